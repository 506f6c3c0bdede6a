"""Every (method, path) the app serves, as docs/protocol.md's auth table and the README's endpoint
table are checked against (tests/rails/test_auth_table.py, tests/project/test_readme.py)."""

from __future__ import annotations


def app_routes() -> set[tuple[str, str]]:
    from clce_server.app import build_app

    found = set()

    def walk(routes):
        for r in routes:
            inner = getattr(r, "original_router", None)
            if inner is not None:                 # FastAPI's included router
                walk(inner.routes)
            elif hasattr(r, "path"):
                found.update((m, r.path) for m in (getattr(r, "methods", None) or ()) if m != "HEAD")

    walk(build_app().routes)
    return found
