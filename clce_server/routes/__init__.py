"""The routers: `ops` (health, readiness, info, status, metrics, the status page) and `loss`
(POST /v1/cross_entropy)."""
