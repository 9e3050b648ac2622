"""The surface form of a prompt: how it asks, apart from what it asks for.

A model tuned on harmful prompts that are phrased one way and harmless ones phrased another can
learn to refuse the phrasing instead of the harm. These functions name a prompt's form (its
opening word and sentence type), measure how alike two prompt sets are in form, and draw a
benign sample whose form matches a harmful one. Torch-free.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import pandas as pd

SentenceType = Literal["question", "first_person", "imperative"]
SENTENCE_TYPES: tuple[SentenceType, ...] = ("question", "first_person", "imperative")

QUESTION_OPENERS = frozenset({
    "how", "what", "what's", "whats", "why", "which", "who", "whom", "whose", "where", "when", "is", "are",
    "can", "could", "should", "would", "will", "do", "does", "did", "am", "was", "were", "may", "might",
    "has", "have", "shall",
})
FIRST_PERSON_OPENERS = frozenset({"i", "i'm", "im", "i've", "i'd", "i'll", "my", "we", "we're", "our", "me"})
_WORD = re.compile(r"[A-Za-z']+")


def opener(text: str) -> str:
    """The first word, lower-cased, curly apostrophes straightened ('' for a text without words)."""
    match = _WORD.search(text.replace("\u2019", "'"))
    return match.group(0).lower() if match else ""


def sentence_type(text: str) -> SentenceType:
    """question (opens with a question word or ends with '?'), first_person (opens with I/my/we),
    else imperative (an instruction: "Write ...", "Help me ...")."""
    first = opener(text)
    if first in FIRST_PERSON_OPENERS:
        return "first_person"
    if first in QUESTION_OPENERS or text.rstrip().endswith("?"):
        return "question"
    return "imperative"


@dataclass(frozen=True)
class FormBalance:
    """How alike two prompt sets are in form (0 = identical shares)."""

    type_shares: pd.DataFrame  # sentence_type x {a, b}: share of each set
    max_type_gap: float  # largest |share_a - share_b| over sentence types
    opener_distance: float  # total variation distance between the two opener distributions
    n_a: int
    n_b: int


def _shares(values: Iterable[str]) -> pd.Series:
    counts = Counter(values)
    total = sum(counts.values())
    return pd.Series({key: count / total for key, count in counts.items()}, dtype=float)


def form_balance(texts_a: Sequence[str], texts_b: Sequence[str]) -> FormBalance:
    """Sentence-type shares and opener distance between two prompt sets."""
    types = pd.DataFrame({
        "a": _shares(sentence_type(t) for t in texts_a),
        "b": _shares(sentence_type(t) for t in texts_b),
    }).reindex(list(SENTENCE_TYPES)).fillna(0.0)
    openers = pd.DataFrame({"a": _shares(map(opener, texts_a)), "b": _shares(map(opener, texts_b))}).fillna(0.0)
    return FormBalance(
        type_shares=types,
        max_type_gap=float((types["a"] - types["b"]).abs().max()),
        opener_distance=float(0.5 * (openers["a"] - openers["b"]).abs().sum()),
        n_a=len(texts_a),
        n_b=len(texts_b),
    )


def matched_sample(targets: Sequence[str], pool: Sequence[str], n: int, seed: int,
                   already: Sequence[str] = ()) -> np.ndarray:
    """Indices of `n` distinct `pool` texts chosen so that `already` plus them follow the openers of
    `targets`: each draw takes the opener furthest below its share in `targets` that the pool still
    has, else the sentence type furthest below its share, else any text. Seeded; sorted."""
    rng = np.random.default_rng(seed)
    pool_openers = np.array([opener(t) for t in pool], dtype=object)
    pool_types = np.array([sentence_type(t) for t in pool], dtype=object)
    free = np.ones(len(pool), dtype=bool)
    wanted_openers, wanted_types = _shares(map(opener, targets)), _shares(sentence_type(t) for t in targets)
    have_openers, have_types = Counter(map(opener, already)), Counter(sentence_type(t) for t in already)
    chosen: list[int] = []
    for drawn in range(min(n, len(pool))):
        total = len(already) + drawn + 1
        candidates = None
        for wanted, have, labels in ((wanted_openers, have_openers, pool_openers),
                                     (wanted_types, have_types, pool_types)):
            # The shares' index holds the openers / sentence types (str; the stubs say Hashable).
            gaps = pd.Series({key: share * total - have[cast(str, key)] for key, share in wanted.items()
                              if (free & (labels == key)).any()}, dtype=float)
            if len(gaps) and gaps.max() > 0:
                best = gaps[gaps == gaps.max()].index
                candidates = free & (labels == best[int(rng.integers(len(best)))])
                break
        pick = int(rng.choice(np.flatnonzero(free if candidates is None else candidates)))
        free[pick] = False
        chosen.append(pick)
        have_openers[pool_openers[pick]] += 1
        have_types[pool_types[pick]] += 1
    return np.sort(np.array(chosen, dtype=np.int64))
