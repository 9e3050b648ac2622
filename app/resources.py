"""Models and SAEs loaded once per server and shared by every session (see engine.models.LoadedModel.lock)."""

from __future__ import annotations

import streamlit as st
from sae_lens import SAE

from engine.models import LoadedModel, load_model
from engine.saes import load_sae


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(spec: str) -> LoadedModel:
    return load_model(spec)


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=8)
def cached_sae(source: str, sae_id: str | None) -> SAE:
    return load_sae(source, sae_id)
