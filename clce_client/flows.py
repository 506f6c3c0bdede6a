"""The I/O steps a call's flow asks its client for, shared by the flows (client.py's
cross_entropy and empty, linear.py's LinearCall) and the clients that run them (`Client._run`,
`AsyncClient._run`). A flow is a generator that yields (kind, args) and is sent the result."""

from __future__ import annotations

import sys
from typing import Any

ARENA = "arena"        # (nbytes): the arena this call may use, or None (asks /v1/info once)
BLOCKING = "blocking"  # (fn, args): Unix-socket registration or a big copy: a thread for AsyncClient
SEND = "send"          # (call): send the call's one request (call.method, call.path); the response
SEND_AFFINE = "send_affine"   # (request): SEND for a stored weight: to its replica, with its affinity header
CHUNKS = "chunks"      # (pipe): send the row chunks; (message, timing) of the whole batch
RENEW = "renew"        # (arena, generation, cause): move the arena to a new server instance
OFFLOAD_BYTES = 1 << 20   # the async client prepares calls at least this big in a thread


def prepared(build: Any, args: tuple, *, arena: Any, nbytes: int) -> Any:
    """`build(*args)` as a flow step: yielded as BLOCKING (a thread, for AsyncClient) when it copies
    into shared memory or registers a region (an arena) or handles at least OFFLOAD_BYTES, else
    called here. Use as ``x = yield from prepared(...)``."""
    if arena is not None or nbytes >= OFFLOAD_BYTES:
        return (yield BLOCKING, (build, args))
    return build(*args)


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported already
    return torch is not None and isinstance(x, torch.Tensor)
