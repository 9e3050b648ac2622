"""`python -m app [streamlit options] [-- --store PATH]`: `streamlit run app/main.py` with the libraries
the pages draw with imported before the server accepts a session, so that a reader's first page does
not wait seconds for them. The model stack (torch, TransformerLens, SAELens) is imported in the
background when a page that runs the model opens (app.context.warm_model_stack)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from streamlit.web import cli

PRELOADED = ("pandas", "pyarrow", "duckdb", "altair", "vl_convert", "markdown_it")

if __name__ == "__main__":
    for name in PRELOADED:
        importlib.import_module(name)
    sys.argv = ["streamlit", "run", str(Path(__file__).with_name("main.py")), *sys.argv[1:]]
    sys.exit(cli.main())
