"""The deploy files: rules and dashboard use real metrics and pass promtool, the compose
file follows the compose spec and starts in order, the manifest, the image and the rules agree."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import nlpstream.inference.metrics  # noqa: F401 - registers metrics
import nlpstream.jobs.metrics  # noqa: F401
import nlpstream.sinks.metrics  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
NAME = re.compile(r"\bnlpstream_[a-z_]+\b")
# Series that exist only after a rare event: a dashboard panel over one shows no data in a healthy run.
ABSENT_WHEN_HEALTHY = {"nlpstream_inference_device_token_cap"}


def exported_names() -> set[str]:
    """Every series the jobs export, and the supervisor's own (``stream --workers``)."""
    from nlpstream.jobs.supervisor import WORKER_RESTARTS, WORKER_UP

    names = {WORKER_UP, WORKER_RESTARTS + "_total"}
    for family in REGISTRY.collect():
        for suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"):
            names.add(family.name + suffix)
    return names


def promtool(*args: str | Path, cwd: Path = ROOT) -> str:
    """Run promtool; fails (never skips) where it is missing."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: install Debian's prometheus package "
                    "(apt-get install --no-install-recommends prometheus; .ci/run does)")
    proc = subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{out}"
    return out


def promtool_check_metrics(text: str) -> None:
    """``promtool check metrics`` on an exposition text: its format and lint rules (units, counter names)."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: install Debian's prometheus package "
                    "(apt-get install --no-install-recommends prometheus; .ci/run does)")
    proc = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool check metrics failed:\n{proc.stdout}{proc.stderr}"


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "rules.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert(name: str) -> dict[str, Any]:
    return next(r for r in rules() if r.get("alert") == name)


def manifest() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / "nlpstream.yaml").read_text())}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


# ------------------------------------------------------------------------------- rules


def test_rules_are_well_formed_and_use_real_metrics():
    names = exported_names()
    alerts = 0
    for rule in rules():
        assert ("alert" in rule) != ("record" in rule)
        for metric in NAME.findall(rule["expr"]):
            assert metric in names, f"{rule.get('alert') or rule.get('record')}: unknown metric {metric}"
        if "alert" in rule:
            alerts += 1
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert alerts >= 5


def test_promtool_checks_the_rules():
    out = promtool("check", "rules", PROM / "rules.yml")
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_rule_unit_tests_pass():
    files = sorted(PROM.glob("*.test.yml"))
    assert files, "no promtool rule tests beside rules.yml"
    out = promtool("test", "rules", *files)
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_rule_unit_tests_cover_every_rule():
    """Each alert has a case where it fires and one where it stays silent; each recording rule is evaluated."""
    firing: set[str] = set()
    silent: set[str] = set()
    evaluated = ""
    for path in PROM.glob("*.test.yml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["rules.yml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
            evaluated += " ".join(case["expr"] for case in test.get("promql_expr_test", []))
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - silent == set(), "alerts without an exp_alerts: [] case"
    records = {r["record"] for r in rules() if "record" in r}
    assert {r for r in records if not re.search(rf"(?<![\w:]){re.escape(r)}(?![\w:])", evaluated)} == set(), \
        "recording rules without a promql_expr_test"


def test_lag_and_progress_rules_use_committed_lag():
    """The position lag reads 0 while fetched records wait for a failing sink; committed lag does not."""
    for name in ("NlpstreamConsumerLagHigh", "NlpstreamNoProgress"):
        expr = alert(name)["expr"]
        assert "nlpstream_consumer_committed_lag" in expr, name
        assert not re.search(r"\bnlpstream_consumer_lag\b", expr), name
    no_progress = alert("NlpstreamNoProgress")
    assert no_progress["for"] == "10m"
    assert "nlpstream_messages_dead_lettered_total" in no_progress["expr"]  # an all-DLQ topic is progress


# ------------------------------------------------------------------------------- prometheus.yml, compose


def test_promtool_checks_the_config_from_any_folder(tmp_path):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] and all(not Path(f).is_absolute() for f in config["rule_files"])
    out = promtool("check", "config", PROM / "prometheus.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(config['rule_files'])} rule files found" in out


def _compose_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("jsonschema") is None:
        pytest.fail("check-jsonschema (the compose-spec schema) and jsonschema are missing: "
                    "pip install -e '.[test]' (make install does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_follows_the_compose_spec():
    schema = _compose_schema()
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # the schema is strict where it matters here: a wrong depends_on condition is an error
    broken = compose()
    broken["services"]["nlpstream"]["depends_on"]["kafka"]["condition"] = "healthy"
    assert list(validator.iter_errors(broken))
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        proc = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_compose_worker_waits_for_a_healthy_broker_and_restarts():
    services = compose()["services"]
    health = services["kafka"]["healthcheck"]
    command = health["test"] if isinstance(health["test"], str) else " ".join(health["test"])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server localhost:9092" in command
    assert health["retries"] * int(health["interval"].rstrip("s")) >= 60  # a slow broker start is no failure
    worker = services["nlpstream"]
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["restart"] in ("always", "unless-stopped", "on-failure")
    assert worker["environment"]["NLPSTREAM_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_compose_mounts_exist_and_rules_sit_beside_the_prometheus_config():
    doc = compose()
    mounts: dict[str, dict[str, str]] = {}
    for name, service in doc["services"].items():
        mounts[name] = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[name][target] = source
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in doc.get("volumes", {}), f"{name}: named volume {source} is not declared"
    build = doc["services"]["nlpstream"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    prom = mounts["prometheus"]
    assert prom["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert prom.get(f"/etc/prometheus/{rule_file}") == f"./prometheus/{rule_file}", rule_file
    # the worker's example config writes where the compose file keeps its output
    example = yaml.safe_load((DEPLOY / "config.example.yaml").read_text())
    assert example["output"]["output"] in mounts["nlpstream"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"nlpstream:{example['metrics']['metrics_port']}" in targets


# ------------------------------------------------------------------------------- image, manifest, KEDA


def test_image_has_the_storage_extras_the_manifest_needs(tmp_path):
    from nlpstream.jobs.config import StreamConfig, load_config

    config_file = tmp_path / "config.yaml"
    config_file.write_text(manifest()["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(StreamConfig, config_file, {})
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    protocol = cfg.output.output.split("://")[0] if "://" in cfg.output.output else None
    if protocol is not None:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}[protocol]
        assert any(dep.startswith(package) for deps in extras.values() for dep in deps), package
    assert extras["storage"] == ["nlpstream[s3,gcs,azure]"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"pip install \S*\.\[[a-z,]*\bstorage\b[a-z,]*\]", dockerfile)
    assert re.search(r"pip install \S*\.\[[a-z,]*\bregistry\b[a-z,]*\]", dockerfile)  # schema'd input
    uid = re.search(r"^USER (\d+)", dockerfile, re.M).group(1)
    pod = manifest()["Deployment"]["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid
    for env in pod["containers"][0]["env"]:
        if "secretKeyRef" in env.get("valueFrom", {}):
            assert env["valueFrom"]["secretKeyRef"]["optional"] is True, env["name"]


def test_keda_trigger_measures_what_the_lag_alert_measures(tmp_path):
    """KEDA's kafka scaler counts lag from committed offsets, per topic, for one group:
    the trigger must name the job's group, topic and broker and start a new group where the
    job does; the alert (on nlpstream_consumer_committed_lag) sits at twice lagThreshold."""
    from nlpstream.jobs.config import StreamConfig, load_config

    docs = manifest()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(StreamConfig, config_file, {})
    scaled = docs["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == cfg.kafka.group_id
    assert meta["topic"] in cfg.kafka.topics
    assert meta["bootstrapServers"] == cfg.kafka.bootstrap_servers
    assert meta.get("offsetResetPolicy", "latest") == cfg.kafka.auto_offset_reset
    threshold = re.search(r"sum by \(topic\) \(nlpstream_consumer_committed_lag\) > (\d+)",
                          alert("NlpstreamConsumerLagHigh")["expr"])
    assert threshold, "NlpstreamConsumerLagHigh must compare the committed lag per topic with a number"
    assert int(threshold.group(1)) == 2 * int(meta["lagThreshold"])


# ------------------------------------------------------------------------------- dashboard


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "nlpstream-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_queries_use_real_metrics():
    names = exported_names()
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        assert "$" not in expr, f"plain PromQL only (no Grafana variables): {expr}"
        for metric in NAME.findall(expr):
            assert metric in names, metric
            assert metric not in ABSENT_WHEN_HEALTHY, f"{metric} is absent in a healthy run: {expr}"
    assert any("nlpstream_consumer_committed_lag" in e for e in exprs)
    assert any(re.search(r"\bnlpstream_consumer_lag\b", e) for e in exprs)


def test_dashboard_queries_parse(tmp_path):
    doc = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(doc))
    promtool("check", "rules", path)


def test_example_config_is_valid():
    from nlpstream.jobs.config import StreamConfig, load_config

    cfg = load_config(StreamConfig, DEPLOY / "config.example.yaml", {})
    assert cfg.kafka.topics == ["support-chats", "fin-news"]
