"""Models and SAEs loaded once per server and shared by every session (see engine.runtime.models.LoadedModel.lock)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from sae_lens import SAE

from app import queries
from engine.errors import ExplorerError
from engine.runtime.models import LoadedModel, load_model, resolve_dtype
from engine.saes.training import load_sae


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(spec: str, dtype: str) -> LoadedModel:
    return load_model(spec, dtype=resolve_dtype(dtype))


def study_model(store: Path, role: str) -> LoadedModel:
    """The model a study calls `role`, in the precision the study ran it."""
    spec = queries.query(store, queries.MODEL_SPEC_SQL, (role,))["model_spec"].iloc[0]
    if spec is None:
        raise ExplorerError(f"The store does not say which model {role!r} is.",
                            "rebuild the store with `python -m precompute run`.")
    return cached_model(spec, queries.query(store, queries.STUDY_DTYPE_SQL)["dtype"].iloc[0])


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=8)
def cached_sae(source: str, sae_id: str | None) -> SAE:
    return load_sae(source, sae_id)
