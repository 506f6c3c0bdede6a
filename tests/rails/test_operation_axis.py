"""The operation is the axis (issue 27): the loss and the fused linear cross-entropy go through one
staged endpoint, parse their fields with one option machinery (clce_wire.options) and refuse bad
arguments with one set of checks; only a check's deliberate refusal is a 400, anything else that
goes wrong inside a check is a 500 with the request id. On the real app over real HTTP (uvicorn
in this process, so a test can put a fault inside a check), real OpenCL."""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest

pytest.importorskip("uvicorn")

from clce_server.cross_entropy import semantics  # noqa: E402
from clce_server.cross_entropy.operation import CrossEntropy  # noqa: E402
from clce_server.linear import engine as linear_engine  # noqa: E402
from clce_server.linear.job import LinearJob  # noqa: E402
from clce_server.linear.operation import LinearCrossEntropyOperation  # noqa: E402
from clce_server.linear.weights import WeightStore  # noqa: E402
from clce_server.rails.endpoint import HandlerEndpoint, StagedEndpoint  # noqa: E402
from clce_server.rails.scheduler import Job  # noqa: E402
from clce_wire import options, protocol  # noqa: E402
from tests.support.inprocess import InProcessServer  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(scope="module")
def server():
    with InProcessServer(max_batch=1) as srv:
        yield srv


def _post(url, path, msg):
    body = b"".join(bytes(s) for s in protocol.encode_message(msg))
    r = httpx.post(url + path, content=body, headers={"Content-Type": protocol.MSGPACK}, timeout=60)
    return r, protocol.decode_message(bytearray(r.content))


def _problem(seed=0, rows=6, H=8, V=11):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((rows, H)).astype(np.float32)
    W = rng.standard_normal((V, H)).astype(np.float32)
    return h, W, rng.integers(0, V, rows)


def _loss_msg(h, W, y, **opts):
    return {"v": 1, "input": h @ W.T, "target": y, **opts}


def _linear_msg(h, W, y, **opts):
    return {"v": 1, "hidden": h, "target": y, "weight": W, "want_grad": False, **opts}


OPERATIONS = [("/v1/cross_entropy", _loss_msg), ("/v1/linear_cross_entropy", _linear_msg)]


def test_both_operations_run_on_the_staged_endpoint(server):
    routes = {getattr(r, "path", None) + ":" + ",".join(sorted(getattr(r, "methods", ()) or ())): r.app
              for r in server.app.router.routes if hasattr(r, "path")}
    assert isinstance(routes["/v1/cross_entropy:POST"], StagedEndpoint)
    assert isinstance(routes["/v1/cross_entropy:POST"].operation, CrossEntropy)
    assert isinstance(routes["/v1/linear_cross_entropy:POST"].operation, LinearCrossEntropyOperation)
    for key in ("/v1/weights/{name}:PUT", "/v1/weights/{name}/grad:POST", "/v1/weights/{name}:DELETE"):
        assert isinstance(routes[key], HandlerEndpoint), key
    state = server.app.state.clce
    assert isinstance(state.weight_store, WeightStore) and state.weight_store.instance == state.instance_id
    assert set(state.linear_engines) == set(state.engines) == {d.index for d in state.devices}
    assert all(state.linear_engines[i].engine is state.engines[i] for i in state.engines)
    assert issubclass(LinearJob, Job)
    # the linear request's fields are declared with the loss's options, by name
    for name in options.LINEAR_LOSS_OPTIONS + ("grad_region", "grad_offset"):
        assert next(o for o in options.LINEAR_OPTIONS if o.name == name) is options.OPTION_BY_NAME[name]


def test_both_operations_answer_torchs_values(server):
    h, W, y = _problem()
    ref = F.cross_entropy(F.linear(torch.from_numpy(h), torch.from_numpy(W)), torch.from_numpy(y),
                          label_smoothing=0.1).item()
    for path, msg in OPERATIONS:
        r, out = _post(server.url, path, msg(h, W, y, label_smoothing=0.1))
        assert r.status_code == 200, out
        assert float(protocol.decode_tensor(out["loss"])) == pytest.approx(ref, rel=1e-5), path


@pytest.mark.parametrize("opts, code, match", [
    ({"reduction": 3}, "bad_request", "reduction: expected a string, got int"),
    ({"ignore_index": 1 << 63}, "value_error", "Overflow when unpacking long long"),
    ({"label_smoothing": 1.5}, "runtime_error", "label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    ({"reduction": "avg"}, "value_error", "avg is not a valid value for reduction"),
    ({"lse_square_scale": -1.0}, "value_error", "lse_square_scale must be a non-negative finite number"),
    ({"bogus": 1}, "bad_request", "unknown request field 'bogus'"),
], ids=["wire-type", "overflow", "smoothing", "reduction", "z-loss", "unknown"])
def test_one_option_check_serves_both_operations(server, opts, code, match):
    h, W, y = _problem(1)
    for path, msg in OPERATIONS:
        r, out = _post(server.url, path, msg(h, W, y, **opts))
        assert r.status_code == 400 and out["error"]["code"] == code, (path, out)
        assert match in out["error"]["message"], (path, out)


def test_a_deliberate_refusal_is_400_with_pytorchs_exception(server):
    h, W, y = _problem(2)
    y[3] = 99
    with pytest.raises(IndexError) as expected:
        F.cross_entropy(torch.from_numpy(h @ W.T), torch.from_numpy(y))
    for path, msg in OPERATIONS:
        r, out = _post(server.url, path, msg(h, W, y))
        assert r.status_code == 400, (path, out)
        assert out["error"]["code"] == "index_error" and out["error"]["message"] == str(expected.value)


@pytest.mark.parametrize("path, module, name", [
    ("/v1/cross_entropy", semantics, "_weights"),          # inside semantics.check, after the refusals
    ("/v1/linear_cross_entropy", linear_engine, "_aligned"),   # inside linear.check, likewise
], ids=["loss", "linear"])
def test_an_exception_inside_a_check_that_is_no_refusal_is_500_with_the_request_id(server, monkeypatch, caplog,
                                                                                     path, module, name):
    """A check that fails by accident (here a ValueError, the type of many of PyTorch's refusals)
    is a server bug: 500 with the request id, never a 400 dressed as the client's argument error."""
    def broken(*args, **kwargs):
        raise ValueError("a bug inside the check")

    monkeypatch.setattr(module, name, broken)
    h, W, y = _problem(3)
    msg = dict(OPERATIONS)[path](h, W, y)
    with caplog.at_level(logging.ERROR, logger="clce.server"):
        r, out = _post(server.url, path, msg)
    assert r.status_code == 500, out
    err = out["error"]
    assert err["code"] == "internal" and "a bug inside the check" not in err["message"]
    assert err["request_id"] == r.headers["x-request-id"] and err["request_id"] in err["message"]
    assert any(err["request_id"] in rec.getMessage() for rec in caplog.records)
    monkeypatch.undo()
    r, out = _post(server.url, path, msg)     # and the server goes on
    assert r.status_code == 200, out
