"""clce_server.cross_entropy.layouts without a server: the rewrite into (N, C) rows is a view of the input (the
point of the server-side shift), the shifted targets are what the manual shift scores, and the
results are mapped back to the request's layout."""

from __future__ import annotations

import numpy as np
import pytest

from clce_server.cross_entropy import layouts
from clce_server.cross_entropy.engine import LossResult
from clce_server.rails.errors import ArgumentError


def args(x, t, **kw):
    return {"input": x, "target": t, "ignore_index": -100, "classes_last": False, "shift": 0, **kw}


def test_rows_are_a_view_and_targets_are_shifted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7), dtype=np.float32)
    t = rng.integers(0, 7, (2, 5)).astype(np.int32)
    out, restore = layouts.to_rows(args(x, t, shift=2, ignore_index=-1))
    assert out["input"].shape == (10, 7) and np.shares_memory(out["input"], x)   # no copy
    assert out["shift"] == 0 and out["classes_last"] is False                   # plain rows now
    want = np.concatenate([t[:, 2:], np.full((2, 2), -1)], axis=1).reshape(-1)
    assert out["target"].dtype == np.int64 and np.array_equal(out["target"], want)

    grad = np.arange(70, dtype=np.float32).reshape(10, 7)
    res = restore(LossResult(loss=np.arange(10, dtype=np.float32), grad=grad,
                             lse=np.arange(10, dtype=np.float32), argmax=np.arange(10)))
    assert res.grad.shape == (2, 5, 7) and np.shares_memory(res.grad, grad)
    assert np.array_equal(res.loss, np.arange(10).reshape(2, 5)[:, :3])
    assert res.lse.shape == res.argmax.shape == (2, 3) and res.loss.flags.c_contiguous


def test_plain_requests_pass_through_untouched():
    x, t = np.zeros((4, 3), np.float32), np.zeros(4, np.int64)
    out, restore = layouts.to_rows(args(x, t))
    assert restore is None and out["input"] is x and out["target"] is t


def test_errors_are_argument_errors_with_pytorchs_type():
    x = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(ArgumentError) as info:
        layouts.to_rows(args(x, np.zeros((2, 4), np.int64), shift=4))
    assert type(info.value.error) is ValueError and "smaller than the sequence length T = 4" in str(info.value)
    with pytest.raises(ArgumentError, match="expected target dtype to be Long or Byte") as info:
        layouts.to_rows(args(x, np.zeros((2, 4), np.float32), shift=1))
    assert type(info.value.error) is RuntimeError
