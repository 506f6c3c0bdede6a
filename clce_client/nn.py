"""The losses as modules: `CrossEntropyLoss` (torch.nn.CrossEntropyLoss computed by a clce server)
and `LinearCrossEntropyLoss` (Liger-Kernel's fused linear cross-entropy loss, remote).

Importable without torch: CrossEntropyLoss is then a plain callable class for numpy arrays, and
LinearCrossEntropyLoss (a torch module) is not defined.
"""

from __future__ import annotations

from typing import Any, Optional

from .client import cross_entropy, default_client
from .linear import linear_cross_entropy

try:
    import torch
except ImportError:
    torch = None

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


class _CrossEntropyCall:
    """What both CrossEntropyLoss flavours share: the constructor's arguments (torch's, then clce's
    client, then Liger's extras) and the call."""

    def __init__(self, weight: Any = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, client: Any = None, *, lse_square_scale: float = 0.0,
                 softcap: float | None = None, return_z_loss: bool = False):
        self._keep_weight(weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.client = client
        self.lse_square_scale, self.softcap, self.return_z_loss = lse_square_scale, softcap, return_z_loss

    def _keep_weight(self, weight: Any) -> None:
        self.weight = weight

    def forward(self, input: Any, target: Any) -> Any:
        # the module-level function when no client was given: it picks the default client
        # without being traced by torch.compile (which then sees the operator)
        call = self.client.cross_entropy if self.client is not None else cross_entropy
        extras = {k: v for k, v in (("lse_square_scale", self.lse_square_scale), ("softcap", self.softcap))
                  if v}   # only when set: the defaults keep the torch.compile operator's path
        kwargs = dict(weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                      label_smoothing=self.label_smoothing, **extras)
        if self.return_z_loss:   # (loss, z_loss), as Liger's CrossEntropyLoss(return_z_loss=True)
            res = call(input, target, return_z_loss=True, **kwargs)
            if hasattr(res, "__await__"):   # an AsyncClient's call
                return _pair(res)
            return res.loss, res.z_loss
        return call(input, target, **kwargs)


async def _pair(res: Any) -> tuple[Any, Any]:
    r = await res
    return r.loss, r.z_loss


if torch is not None:

    class CrossEntropyLoss(_CrossEntropyCall, torch.nn.Module):
        """torch.nn.CrossEntropyLoss computed by a clce server; keyword-only, Liger's extras:
        ``lse_square_scale`` (z-loss), ``softcap``, and ``return_z_loss`` (forward returns
        (loss, z_loss), the z-loss zeros at lse_square_scale 0).

        ``client`` defaults to the module-level client (CLCE_URL, CLCE_API_KEY). With an
        AsyncClient, calling the module returns an awaitable.
        """

        def _keep_weight(self, weight: Any) -> None:
            torch.nn.Module.__init__(self)
            if weight is not None and not isinstance(weight, torch.Tensor):
                weight = torch.as_tensor(weight)
            self.register_buffer("weight", weight)  # follows .to(device) like torch's

        def extra_repr(self) -> str:
            return (
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}"
            )

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

else:

    class CrossEntropyLoss(_CrossEntropyCall):  # type: ignore[no-redef]
        """CrossEntropyLoss for numpy arrays (torch is not installed)."""

        def __call__(self, input: Any, target: Any) -> Any:
            return self.forward(input, target)

        def __repr__(self) -> str:
            return (
                f"CrossEntropyLoss(ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing})"
            )
