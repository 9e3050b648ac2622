"""`python -m precompute report` on a built store, and the docs kept honest: every documented
`python -m precompute` command still parses, every relative link resolves, the README stays short."""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from engine.data import store
from engine.data.paths import REPO_ROOT
from precompute.__main__ import build_parser, main
from precompute.config import parse_config

README = REPO_ROOT / "README.md"
DOCS = (README, *sorted((REPO_ROOT / "docs").glob("*.md")))
COMMAND = re.compile(r"python -m precompute(?![.\w])([^`\n#]*)")  # not precompute.demo
SHELL_OPERATORS = frozenset({">", ">>", "|", "&&", ";", "2>&1"})
LINK = re.compile(r"\]\(([^)#\s]+)")
README_MAX_BYTES = 10_000


def _report(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["report", "--store", str(path)]) == 0
    return capsys.readouterr().out


def test_report_carries_the_stores_numbers(tiny_store: Path, capsys) -> None:
    text = _report(tiny_store, capsys)
    rates = store.read_table(tiny_store, "refusal_rates").query("model == 'other' and kind == 'toxic'")
    refused, n = int(rates["n_refused"].sum()), int(rates["n"].sum())
    assert re.search(rf"\| toxic refused: other +\| {refused / n:.0%} \({refused}/{n}; 95% CI", text)
    held_out = store.read_table(tiny_store, "evaluation_rates").iloc[0]
    assert f"({held_out['n_refused']}/{held_out['n']}; 95% CI" in text and held_out["set"] in text
    for sae in store.read_table(tiny_store, "saes").itertuples():
        assert re.search(rf"\| {re.escape(sae.hook)} .*\| {sae.ce_loss_recovered:.3f} +\|", text)
    for verdict in store.read_table(tiny_store, "circuit_verdicts").itertuples():
        assert re.search(rf"\| verdict \({verdict.kind}\) +\| {verdict.label} ", text)
        assert f"{verdict.ratio:.2f} [{verdict.ratio_low:.2f}, {verdict.ratio_high:.2f}]" in text
    assert "## Replication" not in text  # `precompute replicate` has not run on this store
    for point in store.read_table(tiny_store, "ablation_tradeoff").itertuples():
        assert f"| {point.source} {point.size:g} " in text
        assert f"{point.mean_kl:.3f} [{point.kl_low:.3f}, {point.kl_high:.3f}]" in text
    backup = text.split("## Backup features")[1].split("\n## ")[0]
    for row in store.read_table(tiny_store, "backup_recovery").itertuples():
        assert f"{row.metric_before:.2f} -> {row.metric_after:.2f}" in backup
    addition = text.split("## Addition strength")[1].split("\n## ")[0]
    for row in store.read_table(tiny_store, "addition_tradeoff").itertuples():
        assert f"({row.n_refused}/{row.n};" in addition
    harm = text.split("## Harm recognition versus refusal")[1].split("\n## ")[0]
    cosines = store.read_table(tiny_store, "category_cosines").query("category_a < category_b")
    for variant, pairs in cosines.groupby("variant"):
        assert re.search(rf"\| {re.escape(str(variant))} +\| {len(pairs)} +\| {pairs['cosine'].median():.2f} ", harm)
    specificity = store.read_table(tiny_store, "cross_ablation_specificity").iloc[0]
    assert f"{specificity.difference:.2f} [{specificity.ci_low:.2f}, {specificity.ci_high:.2f}]" in harm
    independence = text.split("## Independence of refusal directions")[1].split("\n## ")[0]
    for cell in store.read_table(tiny_store, "direction_independence").itertuples():
        assert f"{cell.dependence:.2f} [{cell.ci_low:.2f}, {cell.ci_high:.2f}]" in independence


def test_report_shows_the_replication_table_when_stored(tiny_store: Path, tmp_path: Path, capsys) -> None:
    from precompute.replicate import REPLICATION_TABLE, VERDICT_COLUMNS

    path = tmp_path / "replicated.duckdb"
    shutil.copy(tiny_store, path)
    verdicts = store.read_table(path, "circuit_verdicts")[VERDICT_COLUMNS]
    # Seed 1 disagrees with the study everywhere, so no verdict replicates.
    disagreeing = verdicts.assign(label=verdicts["label"].map(lambda label: "monolithic" if label == "modular"
                                                              else "modular"))
    table = pd.concat([verdicts.assign(seed=0, study="tiny"), disagreeing.assign(seed=1, study="tiny-seed1")],
                      ignore_index=True)
    run = store.RunRecord(study="tiny", stage="replicate", models=("m",), dataset="", config={})
    store.write_stage(path, run=run, input_hash="seeds=2", tables={REPLICATION_TABLE: table})
    section = _report(path, capsys).split("## Replication", 1)[1]
    toxic = table.query("kind == 'toxic'")["label"].tolist()
    assert f"- toxic: not replicated over 2 seeds ({toxic[0]}, {toxic[1]})" in section
    assert re.search(rf"\| toxic +\| 1 +\| {toxic[1]} ", section)


def test_a_missing_store_is_one_error_and_a_nonzero_exit(tmp_path: Path, caplog) -> None:
    missing = tmp_path / "nowhere.duckdb"
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["report", "--store", str(missing)]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "does not exist" in errors[0] and "Fix:" in errors[0]
    process = subprocess.run([sys.executable, "-m", "precompute", "report", "--store", str(missing)],
                             check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    assert process.returncode == 2 and process.stdout == "" and "does not exist" in process.stderr


def _documented_commands() -> list[tuple[str, str]]:
    """(file, arguments) for every `python -m precompute ...` in the README and docs/, cut at a shell operator."""
    found = []
    for doc in DOCS:
        for match in COMMAND.finditer(doc.read_text(encoding="utf-8")):
            words = shlex.split(match.group(1))
            if not words:  # the CLI named in prose, not a command line that could go stale
                continue
            cut = next((i for i, word in enumerate(words) if word in SHELL_OPERATORS), len(words))
            found.append((doc.name, shlex.join(words[:cut])))
    return list(dict.fromkeys(found))


def test_the_docs_document_commands() -> None:
    files = {name for name, _ in _documented_commands()}
    assert {"README.md", "methods.md", "cluster.md"} <= files


@pytest.mark.parametrize(("doc", "arguments"), _documented_commands())
def test_every_documented_command_parses(doc: str, arguments: str, capsys) -> None:
    try:
        build_parser().parse_args(shlex.split(arguments))
    except SystemExit as exc:  # --help exits 0; an unknown command or option exits 2
        assert exc.code == 0, f"{doc}: `python -m precompute {arguments}` no longer parses: {capsys.readouterr().err}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_relative_link_resolves(doc: Path) -> None:
    targets = [target for target in LINK.findall(doc.read_text(encoding="utf-8")) if "://" not in target]
    missing = [target for target in targets if not (doc.parent / target).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_readme_config_example_parses() -> None:
    """The README's study config is one parse_config accepts (the keys and sections are real)."""
    example = re.search(r"```yaml\n(study:.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert example, "README.md has no ```yaml block starting with study:"
    config = parse_config(yaml.safe_load(example.group(1)))
    assert config.circuits is not None and config.circuits.model in config.models


def test_readme_is_at_most_10000_bytes() -> None:
    assert len(README.read_bytes()) <= README_MAX_BYTES
