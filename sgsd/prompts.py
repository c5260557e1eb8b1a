"""Prompt templates and chat rendering (owned by the data/prompts work; see issue 4).

`render_chat` is the one place where chat templates are applied, so that the
generator and the scorer see exactly the same prompt tokens.
"""

from __future__ import annotations


def render_chat(tokenizer, messages, enable_thinking: bool = False) -> str:
    """Render chat `messages` (a user string or a list of {role, content}) with the tokenizer's
    chat template, ending with the assistant generation header."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
