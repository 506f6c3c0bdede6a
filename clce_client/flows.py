"""A call as a flow of I/O steps: the typed steps a flow yields, the one loop that owns arena
renewal and the retry deadline (`renewing`), and the driver's half that does no I/O (`resume`).

A flow is a generator: it yields a step and is sent the step's result (or thrown its error), and
returns the call's result. Every call is one: the loss (client.py's `_cross_entropy_flow`),
`empty`, the fused linear cross-entropy (linear.py's `LinearCall.flow`) and the flush of a stored
weight's accumulated gradient (linear.py's `LinearWeights`). `Client._run` and `AsyncClient._run`
run them, the same loop but for `await`: each step names the client method that does its I/O
(`Step.on`), which is a plain call in `Client` and a coroutine in `AsyncClient`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from . import errors

OFFLOAD_BYTES = 1 << 20   # the async client prepares calls at least this big in a thread


class Step:
    """One I/O step of a flow; `on(client)` does it (awaitable in an AsyncClient)."""

    def on(self, client: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Arena(Step):
    """The arena this call may use, or None: TCP (asks /v1/info once, for a call this big)."""
    nbytes: int | None

    def on(self, client: Any) -> Any:
        return client._shm_ready(self.nbytes)


@dataclass(frozen=True)
class Blocking(Step):
    """Unix-socket registration or a big copy: a thread, in an AsyncClient."""
    fn: Callable[..., Any]
    args: tuple = ()

    def on(self, client: Any) -> Any:
        return client._blocking(self.fn, *self.args)


@dataclass(frozen=True)
class Send(Step):
    """The request's one HTTP exchange (its `method`, `path`, `segments`, `nbytes`; `affinity`: a
    stored weight's key, which picks its replica and travels as a header). The response."""
    request: Any

    def on(self, client: Any) -> Any:
        r = self.request
        return client._request(r.method, r.path, r.segments, r.nbytes, affinity=r.affinity)


@dataclass(frozen=True)
class Chunks(Step):
    """A pipelined batch's row chunks, sent on several connections: (message, timing) of the whole."""
    pipe: Any

    def on(self, client: Any) -> Any:
        return client._send_chunks(self.pipe)


@dataclass(frozen=True)
class Renew(Step):
    """Register `arena` (of `generation`) with the new server instance that `cause` revealed."""
    arena: Any
    generation: int
    cause: BaseException

    def on(self, client: Any) -> Any:
        return client._renew_arena(self.arena, self.generation, self.cause)


@dataclass(frozen=True)
class Done:
    """What `resume` gives when the flow has returned."""
    value: Any


Flow = Generator[Step, Any, Any]


def resume(flow: Flow, result: Any, error: BaseException | None) -> Step | Done:
    """Hands the flow its last step's result (or throws it the step's error): its next step, or
    Done with its result. The drivers' loop around this differs only by `await`."""
    try:
        return flow.send(result) if error is None else flow.throw(error)
    except StopIteration as stop:
        return Done(stop.value)


def prepared(build: Any, args: tuple, *, arena: Any, nbytes: int) -> Any:
    """`build(*args)` as a flow step: yielded as Blocking (a thread, for AsyncClient) when it copies
    into shared memory or registers a region (an arena) or handles at least OFFLOAD_BYTES, else
    called here. Use as ``x = yield from prepared(...)``."""
    if arena is not None or nbytes >= OFFLOAD_BYTES:
        return (yield Blocking(build, args))
    return build(*args)


@dataclass
class Try:
    """One attempt of a call under `renewing`: the arena it may use (None: TCP) and whether it has
    placed something in it (the attempt says so: then a NotFound means a region the server does
    not know, the sign of a new server instance)."""
    arena: Any
    deadline: float
    placed: bool = False


def renewing(client: Any, nbytes: int | None, attempt: Callable[[Try], Flow], *, inline: bool = False,
             again: Callable[[BaseException, Try], bool] | None = None) -> Flow:
    """Every call's flow: `attempt(Try)` with the arena the call may use (none when `inline`: the
    call is too small for shared memory), run again when it fails

    * because the server instance holding the arena's registrations has gone (a closed
      registration socket, or a region it does not know after the attempt placed one): the arena
      is registered with the new instance first (a Renew step);
    * or because `again(error, try)` says the attempt repairs it by running again (a stored weight
      the server no longer has is uploaded again);

    within the client's retry budget (`retry_budget_s`, from the call's start); past it, or for any
    other error, the error is raised."""
    deadline = time.monotonic() + client.retry_budget_s
    while True:
        arena = yield Arena(nbytes)
        if inline:
            arena = None
        t = Try(arena, deadline)
        generation = arena.generation if arena is not None else 0
        try:
            return (yield from attempt(t))
        except errors.ClceError as exc:
            if again is not None and again(exc, t):
                continue
            if not _renewal_due(exc, t):
                raise
            yield Renew(arena, generation, exc)


def _renewal_due(exc: BaseException, t: Try) -> bool:
    """Whether `exc`, raised by an attempt over `t.arena`, is the sign of a server restart that
    moving the arena can repair (within the retry budget)."""
    from .shm import ArenaLost

    if t.arena is None or time.monotonic() > t.deadline:
        return False
    return isinstance(exc, ArenaLost) or (isinstance(exc, errors.NotFound) and t.placed)


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported already
    return torch is not None and isinstance(x, torch.Tensor)
