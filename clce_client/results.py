"""`CrossEntropyResult`: what a call that asks for more than the loss answers, on both
operations (client.py's cross_entropy, linear.py's linear_cross_entropy). Its own module so that
both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CrossEntropyResult"]


@dataclass
class CrossEntropyResult:
    """The loss and the extras asked for; a field is None when not requested.

    Arrays are numpy arrays for numpy input, torch tensors (on the input's device) for torch input.
    ``server_timing`` holds the server's phases in milliseconds (decode, queue, kernel, total).
    """

    loss: Any
    grad: Any = None
    lse: Any = None
    argmax: Any = None
    accuracy: float | None = None
    z_loss: Any = None
    server_timing: dict[str, float] = field(default_factory=dict)
