"""deploy/: the dashboard, the alert rules and the Kubernetes files say true things."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient

from creditgate.cli import _parser
from creditgate.config import parse_config
from creditgate.http.app import ENDPOINTS
from creditgate.http.drain import SHUTDOWN_MARGIN_SECONDS, termination_grace_seconds

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\bcreditgate_[a-z_]+")
SUFFIXES = ("", "_bucket", "_sum", "_count")


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "creditgate.json").read_text())


def _alerts() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


def test_dashboard_is_importable_json_with_queries() -> None:
    dash = _dashboard()
    assert dash["title"] and dash["uid"] and dash["panels"]
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_alert_watches_the_windowed_drift_not_consumed_units() -> None:
    """Polar resets ``consumed_units`` every billing cycle; the drift alert reads
    the reconciler's gauge of units outside the lag, computed by event window."""
    rules = {r["alert"]: r for g in _alerts()["groups"] for r in g["rules"] if "alert" in r}
    expr = rules["CreditgateMeterDrift"]["expr"]
    assert "creditgate_polar_meter_drift_units" in expr
    assert "consumed" not in json.dumps(_alerts())


async def test_every_metric_the_dashboard_and_alerts_name_is_exposed(
    cg: TestClient, customer_factory
) -> None:
    c = await customer_factory(1)
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    assert (await cg.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200
    scrape = await (await cg.get("/metrics")).text()
    exposed = set(re.findall(r"^# HELP (creditgate_[a-z_]+)", scrape, re.M))
    named = set(METRIC.findall(json.dumps(_dashboard())))
    for group in _alerts()["groups"]:
        for rule in group["rules"]:
            named |= set(METRIC.findall(rule["expr"]))
    missing = {
        name
        for name in named
        if not any(name.removesuffix(s) in exposed for s in SUFFIXES if s) and name not in exposed
    }
    assert not missing, f"named but not exposed: {sorted(missing)}"


def test_kubernetes_files_match_the_code() -> None:
    docs = {
        path.name: list(yaml.safe_load_all(path.read_text()))
        for path in (DEPLOY / "k8s").glob("*.yaml")
    }
    kinds = {d["kind"] for ds in docs.values() for d in ds}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Job",
        "ConfigMap",
        "Secret",
    } <= kinds
    paths = {e.path for e in ENDPOINTS}
    (deployment,) = docs["deployment.yaml"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" in paths
    (job,) = docs["migrate-job.yaml"]
    commands = [container["command"], job["spec"]["template"]["spec"]["containers"][0]["command"]]
    for command in commands:
        assert command[0] == "creditgate"
        _parser().parse_args(command[1:])  # exits on an unknown command or flag
    # The shutdown grace fits inside the pod's termination grace.
    (config,) = docs["configmap.yaml"]
    grace = int(
        re.search(r"shutdown_timeout_seconds = (\d+)", config["data"]["creditgate.toml"])[1]
    )
    assert grace + 5 < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_the_kubernetes_scrape_sends_the_metrics_token() -> None:
    """The Secret sets METRICS_TOKEN, so Prometheus must scrape with it, not by annotation."""
    (deployment,) = yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text())
    (secret,) = (
        d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text())
        if d["metadata"]["name"] == "creditgate-secrets"
    )
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"].get("annotations") or {}
    token_set = "METRICS_TOKEN" in secret["stringData"]
    # An annotation scrape sends no token: with one set it would only get 401.
    assert not (token_set and annotations.get("prometheus.io/scrape") == "true")
    if not token_set:
        return
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yml").read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics" in {e.path for e in ENDPOINTS}
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    keeps = {
        r["source_labels"][0]: r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert keeps["__meta_kubernetes_pod_label_app"] == pod["metadata"]["labels"]["app"]
    ports = pod["spec"]["containers"][0]["ports"]
    assert keeps["__meta_kubernetes_pod_container_port_name"] in {p["name"] for p in ports}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
def test_promtool_accepts_the_scrape_config(tmp_path) -> None:
    text = (DEPLOY / "prometheus" / "scrape.yml").read_text()
    token = tmp_path / "token"
    token.write_text("t")
    config = tmp_path / "prometheus.yml"
    text = text.replace("/etc/prometheus/secrets/creditgate-metrics-token", str(token))
    # Debian's prometheus is built without Kubernetes service discovery: check
    # everything else of the job with a static target in its place.
    probe = subprocess.run(["promtool", "--version"], capture_output=True, text=True, timeout=60)
    debian = "debian" in (probe.stdout + probe.stderr).lower()
    if debian:
        text = text.replace(
            "kubernetes_sd_configs:\n      - role: pod",
            "static_configs:\n      - targets: ['127.0.0.1:8080']",
        )
        assert "kubernetes_sd_configs" not in text
    config.write_text(text)
    result = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_termination_grace_covers_pre_stop_drain_and_margin() -> None:
    """The kubelet's SIGKILL comes after the preStop, the drain's cut and its margin."""
    (deployment,) = yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text())
    (config,) = yaml.safe_load_all((DEPLOY / "k8s" / "configmap.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    settings = parse_config(
        tomllib.loads(config["data"]["creditgate.toml"], parse_float=Decimal), {}
    )
    timeout = settings.shutdown_timeout_seconds
    assert timeout == 25  # the value read is the one the file sets, not the default
    need = termination_grace_seconds(float(seconds), timeout)
    assert pod["terminationGracePeriodSeconds"] >= need
    # Under --workers N the supervisor kills a worker only past the cut + margin:
    # still inside the grace that is left after the preStop.
    assert timeout + SHUTDOWN_MARGIN_SECONDS <= pod["terminationGracePeriodSeconds"] - float(
        seconds
    )
