"""torch's cross-entropy as the reference for the loss kernels (tests/cross_entropy/): inputs made
from a seeded generator in any of the four dtypes (bf16 through ml_dtypes), torch's loss and input
gradient on the same values, and the per-dtype tolerances."""

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F


BF16 = np.dtype(ml_dtypes.bfloat16)


TORCH_DT = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}


def np_dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def to_torch(a):
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.uint16).astype(np.int32) << 16).view(torch.float32).to(torch.bfloat16)
    return torch.from_numpy(np.array(a, order="C", copy=True))


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(BF16)
    return t.detach().numpy()


def reference(x, t, weight=None, ref_dtype=None, **kw):
    """torch's loss and input gradient; ref_dtype upcasts half inputs first (an fp32 oracle for
    kernels that accumulate in fp32)."""
    xt = to_torch(x)
    if ref_dtype is not None:
        xt = xt.to(ref_dtype)
    xt = xt.detach().requires_grad_(True)
    tt = to_torch(t)
    if tt.is_floating_point() and ref_dtype is not None:
        tt = tt.to(ref_dtype)
    elif not tt.is_floating_point():
        tt = tt.long()
    wt = None
    if weight is not None:
        wt = to_torch(weight)
        if ref_dtype is not None:
            wt = wt.to(ref_dtype)
    loss = F.cross_entropy(xt, tt, weight=wt, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach().double().numpy(), xt.grad.double().numpy()


def make(shape, dtype, rng, *, soft=False, scale=3.0):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = (rng.standard_normal(shape) * scale).astype(np_dtype(dtype))
    if soft:
        p = rng.random(shape)
        p /= p.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
        return x, p.astype(np_dtype(dtype))
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    return x, rng.integers(0, C, tshape).astype(np.int64)


def assert_close(ours, ref, atol, rtol, what):
    ours = np.asarray(ours, np.float64)
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=rtol, equal_nan=True, err_msg=what)


# (dtype, atol, rtol): half types are compared with an fp32 oracle on the same (upcast) values,
# to the precision of one rounding of the result.
DTYPES = [("float32", 2e-6, 2e-5), ("float64", 1e-12, 1e-10), ("float16", 2e-3, 2e-3),
          ("bfloat16", 1.6e-2, 1.6e-2)]
