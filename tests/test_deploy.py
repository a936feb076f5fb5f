"""Deployment files: Prometheus config and alerts, Grafana dashboard, compose, Kubernetes, image.

No Docker or Kubernetes needed. promtool and prometheus (Debian's `prometheus` package, installed
by `make system-deps`) are required: the tests fail, not skip, without them. The integration test
runs a real Prometheus against a daemon on the test broker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from pipeline.cli import build_parser
from pipeline.config import load_settings
from pipeline.embedded import free_port
from tests.kafka_helpers import DaemonProcess, create_topics, produce, unique

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTS_YML = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_YML = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "pipeline.json"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

# What Grafana substitutes in the dashboard's queries, for checking them outside Grafana.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
TEMPLATE_VARIABLES = {"$instance": ".*"}

EXPECTED_ALERTS = {
    "PipelineDown",
    "PipelineInstanceDown",
    "PipelineNoForecasts",
    "PipelineNotReady",
    "PipelineConsumerLagGrowing",
    "PipelineEndToEndLatencyHigh",
    "PipelineDeadLetterRateHigh",
    "PipelineForecastWorseThanLastValue",
    "PipelineInstanceForecastWorseThanLastValue",
    "PipelineStateResets",
    "PipelineCommitFailures",
}


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH. `make system-deps` installs it (Debian package "
            "`prometheus`, which brings both prometheus and promtool)."
        )
    return path


def _promtool(*args: str) -> str:
    proc = subprocess.run(
        [_tool("promtool"), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS_YML.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["refId"], target["expr"]))
    return out


def _dashboard_queries() -> list[str]:
    """Every PromQL-ish string of the dashboard: panel exprs and template variable queries."""
    texts = [expr for _, _, expr in _dashboard_targets()]
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            for key, value in _walk(variable):
                if key in ("query", "definition") and isinstance(value, str):
                    texts.append(value)
    return texts


def _substitute(expr: str) -> str:
    for name, value in {**GRAFANA_VARIABLES, **TEMPLATE_VARIABLES}.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr!r}"
    return expr


# A metric name starting with pipeline_, not inside a quoted label value.
METRIC_NAME = re.compile(r"(?<![\w:\"'.])pipeline_[A-Za-z0-9_:]*")

# The series names a metric family puts in /metrics, by type. Families with labels have no
# samples until a child exists, so the names come from the type, not from collect()'s samples.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def exported_series_names() -> set[str]:
    """Every series name the daemon's /metrics can carry (from the registered families)."""
    import pipeline.metrics  # noqa: F401  (registers the daemon's metrics)

    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
        names.update(s.name for s in family.samples if not s.name.endswith("_created"))
    return names


def referenced_metric_names(texts: list[str]) -> set[str]:
    return {m.group(0) for text in texts for m in METRIC_NAME.finditer(text)}


def _unknown_names(texts: list[str]) -> set[str]:
    return referenced_metric_names(texts) - exported_series_names()


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_docs(path):
            if doc.get("kind") == "Kustomization":
                continue
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a compose service's bind mounts."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
        elif volume.get("type") == "bind":
            source, target = volume["source"], volume["target"]
        else:
            continue
        out.append(((ROOT / source).resolve(), target))
    return out


def _host_path(mounts: list[tuple[Path, str]], container_path: str) -> Path:
    """The repository file that a container path of a service is mounted from."""
    path = PurePosixPath(container_path)
    for host, target in mounts:
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return host / path.relative_to(target)
    raise AssertionError(f"{container_path} is not under any bind mount {mounts}")


def _dockerfile() -> tuple[str, list[tuple[str, PurePosixPath]]]:
    """(USER, [(COPY source, absolute destination)]) of deploy/Dockerfile."""
    workdir, user, copies = PurePosixPath("/"), "root", []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "WORKDIR":
            workdir = workdir / words[1]
        elif words[0] == "USER":
            user = words[1]
        elif words[0] == "COPY":
            args = [w for w in words[1:] if not w.startswith("--")]
            dest = workdir / args[-1]
            for source in args[:-1]:
                target = dest / source if args[-1].endswith("/") and len(args) > 2 else dest
                copies.append((source, target))
    return user, copies


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_config() -> None:
    out = _promtool("check", "config", str(PROMETHEUS_YML.relative_to(ROOT)))
    assert "1 rule files found" in out, out  # rule_files resolved relative to the config


def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(ALERTS_YML.relative_to(ROOT)))
    assert f"{len(EXPECTED_ALERTS)} rules found" in out, out


def test_alert_rules_fire_when_they_should_and_only_then() -> None:
    """promtool's unit tests of every alert (deploy/prometheus/alerts_test.yml)."""
    _promtool("test", "rules", str(ALERTS_TEST_YML.relative_to(ROOT)))
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == EXPECTED_ALERTS, f"alerts never shown firing: {EXPECTED_ALERTS - tested}"


def test_alert_rules_carry_severity_annotations_and_for() -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"]) > 40, name
        if rule["labels"]["severity"] != "info":
            assert re.fullmatch(r"\d+[ms]", rule.get("for", "")), f"{name}: needs a `for:`"


def test_prometheus_config_scrapes_the_daemon_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert [(PROMETHEUS_DIR / f).resolve() for f in config["rule_files"]] == [ALERTS_YML]
    assert not any(Path(f).is_absolute() for f in config["rule_files"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["pipeline"]["dns_sd_configs"][0]
    assert sd["names"] == ["pipeline"] and sd["port"] == 9108
    assert "pipeline" in _compose()["services"]


# --------------------------------------------------------------------------- metric names


def test_dashboard_and_alerts_use_only_metrics_the_daemon_exports() -> None:
    dashboard = _dashboard_queries()
    alerts = [rule["expr"] for rule in _alert_rules()]
    hpa = [(K8S / "hpa-external-metric.yaml").read_text()]
    for what, texts in (("dashboard", dashboard), ("alert rules", alerts), ("HPA", hpa)):
        assert referenced_metric_names(texts), f"no pipeline_ metric found in the {what}"
        unknown = sorted(_unknown_names(texts))
        assert not unknown, f"{what}: metrics the daemon does not export: {unknown}"
    # Every metric family of the daemon shows up somewhere on the dashboard.
    used = referenced_metric_names(dashboard)
    unused = [
        family.name
        for family in REGISTRY.collect()
        if family.name.startswith("pipeline_")
        and not {family.name + s for s in SERIES_SUFFIXES[family.type]} & used
    ]
    assert not unused, f"metrics without a dashboard panel: {unused}"


def test_the_metric_name_check_rejects_names_that_are_not_exported() -> None:
    exported = exported_series_names()
    # Histograms, counters and infos expose suffixed series only.
    assert "pipeline_end_to_end_latency_seconds_bucket" in exported
    assert "pipeline_end_to_end_latency_seconds" not in exported
    assert "pipeline_forecasts_emitted_total" in exported  # labelled: no sample before use
    assert "pipeline_consumer_lag_records" in exported
    assert "pipeline_model_info" in exported and "pipeline_model" not in exported
    bad = [
        "sum(rate(pipeline_forecasts_emitted[5m]))",  # counter without _total
        "rate(pipeline_batch_size[5m])",  # histogram without a suffix
        'pipeline_made_up_total{job="pipeline"} > 0',
    ]
    assert _unknown_names(bad) == {
        "pipeline_forecasts_emitted",
        "pipeline_batch_size",
        "pipeline_made_up_total",
    }
    assert not _unknown_names(['up{job="pipeline", topic="pipeline_x"}'])  # label values


# --------------------------------------------------------------------------- Grafana


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, variables substituted, parses (as a recording rule for promtool)."""
    targets = _dashboard_targets()
    assert len(targets) >= 20
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _substitute(expr)}
        for i, (_, _, expr) in enumerate(targets)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(path))


def test_dashboard_structure_and_provisioning() -> None:
    dash = _dashboard()
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("latency", "lag", "dead letters", "outcome", "skill", "drift", "readiness"):
        assert topic in titles, topic
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"

    datasources = yaml.safe_load((GRAFANA_DIR / "datasources" / "prometheus.yml").read_text())
    prometheus = datasources["datasources"][0]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    # The provider's path is where docker-compose.yml mounts the dashboards directory.
    providers = yaml.safe_load((GRAFANA_DIR / "dashboards" / "dashboards.yml").read_text())
    mounts = _bind_mounts(_compose()["services"]["grafana"])
    provider_dir = _host_path(mounts, providers["providers"][0]["options"]["path"])
    assert (provider_dir / DASHBOARD.name).resolve() == DASHBOARD


# --------------------------------------------------------------------------- docker compose


def test_compose_parses_and_references_existing_files() -> None:
    services = _compose()["services"]
    assert {"kafka", "kafka-init", "pipeline", "simulator", "prometheus", "grafana"} <= set(
        services
    )
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            assert context.is_dir(), f"{name}: build context {context}"
            dockerfile = context / (build.get("dockerfile", "Dockerfile"))
            assert dockerfile.is_file(), f"{name}: dockerfile {dockerfile}"
        for host, _ in _bind_mounts(service):
            assert host.exists(), f"{name}: mounted path {host} is not in the repository"
    # The container paths that matter resolve to repository files.
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = _host_path(_bind_mounts(prometheus), config_flag.split("=", 1)[1])
    assert config.resolve() == PROMETHEUS_YML
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(_bind_mounts(grafana), home).resolve() == DASHBOARD


def test_compose_runs_two_daemons_in_one_group_and_a_simulator() -> None:
    services = _compose()["services"]
    daemon = services["pipeline"]
    assert daemon["deploy"]["replicas"] == 2
    assert daemon["environment"]["PIPELINE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "ports" not in daemon, "replicas of one service cannot share a host port"
    args = build_parser().parse_args(daemon["command"])
    assert args.command == "run" and args.group_id is None  # all replicas: group `pipeline`
    # The --config path is a file the image copies from the repository.
    _, copies = _dockerfile()
    config = PurePosixPath(str(args.config))
    source = next(
        ROOT / src / config.relative_to(dst) for src, dst in copies if dst in config.parents
    )
    assert source.is_file()

    sim = build_parser().parse_args(services["simulator"]["command"])
    assert sim.command == "simulate" and sim.synthetic and sim.bootstrap_servers == "kafka:9092"

    init = " ".join(services["kafka-init"]["command"])
    assert "for topic in ticks forecasts ticks.dlq" in init and "--partitions 6" in init
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"

    host_ports = [
        str(p).split(":")[0] for s in services.values() for p in s.get("ports", []) if ":" in str(p)
    ]
    assert len(host_ports) == len(set(host_ports)), f"host ports clash: {host_ports}"


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_parse_and_are_namespace_free() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        docs = _yaml_docs(path)
        assert docs, path
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"], path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path
                assert "namespace" not in doc["metadata"], f"{path.name}: namespace-free"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    # KEDA and the plain HPA both own the replica count: only one of them is applied.
    assert "keda-scaledobject.yaml" in kustomization["resources"]
    assert "hpa-external-metric.yaml" not in kustomization["resources"]


def test_k8s_configmap_holds_valid_daemon_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = _k8s_objects()
    for name in [k for k in os.environ if k.startswith("PIPELINE_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "pipeline.yaml"
    path.write_text(objects[("ConfigMap", "pipeline-config")]["data"]["pipeline.yaml"])
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers  # never null: that would start the embedded broker
    assert settings.sample_feed.enabled is False
    assert settings.metrics.port == 9108


def test_k8s_deployment_probes_resources_and_autoscaling_agree() -> None:
    objects = _k8s_objects()
    deployment = objects[("Deployment", "pipeline")]
    spec = deployment["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9108"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 30
    # Service links would inject PIPELINE_SERVICE_HOST etc., which the settings loader rejects.
    assert pod["spec"]["enableServiceLinks"] is False
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9108}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 9108, probe
    env = {e["name"]: e for e in container["env"]}
    assert env["PIPELINE_KAFKA__BOOTSTRAP_SERVERS"]["value"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    # The image's entrypoint is `pipeline`; the args are a valid command line whose --config
    # is the mounted ConfigMap.
    args = build_parser().parse_args(container["args"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_volume = next(
        n for n, p in mounts.items() if PurePosixPath(p) == PurePosixPath(str(args.config)).parent
    )
    configmap = objects[("ConfigMap", volumes[config_volume]["configMap"]["name"])]
    assert PurePosixPath(str(args.config)).name in configmap["data"]
    settings = yaml.safe_load(configmap["data"]["pipeline.yaml"])
    assert settings["model"]["torch_threads"] == int(container["resources"]["limits"]["cpu"])

    for kind in ("Service", "PodDisruptionBudget"):
        obj = objects[(kind, "pipeline")]
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    service_port = objects[("Service", "pipeline")]["spec"]["ports"][0]
    assert service_port["port"] == 9108 and service_port["targetPort"] == "metrics"

    # Lag-based autoscaling: the daemon's group and input topic, at most one replica per input
    # partition.
    kafka = settings["kafka"]
    scaled = objects[("ScaledObject", "pipeline")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["minReplicaCount"] == spec["replicas"]
    assert scaled["maxReplicaCount"] == kafka["partitions"] == 6
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == kafka["group_id"] == "pipeline"
    assert meta["topic"] == kafka["input_topic"] == "ticks"
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServers"] == env["PIPELINE_KAFKA__BOOTSTRAP_SERVERS"]["value"]
    hpa = objects[("HorizontalPodAutoscaler", "pipeline")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["maxReplicas"] == kafka["partitions"]
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "pipeline_consumer_lag_records"


# --------------------------------------------------------------------------- the image


def test_dockerfile_copies_existing_paths_and_runs_as_non_root() -> None:
    user, copies = _dockerfile()
    assert copies
    ignore = (ROOT / ".dockerignore").read_text().split()
    for source, _ in copies:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f".dockerignore drops {source}"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and non-root"
    text = DOCKERFILE.read_text()
    pin = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and f"whl/cpu torch=={pin.group(1)}" in text, "CPU torch of the pinned version"


def test_package_data_covers_the_shipped_model() -> None:
    """pyproject's package-data patterns match the model pair the daemon loads by default."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["pipeline"]
    shipped = {
        p.relative_to(ROOT / "pipeline") for pat in patterns for p in (ROOT / "pipeline").glob(pat)
    }
    assert {Path("models/default.pt"), Path("models/default.json")} <= shipped, patterns


def _can_build_wheels_offline() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("setuptools").split(".")[0])
    except PackageNotFoundError:
        return False
    return major >= 70  # bdist_wheel built in (and pyproject asks for >= 68)


def test_the_installed_package_ships_the_model(tmp_path: Path) -> None:
    """What `pip install .` in the image installs: a wheel with a loadable model pair."""
    if not _can_build_wheels_offline():
        pytest.skip(
            "building the wheel offline needs setuptools >= 70 in the venv "
            "(.venv/bin/pip install -U setuptools); package-data is still checked above"
        )
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("pipeline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"pipeline/models/default.pt", "pipeline/models/default.json"} <= names
        zf.extractall(tmp_path / "site")
    check = "import pipeline, pipeline.model as m; m.load_model(None); print(pipeline.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(tmp_path / "site")), out.stdout


# --------------------------------------------------------------------------- live Prometheus


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            raise  # still starting: _wait_for retries
        # 400/422: a bad query, with Prometheus' reason.
        raise AssertionError(f"{url}: {exc.code} {exc.read().decode()[:500]}") from exc
    assert body["status"] == "success", body
    return body["data"]


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = _api(base, "/api/v1/query", query=expr)["result"]
    return result


def _value(base: str, expr: str) -> float | None:
    result = _query(base, expr)
    return float(result[0]["value"][1]) if result else None


def _wait_for(
    what: str, check: Callable[[], bool], timeout_s: float, prometheus: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert prometheus.poll() is None, f"prometheus exited {prometheus.returncode}"
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _test_prometheus_config(metrics_port: int, tmp_path: Path) -> Path:
    """deploy/prometheus/prometheus.yml with a 1 s scrape of one daemon on localhost."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "pipeline")
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = [job]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


P99 = "histogram_quantile(0.99, sum by (le) (rate(pipeline_end_to_end_latency_seconds_bucket[1m])))"
# Alerts that a healthy daemon with a finished stream must not even have pending.
QUIET_ALERTS = {
    "PipelineDown",
    "PipelineInstanceDown",
    "PipelineNoForecasts",
    "PipelineNotReady",
    "PipelineConsumerLagGrowing",
    "PipelineDeadLetterRateHigh",
    "PipelineCommitFailures",
}


@pytest.mark.integration
@pytest.mark.usefixtures("kafka_client")
def test_prometheus_scrapes_latency_and_forecasts_of_a_live_stream(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    prometheus_bin = _tool("prometheus")
    inp, out, dlq, group = unique("ticks"), unique("forecasts"), unique("dlq"), unique("group")
    create_topics(bootstrap, [inp, out, dlq], partitions=6)
    metrics_port, prometheus_port = free_port(), free_port()
    start_daemon(
        ["--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
         "--dlq-topic", dlq, "--group-id", group, "--metrics-port", str(metrics_port),
         "--no-sample-feed"]
    )  # fmt: skip
    config = _test_prometheus_config(metrics_port, tmp_path)
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{prometheus_port}"
    try:
        # Scraped while idle and ready (in the group): rate() then sees the counters rise from 0.
        _wait_for(
            "the daemon scraped as ready",
            lambda: _value(base, "max(pipeline_ready)") == 1.0,
            60,
            prometheus,
        )

        n_streams, n_ticks = 20, 2000
        records: list[tuple[bytes | None, bytes | None]] = [
            (
                f"s{i % n_streams:02d}".encode(),
                json.dumps({"ts": 1.7e9 + 60 * (i // n_streams), "value": 100 + i % 7}).encode(),
            )
            for i in range(n_ticks)
        ]
        records.insert(n_ticks // 2, (b"s00", b"{not json"))  # one dead letter, for its series
        produce(bootstrap, inp, records)

        forecasts = "sum(pipeline_forecasts_emitted_total)"
        _wait_for(
            f"{forecasts} == {n_ticks}",
            lambda: _value(base, forecasts) == n_ticks,
            30,
            prometheus,
        )
        assert _value(base, "sum(pipeline_ticks_consumed_total)") == n_ticks + 1
        assert _value(base, "sum(pipeline_dead_letters_total)") == 1

        p99: list[float] = []

        def p99_known() -> bool:
            value = _value(base, P99)
            if value is None or value != value:  # absent or NaN: no increase in the window yet
                return False
            p99.append(value)
            return True

        _wait_for("a p99 latency", p99_known, 15, prometheus)
        assert 0 < p99[-1] < 60, p99

        # The metric names the dashboard and alerts use are all in Prometheus (not just derived
        # from the registry), and every dashboard query runs and returns data.
        # The lag gauge first appears once a fetch response has brought a high watermark, so
        # a loaded machine may need another scrape or two.
        referenced = referenced_metric_names(
            _dashboard_queries() + [rule["expr"] for rule in _alert_rules()]
        )
        missing: list[str] = []

        def all_names_ingested() -> bool:
            missing[:] = sorted(referenced - set(_api(base, "/api/v1/label/__name__/values")))
            return not missing

        try:
            _wait_for("every referenced metric name", all_names_ingested, 20, prometheus)
        except AssertionError:
            raise AssertionError(f"never scraped: {missing}") from None
        # A series born with a value (a labelled counter's first increment) needs a second
        # scrape before rate() returns anything for it.
        empty: list[str] = []

        def all_panels_have_data() -> bool:
            empty[:] = [
                f"{title} / {ref}"
                for title, ref, expr in _dashboard_targets()
                if not _query(base, _substitute(expr))
            ]
            return not empty

        try:
            _wait_for("data for every dashboard query", all_panels_have_data, 10, prometheus)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; no data: {empty}") from None

        # Every alert rule evaluates without error; the ones a healthy run must not trigger
        # are inactive.
        def rules_evaluated() -> bool:
            groups = _api(base, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return len(rules) == len(EXPECTED_ALERTS) and all(
                r["health"] != "unknown" for r in rules
            )

        _wait_for("the alert rules evaluated", rules_evaluated, 10, prometheus)
        rules = [r for g in _api(base, "/api/v1/rules")["groups"] for r in g["rules"]]
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            if rule["name"] in QUIET_ALERTS:
                assert rule["state"] == "inactive", (rule["name"], rule["alerts"])
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=15)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
    assert prometheus.returncode == 0, log_path.read_text()[-3000:]
