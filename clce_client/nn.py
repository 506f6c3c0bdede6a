"""`CrossEntropyLoss`: torch.nn.CrossEntropyLoss computed by a clce server.

Importable without torch: it is then a plain callable class for numpy arrays.
"""

from __future__ import annotations

from typing import Any

from .client import cross_entropy

try:
    import torch
except ImportError:
    torch = None

__all__ = ["CrossEntropyLoss"]


class _CrossEntropyCall:
    """The call both CrossEntropyLoss flavours share."""

    def forward(self, input: Any, target: Any) -> Any:
        # the module-level function when no client was given: it picks the default client
        # without being traced by torch.compile (which then sees the operator)
        call = self.client.cross_entropy if self.client is not None else cross_entropy
        extras = {k: v for k, v in (("lse_square_scale", self.lse_square_scale), ("softcap", self.softcap))
                  if v}   # only when set: the defaults keep the torch.compile operator's path
        if self.return_z_loss:   # (loss, z_loss), as Liger's CrossEntropyLoss(return_z_loss=True)
            res = call(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                       label_smoothing=self.label_smoothing, return_z_loss=True, **extras)
            if hasattr(res, "__await__"):   # an AsyncClient's call
                return _pair(res)
            return res.loss, res.z_loss
        return call(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            **extras,
        )


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

        def __init__(
            self,
            weight: Any = None,
            ignore_index: int = -100,
            reduction: str = "mean",
            label_smoothing: float = 0.0,
            client: Any = None,
            *,
            lse_square_scale: float = 0.0,
            softcap: float | None = None,
            return_z_loss: bool = False,
        ):
            super().__init__()
            self.lse_square_scale, self.softcap, self.return_z_loss = lse_square_scale, softcap, return_z_loss
            if weight is not None and not isinstance(weight, torch.Tensor):
                weight = torch.as_tensor(weight)
            self.register_buffer("weight", weight)  # follows .to(device) like torch's
            self.ignore_index = ignore_index
            self.reduction = reduction
            self.label_smoothing = label_smoothing
            self.client = client

        def extra_repr(self) -> str:
            return (
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}"
            )

else:

    class CrossEntropyLoss(_CrossEntropyCall):  # type: ignore[no-redef]
        """CrossEntropyLoss for numpy arrays (torch is not installed)."""

        def __init__(
            self,
            weight: Any = None,
            ignore_index: int = -100,
            reduction: str = "mean",
            label_smoothing: float = 0.0,
            client: Any = None,
            *,
            lse_square_scale: float = 0.0,
            softcap: float | None = None,
            return_z_loss: bool = False,
        ):
            self.lse_square_scale, self.softcap, self.return_z_loss = lse_square_scale, softcap, return_z_loss
            self.weight = weight
            self.ignore_index = ignore_index
            self.reduction = reduction
            self.label_smoothing = label_smoothing
            self.client = client

        def __call__(self, input: Any, target: Any) -> Any:
            return self.forward(input, target)

        def __repr__(self) -> str:
            return (
                f"CrossEntropyLoss(ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing})"
            )
