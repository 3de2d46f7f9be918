"""The model output function f(x) shared by training, every attribution method and LDS.

margin = correct-class logit minus log-sum-exp of the other logits ("logsumexp", the
datamodels default), or minus the largest other logit ("max"). Whatever is chosen is
recorded in the ledger and used identically everywhere.
"""
from __future__ import annotations

import torch

MARGIN_KINDS = ("logsumexp", "max")


def margin(logits: torch.Tensor, labels: torch.Tensor, kind: str = "logsumexp") -> torch.Tensor:
    """Margins of `logits` [..., C] for integer `labels` [...]; returns [...] in float32.

    Computed in float32 whatever the logits' dtype, so bf16 training gives the same
    margins as float32 up to the logits' own rounding.
    """
    if kind not in MARGIN_KINDS:
        raise ValueError(f"margin kind {kind!r} is not one of {MARGIN_KINDS}")
    logits = logits.float()
    correct = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.long().unsqueeze(-1), float("-inf"))
    if kind == "logsumexp":
        rest = torch.logsumexp(others, dim=-1)
    else:
        rest = others.max(dim=-1).values
    return correct - rest
