"""A token corpus of chat transcripts (prompt plus answer) for training and reading SAEs.

The prompt part is tokenized on its own and the answer appended, so the prompt's positions are
the same as when the prompt is run alone: a feature's activation at the first response position
of a transcript is its activation where the model decides to refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.runtime.chat import chat_prompt


@dataclass(frozen=True)
class ChatCorpus:
    sequences: list[list[int]]  # token ids per transcript
    prompt_lengths: np.ndarray  # tokens in each transcript's chat-formatted prompt
    tokens: list[list[str]]  # each token as text, for display

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def chat_sequences(tokenizer, instructions: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each transcript (one user turn, then the answer; empty: the prompt alone) and
    each one's prompt length."""
    sequences, lengths = [], []
    for instruction, response in zip(instructions, responses, strict=True):
        prompt_ids = tokenizer(chat_prompt(tokenizer, instruction), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
        sequences.append(list(prompt_ids) + list(answer_ids))
        lengths.append(len(prompt_ids))
    return sequences, np.array(lengths, dtype=np.int64)


def chat_corpus(tokenizer, instructions: Sequence[str], responses: Sequence[str]) -> ChatCorpus:
    """`chat_sequences` plus every token as text."""
    sequences, lengths = chat_sequences(tokenizer, instructions, responses)
    vocabulary = {i: tokenizer.decode([i]) for i in {t for s in sequences for t in s}}
    return ChatCorpus(sequences, lengths, [[vocabulary[t] for t in s] for s in sequences])
