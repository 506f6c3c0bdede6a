"""clce's operations as PyTorch operators, for training code: ``torch.ops.clce.cross_entropy``
(`cross_entropy`) and ``torch.ops.clce.linear_cross_entropy`` (`linear_cross_entropy`).

Each is one opaque node under torch.compile (the HTTP client is never traced), follows torch's
autocast policies (float32 for the loss; the autocast dtype for F.linear's inputs) and gets its
gradients from the server in the same round trip (clce_client/operators.py, where they are
registered). ``client`` defaults to the module-level client (CLCE_URL); `client_key` names a
`Client` to the operators as the plain int they take. Importing this module imports torch.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import operators
from .client import Client, default_client

__all__ = ["cross_entropy", "linear_cross_entropy", "client_key"]


def client_key(client: Optional[Client]) -> int:
    """The operators' key for `client` (None: the default client, from CLCE_URL). A compiled graph
    holds the key as a constant (dynamo guards on the client object, so another client recompiles)."""
    if client is not None and not isinstance(client, Client):
        raise TypeError(f"clce's operator needs a clce_client.Client, got {type(client).__name__}")
    return operators.client_key(client, default_client)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, shift: int = 0,
                  classes_last: bool = False, client: Optional[Client] = None) -> Tensor:
    """F.cross_entropy computed by a clce server, as one operator (see the module's doc).

    ``shift`` and ``classes_last``: the request layouts of docs/protocol.md; ``shift=1`` with
    (B, T, V) logits and (B, T) labels is the causal LM loss without the shifted copy.
    """
    return operators.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, shift=shift,
                                   classes_last=classes_last, key=client_key(client))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         client: Optional[Client] = None, **options) -> Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) as one operator: the weight
    travels with every call (``weight_name`` is accepted and not used); reductions 'mean' and
    'sum'; ``accumulate`` and ``return_z_loss`` run eagerly only (Client.linear_cross_entropy).
    Options: class_weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
    shift."""
    return operators.linear_cross_entropy(hidden, weight, target, bias, key=client_key(client), **options)
