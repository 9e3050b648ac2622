"""The command line: documented options, one clear error line and a non-zero exit for bad input."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from precompute.__main__ import main
from precompute.config import parse_config


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "precompute", "run", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for option in ("--config", "--store", "--force"):
        assert option in out
    top = subprocess.run([sys.executable, "-m", "precompute", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(command in top for command in ("run", "tune", "status", "bench"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("config", "message"), [
    (None, "Config file .* does not exist"),
    ("study: x\nmodels: {base: m}\nprompts: {categories: []}\n", "prompts.categories is empty"),
    ("study: x\nmodels: {base: m}\ngeneration: {batch_size: 0}\n", "generation.batch_size = 0 is out of range"),
    ("study: x\nmodels: {base: m}\ntune: {epochs: 99}\n", "tune.epochs = 99 is out of range"),
    ("study: x\nmodels: {base: m}\ngeneration: {beams: 4}\n", "Unknown key\\(s\\) \\['beams'\\]"),
    ("study: x\nmodels: {base: m}\ngeneration: {dtype: float8}\n",
     "generation.dtype = 'float8' is not one of the choices.*auto or float32"),
    ("study: x\nmodels: {base: m}\nsaes: {architecture: gated2}\n",
     "saes.architecture = 'gated2' is not one of the choices.*topk or jumprelu"),
    ("study: x\nmodels: {base: m}\nsaes: {k: 0}\n", "saes.k = 0 is out of range.*use 1-4096"),
    ("study: x\nmodels: {base: m}\nsaes: {model: other, hooks: [blocks.0.hook_resid_pre]}\n",
     "saes.model = 'other' is not one of"),
    ("study: x\nmodels: {base: m}\nsaes: {model: base}\n", "no `directions:` section"),
    ("study: x\nmodels: {base: m}\nsaes: {model: base, pretrained: [{release: r}]}\n", "names no SAE"),
    ("study: x\nmodels: {base: m}\ncircuits: {model: base}\n", "circuits need a `saes:` section"),
    ("study: x\nmodels: {base: m}\ncircuits: {metric: odds}\n",
     "circuits.metric = 'odds' is not one of the choices.*refusal_score or logit_diff"),
    ("study: x\nmodels: {base: m}\ndirections: {filter_by_refusal: sometimes}\n",
     "directions.filter_by_refusal = 'sometimes' is out of range.*true or false"),
    ("study: x\nmodels: {base: m}\ncircuits: {min_prompts: 2}\n", "circuits.min_prompts = 2 is out of range.*4-100000"),
    ("study: x\nmodels: {base: m}\ncircuits: {min_prompts: 60}\n",
     "circuits.min_prompts = 60 is above circuits.max_prompts = 48"),
    ("study: x\nmodels: {base: m}\ncircuits: {edge_threshold: -1}\n",
     "circuits.edge_threshold = -1 is out of range.*>= 0"),
    ("study: x\nmodels: {base: m}\ncircuits: {kinds: [benign]}\n", "circuits.kinds"),
    ("study: x\nmodels: {base: m}\ngeneration: {dtype: auto}\nsaes: {autocast: maybe}\n",
     "saes.autocast = 'maybe' is not one of the choices.*auto"),
    ("study: x\nmodels: {base: m}\ngeneration: {device_map: everywhere}\n",
     "generation.device_map 'everywhere' is not a placement strategy.*auto, balanced"),
    ("study: x\nmodels: {base: m}\ngeneration: {device_map: {model.layers: disk}}\n",
     "generation.device_map entry 'model.layers': 'disk' is not a module path and a device"),
    ("study: x\nmodel: m\n", "Unknown top-level config key"),
    ("study: [unclosed\n", "not valid YAML"),
    ("study: x\nmodels: {base: no-such-model}\n", "Unknown model 'no-such-model'"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, caplog, config, message) -> None:
    path = tmp_path / "missing.yaml" if config is None else _write(tmp_path, config)
    with caplog.at_level(logging.ERROR, logger="precompute"):
        code = main(["run", "--config", str(path), "--store", str(tmp_path / "s.duckdb")])
    assert code == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Fix:" in errors[0].getMessage()
    assert re.search(message, errors[0].getMessage())


def test_corrupt_store_is_reported_and_kept(tmp_path, caplog) -> None:
    store = tmp_path / "s.duckdb"
    store.write_text("not a database")
    config = _write(tmp_path, "study: x\nmodels: {base: m}\n")
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["status", "--config", str(config), "--store", str(store)]) == 2
    assert "not a readable DuckDB store" in caplog.text
    assert store.read_text() == "not a database"


def test_status_reports_missing_stages(tmp_path, caplog) -> None:
    config = _write(tmp_path, "study: x\nmodels: {base: m}\n")
    with caplog.at_level(logging.INFO, logger="precompute"):
        assert main(["status", "--config", str(config), "--store", str(tmp_path / "s.duckdb")]) == 0
    assert "prompts    missing" in caplog.text and "tune       not applicable" in caplog.text


def test_bench_prints_its_figures(tmp_path, caplog, tiny_model_dir) -> None:
    config = _write(tmp_path, f"""
study: tiny
models: {{base: {tiny_model_dir}}}
prompts: {{test_fraction: 0.3}}
generation: {{max_new_tokens: 2, batch_size: 64}}
directions: {{model: base, max_validation_prompts: 4, bootstrap: 10, eval_max_new_tokens: 2,
             prune_last_fraction: 0.0, max_kl: 10.0, filter_by_refusal: false}}  # the random model refuses nothing
""")
    store_path = str(tmp_path / "s.duckdb")
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["bench", "--config", str(config), "--store", store_path]) == 2
    assert "No study store at" in caplog.text
    assert main(["run", "--config", str(config), "--store", store_path]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="precompute"):
        code = main(["bench", "--config", str(config), "--store", store_path, "--new-tokens", "4",
                     "--repeats", "1", "--prompts", "16"])
    assert code == 0
    figures = {line.split("  ")[0].strip(): line for line in caplog.messages}
    assert {"steering: baseline + steered answer", "plain forward", "capture, every layer",
            "capture / plain forward", "peak resident memory", "store: DuckDB file per 1,000 prompts",
            "generation, hook-free twin", "generation, bridged", "generation: twin / bridged"} <= set(figures)
    assert float(figures["capture / plain forward"].split()[4]) > 0  # a figure, never a timed assertion
    assert float(figures["generation: twin / bridged"].split()[4]) > 0


def test_store_size_counts_the_file_partitions_and_saes_apart(tmp_path) -> None:
    from engine.data import store
    from precompute.bench import bench_store, store_size

    path = tmp_path / "study.duckdb"
    run = store.RunRecord(study="study", stage="prompts", models=(), dataset="builtin", config={})
    prompts = pd.DataFrame({"id": [f"p{i}" for i in range(500)], "text": ["Name a fruit"] * 500})
    store.write_stage(path, run=run, input_hash="h", tables={"prompts": prompts})
    partition = tmp_path / "study.shards" / "generate" / "shard-1-of-2"
    partition.mkdir(parents=True)
    prompts.to_parquet(partition / "answers.parquet")
    (tmp_path / "study.saes" / "hash" / "blocks.0.hook_resid_pre").mkdir(parents=True)
    (tmp_path / "study.saes" / "hash" / "blocks.0.hook_resid_pre" / "sae_weights.safetensors").write_bytes(b"0" * 3000)
    (tmp_path / "other.saes").mkdir()  # another study's folder is not counted
    (tmp_path / "other.saes" / "w").write_bytes(b"0" * 10_000)

    size = store_size(path)
    assert (size.n_prompts, size.duckdb, size.saes) == (500, path.stat().st_size, 3000)
    assert size.partitions == (partition / "answers.parquet").stat().st_size
    assert size.per_thousand_prompts(size.saes) == 6000
    config = parse_config({"study": "study", "models": {"base": "m"}}, store_override=path)
    figures = {r.name: r for r in bench_store(config)}
    assert figures["store: SAE folders per 1,000 prompts"].value == pytest.approx(6000 / 2 ** 20)
    assert figures["store: DuckDB file per 1,000 prompts"].unit == "MiB"
    assert "for 500 prompts" in figures["store: shard partitions per 1,000 prompts"].detail
