"""Who caused a failure, which decides how it is answered.

* `ArgumentError`: the request's arguments are wrong, as PyTorch would refuse them. Answered
  4xx with PyTorch's exception type and message (``.error`` is that exception).
* `DeviceError`: the OpenCL device failed (out of resources, lost, a failed build). Answered
  503 with Retry-After; the server stays up and keeps serving other requests and devices.
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


def is_opencl_error(exc: BaseException) -> bool:
    """pyopencl's errors (out of resources, lost device, build failure) are the device's."""
    return type(exc).__module__.startswith("pyopencl")


def classify(exc: BaseException) -> BaseException:
    """`exc` as ArgumentError / DeviceError where it is one of those, else unchanged (a bug)."""
    if isinstance(exc, (ArgumentError, DeviceError)):
        return exc
    if is_opencl_error(exc):
        return DeviceError(f"OpenCL device error: {type(exc).__name__}: {exc}")
    return exc


class ApiError(Exception):
    """An error answered as {"error": {"code", "message"}} with the code's HTTP status (from the
    wire's ERROR_CODES) and, for transient conditions, Retry-After."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.status = ERROR_CODES[code][0]
        self.retry_after = retry_after
