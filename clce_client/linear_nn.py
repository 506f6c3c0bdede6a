"""The fused linear cross-entropy as a torch module (torch imported here, not by clce_client)."""

from __future__ import annotations

import torch

from .client import default_client
from .linear import linear_cross_entropy


class LinearCrossEntropyLoss(torch.nn.Module):
    """Liger-Kernel's LigerFusedLinearCrossEntropyLoss, remote: forward(lin_weight, _input,
    target, bias=None), so code using Liger's switches by changing the import. Options as
    clce_client.linear_cross_entropy's; `ce_weight` is Liger's name for the class weights."""

    def __init__(self, client=None, *, ce_weight=None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
                 shift: int = 0, return_z_loss: bool = False, weight_name: str | None = None,
                 accumulate: bool = False, stateless: bool = False):
        super().__init__()
        self.client = client
        self.options = dict(class_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                            shift=shift, return_z_loss=return_z_loss, weight_name=weight_name, accumulate=accumulate,
                            stateless=stateless)

    def forward(self, lin_weight, _input, target, bias=None):
        return linear_cross_entropy(_input, lin_weight, target, bias, client=self.client or default_client(),
                                    **self.options)
