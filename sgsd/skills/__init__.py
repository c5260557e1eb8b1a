"""The skill bank and everything around it.

bank.py       schema, validation, atomic IO, snapshots, `load_bank("builtin:starter" | path)`
retrieval.py  embedder, rank-paired top-K retrieval, teacher weights (Eqs. 2, 6)
parse.py      robust parsing of model output into validated items
build.py      cold start (Alg. 2)
merge.py      hierarchical merge (Alg. 3)
evolve.py     online evolution (Alg. 4)
ledger.py     per-entry teacher outcomes during training (Table 2 categories)
"""

from sgsd.skills.bank import CommonMistake, GeneralSkill, SkillBank, load_bank

__all__ = ["CommonMistake", "GeneralSkill", "SkillBank", "load_bank"]
