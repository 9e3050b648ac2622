"""The one prompt table shape every loader returns, and the stable train/test split.

Columns: id, text, category, kind, split, source.
- category: the set's own harm category name, kept verbatim (OR-Bench's ten for the built-in set),
  "none" for plainly safe prompts, "uncategorized" for prompts from sets without a category;
- kind: "toxic" (should be refused), "hard" (sounds toxic, is safe) or "safe";
- split: "train" or "test", by a stable hash of the text, so it never depends on row order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from engine.data.schema import KINDS
from engine.errors import ExplorerError

logger = logging.getLogger(__name__)

# The built-in set's taxonomy (OR-Bench's); a study's categories are whatever its data holds.
ORBENCH_CATEGORIES: tuple[str, ...] = (
    "deception",
    "harassment",
    "harmful",
    "hate",
    "illegal",
    "privacy",
    "self-harm",
    "sexual",
    "unethical",
    "violence",
)
NO_CATEGORY = "none"
UNCATEGORIZED = "uncategorized"
SPLITS: tuple[str, ...] = ("train", "test")
PROMPT_COLUMNS: tuple[str, ...] = ("id", "text", "category", "kind", "split", "source")


def prompt_id(text: str) -> str:
    """Stable id of a prompt's text (the same prompt has the same id in every source)."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def stable_split(text: str, test_fraction: float) -> str:
    """'test' for a fixed `test_fraction` of texts chosen by hash, 'train' otherwise."""
    bucket = int(hashlib.sha256(("split:" + text.strip()).encode("utf-8")).hexdigest()[:8], 16)
    return "test" if bucket / 0xFFFFFFFF < test_fraction else "train"


def direction_validation(texts: Iterable[str], fraction: float) -> np.ndarray:
    """Which prompts (a fixed `fraction`, by hash) the directions stage holds out of its train split to
    choose a direction: the tune leaves them out too, so the choice is not measured on tuned prompts."""
    return np.array([stable_split("validation:" + text, fraction) == "test" for text in texts], dtype=bool)


def check_category_names(categories: list[str] | tuple[str, ...], where: str) -> None:
    """Any taxonomy is allowed; a name only has to be a non-empty string, listed once."""
    bad = [c for c in categories if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ExplorerError(f"Empty or non-text category name(s) {bad} in {where}.",
                            "give every category a non-empty name.")
    repeated = sorted({c for c in categories if list(categories).count(c) > 1})
    if repeated:
        raise ExplorerError(f"Category name(s) {repeated} listed twice in {where}.", "list each category once.")


def category_label(category: str) -> str:
    """A category name for display (the store keeps it verbatim): 'chemical_biological' ->
    'chemical biological'."""
    return " ".join(category.replace("_", " ").split())


def normalised_categories(categories: pd.Series) -> pd.Series:
    """Stored category names: trimmed and verbatim; missing or blank -> 'uncategorized'; any
    spelling of 'none' -> 'none' (plainly safe)."""
    names = categories.astype("string").str.strip()
    names = names.mask(names.isna() | (names == ""), UNCATEGORIZED)
    return names.mask(names.str.lower() == NO_CATEGORY, NO_CATEGORY).astype(str)


def make_prompt_table(
    frame: pd.DataFrame, *, source: str, test_fraction: float, where: str
) -> pd.DataFrame:
    """Validate text/category/kind columns and add id, split and source.

    An existing `split` column is kept (sets that ship their own split); otherwise the stable
    hash split is used. Duplicate texts keep their first row.
    """
    missing = [c for c in ("text", "category", "kind") if c not in frame.columns]
    if missing:
        raise ExplorerError(
            f"{where} lacks column(s) {missing}; it has {list(frame.columns)}.",
            "map your columns onto text, category and kind (see engine.data.prompt_sources.ColumnMapping).",
        )
    table = frame.copy()
    table["text"] = table["text"].astype("string").str.strip()
    table = table[table["text"].notna() & (table["text"] != "")]
    if table.empty:
        raise ExplorerError(f"{where} has no prompts.", "check the file and the text column.")
    if blank := len(frame) - len(table):
        logger.info("%s: %d row(s) without a prompt text left out", where, blank)
    table["category"] = normalised_categories(table["category"])
    table["kind"] = table["kind"].astype(str).str.strip().str.lower()
    bad_kinds = sorted(set(table["kind"]) - set(KINDS))
    if bad_kinds:
        raise ExplorerError(
            f"Unknown kind(s) {bad_kinds} in {where}.", f"use one of {', '.join(KINDS)}."
        )
    if "split" not in table.columns:
        table["split"] = [stable_split(t, test_fraction) for t in table["text"]]
    bad_splits = sorted(set(table["split"]) - set(SPLITS))
    if bad_splits:
        raise ExplorerError(f"Unknown split(s) {bad_splits} in {where}.", "use train or test.")
    table["id"] = [prompt_id(t) for t in table["text"]]
    table["source"] = source
    if repeated := int(table["id"].duplicated().sum()):
        logger.info("%s: %d repeated prompt text(s) kept once", where, repeated)
    table = table.drop_duplicates("id", keep="first")
    return table[list(PROMPT_COLUMNS)].reset_index(drop=True).astype(
        {c: "string" for c in PROMPT_COLUMNS}
    )


def seeded_sample(prompts: pd.DataFrame, kind: str, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of at most `n` of `prompts`' rows of `kind`."""
    of_kind = prompts[prompts["kind"] == kind]
    return of_kind.sample(n=min(n, len(of_kind)), random_state=seed)


def seeded_texts(prompts: pd.DataFrame, kind: str, n: int, seed: int) -> list[str]:
    """The texts of `seeded_sample`."""
    return seeded_sample(prompts, kind, n, seed)["text"].tolist()
