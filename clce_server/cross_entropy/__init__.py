"""The loss, F.cross_entropy: its operation (operation.py), its scheduler job (job.py), its OpenCL
engine (engine.py), PyTorch's checks (semantics.py) and the class-last layouts (layouts.py)."""
