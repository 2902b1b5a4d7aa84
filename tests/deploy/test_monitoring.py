"""Checks of deploy/monitoring/: the Prometheus alert rules, their unit tests, the Grafana dashboard,
the scrape configuration and the PodMonitor.

Needs: pytest, PyYAML, and promtool (Debian package `prometheus`). Without promtool the promtool
checks are skipped, except under CI=true, where they fail: CI must check the rules.

Run: python3 -m pytest tests/deploy -q
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
POD_MONITOR = MONITORING / "podmonitor.yaml"

# The metrics kora-sidecar exports, with their label values. The rules and
# the dashboard may name only these (and Prometheus' own `up`); test_metric_names_are_exported_by_
# the_sources checks the same names against the Swift sources.
CONTRACT_METRICS = {
    "kora_sidecar_webhooks_total": {
        "result": {"accepted", "duplicate", "unrouted", "unverified", "MISSING_SIGNATURE", "INVALID_SIGNATURE",
                   "STALE_TIMESTAMP", "UNSUPPORTED_ALGORITHM", "INVALID_PAYLOAD", "PAYLOAD_TOO_LARGE", "UNAVAILABLE",
                   "REQUEST_TIMEOUT"},
        "reason": {"MISSING_SIGNATURE", "INVALID_SIGNATURE", "STALE_TIMESTAMP", "UNSUPPORTED_ALGORITHM",
                   "store", "service_refused", "service_held", "in_flight", "busy"},
    },
    "kora_sidecar_deliveries_total": {"service": None, "result": {"delivered", "retry", "dead", "refused", "not_recorded", "not_attempted"}},
    "kora_sidecar_delivery_duration_seconds": {"service": None},
    "kora_sidecar_outbox_depth": {"service": None, "state": {"pending", "delivered", "dead"}},
    "kora_sidecar_oldest_pending_age_seconds": {"service": None},
    "kora_sidecar_kora_requests_total": {"status_class": {"2xx", "3xx", "4xx", "5xx", "error"}},
    "kora_sidecar_kora_request_duration_seconds": {},
    "kora_sidecar_kora_credentials_rejected_total": {},
    "kora_sidecar_stored_bodies_unreadable_total": {},
    "kora_sidecar_webhooks_signed_late_total": {},
    "kora_sidecar_ready": {},
    "kora_sidecar_unrouted_events": {},
    "kora_sidecar_store_free_bytes": {},
    "kora_sidecar_outbox_counts_age_seconds": {},
    "kora_sidecar_service_state": {"service": None, "state": {"closed", "open", "half_open"}},
}
HISTOGRAMS = {"kora_sidecar_delivery_duration_seconds", "kora_sidecar_kora_request_duration_seconds"}
# Labels Prometheus adds to every target (the scrape configuration here adds namespace and pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}
PROMETHEUS_OWN = {"up"}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "inf", "nan", "atan2",
}


# ---------------------------------------------------------------------------------------------
# helpers


def strip_suffix(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def grafana_to_promql(expr):
    """A dashboard query with Grafana's variables replaced, so that promtool can parse it."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(namespace|service)\}?", ".*", expr)


def metric_names(expr):
    """The metric names a PromQL expression selects (suffixes of the histograms stripped)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', grafana_to_promql(expr))  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:ms|s|m|h|d|w|y)?\b", " ", text)  # numbers and durations
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        token = match.group(0)
        if token.lower() in PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation
        names.add(strip_suffix(token))
    return names


def label_matchers(expr):
    """[(metric, label, operator, value)] of the selectors in an expression."""
    found = []
    for selector in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", grafana_to_promql(expr)):
        metric = strip_suffix(selector.group(1))
        for matcher in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', selector.group(2)):
            found.append((metric, matcher.group(1), matcher.group(2), matcher.group(3)))
    return found


def alert_rules():
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard():
    return json.loads(DASHBOARD.read_text())


def dashboard_panels():
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries():
    queries = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group(1))
    return queries


def exported_metric_names():
    """The kora_sidecar_* string literals of the Swift sources, wherever the targets are."""
    names = set()
    for path in sorted((ROOT / "Sources").rglob("*.swift")):
        names |= set(re.findall(r'"(kora_sidecar_[a-z_]+)"', path.read_text()))
    assert names, "no kora_sidecar_* string literal under Sources/"
    return names


@pytest.fixture(scope="session")
def promtool():
    path = shutil.which("promtool")
    if not path:
        message = "promtool is not installed (Debian package `prometheus`; scripts/setup installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must check the alert rules")
        pytest.skip(message)
    return path


def run_promtool(promtool, *arguments, cwd=None):
    return subprocess.run([promtool, *arguments], capture_output=True, text=True, timeout=120, cwd=cwd)


# ---------------------------------------------------------------------------------------------
# the extraction the name checks rely on


def test_metric_name_extraction_finds_selectors_and_nothing_else():
    expr = ('sum by (job, service) (rate(kora_sidecar_delivery_duration_seconds_bucket{service=~"a|b"}[5m])) '
            '/ on(job) group_left sum without (le) (foo_total offset 30m) > 0.1 * bar and up{job="x"} == 0 '
            'or absent(baz) unless histogram_quantile(0.99, qux_count[$__rate_interval])')
    assert metric_names(expr) == {"kora_sidecar_delivery_duration_seconds", "foo_total", "bar", "up", "baz", "qux_count"}
    assert label_matchers(expr) == [
        ("kora_sidecar_delivery_duration_seconds", "service", "=~", "a|b"), ("up", "job", "=", "x")]


# ---------------------------------------------------------------------------------------------
# alert rules


def test_promtool_check_rules_passes(promtool):
    result = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


# Alerts whose unit tests do not yet show them firing, or not firing. A new alert gets both.
NOT_TESTED_FIRING = set()
NOT_TESTED_SILENT = set()


def test_promtool_unit_tests_of_the_alerts_pass(promtool):
    document = yaml.safe_load(ALERT_TESTS.read_text())
    assert document["rule_files"] == [ALERTS.name]
    cases = [case for test in document["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert firing | silent <= names, "unit tests of alerts that do not exist"
    assert names - firing == NOT_TESTED_FIRING, "unit-test every alert firing (and update NOT_TESTED_FIRING)"
    assert names - silent == NOT_TESTED_SILENT, "unit-test every alert not firing (and update NOT_TESTED_SILENT)"
    result = run_promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_waits_is_labelled_and_says_what_to_do():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: give it a `for:`"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and len(annotations["summary"]) <= 120, name
        # What to do: a command, an endpoint or a configuration key, not only what happened.
        assert re.search(r"`[^`]+`|kora-sidecar \w|/readyz|webhooks\.|kora\.", annotations["description"]), name


def alerts_naming(metric, **labels):
    """The alerts whose expression selects `metric` with every given label matcher value."""
    found = []
    for rule in alert_rules():
        if metric not in metric_names(rule["expr"]):
            continue
        matchers = {(label, value) for m, label, _, value in label_matchers(rule["expr"]) if m == metric}
        if all(any(label == l and re.fullmatch(v, value) for l, v in matchers) for label, value in labels.items()):
            found.append(rule)
    return found


def test_the_alerts_the_issue_asks_for_exist():
    assert alerts_naming("kora_sidecar_oldest_pending_age_seconds"), "oldest pending delivery too old"
    assert alerts_naming("kora_sidecar_outbox_depth", state="dead") or alerts_naming(
        "kora_sidecar_deliveries_total", result="dead"), "dead deliveries growing"
    for code in ["MISSING_SIGNATURE", "INVALID_SIGNATURE", "STALE_TIMESTAMP", "UNSUPPORTED_ALGORITHM"]:
        assert alerts_naming("kora_sidecar_webhooks_total", result=code), f"signature failures: {code}"
    assert alerts_naming("kora_sidecar_webhooks_total", result="unverified"), "report-only failures"
    assert alerts_naming("kora_sidecar_kora_credentials_rejected_total"), "Kora refusing the key"
    assert alerts_naming("kora_sidecar_stored_bodies_unreadable_total"), "stored bodies no configured key opens"
    assert alerts_naming("kora_sidecar_webhooks_total", result="INVALID_PAYLOAD"), "signed webhooks quarantined"
    # A paused service: the one delivery alert that can fire in direct mode, where nothing enters the outbox.
    (paused,) = alerts_naming("kora_sidecar_service_state", state="closed")
    assert re.search(r'state\s*!=\s*"closed"', paused["expr"]) and paused["for"] == "10m"
    # Only while something is at risk: a breaker changes state only when the sidecar sends, so one
    # left open with nothing to send must not page. Direct mode: its probes refused; queued mode:
    # deliveries pending.
    assert paused in alerts_naming("kora_sidecar_deliveries_total", result="refused"), "direct mode: probes refused"
    assert paused in alerts_naming("kora_sidecar_outbox_depth", state="pending"), "queued mode: deliveries pending"
    assert re.search(r"\band\s+on\s*\(\s*job,\s*namespace,\s*service\s*\)", paused["expr"]), "the breaker and what is at risk"
    assert alerts_naming("kora_sidecar_kora_requests_total", status_class="5xx")
    assert alerts_naming("kora_sidecar_kora_requests_total", status_class="error")
    (not_ready,) = [rule for rule in alert_rules() if re.fullmatch(r"kora_sidecar_ready\s*==\s*0", rule["expr"].strip())]
    assert not_ready["labels"]["severity"] == "critical"
    assert [rule for rule in alert_rules() if "up" in metric_names(rule["expr"]) or "absent(kora_sidecar_ready)" in rule["expr"]]


def test_rules_name_only_the_contract_metrics_and_label_values():
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in its expression"
        unknown = names - set(CONTRACT_METRICS) - PROMETHEUS_OWN
        assert not unknown, f"{rule['alert']} names metrics the sidecar does not export: {unknown}"
        check_matchers(rule["alert"], rule["expr"])


def check_matchers(where, expr):
    for metric, label, operator, value in label_matchers(expr):
        if metric in PROMETHEUS_OWN:
            continue
        allowed = CONTRACT_METRICS[metric]
        assert label in allowed or label in TARGET_LABELS, f"{where}: {metric} has no label {label}"
        values = allowed.get(label)
        if values and operator in ("=", "!=", "=~", "!~"):
            for alternative in (value.split("|") if "~" in operator else [value]):
                assert alternative in values, f"{where}: {metric}{{{label}={alternative!r}}} never exists"


# ---------------------------------------------------------------------------------------------
# dashboard


def test_dashboard_is_importable_json():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), panel["title"]
    # No two panels overlap on the grid.
    cells = {}
    for panel in board["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_the_issue_asks_for():
    panels = dashboard_panels()

    def panels_with(pattern):
        return [panel for panel in panels if any(re.search(pattern, target["expr"]) for target in panel["targets"])]

    assert panels_with(r"by \(result\) \(rate\(kora_sidecar_webhooks_total"), "webhooks by result"
    assert panels_with(r"by \(service, result\) \(rate\(kora_sidecar_deliveries_total"), "deliveries by service/result"
    for quantile in ["0.5", "0.99"]:
        assert panels_with(rf"histogram_quantile\({quantile}, .*kora_sidecar_delivery_duration_seconds_bucket"), quantile
        assert panels_with(rf"histogram_quantile\({quantile}, .*kora_sidecar_kora_request_duration_seconds_bucket"), quantile
    assert panels_with(r"kora_sidecar_outbox_depth"), "outbox depth"
    assert panels_with(r"kora_sidecar_oldest_pending_age_seconds"), "oldest pending age"
    assert panels_with(r"by \(status_class\) \(rate\(kora_sidecar_kora_requests_total"), "Kora calls by status class"
    assert panels_with(r"kora_sidecar_ready"), "ready"
    for panel in panels_with(r"_seconds"):
        assert panel["fieldConfig"]["defaults"].get("unit") == "s", panel["title"]


def test_dashboard_names_only_the_contract_metrics_and_label_values():
    for query in dashboard_queries():
        names = metric_names(query)
        assert names, f"no metric in {query}"
        unknown = names - set(CONTRACT_METRICS)
        assert not unknown, f"the dashboard names metrics the sidecar does not export: {unknown}"
        check_matchers("dashboard", query)


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses every panel query, written as a recording rule."""
    queries = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(query)} for index, query in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# against the Swift sources


def test_metric_names_are_exported_by_the_sources():
    """Every metric the rules and the dashboard name is one the sidecar's sources export."""
    used = set()
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    for query in dashboard_queries():
        used |= metric_names(query)
    used -= PROMETHEUS_OWN
    assert used, "no metric found"
    missing = used - exported_metric_names()
    assert not missing, f"named by deploy/monitoring but not exported by Sources/: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# how Prometheus finds the sidecars


def kubernetes_sidecar_pods():
    """(pod labels, sidecar container) of both Kubernetes examples."""
    pods = []
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] in {"StatefulSet", "Deployment"}:
                template = document["spec"]["template"]
                (container,) = [c for c in template["spec"]["containers"] if c["name"] == "kora-sidecar"]
                pods.append((template["metadata"]["labels"], container))
    assert len(pods) == 2, "the single-pod example and replicas-postgres/"
    return pods


def test_prometheus_config_passes_promtool_and_loads_the_rules(promtool, tmp_path):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "kora-sidecar"]
    keep = [rule for rule in job["relabel_configs"] if rule.get("action") == "keep"]
    assert any(rule["regex"] == "kora-sidecar;metrics" for rule in keep), "scrape only the metrics port"
    # Debian's promtool is built without Kubernetes discovery: check the rest with a static target.
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run_promtool(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_the_scrape_job_and_pod_monitor_reach_both_examples_and_only_the_metrics_port():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "kora-sidecar"]
    (monitor,) = [d for d in yaml.safe_load_all(POD_MONITOR.read_text()) if d]
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    assert expression["operator"] == "In"
    # KoraSidecarDown selects these jobs: "kora-sidecar" and the PodMonitor's "<namespace>/<name>".
    (down,) = [rule for rule in alert_rules() if rule["alert"] == "KoraSidecarDown"]
    selector = re.search(r'up\{job=~"([^"]+)"\}', down["expr"]).group(1)
    assert re.fullmatch(selector, job["job_name"])
    assert re.fullmatch(selector, f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}")
    for labels, container in kubernetes_sidecar_pods():
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert endpoint["port"] == "metrics" and "metrics" in ports
        assert labels[expression["key"]] in expression["values"]
        assert re.fullmatch(job["relabel_configs"][1]["regex"], f"{container['name']};metrics")
