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
        return call(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


if torch is not None:

    class CrossEntropyLoss(_CrossEntropyCall, torch.nn.Module):
        """torch.nn.CrossEntropyLoss computed by a clce server.

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
        ):
            super().__init__()
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
        ):
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
