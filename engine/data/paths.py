"""Where generated artifacts live; overridable so tests and clusters never touch the repo's data/."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """Root for generated artifacts (models, stores, caches): $REFUSAL_EXPLORER_DATA or ./data."""
    return Path(os.environ.get("REFUSAL_EXPLORER_DATA", REPO_ROOT / "data"))


def models_dir() -> Path:
    return data_dir() / "models"


def stores_dir() -> Path:
    return data_dir() / "stores"


def cache_dir() -> Path:
    return data_dir() / "cache"


BUILTIN_PROMPTS = REPO_ROOT / "data" / "prompts" / "builtin.csv"
BALANCED_PROMPTS = REPO_ROOT / "data" / "prompts" / "builtin_balanced.csv"


def public_dataset_dir(name: str) -> Path | None:
    """A local copy of a public prompt set's folder (e.g. refusal_direction), if one is here:
    $REFUSAL_EXPLORER_DATASETS/<name>, else a `datasets/<name>` folder in ../shared beside the repo
    (this project's machines keep the public sets there). None: the loader downloads it."""
    roots = [Path(os.environ["REFUSAL_EXPLORER_DATASETS"])] if os.environ.get("REFUSAL_EXPLORER_DATASETS") else []
    roots.append(REPO_ROOT.parent / "shared" / "datasets")
    return next((root / name for root in roots if (root / name).is_dir()), None)
