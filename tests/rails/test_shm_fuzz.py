"""Fuzzing the shared-memory registration socket of a real server, briefly (scripts/fuzz_service.py
--shm runs the same sessions for as long as you like, with tenants training beside them).

Sessions from tests/support/fuzzing.py: frames x descriptors x seals x sizes x timing (pieces, stalls past
the frame deadline, peers that die mid-frame, answers left unread). Every whole frame is answered
with {"ok": true} or a known error code, nobody is dropped without an error frame, and afterwards
nothing of the fuzzing tenant is held, no descriptor is left open, the neighbour's session still
computes exactly, and registration works.
"""

from __future__ import annotations


import pytest
from tests.support import fuzzing  # noqa: E402
from tests.support.shm_peers import (ADMIN_KEY, KEYS, Bystander, info, registration_alive, server_fds,  # noqa: E402
                                     shm_server, socket_path, steady_fds, wait_for)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = pytest.mark.timeout(600)

FRAME_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with shm_server(tmp_path_factory.mktemp("shmfuzz"), "--shm-frame-timeout", str(FRAME_TIMEOUT),
                    "--shm-hello-timeout", str(FRAME_TIMEOUT)) as srv:
        yield srv


def test_fuzzed_sessions_are_answered_and_leave_nothing_behind(server):
    bystander = Bystander(server)
    baseline = steady_fds(server)
    path = socket_path(server)
    findings, answers, frames = [], {}, 0

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(session=fuzzing.shm_sessions())
    def run(session):
        nonlocal frames
        res = fuzzing.run_shm_session(path, KEYS["a"], session, FRAME_TIMEOUT)
        frames += res.frames
        for k, v in res.answers.items():
            answers[k] = answers.get(k, 0) + v
        findings.extend((f, session) for f in res.findings)

    run()
    print("shm fuzz:", frames, "frames", answers)
    assert not findings, findings[:3]
    assert frames > 100 and answers.get("ok", 0) > 20 and len(answers) > 4, (frames, answers)
    wait_for(lambda: info(server, KEYS["a"])["shm"]["regions"] == 0, what="the fuzzing tenant's regions reclaimed")
    wait_for(lambda: server_fds(server) <= baseline, timeout=5, what="every descriptor closed")
    bystander.check()
    registration_alive(server)
    shm = info(server, ADMIN_KEY)["shm"]
    assert shm["connections"] == 1 and shm["regions"] == 1, shm          # the bystander's
    assert "Traceback" not in server.log() and "unexpected error" not in server.log()
    bystander.close()
