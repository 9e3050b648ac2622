"""The study's vocabulary, declared once: the prompt kinds, the stages in the order they run, and the
tables each stage writes to the store.

Plain data on the standard library alone, so the app reads it without the model stack. The pipeline
refuses to store a table its stage does not declare here (precompute.pipeline), and a test checks that
the stages of precompute.stages.STAGES are the ones declared here, in this order.
"""

from __future__ import annotations

from collections.abc import Iterable

KINDS: tuple[str, ...] = ("toxic", "hard", "safe")

# Stage name -> the tables it writes, in the order the stages run.
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "prompts": ("prompts",),
    "tune": ("tune_steps", "tune_data"),
    "generate": ("generations", "refusal_rates", "judge_agreement", "refusal_tokens"),
    "evaluation": ("evaluation_generations", "evaluation_rates"),
    "directions": (
        "direction_candidates", "refusal_directions", "direction_generations", "direction_effects",
        "direction_harmlessness", "cross_ablation", "layer_separation", "direction_projections",
        "category_cosines", "hard_prompt_direction", "form_probe", "cross_ablation_specificity"),
    "saes": ("saes", "sae_corpus", "features", "feature_examples", "feature_groups", "feature_direction_cosines"),
    "steering": ("steering_effects", "steering_harmlessness", "steering_generations", "steering_rates"),
    "circuits": (
        "circuits", "circuit_nodes", "circuit_edges", "circuit_faithfulness", "circuit_similarity",
        "circuit_verdicts", "circuit_core", "circuit_components", "circuit_calibration", "circuit_prompts"),
    "tradeoff": ("ablation_tradeoff", "direction_independence", "addition_tradeoff", "tradeoff_answers"),
    "backup": ("backup_recovery", "backup_gains"),
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_TABLES)
# Commands that write into a built study's store beside the stages.
COMMAND_TABLES: dict[str, tuple[str, ...]] = {
    "replicate": ("verdict_replication",),
    "evaluate": ("benchmark_generations", "benchmark_rates"),
}
TABLE_STAGE: dict[str, str] = {table: stage for stage, tables in (STAGE_TABLES | COMMAND_TABLES).items()
                               for table in tables}


def undeclared_tables(stage: str, tables: Iterable[str]) -> list[str]:
    """The names in `tables` that `stage` does not declare (all of them for an undeclared stage)."""
    declared = set(STAGE_TABLES.get(stage, ()))
    return sorted(name for name in tables if name not in declared)
