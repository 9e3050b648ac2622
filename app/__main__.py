"""`python -m app [streamlit options] [-- --store PATH]`: `streamlit run app/main.py` with the libraries
the pages draw with imported before the server accepts a session, so that a reader's first page does
not wait seconds for them, and the landing page's numbers computed for the default store. The model
stack (torch, TransformerLens, SAELens) is imported in the background when a page that runs the model
opens (app.context.warm_model_stack)."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from streamlit.web import cli

PRELOADED = ("pandas", "pyarrow", "duckdb", "altair", "vl_convert", "markdown_it", "app.narrative", "app.report")
logger = logging.getLogger("app")


def warm_landing_page(args: list[str]) -> Path | None:
    """Compute the Findings of the store the app opens by default (`args`: this command's, the script's after
    `--`); returns that store, or None when there is none yet. A store that cannot be read is left to the page,
    which says what is wrong: the server starts either way."""
    from app.context import default_store
    from app.findings import current_findings

    store = default_store(args[args.index("--") + 1:] if "--" in args else [])
    if not store.is_file():
        return None
    try:
        current_findings(store)
    except Exception as exc:  # noqa: BLE001 - the page reports it; starting the server matters more here
        logger.warning("Findings of %s not precomputed (%s); the page will compute them.", store, exc)
        return None
    return store


if __name__ == "__main__":
    for name in PRELOADED:
        importlib.import_module(name)
    warm_landing_page(sys.argv[1:])
    sys.argv = ["streamlit", "run", str(Path(__file__).with_name("main.py")), *sys.argv[1:]]
    sys.exit(cli.main())
