"""The README's examples run as written against a real server (tests/support/serverproc.py)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.app_routes import app_routes
from tests.support.readme_checks import check_curl_example
from tests.support.serverproc import server_fixture

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
server = server_fixture()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_setup_commands_are_the_ones_ci_runs():
    cmds = blocks(section("Set-up: two commands (fresh Debian or Ubuntu)"), "sh")
    assert len(cmds) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1].strip() in ci
    # the run command, in its two parts (CI starts the server in the background and checks it)
    assert cmds[0].strip().startswith("scripts/setup.sh server")
    for part in cmds[0].split("&&"):
        assert part.strip() in ci


def test_python_examples_run(server, tmp_path):
    code = "\n".join(blocks(section("Use it"), "python"))
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "CLCE_URL": server.url}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(8, 32000)" in out.stdout and "(8,)" in out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_prints_what_the_readme_shows(server):
    check_curl_example(server.url)


def test_check_served_runs_as_ci_runs_it(server):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check-served.py"), "--url", server.url,
                          "--wait", "30"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the README's curl example answers as printed" in out.stdout


def test_check_it_is_the_clce_command(server):
    (cmd,) = blocks(section("Check it"), "sh")
    assert cmd.strip() == ".venv/bin/clce check"
    out = subprocess.run([sys.executable, "-m", "clce_client.cli", "check", server.url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_headers_are_as_the_readme_says(server):
    """X-Request-ID on the loss endpoint's answers, Server-Timing with the phases named on its
    successful ones; neither on /healthz."""
    import httpx

    text = " ".join(section("Running the server").split())
    names = re.search(r"`Server-Timing` header \(([^)]*)\)", text).group(1)
    phases = re.findall(r"`(\w+)`", names)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        ok = http.post("/v1/cross_entropy", json={"input": [[1.0, 2.0]], "target": [1]})
        bad = http.post("/v1/cross_entropy", json={"input": [[1.0, 2.0]], "target": [5]})
        health = http.get("/healthz")
    assert ok.status_code == 200 and bad.status_code == 400
    assert ok.headers["x-request-id"] and bad.headers["x-request-id"]
    assert [p.split(";")[0] for p in ok.headers["server-timing"].split(", ")] == phases
    assert "x-request-id" not in health.headers and "server-timing" not in health.headers


def test_every_endpoint_in_the_table_is_served():
    rows = re.findall(r"^\| `(GET|POST) (\S+)` \|", section("Running the server"), flags=re.M)
    assert rows and set(rows) <= app_routes(), set(rows) - app_routes()


def test_the_readme_is_short_and_its_tables_fit():
    """About 200 lines; tables (here, in bench/README.md and the docs this project owns) fit 100
    columns."""
    assert len(README.splitlines()) <= 215
    for path in (ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "docs" / "architecture.md",
                 ROOT / "docs" / "integrations" / "README.md"):
        wide = [line for line in path.read_text().splitlines() if line.startswith("|") and len(line) > 100]
        assert wide == [], (path, wide)


def test_one_ratio_convention():
    """clce's time over torch's, lower is better, said once; never torch's over clce's."""
    text = README + (ROOT / "bench" / "README.md").read_text()
    assert "lower is better" in README
    for wrong in ("torch / fused", "torch / clce", "x faster than torch"):
        assert wrong not in text, wrong
