"""What live steering accepts: a 2-core CPU must answer within seconds. Apart from engine.steering.spec
so that the Steering page can draw its widgets' bounds without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import ExplorerError

if TYPE_CHECKING:
    from engine.steering.spec import Steering


@dataclass(frozen=True)
class SteeringLimits:
    """The bounds of the Steering page's widgets, checked again before any generation."""

    max_prompt_chars: int = 1000
    max_new_tokens: int = 128
    max_abs_alpha: float = 500.0
    max_abs_feature_value: float = 1000.0

    def check(self, instruction: str, max_new_tokens: int, steering: Steering) -> None:
        if not instruction.strip():
            raise ExplorerError("The prompt is empty.", "type a prompt or pick one from the set.")
        if len(instruction) > self.max_prompt_chars:
            raise ExplorerError(f"The prompt has {len(instruction)} characters, over the limit of "
                                f"{self.max_prompt_chars}.", "shorten it: live steering must answer in seconds.")
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ExplorerError(f"{max_new_tokens} new tokens is out of range.",
                                f"use 1-{self.max_new_tokens} (longer answers take too long on a CPU).")
        for addition in steering.add:
            if addition.alpha is not None and abs(addition.alpha) > self.max_abs_alpha:
                raise ExplorerError(f"alpha = {addition.alpha} is out of range.",
                                    f"use |alpha| <= {self.max_abs_alpha:g}; beyond that the model only "
                                    "produces noise.")
        for clamp in steering.clamp:
            if clamp.value is not None and abs(clamp.value) > self.max_abs_feature_value:
                raise ExplorerError(f"Feature value {clamp.value} is out of range.",
                                    f"use |value| <= {self.max_abs_feature_value:g}.")


DEFAULT_LIMITS = SteeringLimits()
