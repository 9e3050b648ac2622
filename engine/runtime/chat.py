"""Chat formatting comes from the tokenizer's own chat template, never from a hand-written one."""

from __future__ import annotations

from typing import Any


def chat_prompt(tokenizer: Any, instruction: str) -> str:
    """The instruction as one user turn, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def end_of_turn(tokenizer: Any) -> str:
    """Text that closes an assistant turn (the template's end-of-turn, else the EOS token)."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ANSWER"}],
        tokenize=False,
    )
    closing = probe.split("ANSWER", 1)[1]
    return closing.rstrip("\n") or tokenizer.eos_token
