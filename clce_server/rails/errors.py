"""Who caused a failure, which decides how it is answered.

* `ArgumentError`: the request's arguments are wrong, as PyTorch would refuse them. Answered
  4xx with PyTorch's exception type and message (``.error`` is that exception). Only deliberate:
  a check raises it itself (`ArgumentError(ValueError(...))`); an exception that merely happens
  inside a check is not dressed as one.
* `DeviceError`: the OpenCL device failed (out of resources, lost, a failed build) or the host is
  out of memory. Answered 503 with Retry-After; the server stays up and keeps serving other
  requests and devices. `classify` (and `device_faults` around device work) is the one place that
  says which exceptions those are.
* Anything else is a server bug: 500, logged with the request id that the response carries.
"""

from __future__ import annotations


from clce_wire.protocol import ERROR_CODES

class ArgumentError(Exception):
    """Bad arguments. ``error`` is the exception PyTorch raises for them (its type and message
    travel to the client, which re-raises the same type)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class DeviceError(Exception):
    """The device could not run the work; retrying later (or on another replica) may succeed."""

    retry_after = 1.0

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


def classify(exc: BaseException) -> BaseException:
    """`exc` as the failure it is: pyopencl's errors (out of resources, lost device, build
    failure) and the host's MemoryError become a DeviceError caused by `exc`; anything else,
    ArgumentError and DeviceError included, is returned as it is (never "raise exc from exc": an
    exception that is its own cause is a reference cycle, which would keep its traceback's frames,
    the request's arrays among them, until the garbage collector ran)."""
    if isinstance(exc, MemoryError):
        raised = DeviceError(f"out of memory: {exc}")
    elif type(exc).__module__.startswith("pyopencl"):
        raised = DeviceError(f"OpenCL device error: {type(exc).__name__}: {exc}")
    else:
        return exc
    raised.__cause__ = exc
    return raised


class device_faults:
    """Device work (`with device_faults():`): a failure of the device (`classify`) is raised as
    DeviceError; anything else as it is."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if not isinstance(exc, Exception):
            return False
        raised = classify(exc)
        if raised is exc:
            return False
        try:
            raise raised
        finally:
            # no local of this frame, which the traceback keeps, may refer to the exceptions: that
            # cycle would keep the request's arrays until the garbage collector ran
            del raised, exc, tb


class ApiError(Exception):
    """An error answered as {"error": {"code", "message"}} with the code's HTTP status (from the
    wire's ERROR_CODES) and, for transient conditions, Retry-After."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.status = ERROR_CODES[code][0]
        self.retry_after = retry_after
