"""Stage `backup`: do other features take over when the top refusal features are removed (the hydra effect)?

The earliest SAE's features with the largest attribution to the refusal score (the `saes` stage's,
on train-split prompts) are clamped to 0 at every position, k = 1, 3 and 10 at a time, and attribution
is computed again on toxic test prompts at the later SAEs, at the prompt-end positions the `saes` stage
attributes at (engine.saes.backup_features): which features
gain effect, and how much of the drop the removed features' attributions predict does not happen
(recovered share). Writes `backup_recovery` and `backup_gains`.
"""

from __future__ import annotations

from typing import Any, cast

from engine.circuits.refusal_metric import RefusalMetric
from engine.data.prompts import seeded_texts
from engine.judging.judge import refusal_token_ids
from engine.runtime.activations import prompt_end_positions
from engine.saes.backup_features import backup_features
from engine.saes.training import load_sae, stored_sae_source
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput
from precompute.stages.generate import model_fingerprint

REMOVED_COUNTS = (1, 3, 10)
HYDRA_PROMPTS = 32  # toxic and safe test prompts each, a seeded sample


class BackupStage(Stage):
    name = "backup"
    version = 2
    upstream = ("prompts", "generate", "saes")

    def applies(self, config: StudyConfig) -> bool:
        return config.saes is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        assert config.saes is not None  # applies() guarantees it
        return {"model": model_fingerprint(config.models[config.saes.model]), "removed": REMOVED_COUNTS,
                "prompts": HYDRA_PROMPTS, "seed": config.saes.seed, "batch_size": config.generation.batch_size,
                "dtype": config.generation.dtype_name}

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        settings = config.saes
        assert settings is not None
        saes = context.table("saes").sort_values("layer")
        model = config.generation.load(config.models[settings.model])
        loaded = {row["hook"]: load_sae(*stored_sae_source(config.store, row.to_dict()), device=model.device)
                  for _, row in saes.iterrows()}
        removed_hook = str(saes["hook"].iloc[0])
        watched = {hook: sae for hook, sae in loaded.items() if hook != removed_hook} or {removed_hook: loaded[removed_hook]}
        features = context.table("features").query("hook == @removed_hook")
        ranking = features.sort_values("attribution", ascending=False)["feature"].astype(int).tolist()
        test = context.table("prompts").query("split == 'test'")
        sample = {kind: seeded_texts(test, kind, HYDRA_PROMPTS, settings.seed) for kind in ("toxic", "safe")}
        metric = RefusalMetric("refusal_score", tuple(refusal_token_ids(context.table("refusal_tokens"), settings.model)))
        # The positions the saes stage attributes at: the instruction's last token and the template after it.
        result = backup_features(model, removed_hook, loaded[removed_hook], watched, sample["toxic"], sample["safe"],
                                 metric, ks=REMOVED_COUNTS, ranking=ranking,
                                 offsets=prompt_end_positions(model.tokenizer).offsets,
                                 batch_size=max(1, config.generation.batch_size // 4))
        # "removed" holds lists of feature ids (pandas-stubs type map's argument as possibly NA).
        recovery = result.recovery.assign(hook=removed_hook, removed=result.recovery["removed"].map(
            lambda features: ", ".join(map(str, cast(list[int], features)))), n_prompts=len(sample["toxic"]))
        return StageOutput(tables={"backup_recovery": recovery, "backup_gains": result.gains},
                           models=(config.models[settings.model],))
