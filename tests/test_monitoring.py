"""The monitoring kit in deploy/monitoring/ holds together with the code, checked on the files.

- alerts.yml and grafana-dashboard.json have the shape Prometheus and Grafana read (a
  structural check with pyyaml and jsonschema, always); with promtool on PATH (CI installs it,
  .ci/run), `promtool check rules` on the rules and on the dashboard's queries, and
  `promtool test rules alerts_test.yml`: every alert fires on the series it is about;
- every series a query names is one the code exports, read from the code (each
  ray.util.metrics Counter, Gauge and Histogram made in the project's packages), with its
  exported suffix (`_total`, `_bucket`...) and only tags it has;
- every exported series is on docs/reference/metrics.md with its type and tags, and nothing
  else is; every alert has its section in docs/operations/monitoring.md.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serve_app", "actors", "storage", "config", "metergate_client", "cli")
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRICS_PAGE = ROOT / "docs" / "reference" / "metrics.md"
MONITORING_PAGE = ROOT / "docs" / "operations" / "monitoring.md"
METRIC_CLASSES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
# Grafana's interval variable, as Grafana would put it in before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
SERIES_NAME = re.compile(r"\bray_[a-zA-Z0-9_]+")
SELECTOR = re.compile(r"\b(ray_[a-zA-Z0-9_]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
DURATION = re.compile(r"^\d+[smhd]$")


@dataclass(frozen=True)
class Metric:
    name: str  # as made: metergate_ticks
    kind: str  # counter, gauge, histogram
    tags: tuple[str, ...]
    where: str

    @property
    def exported(self) -> str:
        """The name a scrape shows, without a histogram's suffixes: Ray adds ray_, a counter _total."""
        return "ray_" + self.name + ("_total" if self.kind == "counter" else "")

    @property
    def series_names(self) -> set[str]:
        return {"ray_" + self.name + suffix for suffix in SUFFIXES[self.kind]}


def _literal(node: ast.AST, constants: dict[str, ast.AST]):
    """A constant expression, a module-level name standing for one resolved."""
    if isinstance(node, ast.Name) and node.id in constants:
        node = constants[node.id]
    return ast.literal_eval(node)


def exported_metrics() -> dict[str, Metric]:
    """Every metric the project's packages make with ray.util.metrics, by name."""
    found: dict[str, Metric] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            classes = {alias.asname or alias.name: METRIC_CLASSES[alias.name]
                       for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                       and node.module == "ray.util.metrics" for alias in node.names if alias.name in METRIC_CLASSES}
            if not classes:
                continue
            constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                         for target in node.targets if isinstance(target, ast.Name)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    assert node.args and isinstance(node.args[0], ast.Constant), f"{where}: a metric's name is a literal"
                    keywords = {k.arg: k.value for k in node.keywords}
                    tags = tuple(_literal(keywords["tag_keys"], constants)) if "tag_keys" in keywords else ()
                    metric = Metric(node.args[0].value, classes[node.func.id], tags, where)
                    assert metric.name not in found, f"{where}: {metric.name} is made twice"
                    found[metric.name] = metric
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", ())]


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert and dashboard query, Grafana's variables put in."""
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    found += [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
    for variable, value in GRAFANA_VARIABLES.items():
        found = [(where, expr.replace(variable, value)) for where, expr in found]
    return found


def test_the_code_exports_the_request_metrics_and_the_reader_finds_every_metric():
    """The reader of the code is what the other checks lean on: it must find the metrics."""
    metrics = exported_metrics()
    assert metrics["metergate_http_requests"].kind == "counter"
    assert metrics["metergate_http_request_latency_ms"].tags == ("route", "method", "status_class")
    assert metrics["metergate_gate_decisions"].tags == ("reason", "action", "source")
    assert metrics["metergate_outbox_backlog"].kind == "gauge"
    assert len(metrics) >= 20
    for metric in metrics.values():
        assert not {"org", "org_id", "path"} & set(metric.tags), f"{metric.where}: {metric.name} is tagged by org or path"


def test_every_series_an_alert_or_a_panel_names_is_exported_with_its_suffix_and_tags():
    metrics = exported_metrics()
    by_series = {series: metric for metric in metrics.values() for series in metric.series_names}
    wrong = []
    for where, expr in queries():
        assert "metergate_" in expr, f"{where}: names no metergate series: {expr}"
        for name in SERIES_NAME.findall(expr):
            if name not in by_series:
                wrong.append(f"{where}: {name} is not exported (counters end _total; histograms _bucket, _count, _sum)")
        for name, matchers in SELECTOR.findall(expr):
            metric = by_series.get(name)
            allowed = set(metric.tags if metric else ()) | ({"le"} if name.endswith("_bucket") else set())
            for label in MATCHER_LABEL.findall(matchers):
                if metric and label not in allowed:
                    wrong.append(f"{where}: {name} has no tag {label!r} (its tags: {sorted(allowed)})")
        if re.search(r"(?<![a-zA-Z0-9_])metergate_", expr):
            wrong.append(f"{where}: a metergate series without Ray's ray_ prefix")
    assert not wrong, "\n".join(wrong)


def test_the_alert_rules_have_the_shape_prometheus_reads_and_a_runbook_section_each():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    page = MONITORING_PAGE.read_text()
    headings = set(re.findall(r"^#+\s+(\S+)\s*$", page, re.MULTILINE))
    names = []
    for group in groups:
        assert set(group) == {"name", "rules"} and group["rules"], group.get("name")
        for rule in group["rules"]:
            where = rule.get("alert", rule)
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, where
            assert isinstance(rule["alert"], str) and re.fullmatch(r"Metergate[A-Za-z0-9]+", rule["alert"]), where
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), where
            assert "for" not in rule or DURATION.match(rule["for"]), where
            assert rule["labels"]["severity"] in ("page", "ticket"), where
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), where
            assert rule["annotations"]["runbook"] == f"docs/operations/monitoring.md#{rule['alert'].lower()}", where
            assert rule["alert"] in headings, f"{rule['alert']}: no section in {MONITORING_PAGE.relative_to(ROOT)}"
            names.append(rule["alert"])
    assert len(names) == len(set(names)), "alert names are unique"
    required = {"MetergateHigh5xxRate", "MetergateGateLatencyHigh", "MetergateShardNotReporting", "MetergateNotReady",
                "MetergateOutboxBacklog", "MetergateOutboxDeadLetters", "MetergateFeedLagHigh",
                "MetergateCommitLatencyHigh", "MetergateStripeErrors"}
    assert required <= set(names), required - set(names)


def test_every_alert_has_a_promtool_case_where_it_fires():
    cases = yaml.safe_load(ALERT_TESTS.read_text())
    assert cases["rule_files"] == ["alerts.yml"]
    fired = {check["alertname"] for case in cases["tests"] for check in case["alert_rule_test"] if check["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}
    assert names == fired, f"alerts without a firing case: {sorted(names - fired)}; unknown: {sorted(fired - names)}"


DASHBOARD_SCHEMA = {
    # The part of Grafana's dashboard model (schemaVersion 39) this dashboard uses; Grafana
    # publishes no standalone JSON Schema for it.
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"]}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "table"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
                    "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                    "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0}}},
                "datasource": {"type": "object", "required": ["type", "uid"]},
                "targets": {"type": "array", "items": {"type": "object", "required": ["refId", "expr"], "properties": {
                    "refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1}}}},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "else": {"required": ["datasource", "targets"], "properties": {"targets": {"minItems": 1}}},
        }},
    },
}


def test_the_dashboard_has_grafanas_shape_its_panels_do_not_overlap_and_use_its_datasource():
    board = dashboard()
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    variables = {v["name"] for v in board["templating"]["list"] if v["type"] == "datasource"}
    ids, cells = set(), {}
    for panel in board["panels"]:
        assert panel["id"] not in ids, f"panel id {panel['id']} twice"
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        for source in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", ())]:
            if source is not None:
                assert source["uid"].removeprefix("${").removesuffix("}") in variables, panel["title"]
        refs = [t["refId"] for t in panel.get("targets", ())]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_exported_metric_is_on_the_metrics_page_with_its_type_and_tags():
    """Rows of docs/reference/metrics.md: | `ray_...` | type | `tag`, `tag` | meaning |."""
    documented = {}
    for line in METRICS_PAGE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 4 and cells[0].startswith("`ray_"):
            name = re.match(r"`([^`]+)`", cells[0]).group(1)
            assert name not in documented, f"{name} twice on the page"
            documented[name] = (cells[1], tuple(re.findall(r"`([^`]+)`", cells[2])), cells[3])
    wrong = []
    for metric in exported_metrics().values():
        row = documented.pop(metric.exported, None)
        if row is None:
            wrong.append(f"{metric.exported} ({metric.where}) is not on {METRICS_PAGE.relative_to(ROOT)}")
        elif row[:2] != (metric.kind, metric.tags):
            wrong.append(f"{metric.exported}: the page says {row[:2]}, the code {(metric.kind, metric.tags)}")
        elif not row[2]:
            wrong.append(f"{metric.exported}: no meaning given")
    wrong += [f"{name} is on the page but the code does not export it" for name in documented]
    assert not wrong, "\n".join(wrong)


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (.ci/run installs it)")


def promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    assert f"SUCCESS: {len(alert_rules())} rules found" in promtool("check", "rules", str(ALERTS), cwd=ROOT)


@needs_promtool
def test_promtool_parses_every_query_of_the_dashboard(tmp_path):
    rules = [{"record": f"metergate:dashboard_query_{n}", "expr": expr}
             for n, (_, expr) in enumerate(q for q in queries() if q[0].startswith("panel"))]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", str(path), cwd=tmp_path)


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass(tmp_path):
    """alerts_test.yml against the rules without their annotations (promtool compares them whole)."""
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(document, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
