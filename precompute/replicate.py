"""`python -m precompute replicate`: does the circuits verdict hold under other seeds?

Seed 0 is the study itself. Each other seed s is a sibling study with every seed the verdict
depends on set to s: the fine-tune (its own tuned model, data/models/<tuned>-seed<s>), the
directions' validation sample, the SAEs' training and the circuits' prompt sample and bootstraps.
Siblings run the stages up to `circuits` (steering and the held-out evaluation are left out) into
data/stores/replicate/<study>-seed<s>.duckdb; a sibling built before is read back, not re-run.

The table (seed, kind, verdict, ratio and its interval, decodability) goes into the study's own
store as `verdict_replication` (the Findings page reads it) and to a CSV beside the store.
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from engine.data import store
from engine.data.paths import stores_dir
from engine.data.schema import COMMAND_TABLES
from engine.errors import ExplorerError
from engine.runtime.models import is_embedded_tuned
from precompute.config import SECTIONS, StudyConfig
from precompute.pipeline import run_pipeline
from precompute.stages import STAGES

logger = logging.getLogger(__name__)

REPLICATION_TABLE, = COMMAND_TABLES["replicate"]
VERDICT_COLUMNS = ["kind", "label", "ratio", "ratio_low", "ratio_high", "decoding_accuracy", "decoding_chance",
                   "decoding_p", "detectable_share"]


def seed_config(config: StudyConfig, seed: int) -> StudyConfig:
    """The sibling study for `seed` (the study itself for seed 0)."""
    if config.circuits is None:
        raise ExplorerError("The config has no `circuits:` section: there is no verdict to replicate.",
                            "use a config with circuits, e.g. precompute/configs/demo.yaml.")
    if seed == 0:
        return config
    reseeded = {name: dataclasses.replace(getattr(config, name), seed=seed)
                for name in ("tune", "directions", "saes", "circuits") if getattr(config, name) is not None}
    # A tuned embedded model gets a folder per seed; a model from elsewhere is the same for every seed.
    models = {role: f"{spec}-seed{seed}" if config.tune is not None and is_embedded_tuned(spec) else spec
              for role, spec in config.models.items()}
    study = f"{config.study}-seed{seed}"
    return dataclasses.replace(config, study=study, models=models, store=stores_dir() / "replicate" / f"{study}.duckdb",
                               steering=None, evaluation=None, **reseeded)


def replication_table(studies: dict[int, StudyConfig]) -> pd.DataFrame:
    """Each seed's verdict rows (one per kind) from its store."""
    frames = [store.read_table(study.store, "circuit_verdicts")[VERDICT_COLUMNS].assign(seed=seed, study=study.study)
              for seed, study in studies.items()]
    table = pd.concat(frames, ignore_index=True)
    return table[["seed", "study", *VERDICT_COLUMNS]].sort_values(["kind", "seed"], ignore_index=True)


def replicated(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind: the verdicts over seeds and whether every seed gave the same one."""
    return table.groupby("kind").agg(seeds=("seed", "size"), verdicts=("label", lambda v: ", ".join(v)),
                                     replicated=("label", lambda v: v.nunique() == 1)).reset_index()


def run_replicate(config: StudyConfig, seeds: int) -> pd.DataFrame:
    """Build every seed's study (up to circuits), then store and return the replication table."""
    if not 2 <= seeds <= 20:
        raise ExplorerError(f"--seeds {seeds} is out of range.", "use 2 to 20 seeds (3 is the usual check).")
    studies = {seed: seed_config(config, seed) for seed in range(seeds)}
    for seed, study in studies.items():
        logger.info("Replicate seed %d -> %s", seed, study.store)
        run_pipeline(study, STAGES, until="circuits")
    table = replication_table(studies)
    run = store.RunRecord(study=config.study, stage="replicate", models=tuple(config.models.values()),
                          dataset="", config={name: config.section(name) for name in SECTIONS} | {"seeds": seeds})
    store.write_stage(config.store, run=run, input_hash=f"seeds={seeds}", tables={REPLICATION_TABLE: table})
    return table
