"""The clce wire format, shared by the client and the server: tensors and messages
(`protocol`, specified in docs/protocol.md) and the request's options, declared once (`options`).

Imports only the standard library, numpy and msgpack: the server uses it without the client's
HTTP stack, and the client without the server's.
"""

from . import options, protocol

__all__ = ["options", "protocol"]
