"""The fused linear cross-entropy, F.cross_entropy(F.linear(hidden, weight, bias), target): its
operation (operation.py), its scheduler job (job.py), its engine (engine.py) and GEMMs (gemm.py),
the weight store (weights.py) and its endpoints (weight_endpoints.py)."""
