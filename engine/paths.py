"""Where generated artifacts live; overridable so tests and clusters never touch the repo's data/."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


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
