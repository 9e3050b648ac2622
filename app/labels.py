"""Labels the app's pages show that code outside a page also needs (the app benchmark and the browser tests
open these tabs). Plain constants: importing this module runs no page and imports neither Streamlit nor torch."""

from __future__ import annotations

# Features: one feature's dashboard, the table of all features, the SAE's quality (app/views/features.py).
FEATURES_TABS = ("Feature dashboard", "All features", "SAE quality and refusal-aligned features")
FEATURE_DASHBOARD, ALL_FEATURES, SAE_QUALITY = FEATURES_TABS

# Circuits: the page's sections, and the views of one category's circuit (app/views/circuits.py).
CIRCUITS_TABS = ("Verdict and similarity", "One category's circuit", "Heads and MLPs")
CIRCUIT_VERDICT, CATEGORY_CIRCUIT, HEADS_AND_MLPS = CIRCUITS_TABS
CIRCUIT_CATEGORY_TABS = ("Graph and nodes", "Faithfulness against size", "Shared core and tail", "Attention heads")
