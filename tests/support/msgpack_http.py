"""Raw msgpack requests to a real server and a client's shared memory with it, for tests that build
bodies by hand (tests/linear/test_endpoint_shm.py, tests/linear/test_weight_store_budgets.py):
`send` a message, `ok` decodes a 200 answer's tensors, `error` checks a refusal, and `Shared`
places arrays in registered regions and names them by reference."""

from __future__ import annotations

import httpx
import numpy as np

from clce_client.shm import connect
from clce_wire import protocol
from clce_wire.shm import ref_map


def body(msg: dict) -> bytes:
    return b"".join(bytes(s) for s in protocol.encode_message(msg))


def send(url: str, method: str, path: str, msg: dict | None = None, **kw) -> httpx.Response:
    return httpx.request(method, url + path, content=None if msg is None else body(msg), timeout=120,
                         headers={"Content-Type": protocol.MSGPACK}, **kw)


def ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.content[:500]
    msg = protocol.decode_message(bytearray(resp.content))
    return {k: protocol.decode_tensor(v, name=k) if isinstance(v, protocol.WireTensor) else v for k, v in msg.items()}


def error(resp: httpx.Response, status: int, match: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.content[:500])
    err = protocol.decode_message(bytearray(resp.content))["error"]
    assert match in err["message"], err
    return err


class Shared:
    """A client's shared memory with the server: arrays placed in registered regions (kept alive
    here) and the references that name them."""

    def __init__(self, url: str):
        self.arena = connect(httpx.get(url + "/v1/info").json(), None)
        self.kept: list[np.ndarray] = []

    def empty(self, shape, dtype) -> tuple[np.ndarray, dict]:
        arr = self.arena.empty(shape, np.dtype(dtype))
        self.kept.append(arr)
        region, offset = self.arena.locate(arr.ctypes.data, max(arr.nbytes, 1))
        return arr, ref_map(protocol.dtype_name(arr.dtype), arr.shape, region, offset)

    def put(self, x: np.ndarray) -> dict:
        arr, ref = self.empty(x.shape, x.dtype)
        arr[...] = x
        return ref

    def close(self) -> None:
        self.kept.clear()
        self.arena.close()
