"""The fused linear cross-entropy as a torch module (torch imported here, not by clce_client)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .client import default_client
from .linear import linear_cross_entropy


class LinearCrossEntropyLoss(torch.nn.Module):
    """Liger-Kernel's LigerFusedLinearCrossEntropyLoss, remote: its constructor, positionally
    (ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
    accum_dtype, use_token_scaling, return_token_accuracy), and forward(lin_weight, _input, target,
    bias=None), so code using Liger's switches by changing the import. clce's own arguments are
    keywords: `client` (default: the module-level client), shift, weight_name, accumulate,
    stateless, return_lse, return_argmax (see clce_client.linear_cross_entropy).

    What forward returns: the loss (float32); with return_z_loss, (loss, z_loss); with
    return_token_accuracy (or return_lse / return_argmax) a CrossEntropyResult whose `accuracy`
    is Liger's token accuracy and `argmax` its predicted tokens, with z_loss. accum_dtype: the
    server accumulates in float32, so None or torch.float32; use_token_scaling is not available."""

    def __init__(self, ce_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False,
                 accum_dtype: Optional[torch.dtype] = None, use_token_scaling: bool = False,
                 return_token_accuracy: bool = False, *, client: Any = None, shift: int = 0,
                 weight_name: str | None = None, accumulate: bool = False, stateless: bool = False,
                 return_lse: bool = False, return_argmax: bool = False):
        super().__init__()
        if ce_weight is not None and not isinstance(ce_weight, torch.Tensor) and hasattr(ce_weight, "_run"):
            raise TypeError("LinearCrossEntropyLoss takes Liger's constructor: the first argument is ce_weight "
                            "(class weights); pass the client as LinearCrossEntropyLoss(client=client)")
        if not 0.0 <= label_smoothing <= 1.0:   # Liger asserts it at construction
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean' or 'sum' or 'none'. Got: {reduction}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must greater than 0.0 or None. Got: {softcap}")
        if accum_dtype not in (None, torch.float32):
            raise ValueError(f"accum_dtype: the server accumulates in torch.float32, got {accum_dtype}")
        if use_token_scaling:
            raise ValueError("use_token_scaling is not available in clce's fused linear cross-entropy")
        self.client = client
        self.ce_weight = ce_weight
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=softcap, shift=shift,
                            return_z_loss=return_z_loss, weight_name=weight_name, accumulate=accumulate,
                            stateless=stateless, return_lse=return_lse,
                            return_argmax=return_argmax or return_token_accuracy)

    def forward(self, lin_weight, _input, target, bias=None):
        return linear_cross_entropy(_input, lin_weight, target, bias, client=self.client or default_client(),
                                    class_weight=self.ce_weight, **self.options)
