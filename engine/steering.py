"""One steering spec composing direction ablation, activation addition and SAE feature clamping.

Clamping keeps the SAE's error term: at the SAE's hook, x becomes x + sum_i (f'_i - f_i) W_dec[i],
which is decode(f') + (x - decode(f)); features not clamped, and whatever the SAE fails to
reconstruct, are left exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sae_lens import SAE

from engine.errors import ExplorerError
from engine.features import check_feature
from engine.interventions import Hook, ablation_hooks, addition_hooks
from engine.models import LoadedModel
from engine.saes import check_sae_fits


@dataclass(frozen=True)
class Addition:
    direction: np.ndarray  # [d_model]
    layer: int
    alpha: float | None = None  # None: the direction's own norm


@dataclass(frozen=True)
class FeatureClamp:
    """Set chosen features to `value`, or multiply them by `scale` (exactly one of the two)."""

    sae: SAE
    features: tuple[int, ...]
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise ExplorerError("A feature clamp needs exactly one of value and scale.",
                                "e.g. value=8.0 to set the features, or scale=0.0 to switch them off.")
        for feature in self.features:
            check_feature(self.sae, feature)


@dataclass(frozen=True)
class Steering:
    ablate: tuple[np.ndarray, ...] = ()  # directions projected out everywhere
    add: tuple[Addition, ...] = ()
    clamp: tuple[FeatureClamp, ...] = field(default_factory=tuple)

    def hooks(self, model: LoadedModel) -> list[Hook]:
        hooks: list[Hook] = []
        if self.ablate:
            hooks += ablation_hooks(model, torch.from_numpy(np.stack(self.ablate).astype(np.float32)))
        for addition in self.add:
            hooks += addition_hooks(model, torch.from_numpy(np.asarray(addition.direction, np.float32)),
                                    addition.layer, addition.alpha)
        hooks += [clamp_hook(model, clamp) for clamp in self.clamp]
        return hooks


def clamp_hook(model: LoadedModel, clamp: FeatureClamp) -> Hook:
    hook_name = check_sae_fits(clamp.sae, model)
    index = torch.tensor(list(clamp.features), dtype=torch.long)
    decoder = clamp.sae.W_dec.detach().float()[index].to(model.device)  # [n_features, d_model]

    def steer(activation: torch.Tensor, hook: object) -> torch.Tensor:
        with torch.no_grad():
            codes = clamp.sae.encode(activation.float())[..., index]
            target = torch.full_like(codes, clamp.value) if clamp.value is not None else codes * clamp.scale
            return activation + ((target - codes) @ decoder).to(activation.dtype)

    return hook_name, steer

