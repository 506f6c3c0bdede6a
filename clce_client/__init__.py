"""clce client: torch.nn.functional.cross_entropy computed by a remote clce server.

    import clce_client
    loss = clce_client.cross_entropy(logits, target)          # default client from CLCE_URL
    with clce_client.Client("http://gpu-box:8000") as c:
        result = c.cross_entropy(logits, target, return_grad=True)

torch is optional; `CrossEntropyLoss`, `LinearCrossEntropyLoss` (and torch itself) are imported
on first use only.
"""

from __future__ import annotations

from typing import Any

from .client import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    AsyncClient,
    Client,
    CrossEntropyResult,
    __version__,
    cross_entropy,
    default_client,
)
from . import errors
from .errors import *  # noqa: F403  (the exception tree, listed once in errors.__all__)
from clce_wire.protocol import PROTOCOL_VERSION, ProtocolError

__all__ = [
    "__version__",
    "PROTOCOL_VERSION",
    "DEFAULT_URL",
    "DEFAULT_TIMEOUT",
    "Client",
    "AsyncClient",
    "CrossEntropyResult",
    "CrossEntropyLoss",
    "cross_entropy",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "default_client",
    "ProtocolError",
    *(n for n in errors.__all__ if n != "error_from_response"),
]


def linear_cross_entropy(hidden: Any, weight: Any, target: Any, bias: Any = None, *, client: Any = None,
                         **options: Any) -> Any:
    """F.cross_entropy(F.linear(hidden, weight, bias), target, **options) on a clce server, which
    never holds the logits (clce_client/linear.py); `client` defaults to default_client()."""
    return (client or default_client()).linear_cross_entropy(hidden, weight, target, bias, **options)


def __getattr__(name: str) -> Any:
    # Importing torch takes seconds; pay for it only when CrossEntropyLoss is asked for.
    if name in ("CrossEntropyLoss", "LinearCrossEntropyLoss"):
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
