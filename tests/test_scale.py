"""OR-Bench scale without a GPU: 80,000 prompts through `generate` in 8 shards of a tiny model,
merged into one store, and the app's Overview and Prompts queries timed on it."""

from __future__ import annotations

import logging
import re
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import queries
from engine.data import store
from engine.data.paths import BUILTIN_PROMPTS
from engine.data.prompts import KINDS
from engine.data.prompts import ORBENCH_CATEGORIES as CATEGORIES
from precompute import pipeline
from precompute.config import parse_config
from precompute.shards import ShardSpec
from precompute.stages import STAGES

logger = logging.getLogger(__name__)

N_PROMPTS = 80_000
N_SHARDS = 8
QUERY_BUDGET_SECONDS = 0.3  # the target for every app query on the merged store


def synthetic_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """n distinct prompts of 6-14 words from the built-in set's vocabulary (words the tiny model
    knows), spread evenly over the 10 categories x 3 kinds."""
    words = sorted(set(re.findall(r"[A-Za-z]+", BUILTIN_PROMPTS.read_text(encoding="utf-8"))))
    rng = np.random.default_rng(seed)
    texts: set[str] = set()
    while len(texts) < n:
        lengths = rng.integers(6, 15, size=n)
        texts.update(" ".join(rng.choice(words, size=k)) + "?" for k in lengths)
    groups = [(category, kind) for category in CATEGORIES for kind in KINDS]
    frame = pd.DataFrame({"text": sorted(texts)[:n]})
    frame["category"], frame["kind"] = zip(*(groups[i % len(groups)] for i in range(n)), strict=True)
    frame.to_csv(path, index=False)
    return path


def _timed(path: Path, sql: str, params: list, repeats: int = 5) -> tuple[float, float]:
    """(first, median) seconds of a query on a fresh read-only connection, as the app runs it."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        with store.reading(path) as con:
            con.execute(sql, params).fetchall()
        seconds.append(time.perf_counter() - started)
    return seconds[0], statistics.median(seconds)


@pytest.mark.slow
def test_80k_prompts_in_8_shards_merge_into_a_fast_store(tmp_path, tiny_model_dir) -> None:
    started = time.perf_counter()
    prompt_file = synthetic_prompts(tmp_path / "prompts.csv", N_PROMPTS)
    config = parse_config({
        "study": "scale", "store": str(tmp_path / "scale.duckdb"),
        "models": {"base": str(tiny_model_dir)},
        "prompts": {"sources": [{"type": "table", "path": str(prompt_file),
                                 "mapping": {"category": "category", "kind": "kind"}}]},
        "generation": {"max_new_tokens": 1, "batch_size": 500, "chunk_size": 5000, "splits": ["train", "test"]},
    })
    for k in range(1, N_SHARDS + 1):
        assert pipeline.run_shard(config, STAGES, ShardSpec(k, N_SHARDS))[-1].status == "ran"
    sharded = time.perf_counter()
    reports = pipeline.merge_shards(config, STAGES, N_SHARDS, rerun="run --shard {shard}")
    assert reports[-1].status == "merged"
    merged = time.perf_counter()

    with store.reading(config.store) as con:
        assert con.execute("SELECT count(*) FROM prompts").fetchone() == (N_PROMPTS,)
        assert con.execute("SELECT count(*), count(DISTINCT prompt_id) FROM generations").fetchone() == (
            N_PROMPTS, N_PROMPTS)
        assert con.execute("SELECT count(*) FROM generations g ANTI JOIN prompts p ON g.prompt_id = p.id"
                           ).fetchone() == (0,)
        assert con.execute("SELECT count(*), sum(n) FROM refusal_rates").fetchone() == (30, N_PROMPTS)

    test_id = store.read_table(config.store, "prompts")["id"].iloc[12345]
    app_queries = {  # the Overview and Prompts pages' queries, with the Prompts page's default filters
        "PROMPT_COUNTS_SQL": (queries.PROMPT_COUNTS_SQL, []),
        "RATES_SQL": (queries.RATES_SQL, []),
        "AGREEMENT_SQL": (queries.AGREEMENT_SQL, []),
        "MODELS_SQL": (queries.MODELS_SQL, []),
        "REFUSAL_TOKENS_SQL": (queries.REFUSAL_TOKENS_SQL, []),
        "RATE_TOTALS_SQL": (queries.RATE_TOTALS_SQL, []),
        "CATEGORIES_SQL": (queries.CATEGORIES_SQL, []),
        "BROWSE_SQL": (queries.BROWSE_SQL, [list(CATEGORIES), list(KINDS), ["test"], "", 500]),
        "BROWSE_SQL (all splits, search)": (queries.BROWSE_SQL, [list(CATEGORIES), list(KINDS), ["train", "test"],
                                                                  "help", 500]),
        "PROMPT_GENERATIONS_SQL": (queries.PROMPT_GENERATIONS_SQL, [test_id]),
    }
    timings = {name: _timed(config.store, sql, params) for name, (sql, params) in app_queries.items()}
    report = "\n".join(f"  {name:<34} first {first * 1000:6.1f} ms, median {median * 1000:6.1f} ms"
                       for name, (first, median) in timings.items())
    summary = (f"80k scale: {N_SHARDS} shards {sharded - started:.0f} s, merge {merged - sharded:.0f} s, "
               f"store {config.store.stat().st_size / 1e6:.1f} MB; app queries on the merged store:\n{report}")
    logger.info(summary)
    print(summary)
    slow = {name: median for name, (_, median) in timings.items() if median > QUERY_BUDGET_SECONDS}
    assert not slow, f"app queries over {QUERY_BUDGET_SECONDS * 1000:.0f} ms: {slow}"
