"""Loaders for prompt sets, each returning the one prompt table shape (engine.prompts).

A small registry maps a source `type` (as written in a study config) to its loader:
builtin, orbench, refusal_direction, advbench, table (any CSV/JSONL with a column mapping).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from engine.errors import ExplorerError
from engine.paths import BALANCED_PROMPTS, BUILTIN_PROMPTS, cache_dir, public_dataset_dir
from engine.prompts import NO_CATEGORY, UNCATEGORIZED, make_prompt_table

ORBENCH_REPO = "bench-llm/or-bench"
# OR-Bench's three files: the 80k and hard-1k sets are safe prompts that look toxic.
ORBENCH_FILES: dict[str, str] = {
    "or-bench-80k.csv": "hard",
    "or-bench-hard-1k.csv": "hard",
    "or-bench-toxic.csv": "toxic",
}
# refusal_direction's harmful splits carry HarmBench-style categories; map the ones that have an
# OR-Bench counterpart, keep the rest apart rather than guess.
REFUSAL_DIRECTION_CATEGORIES: dict[str, str] = {
    "illegal": "illegal",
    "harmful": "harmful",
    "harassment_bullying": "harassment",
    "misinformation_disinformation": "deception",
}


def read_table_file(path: Path) -> pd.DataFrame:
    """Read a CSV, JSON list or JSONL file, turning parser failures into one clear error."""
    if not path.is_file():
        raise ExplorerError(f"Prompt file {path} does not exist.", "check the path in the config.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise ExplorerError(
            f"Malformed {suffix[1:].upper()} file {path}: {str(exc).splitlines()[0]}",
            "fix the file (quote fields that contain commas or newlines; UTF-8 encoding).",
        ) from exc
    raise ExplorerError(f"Unsupported prompt file type {path.name}.", "use .csv, .json or .jsonl.")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold the text, category, kind and split; constants where a column is absent."""

    text: str = "text"
    category: str | None = None
    kind: str | None = None
    split: str | None = None
    default_category: str = UNCATEGORIZED
    default_kind: str = "toxic"


def load_table(
    path: str | Path,
    mapping: ColumnMapping | None = None,
    *,
    source: str | None = None,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """Any CSV/JSON/JSONL prompt file, mapped onto the prompt table."""
    path = Path(path)
    mapping = mapping or ColumnMapping()
    raw = read_table_file(path)
    where = str(path)
    wanted = [c for c in (mapping.text, mapping.category, mapping.kind, mapping.split) if c]
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise ExplorerError(
            f"{where} lacks column(s) {missing}; it has {list(raw.columns)}.",
            "fix the column mapping in the config (text/category/kind/split) or the file header.",
        )
    frame = pd.DataFrame({"text": raw[mapping.text]})
    frame["category"] = raw[mapping.category] if mapping.category else mapping.default_category
    frame["kind"] = raw[mapping.kind] if mapping.kind else mapping.default_kind
    if mapping.split:
        frame["split"] = raw[mapping.split]
    return make_prompt_table(
        frame, source=source or path.stem, test_fraction=test_fraction, where=where
    )


BUILTIN_VARIANTS: dict[str, Path] = {"original": BUILTIN_PROMPTS, "balanced": BALANCED_PROMPTS}


def load_builtin(test_fraction: float = 0.3, variant: str = "original") -> pd.DataFrame:
    """The project's own prompt set: ten OR-Bench categories x toxic/hard, plus safe prompts.
    `balanced`: the same set with the safe prompts phrased like the toxic ones (same openers)."""
    if variant not in BUILTIN_VARIANTS:
        raise ExplorerError(f"Unknown built-in prompt set variant {variant!r}.",
                            f"use one of {', '.join(BUILTIN_VARIANTS)}.")
    return load_table(
        BUILTIN_VARIANTS[variant],
        ColumnMapping(category="category", kind="kind"),
        source="builtin",
        test_fraction=test_fraction,
    )


def _orbench_file(location: str, filename: str) -> Path:
    if location == "hub":
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(ORBENCH_REPO, filename, repo_type="dataset"))
        except Exception as exc:  # the hub client raises many types; all mean "not reachable"
            raise ExplorerError(
                f"Could not fetch {filename} from the hub dataset {ORBENCH_REPO}: {exc}",
                "download OR-Bench's CSVs and set `location:` to their folder.",
            ) from exc
    return Path(location) / filename


def load_orbench(
    location: str = "hub",
    files: tuple[str, ...] = tuple(ORBENCH_FILES),
    *,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """OR-Bench's CSVs (`prompt,category`) from a local folder or from the hub."""
    unknown = sorted(set(files) - set(ORBENCH_FILES))
    if unknown:
        raise ExplorerError(
            f"Unknown OR-Bench file(s) {unknown}.", f"use some of {', '.join(ORBENCH_FILES)}."
        )
    tables = [
        load_table(
            _orbench_file(location, name),
            ColumnMapping(text="prompt", category="category", default_kind=ORBENCH_FILES[name]),
            source=name.removesuffix(".csv"),
            test_fraction=test_fraction,
        )
        for name in files
    ]
    return pd.concat(tables).drop_duplicates("id", keep="first").reset_index(drop=True)


REFUSAL_DIRECTION_URL = "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset/splits/{}.json"
REFUSAL_DIRECTION_FILES: dict[str, tuple[str, str]] = {  # file stem -> (kind, split)
    "harmful_train": ("toxic", "train"),
    "harmful_val": ("toxic", "test"),
    "harmless_train": ("safe", "train"),
    "harmless_val": ("safe", "test"),
}


def refusal_direction_file(folder: str | Path, stem: str) -> Path:
    """One of refusal_direction's split files: in `folder`, or with folder `auto` in a local copy
    (engine.paths.public_dataset_dir) else downloaded once from the project's GitHub repository."""
    if str(folder) != "auto":
        return Path(folder) / f"{stem}.json"
    local = public_dataset_dir("refusal_direction")
    if local is not None:
        return local / f"{stem}.json"
    target = cache_dir() / "datasets" / "refusal_direction" / f"{stem}.json"
    if not target.is_file():
        import urllib.request

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        try:
            urllib.request.urlretrieve(REFUSAL_DIRECTION_URL.format(stem), partial)
        except OSError as exc:
            raise ExplorerError(
                f"Could not download refusal_direction's {stem}.json: {exc}",
                "download dataset/splits/ from github.com/andyrdt/refusal_direction and set `folder:` to it "
                "(or $REFUSAL_EXPLORER_DATASETS to the folder holding refusal_direction/).",
            ) from exc
        partial.replace(target)
    return target


def load_refusal_direction(
    folder: str | Path = "auto",
    *,
    files: tuple[str, ...] = tuple(REFUSAL_DIRECTION_FILES),
    max_per_file: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """refusal_direction's JSON splits: harmful_* are toxic, harmless_* are safe; val -> test.
    `max_per_file` keeps each file's first rows, `sample` a seeded random sample of each file."""
    unknown = sorted(set(files) - set(REFUSAL_DIRECTION_FILES))
    if unknown:
        raise ExplorerError(f"Unknown refusal_direction file(s) {unknown}.",
                            f"use some of {', '.join(REFUSAL_DIRECTION_FILES)}.")
    tables = []
    for stem in files:
        kind, split = REFUSAL_DIRECTION_FILES[stem]
        path = refusal_direction_file(folder, stem)
        raw = read_table_file(path)
        if "instruction" not in raw.columns:
            raise ExplorerError(
                f"{path} lacks the 'instruction' field.",
                "use the files from refusal_direction's dataset/splits/ folder.",
            )
        raw = raw.head(max_per_file) if max_per_file else raw
        if sample is not None and sample < len(raw):
            raw = raw.sample(n=sample, random_state=seed).sort_index()
        categories = raw.get("category", pd.Series([None] * len(raw)))
        default = UNCATEGORIZED if kind == "toxic" else NO_CATEGORY
        frame = pd.DataFrame(
            {
                "text": raw["instruction"].to_numpy(),
                "category": [REFUSAL_DIRECTION_CATEGORIES.get(c, default) for c in categories],
                "kind": kind,
                "split": split,
            }
        )
        tables.append(
            make_prompt_table(
                frame, source=f"refusal_direction/{path.stem}", test_fraction=test_fraction, where=str(path),
            )
        )
    return pd.concat(tables).drop_duplicates("id", keep="first").reset_index(drop=True)


def load_advbench(path: str | Path, *, test_fraction: float = 0.3) -> pd.DataFrame:
    """AdvBench's harmful_behaviors.csv (`goal,target`): every goal is a toxic prompt."""
    return load_table(
        path, ColumnMapping(text="goal"), source="advbench", test_fraction=test_fraction
    )


PROMPT_SOURCES: dict[str, Callable[..., pd.DataFrame]] = {
    "builtin": load_builtin,
    "orbench": load_orbench,
    "refusal_direction": load_refusal_direction,
    "advbench": load_advbench,
    "table": load_table,
}


def load_prompt_source(spec: dict[str, Any], *, test_fraction: float) -> pd.DataFrame:
    """Load one `{type: ..., **options}` entry of a study config's `prompts.sources` list."""
    options = dict(spec)
    kind = options.pop("type", None)
    if kind not in PROMPT_SOURCES:
        raise ExplorerError(
            f"Unknown prompt source type {kind!r}.", f"use one of {', '.join(PROMPT_SOURCES)}."
        )
    if kind == "table" and isinstance(options.get("mapping"), dict):
        options["mapping"] = ColumnMapping(**options["mapping"])
    if kind in ("orbench", "refusal_direction") and "files" in options:
        options["files"] = tuple(options["files"])
    try:
        return PROMPT_SOURCES[kind](**options, test_fraction=test_fraction)
    except TypeError as exc:
        raise ExplorerError(
            f"Bad options for prompt source {kind!r}: {exc}.",
            "see the loader's arguments in engine/prompt_sources.py.",
        ) from exc
