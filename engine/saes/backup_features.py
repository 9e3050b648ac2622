"""Backup refusal features (the hydra effect; Prakash et al. 2025, McGrath et al. 2023).

Remove the k SAE features with the largest attribution to the refusal metric (clamp them to 0 at every
position) and attribute again: features downstream that gain effect are backups that take over, and
the share of the linearly predicted drop that does not happen is what the model recovers:

    recovered share = 1 - (metric before - metric after) / (sum of the removed features' attributions)

0: the metric falls as far as the removed features' attributions predict; near 1: something else
restores it. Attribution is engine.saes.features.feature_attribution (attribution patching towards the safe
prompts' mean codes), on toxic prompts, at the prompt's last `offsets` positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sae_lens import SAE

from engine.circuits.attribution import metric_gradients
from engine.circuits.refusal_metric import RefusalMetric
from engine.runtime.activations import capture
from engine.runtime.interventions import Hook, applied
from engine.runtime.models import LoadedModel
from engine.saes.features import baseline_means, feature_attribution
from engine.steering.spec import FeatureClamp, Steering


@dataclass(frozen=True)
class FeatureEffects:
    effects: dict[str, np.ndarray]  # hook -> [d_sae] mean attribution over the toxic prompts
    metric: float  # the metric's mean over the toxic prompts


def feature_effects(model: LoadedModel, saes: Mapping[str, SAE], toxic: Sequence[str], safe: Sequence[str],
                    metric: RefusalMetric, *, offsets: Sequence[int] = (-1,), batch_size: int,
                    hooks: Sequence[Hook] = ()) -> FeatureEffects:
    """Each SAE feature's mean attribution to `metric` on `toxic`, under `hooks` (e.g. a clamp)."""
    names = list(saes)
    with applied(model, hooks):
        gradients = metric_gradients(model, list(toxic), names, offsets, metric, batch_size=batch_size,
                                     desc="attribution")
        baseline = capture(model, list(safe), names, offsets, batch_size=batch_size, desc="safe baseline")
    effects = {}
    for h, (name, sae) in enumerate(saes.items()):
        attribution = feature_attribution(sae, gradients.activations[:, h], gradients.gradients[:, h],
                                          baseline_means(sae, baseline[:, h]))
        effects[name] = attribution.feature_effects.mean(0)
    return FeatureEffects(effects, float(gradients.metric.mean()))


@dataclass(frozen=True)
class HydraResult:
    recovery: pd.DataFrame  # k, removed, metric_before, metric_after, predicted_drop, actual_drop, recovered_share
    gains: pd.DataFrame  # k, hook, feature, attribution_before, attribution_after, gain (largest first per k)


def backup_features(model: LoadedModel, removed_hook: str, removed_sae: SAE, watched: Mapping[str, SAE],
                    toxic: Sequence[str], safe: Sequence[str], metric: RefusalMetric, *, ks: Sequence[int] = (1, 3, 10),
                    ranking: Sequence[int] | None = None, offsets: Sequence[int] = (-1,), batch_size: int,
                    top_gains: int = 20) -> HydraResult:
    """Remove the top-k refusal-attributed features of `removed_sae` for each k; how much the metric
    recovers, and which features of the `watched` SAEs gain attribution (`top_gains` per k). `ranking`:
    the features in the order to remove them, chosen on other prompts (else by attribution on these)."""
    kwargs = {"offsets": offsets, "batch_size": batch_size}
    before = feature_effects(model, {removed_hook: removed_sae, **watched}, toxic, safe, metric, **kwargs)
    ranked = np.asarray(ranking) if ranking is not None else np.argsort(-before.effects[removed_hook])
    recovery, gains = [], []
    for k in ks:
        top = tuple(int(f) for f in ranked[:k])
        clamp = Steering(clamp=(FeatureClamp(removed_sae, top, value=0.0),)).hooks(model)
        after = feature_effects(model, watched, toxic, safe, metric, hooks=clamp, **kwargs)
        predicted = float(before.effects[removed_hook][list(top)].sum())
        actual = before.metric - after.metric
        recovery.append({"k": k, "removed": list(top), "metric_before": before.metric, "metric_after": after.metric,
                         "predicted_drop": predicted, "actual_drop": actual,
                         "recovered_share": 1.0 - actual / predicted if abs(predicted) > 1e-9 else np.nan})
        for hook, effects in after.effects.items():
            frame = pd.DataFrame({"k": k, "hook": hook, "feature": np.arange(len(effects)),
                                  "attribution_before": before.effects[hook], "attribution_after": effects})
            frame["gain"] = frame["attribution_after"] - frame["attribution_before"]
            gains.append(frame.nlargest(top_gains, "gain"))
    return HydraResult(pd.DataFrame(recovery), pd.concat(gains, ignore_index=True))
