"""The scalar a circuit explains: how strongly the next token opens a refusal.

- `refusal_score`: log-odds that the first response token is one of the refusal tokens.
- `logit_diff`: log-sum-exp of the refusal tokens' logits minus that of the compliance tokens'
  (the tokens that open the model's compliant answers): a refusal-minus-compliance logit
  difference, for token sets instead of one token each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from engine.errors import ExplorerError
from engine.judging.judge import refusal_log_odds

Metric = Literal["refusal_score", "logit_diff"]
METRICS: tuple[str, ...] = get_args(Metric)


@dataclass(frozen=True)
class RefusalMetric:
    kind: str
    refusal_ids: tuple[int, ...]
    compliance_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in METRICS:
            raise ExplorerError(f"Unknown circuit metric {self.kind!r}.", f"use one of {list(METRICS)}.")
        if not self.refusal_ids:
            raise ExplorerError("The metric has no refusal tokens.", "run the generate stage, which finds them.")
        if self.kind == "logit_diff":
            if not self.compliance_ids:
                raise ExplorerError("logit_diff needs compliance tokens and the model never complied.",
                                    "use metric: refusal_score.")
            if shared := set(self.refusal_ids) & set(self.compliance_ids):
                raise ExplorerError(f"Tokens {sorted(shared)} are both refusal and compliance tokens.",
                                    "compliance tokens must exclude the refusal tokens.")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric per row of next-token `logits` [n, vocab] (differentiable)."""
        logits = logits.float()
        refusal = torch.tensor(self.refusal_ids, dtype=torch.long, device=logits.device)
        if self.kind == "refusal_score":
            return refusal_log_odds(torch.log_softmax(logits, dim=-1)[:, refusal])
        compliance = torch.tensor(self.compliance_ids, dtype=torch.long, device=logits.device)
        return torch.logsumexp(logits[:, refusal], -1) - torch.logsumexp(logits[:, compliance], -1)


def compliance_token_ids(first_token_ids: Sequence[int], refused: Sequence[bool], refusal_ids: Sequence[int],
                         n_tokens: int = 5) -> tuple[int, ...]:
    """The `n_tokens` commonest first tokens of compliant answers, refusal tokens excluded."""
    openers = Counter(int(t) for t, r in zip(first_token_ids, refused, strict=True) if not r)
    return tuple(t for t, _ in openers.most_common() if t not in set(refusal_ids))[:n_tokens]
