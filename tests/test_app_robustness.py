"""The app against a store that precompute is rewriting, user input and SQL, and where it listens."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

from streamlit.testing.v1 import AppTest

from app.findings import study_findings
from engine.data import store

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "app" / "main.py"
SQL_CALLS = {"execute", "sql", "query", "run_query"}


def _rewrite_rates(path: Path, refused_share: float) -> None:
    rates = store.read_table(path, "refusal_rates").drop(columns="run_id")
    rates["n_refused"] = (rates["n"] * refused_share).round().astype(int)
    run = store.RunRecord(study="tiny", stage="generate", models=("base", "other"), dataset="builtin", config={})
    store.write_stage(path, run=run, input_hash=f"rewrite-{refused_share}", tables={"refusal_rates": rates})


def test_pages_keep_rendering_while_precompute_rewrites_the_store(tiny_store: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    path = tmp_path / "live.duckdb"
    shutil.copy2(tiny_store, path)
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(path))
    shares = [0.0, 0.5] * 4 + [1.0]
    writer = threading.Thread(target=lambda: [_rewrite_rates(path, share) for share in shares])
    writer.start()
    renders = 0
    while writer.is_alive() or renders < 3:
        app = AppTest.from_file(str(MAIN), default_timeout=120).run()
        assert not app.exception and not app.error, (app.exception, app.error)
        renders += 1
    writer.join()
    # After the last swap the page reads the new file, not a cached old one.
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()
    toxic = study_findings(path).refusal_of("other").by_kind["toxic"]
    assert toxic.refused == toxic.n
    assert {m.label: m.value for m in app.metric}["Toxic prompts refused (other)"] == "100%"


def _sql_arguments_built_from_strings(source: str) -> list[int]:
    """Lines where an SQL call's first argument is an f-string, a concatenation or .format()."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            first = node.args[0] if name != "query" else (node.args[1] if len(node.args) > 1 else node.args[0])
            built = isinstance(first, ast.JoinedStr | ast.BinOp) or (
                isinstance(first, ast.Call) and isinstance(first.func, ast.Attribute) and first.func.attr == "format")
            if name in SQL_CALLS and built:
                lines.append(node.lineno)
    return lines


def test_user_input_reaches_sql_only_as_parameters() -> None:
    assert _sql_arguments_built_from_strings('con.execute(f"SELECT * FROM t WHERE x = {value}")') == [1]
    assert _sql_arguments_built_from_strings('queries.query(store, "SELECT " + column)') == [1]
    assert _sql_arguments_built_from_strings("queries.query(store, queries.RATES_SQL, (kind,))") == []
    offenders = {str(path.relative_to(REPO)): lines for path in sorted((REPO / "app").rglob("*.py"))
                 if (lines := _sql_arguments_built_from_strings(path.read_text(encoding="utf-8")))}
    assert offenders == {}
    from app import queries

    constants = {name: value for name, value in vars(queries).items() if name.endswith("_SQL")}
    assert constants and all(isinstance(value, str) for value in constants.values())


def test_server_listens_on_localhost_unless_asked() -> None:
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["server"]["address"] == "localhost"
    assert config["runner"]["postScriptGC"] is False  # a full GC per rerun was most of each interaction
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "ADDRESS ?= localhost" in makefile and "--server.address $(ADDRESS)" in makefile



def test_stored_result_modules_import_no_model_or_scipy_stack() -> None:
    # Each of these costs seconds on a page's first load; only live generation and encoding need them.
    check = ("import sys, importlib\n"
             "for name in ('app.findings', 'app.narrative', 'app.figures', 'app.charts', 'app.components', "
             "'app.queries', 'app.report', 'app.export', 'app.context', 'engine.steering.limits'): "
             "importlib.import_module(name)\n"
             "print(','.join(m for m in ('torch', 'scipy.stats', 'statsmodels', 'transformer_lens', 'sae_lens') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == ""
