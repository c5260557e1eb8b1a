"""sgsd: Skill-Conditioned Gated Self-Distillation for LLM reasoning.

Importing this package is cheap: submodules that need torch or transformers are
imported only where they are used.
"""

__version__ = "0.1.0"
