"""The operational router: `ops` (health, readiness, info, status, metrics, the status page). The
operations' endpoints are in cross_entropy/operation.py and linear/ (operation.py,
weight_endpoints.py)."""
