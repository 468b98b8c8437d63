"""Deployment artefacts: the kustomize overlays render with a real kustomize and validate
against the Kubernetes schemas (kubernetes-validate, strict) and the KEDA ScaledObject CRD
(cloudcoil-models-keda, generated from KEDA's CRD); the manifests agree with the code
(stream/group names, settings, processors); the alert rules pass promtool; the Dockerfile
lints and the wheel it installs carries the package data."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from processors import registry
from processors.ops import cli
from processors.ops.replay import replay_parser
from schemas import keys
from streams.settings import RuntimeSettings, check_env, from_env, registered

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
OVERLAYS = ["dev", "prod", "prod-cluster", "replay"]
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

PROCESSORS = {
    # deployment -> (run argument, fixed replicas or None when KEDA owns them)
    "chain-poller": ("chain-poller", 1),
    "ws-ingest": ("ws-ingest", 1),
    "normalizer": ("normalizer", 1),
    "hydrator": ("hydrator", None),
    "tile-builder-single": ("tile-builder:single", None),
    "tile-builder-vertical": ("tile-builder:vertical", None),
    "tile-builder-butterfly": ("tile-builder:butterfly", None),
    "publisher-single": ("publisher:single", 2),
    "publisher-vertical": ("publisher:vertical", 2),
    "publisher-butterfly": ("publisher:butterfly", 2),
    "gex": ("gex", 2),
    "monitor": ("monitor", 1),
    "sse-gateway": ("sse-gateway", 2),
}
# name -> (stream, group) of each trigger: one per symbol's dirty stream for the builders
SCALED = {
    "hydrator": [(keys.WS_STREAM, keys.HYDRATOR_GROUP)],
    **{
        f"tile-builder-{s}": [
            (keys.contracts_dirty_stream(sym), keys.tile_builder_group(s))
            for sym in RuntimeSettings().symbols
        ]
        for s in keys.STRATEGIES
    },
}


def kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    cmd = kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl installed (apt-get install kubectl)")
    out = subprocess.run(
        [*cmd, str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def secret(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, str]:
    """The data of a generated Secret (``name`` plus kustomize's hash suffix), decoded."""
    (sec,) = [
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith(name + "-")
    ]
    return {k: base64.b64decode(v).decode() for k, v in sec["data"].items()}


def example_secrets() -> dict[str, dict[str, str]]:
    """The prod overlay's secret.example.yaml: Secret name -> stringData."""
    docs = yaml.safe_load_all((K8S / "overlays/prod/secret.example.yaml").read_text())
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d}


def secret_refs(workload: dict[str, Any]) -> set[str]:
    """Every Secret a workload's pods reference (envFrom, env valueFrom, volumes), with
    kustomize's hash suffix removed."""
    pod = workload["spec"]["template"]["spec"]
    names: set[str] = set()
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        names |= {r["secretRef"]["name"] for r in c.get("envFrom", []) if "secretRef" in r}
        names |= {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
    names |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return {re.sub(r"-[a-z0-9]{10}$", "", n) for n in names}


def config(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    (cm,) = [
        d for d in docs if d["kind"] == "ConfigMap" and "massive-config" in d["metadata"]["name"]
    ]
    data: dict[str, str] = cm["data"]
    return data


# --- schema validation -----------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "ScaledObject", "PodDisruptionBudget"} <= kinds
    for d in docs:
        if d["kind"] == "ScaledObject":
            # Schema of KEDA's CRD (types, required fields); the round trip catches
            # unknown fields, which the generated models would otherwise drop.
            so = ScaledObject.model_validate(d)
            assert so.model_dump(mode="json", by_alias=True, exclude_unset=True) == d
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)


def test_validators_reject_broken_manifests() -> None:
    """The validators used above do fail on mistakes (guards against a vacuous test)."""
    dep = json.loads(json.dumps(by_kind(render("dev"), "Deployment")["hydrator"]))
    container(dep)["livenessProbe"]["httpGet"]["portt"] = 9100
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    so = json.loads(json.dumps(by_kind(render("dev"), "ScaledObject")["hydrator"]))
    so["spec"]["minReplicaCount"] = "one"
    with pytest.raises(ValueError):
        ScaledObject.model_validate(so)
    so = json.loads(json.dumps(by_kind(render("dev"), "ScaledObject")["hydrator"]))
    so["spec"]["minReplicas"] = 1  # not a ScaledObject field
    dumped = ScaledObject.model_validate(so).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    assert dumped != so


# --- processors ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_processor_has_a_deployment_with_probes_grace_and_config(overlay: str) -> None:
    docs = render(overlay)
    deps = by_kind(docs, "Deployment")
    assert set(PROCESSORS) <= set(deps)
    cfg = config(docs)
    # The ConfigMap parses as the runtime's own settings (fails fast on a typo'd value).
    rt = from_env(RuntimeSettings, {**cfg, "MASSIVE_CONSUMER": "pod-0"})
    assert rt.metrics_port == 9100
    for name, (run, replicas) in PROCESSORS.items():
        dep = deps[name]
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        c = container(dep)
        assert c["args"] == ["run", run], name
        assert spec.get("replicas") == replicas, name
        # Probes on the runner's health endpoint (metrics port).
        assert {"name": "metrics", "containerPort": rt.metrics_port, "protocol": "TCP"} in c[
            "ports"
        ]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        ann = spec["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(rt.metrics_port)
        # SIGTERM: the runner gets MASSIVE_GRACE_S to finish the batch, after any preStop.
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_s = float(pre[1]) if pre[:1] == ["sleep"] else 0.0
        assert pod["terminationGracePeriodSeconds"] > rt.grace_s + pre_s, name
        # Consumer name = pod name (stable across restarts of the same pod).
        assert {
            "name": "MASSIVE_CONSUMER",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        } in c["env"]
        refs = c["envFrom"]
        assert refs[0]["configMapRef"]["name"].startswith("massive-config")
        assert refs[1]["secretRef"]["name"].startswith("massive-redis")
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for name in ("ws-ingest", "chain-poller"):  # never two connections/pollers at once
        assert deps[name]["spec"]["strategy"] == {"type": "Recreate"}
    svc = by_kind(docs, "Service")["sse-gateway"]
    assert svc["spec"]["selector"] == deps["sse-gateway"]["spec"]["selector"]["matchLabels"]
    gw = container(deps["sse-gateway"])
    port = {e["name"]: e.get("value") for e in gw["env"]}["MASSIVE_SSE_PORT"]
    assert {"name": "http", "containerPort": int(port), "protocol": "TCP"} in gw["ports"]


def test_deployments_run_processors_that_exist() -> None:
    missing = [
        run
        for _, (run, _) in PROCESSORS.items()
        if run.partition(":")[0] not in registry.PROCESSORS
    ]
    assert not missing, f"Deployments run processors the registry does not know: {missing}"
    sim = container(by_kind(render("dev"), "Deployment")["simulator"])
    assert sim["args"][0] in cli.EXTERNAL


@pytest.mark.parametrize("overlay", ["dev", "prod", "prod-cluster"])
def test_keda_scales_on_the_lag_of_the_right_groups(overlay: str) -> None:
    docs = render(overlay)
    scaled = by_kind(docs, "ScaledObject")
    deps = by_kind(docs, "Deployment")
    cfg = config(docs)
    assert set(scaled) == set(SCALED)
    for name, wanted in SCALED.items():
        so = scaled[name]["spec"]
        assert so["scaleTargetRef"] == {"name": name}
        assert 1 <= so["minReplicaCount"] <= so["maxReplicaCount"]
        trigs = so["triggers"]
        assert [(t["metadata"]["stream"], t["metadata"]["consumerGroup"]) for t in trigs] == wanted
        cluster = overlay == "prod-cluster"
        kind = "redis-cluster-streams" if cluster else "redis-streams"
        assert all(t["type"] == kind for t in trigs)
        md = trigs[0]["metadata"]
        assert all(int(t["metadata"]["lagCount"]) > 0 for t in trigs)
        assert int(md["activationLagCount"]) >= 0
        # KEDA resolves addressFromEnv (a cluster: addressesFromEnv, the seed nodes) from
        # the target's container env/envFrom; every trigger of a ScaledObject the same way.
        env_name = md["addressesFromEnv" if cluster else "addressFromEnv"]
        for t in trigs:
            assert ("addressFromEnv" in t["metadata"]) != cluster
            assert (
                t["metadata"].get("addressesFromEnv" if cluster else "addressFromEnv") == env_name
            )
        c = container(deps[name])
        assert "massive-redis" in secret_refs(deps[name])  # envFrom: what KEDA resolves
        if overlay == "dev":
            assert re.fullmatch(r"[\w.-]+:\d+", secret(docs, "massive-redis")[env_name])
            assert env_name not in cfg
        else:
            redis_secret = example_secrets()["massive-redis"]
            assert env_name in redis_secret
            for t in trigs:  # every trigger reaches Redis as the processors do
                assert t["metadata"]["passwordFromEnv"] in redis_secret
                assert t["metadata"]["enableTLS"] == "true"
            assert any("secretRef" in r for r in c["envFrom"])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_disruption_budgets_select_deployments_and_allow_drains(overlay: str) -> None:
    docs = render(overlay)
    deps = by_kind(docs, "Deployment")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert {"hydrator", "gex", "sse-gateway", "publisher-butterfly"} <= set(pdbs)
    for name, pdb in pdbs.items():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert sel == deps[name]["spec"]["selector"]["matchLabels"]
        if "minAvailable" in pdb["spec"]:
            # Fixed replicas > minAvailable, or a drain could never evict a pod.
            assert deps[name]["spec"]["replicas"] > pdb["spec"]["minAvailable"], name


def test_dev_overlay_runs_redis7_with_aof_and_the_simulator() -> None:
    docs = render("dev")
    (sts,) = by_kind(docs, "StatefulSet").values()
    c = container(sts)
    assert c["image"] == "redis:7"
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    svc = by_kind(docs, "Service")
    cfg = config(docs)
    host = re.fullmatch(
        r"redis://([\w-]+):(\d+)/0", secret(docs, "massive-redis")["MASSIVE_REDIS_URL"]
    )
    assert host is not None and host.group(1) in svc
    assert int(host.group(2)) == svc[host.group(1)]["spec"]["ports"][0]["port"]
    for var, scheme in (("MASSIVE_POLLER_REST_URL", "http"), ("MASSIVE_WS_URL", "ws")):
        sim = re.fullmatch(scheme + r"://([\w-]+):(\d+)", cfg[var])
        assert sim is not None and sim.group(1) in svc, var
        assert int(sim.group(2)) == svc[sim.group(1)]["spec"]["ports"][0]["port"]
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"massive-dev"}


def test_prod_overlay_has_no_redis_and_commits_no_secret() -> None:
    docs = render("prod")
    assert not by_kind(docs, "StatefulSet")
    assert not by_kind(docs, "Secret")
    assert "MASSIVE_REDIS_URL" not in config(docs)  # comes from the Secret
    example = example_secrets()
    assert set(example["massive-api-key"]) == {"MASSIVE_API_KEY"}
    assert {"MASSIVE_REDIS_URL", "REDIS_ADDR", "REDIS_PASSWORD"} <= set(example["massive-redis"])
    assert "MASSIVE_API_KEY" not in example["massive-redis"]


# Who calls the provider (and, in dev, the simulator that checks the key).
NEEDS_API_KEY = {"chain-poller", "ws-ingest"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_ingest_gets_the_api_key(overlay: str) -> None:
    """The provider's key is in a Secret of its own, referenced by chain-poller and ws-ingest
    (and the dev simulator) only: the gateway and every other pod never see it."""
    docs = render(overlay)
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "Job")}
    with_key = {n for n, w in workloads.items() if "massive-api-key" in secret_refs(w)}
    expected = NEEDS_API_KEY | ({"simulator"} if not overlay.startswith("prod") else set())
    assert with_key == expected
    assert "sse-gateway" in workloads and "sse-gateway" not in with_key
    for name in with_key:  # by name, not envFrom: nothing else of that Secret leaks in
        c = container(workloads[name])
        assert not any(
            "massive-api-key" in r.get("secretRef", {}).get("name", "")
            for r in c.get("envFrom", [])
        )
        (ref,) = [e for e in c["env"] if e["name"] == "MASSIVE_API_KEY"]
        assert ref["valueFrom"]["secretKeyRef"]["key"] == "MASSIVE_API_KEY"
    if not overlay.startswith("prod"):  # the generated Secrets: the key only in its own
        assert set(secret(docs, "massive-api-key")) == {"MASSIVE_API_KEY"}
        assert "MASSIVE_API_KEY" not in secret(docs, "massive-redis")
        assert "MASSIVE_API_KEY" not in config(docs)
        sim = container(workloads["simulator"])
        assert "--api-key" not in sim["args"]  # read from MASSIVE_API_KEY, not the command line


def test_replay_job_runs_a_valid_replay_command() -> None:
    docs = render("replay")
    (job,) = by_kind(docs, "Job").values()
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert (
        c["args"][0] == "replay" and cli.EXTERNAL["replay"] == "processors.ops.replay:replay_main"
    )
    args = replay_parser().parse_args(c["args"][1:])
    # it feeds the dev pipeline (whose processors consume the streams): never in-process ones
    assert args.feed and args.speed == 1.0
    (mount,) = c["volumeMounts"]
    assert Path(args.file).parent == Path(mount["mountPath"])
    (vol,) = pod["volumes"]
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    assert vol["persistentVolumeClaim"]["claimName"] in pvcs
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert c["envFrom"][0]["configMapRef"]["name"] in by_kind(docs, "ConfigMap")


def test_replay_overlay_stops_the_live_ingest_as_the_readme_says() -> None:
    deps = by_kind(render("replay"), "Deployment")
    assert {n: deps[n]["spec"]["replicas"] for n in ("chain-poller", "ws-ingest", "simulator")} == {
        "chain-poller": 0,
        "ws-ingest": 0,
        "simulator": 0,
    }
    model_path = set(PROCESSORS) - {"chain-poller", "ws-ingest"}
    assert all(deps[n]["spec"].get("replicas") != 0 for n in model_path)
    readme = " ".join((ROOT / "deploy" / "README.md").read_text().split())
    assert "chain-poller, ws-ingest and the simulator at 0 replicas" in readme


def pod_images(doc: dict[str, Any]) -> list[str]:
    """The image of every container and init container anywhere in ``doc``."""
    out: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                out += [c["image"] for c in value]
            else:
                out += pod_images(value)
    elif isinstance(doc, list):
        for value in doc:
            out += pod_images(value)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_of_the_project_is_rewritten(overlay: str) -> None:
    """The overlays set one image for every container they deploy, the ones they add
    (simulator, replay Job) included: none is left as the bare ``massive-pipeline``."""
    component = yaml.safe_load((K8S / "components/image/kustomization.yaml").read_text())
    (img,) = component["images"]
    ours = f"{img['newName']}:{img['newTag']}"
    images = {f"{d['kind']}/{d['metadata']['name']}": pod_images(d) for d in render(overlay)}
    unrewritten = {w: i for w, imgs in images.items() for i in imgs if i != ours and i != "redis:7"}
    assert unrewritten == {}
    assert images["Deployment/chain-poller"] == [ours]
    if not overlay.startswith("prod"):
        assert images["Deployment/simulator"] == [ours]
    if overlay == "replay":
        assert images["Job/massive-replay"] == [ours]


# --- Prometheus rules and the dashboard ------------------------------------------------
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool absent (apt-get install prometheus)")
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    assert PROMTOOL is not None
    subprocess.run(
        [PROMTOOL, "check", "rules", str(GRAFANA / "alerts.rules.yml")],
        check=True,
        capture_output=True,
    )
    res = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yml"],
        cwd=GRAFANA,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def defined_metrics() -> set[str]:
    """Every massive_* metric name the code registers (as exposed: counters get _total),
    from calls like ``counter(reg, "massive_x", ...)`` or ``gauge(reg, p + "x", ...)``."""
    names: set[str] = set()
    kinds = r"\b(counter|gauge|histogram|Counter|Gauge|Histogram|_Family)\(\s*[\w.]+,\s*"
    literal = re.compile(kinds + r"\"(massive_\w+)\"")
    prefixed = re.compile(kinds + r"(\w+) \+ \"(\w+)\"")
    sources = [*ROOT.glob("streams/*.py"), *ROOT.glob("processors/**/*.py")]
    for src in sources:
        text = src.read_text()
        found = literal.findall(text)
        prefixes = dict(re.findall(r"\b(\w+) = \"(massive_\w+_)\"", text))
        found += [(k, prefixes[v] + n) for k, v, n in prefixed.findall(text) if v in prefixes]
        for kind, name in found:
            if kind.lower() == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind.lower() == "histogram":
                names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
            else:
                names.add(name)
    return names


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bmassive_[a-z_]+\b", text))


def test_dashboard_and_alerts_use_only_metrics_the_code_exports() -> None:
    defined = defined_metrics()
    assert {"massive_stream_group_lag", "massive_processed_total"} <= defined
    dash = json.loads((GRAFANA / "massive-pipeline.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    rules = (GRAFANA / "alerts.rules.yml").read_text()
    rule_exprs = [r["expr"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"]]
    unknown = sorted(used_metrics("\n".join(exprs + rule_exprs)) - defined)
    assert not unknown, f"dashboard/alerts use metrics nobody exports: {unknown}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("lag", "throughput", "latency", "epoch", "dead", "dormancy"):
        assert topic in titles


# --- image -------------------------------------------------------------------------------
def test_dockerfile_is_slim_non_root_and_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))
    assert 'ENTRYPOINT ["massive-pipeline"]' in lines
    # the locked, hashed dependencies first, then the package alone
    assert "RUN pip install --require-hashes -r requirements.lock \\" in lines
    assert "&& pip install --no-deps . \\" in lines
    assert "requirements.lock" in next(ln for ln in lines if ln.startswith("COPY pyproject.toml"))
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert py["project"]["scripts"]["massive-pipeline"] == "processors.ops.cli:main"
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY ")}
    for pattern in py["tool"]["setuptools"]["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*")
        assert pkg in copied, f"package {pkg} not copied into the image"
        assert (ROOT / pkg).is_dir()
    ignored = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert {".venv", ".git"} <= set(ignored)
    assert not {
        "schemas",
        "streams",
        "processors",
        "simulator",
        "pyproject.toml",
        "requirements.lock",
    } & set(ignored)
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if Path(hadolint).exists():
        res = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_installed_package_carries_its_data_files(tmp_path: Path) -> None:
    """What ``pip install .`` (the Dockerfile) installs must include the Lua scripts and
    static files the processors load at run time, not only the .py modules."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "processors", "schemas", "streams", "simulator"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    data = [f for f in tracked if not f.endswith(".py") and (ROOT / f).is_file()]
    missing = [f for f in data if f not in names]
    assert not missing, f"not in the wheel (add [tool.setuptools.package-data]): {missing}"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_configured_variable_is_read_by_a_settings_class_and_parses(overlay: str) -> None:
    """A typo'd MASSIVE_* name in the manifests would stop the pod at start."""
    docs = render(overlay)
    cfg = config(docs)
    for dep in by_kind(docs, "Deployment").values():
        c = container(dep)
        env = {**cfg, **{e["name"]: e.get("value", "pod-0") for e in c.get("env", [])}}
        check_env(env)  # raises SettingsError naming the unknown variable
        for cls in registered():
            from_env(cls, env)  # every value parses (raises SettingsError if not)


# --- prod access: Ingress + TLS, NetworkPolicies, gateway auth --------------------------
def _ports(dep: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(dep)["ports"]}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + In/NotIn/Exists expressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and val not in e["values"]) or (op == "NotIn" and val in e["values"]):
            return False
        if (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def _port_ok(rule: dict[str, Any], port: int, ports: dict[str, int]) -> bool:
    if "ports" not in rule:
        return True
    for p in rule["ports"]:
        want = p["port"]
        if (ports.get(want) if isinstance(want, str) else want) == port:
            return True
    return False


def _peer_ok(peers: list[dict[str, Any]] | None, namespace: str | None, ip: str | None) -> bool:
    """Whether a peer (a pod of ``namespace`` of any labels, or an outside ``ip``) is one of
    ``peers`` (None: any peer)."""
    if peers is None:
        return True
    for peer in peers:
        if "ipBlock" in peer and ip is not None:
            import ipaddress

            block = peer["ipBlock"]
            addr = ipaddress.ip_address(ip)
            if addr in ipaddress.ip_network(block["cidr"]) and not any(
                addr in ipaddress.ip_network(x) for x in block.get("except", [])
            ):
                return True
        ns_sel = peer.get("namespaceSelector")
        if (
            namespace is not None
            and ns_sel is not None
            and "podSelector" not in peer
            and _selects(ns_sel, {"kubernetes.io/metadata.name": namespace})
        ):
            return True
    return False


def _allowed(
    policies: dict[str, dict[str, Any]],
    pod: dict[str, Any],
    direction: str,
    port: int,
    namespace: str | None = None,
    ip: str | None = None,
) -> bool:
    """Whether the NetworkPolicies let traffic into (``ingress``: from a pod of
    ``namespace``) or out of (``egress``: to ``ip`` or ``namespace``) ``pod`` on ``port``."""
    labels = pod["spec"]["template"]["metadata"]["labels"]
    ports = _ports(pod)
    kind = direction.capitalize()
    isolating = [
        p["spec"]
        for p in policies.values()
        if _selects(p["spec"]["podSelector"], labels) and kind in p["spec"]["policyTypes"]
    ]
    if not isolating:
        return True
    key, peer_key = direction, "from" if direction == "ingress" else "to"
    return any(
        _port_ok(rule, port, ports) and _peer_ok(rule.get(peer_key), namespace, ip)
        for spec in isolating
        for rule in spec.get(key, [])
    )


def test_prod_ingress_routes_only_to_the_gateway_public_port_over_tls() -> None:
    docs = render("prod")
    (ing,) = by_kind(docs, "Ingress").values()
    ann = ing["metadata"]["annotations"]
    assert ann["cert-manager.io/cluster-issuer"]  # cert-manager issues the certificate
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # SSE frames flow
    (tls,) = ing["spec"]["tls"]
    hosts = {r["host"] for r in ing["spec"]["rules"]}
    assert hosts == set(tls["hosts"]) and tls["secretName"]
    backends = {
        (p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"])
        for r in ing["spec"]["rules"]
        for p in r["http"]["paths"]
    }
    assert backends == {("sse-gateway", "http")}
    gw = by_kind(docs, "Deployment")["sse-gateway"]
    ports = _ports(gw)
    env = {e["name"]: e.get("value") for e in container(gw)["env"]}
    assert ports["http"] == int(env["MASSIVE_SSE_PORT"])
    assert ports["admin"] == int(env["MASSIVE_SSE_ADMIN_PORT"]) != ports["http"]
    # no Service exposes the admin or metrics ports
    for svc in by_kind(docs, "Service").values():
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {"http"}, svc["metadata"]


def test_prod_network_policies() -> None:
    """Only the gateway's public port is reachable, only through the Ingress controller;
    metrics and the admin port only from the monitoring namespace; only processors reach
    Redis; only the ingest reaches the provider."""
    docs = render("prod")
    pols = by_kind(docs, "NetworkPolicy")
    deps = by_kind(docs, "Deployment")
    gw = deps["sse-gateway"]
    gp = _ports(gw)
    assert _allowed(pols, gw, "ingress", gp["http"], namespace="ingress-nginx")
    for other in ("default", "monitoring", "massive", None):
        assert not _allowed(pols, gw, "ingress", gp["http"], namespace=other, ip="203.0.113.9")
    assert not _allowed(pols, gw, "ingress", gp["admin"], namespace="ingress-nginx")
    assert _allowed(pols, gw, "ingress", gp["admin"], namespace="monitoring")
    for name, dep in deps.items():
        port = _ports(dep)["metrics"]
        assert _allowed(pols, dep, "ingress", port, namespace="monitoring"), name
        for ns in ("ingress-nginx", "default", "massive"):
            assert not _allowed(pols, dep, "ingress", port, namespace=ns), (name, ns)
        if name != "sse-gateway":
            assert not any(
                _allowed(pols, dep, "ingress", p, namespace="ingress-nginx")
                for p in _ports(dep).values()
            ), name
    # Redis (the port of the overlay's example URL) from every processor, from nothing else
    redis_port = 6380
    assert f":{redis_port}/0" in (K8S / "overlays/prod/kustomization.yaml").read_text()
    for name, dep in deps.items():
        assert _allowed(pols, dep, "egress", redis_port, ip="10.1.2.3"), name
        assert _allowed(pols, dep, "egress", 53, namespace="kube-system"), name
        calls_provider = _allowed(pols, dep, "egress", 443, ip="198.51.100.7")
        assert calls_provider == (name in NEEDS_API_KEY), name
    pod = {"metadata": {"labels": {"app.kubernetes.io/name": "debug"}}}
    stranger = {"spec": {"template": {**pod, "spec": {"containers": [{"ports": []}]}}}}
    assert not _allowed(pols, stranger, "egress", redis_port, ip="10.1.2.3")
    assert not _allowed(pols, stranger, "ingress", 8080, namespace="ingress-nginx")


def test_prod_gateway_requires_a_token_from_its_own_secret() -> None:
    from processors.serve.gateway import SseSettings

    docs = render("prod")
    deps = by_kind(docs, "Deployment")
    gw = deps["sse-gateway"]
    c = container(gw)
    env = {**config(docs), **{e["name"]: e.get("value", "") for e in c["env"]}}
    s = from_env(SseSettings, env)
    assert s.token_file and s.max_clients > 0 and s.max_per_ip > 0
    assert s.trusted_proxy_hops == 1 and s.admin_port > 0
    (mount,) = [m for m in c["volumeMounts"] if s.token_file.startswith(m["mountPath"] + "/")]
    (vol,) = [v for v in gw["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "massive-sse-tokens"
    assert s.token_file.rsplit("/", 1)[1] in example_secrets()["massive-sse-tokens"]
    # only the gateway holds the tokens
    assert {n for n, w in deps.items() if "massive-sse-tokens" in secret_refs(w)} == {"sse-gateway"}
    # the demo and the dev overlay stay open
    dev = container(by_kind(render("dev"), "Deployment")["sse-gateway"])
    assert not any("TOKEN" in e["name"] for e in dev["env"])
