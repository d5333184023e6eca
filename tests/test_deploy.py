"""The shipped Prometheus rules and dashboard refer to metrics the code really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import nlpstream.inference.metrics  # noqa: F401 - registers metrics
import nlpstream.jobs.metrics  # noqa: F401
import nlpstream.sinks.metrics  # noqa: F401

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
NAME = re.compile(r"\bnlpstream_[a-z_]+\b")


def exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        for suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"):
            names.add(family.name + suffix)
    return names


def test_rules_are_well_formed_and_use_real_metrics():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    names = exported_names()
    alerts = 0
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule)
            for metric in NAME.findall(rule["expr"]):
                assert metric in names, f"{rule.get('alert') or rule.get('record')}: unknown metric {metric}"
            if "alert" in rule:
                alerts += 1
                assert rule["labels"]["severity"] in ("warning", "critical")
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert alerts >= 5
    promtool = shutil.which("promtool")
    if promtool:
        subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")], check=True)


def test_dashboard_queries_use_real_metrics():
    dash = json.loads((DEPLOY / "grafana" / "nlpstream-dashboard.json").read_text())
    names = exported_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        for metric in NAME.findall(expr):
            assert metric in names, metric


def test_example_config_is_valid():
    from nlpstream.jobs.config import StreamConfig, load_config

    cfg = load_config(StreamConfig, DEPLOY / "config.example.yaml", {})
    assert cfg.kafka.topics == ["support-chats", "fin-news"]
