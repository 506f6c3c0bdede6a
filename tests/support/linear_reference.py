"""The fused linear cross-entropy's test data and its torch reference, shared by the client and
service tests: `model` makes hidden states, a head (weight, bias) and targets; `local` computes
F.cross_entropy(F.linear(h, W, b), y) on fresh leaves (in float32) for backward to fill;
`to_numpy` and `to_torch` move tensors to the server's arrays and back (bf16 through ml_dtypes)."""

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).reshape(a.shape)
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(a.shape)


def model(seed, N=150, H=40, V=310, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, b, y


def local(h, W, y, b=None, **opts):
    h2, W2 = h.detach().float().clone().requires_grad_(), W.detach().float().clone().requires_grad_()
    b2 = None if b is None else b.detach().float().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h2, W2, b2), y, **opts)
    return loss, h2, W2, b2
