"""deploy/observability: every query names metrics, events and attributes dmipro really emits.

What dmipro emits is recorded, not listed by hand: the OTel instruments ``_Instruments``
creates, the metric points and attributes of a real run (and a real Redis for the queue
gauge), and the New Relic events and metrics the subscriber records during a real run and
a deploy. The files are checked against a schema of their import format, then each query
is parsed and every name in it must be one of those.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "deploy" / "observability"

# -- what dmipro emits -------------------------------------------------------------------


def _failed_lm_call() -> None:
    """One LM call that ends in a server error, so the LM error metrics and labels are emitted too."""
    from dspy.utils.exceptions import LMServerError

    from dmipro.lm._sim import sim_lm

    with pytest.raises(LMServerError):
        sim_lm(server_error_rate=1.0, num_retries=0)("What is 2 + 2?")


class _RecordingMeter:
    """Notes each instrument ``_Instruments`` creates: (name, kind, unit)."""

    def __init__(self) -> None:
        self.created: list[tuple[str, str, str]] = []

    def __getattr__(self, method: str) -> Any:
        kind = method.removeprefix("create_")

        def create(name: str, *args: Any, unit: str = "", **kwargs: Any) -> Any:
            self.created.append((name, kind, unit))
            return _Sink()

        return create


class _Sink:
    def __getattr__(self, _: str) -> Any:
        return lambda *a, **k: None


def _prometheus_names(name: str, kind: str, unit: str) -> set[str]:
    """The OTel→Prometheus translation (UnderscoreEscapingWithSuffixes), for dmipro's units."""
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    units = {"s": "seconds", "1": "ratio" if kind == "observable_gauge" else ""}
    suffix = "" if unit.startswith("{") else units.get(unit, re.sub(r"[^a-zA-Z0-9]", "", unit))
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    if kind == "counter":
        return {base + "_total"}
    if kind == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


@pytest.fixture(scope="module")
def otel_emitted(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> dict[str, Any]:
    """Instrument names and the attribute keys/values of a real run, a failure and a queue reading."""
    import redis
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from dmipro import observability
    from dmipro.config import Settings, reload_settings
    from dmipro.events import bus
    from dmipro.subscribers import otel
    from tests.subscribers._support import run_tiny

    meter = _RecordingMeter()
    otel._Instruments(meter)
    mp = pytest.MonkeyPatch()
    url = f"{redis_server}/5"
    redis.Redis.from_url(url).rpush("dmipro.work", b"x")
    try:
        mp.setenv("OTEL_TRACES_EXPORTER", "none")
        mp.setenv("OTEL_METRICS_EXPORTER", "none")
        mp.setenv("DMIPRO_BROKER_URL", url)
        mp.setenv("DMIPRO_HOME", str(tmp_path_factory.mktemp("obs-home")))
        mp.setenv("DMIPRO_ALLOWED_MODULES", "examples,tests")
        reload_settings()
        reader = InMemoryMetricReader()
        observability.setup(Settings(subscribers=("otel",)), metric_readers=[reader])
        run_tiny()
        _failed_lm_call()
        bus.emit("dspy.optimization.error", job_id="job-x", error="boom", error_type="OptimizationError")
        bus.emit("dspy.storage.error", operation="save", error="disk full")
        data = reader.get_metrics_data()
        observability.shutdown()
    finally:
        redis.Redis.from_url(url).delete("dmipro.work")
        mp.undo()
        reload_settings()
    labels: dict[str, set[str]] = defaultdict(set)
    seen: set[str] = set()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                seen.add(metric.name)
                for point in metric.data.data_points:
                    for key, value in (point.attributes or {}).items():
                        labels[key].add(str(value))
    return {"instruments": meter.created, "seen": seen, "labels": labels}


@pytest.fixture(scope="module")
def prometheus(otel_emitted: dict[str, Any]) -> dict[str, Any]:
    metrics: set[str] = set()
    for name, kind, unit in otel_emitted["instruments"]:
        metrics |= _prometheus_names(name, kind, unit)
    labels = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in otel_emitted["labels"].items()}
    return {"metrics": metrics, "labels": labels}


@pytest.fixture(scope="module")
def newrelic_emitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Event types with their attributes, and metric names, the New Relic subscriber records."""
    import newrelic.agent as nr

    import dmipro.registry as registry
    from dmipro.config import reload_settings
    from dmipro.events import bus
    from dmipro.lm import callbacks
    from dmipro.subscribers.newrelic import NewRelicSubscriber
    from tests.subscribers._support import register_versions, run_tiny

    events: dict[str, set[str]] = defaultdict(set)
    metrics: set[str] = set()
    mp = pytest.MonkeyPatch()
    mp.setattr(nr, "record_custom_event", lambda t, attrs, application=None: events[t].update(attrs))
    mp.setattr(nr, "record_custom_metric", lambda name, value, application=None: metrics.add(name))
    mp.setenv("DMIPRO_HOME", str(tmp_path_factory.mktemp("nr-home")))
    mp.setenv("DMIPRO_ALLOWED_MODULES", "examples,tests")
    reload_settings()
    subscriber = NewRelicSubscriber(application=None)
    bus.add(subscriber)
    callbacks.add_listener(subscriber)
    try:
        job_id, _ = run_tiny()
        _failed_lm_call()
        register_versions(job_id)
        registry.deploy("math_qa", 1)
        registry.deploy("math_qa", 2)
        registry.rollback("math_qa")
        bus.emit("dspy.optimization.error", job_id="job-x", error="boom", error_type="OptimizationError")
    finally:
        callbacks.remove_listener(subscriber)
        bus.remove(subscriber)
        mp.undo()
        reload_settings()
    # A run that succeeded and one that failed carry different attributes; both are OptimizationRun.
    return {"events": dict(events), "metrics": metrics}


# -- parsers ---------------------------------------------------------------------------

PROMQL_FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "max", "min", "avg", "count"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "and", "or", "unless", "bool"}


def promql_names(expr: str) -> tuple[set[str], dict[str, set[str]]]:
    """(metric names, {label: values compared}) of a PromQL expression; raises on anything unknown."""
    labels: dict[str, set[str]] = defaultdict(set)
    for body in re.findall(r"\{([^}]*)\}", expr):
        for label, _, value in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"', body):
            labels[label].add(value)
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in re.split(r"\s*,\s*", group.strip()):
            labels[label]  # noqa: B018  (a label used for grouping, no value)
    stripped = re.sub(r"\{[^}]*\}", " ", expr)
    stripped = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    metrics = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        word = match.group(0)
        following = stripped[match.end() :].lstrip()[:1]
        if following == "(":
            assert word in PROMQL_FUNCTIONS, f"unexpected PromQL function {word!r} in {expr}"
        elif word not in PROMQL_KEYWORDS:
            metrics.add(word)
    return metrics, labels


NRQL_KEYWORDS = {
    "select", "from", "where", "facet", "timeseries", "since", "ago", "and", "or", "not", "in", "is", "null",
    "as", "limit", "day", "days", "hour", "hours", "minute", "minutes", "week", "weeks", "max", "auto",
}  # fmt: skip
NRQL_FUNCTIONS = {"count", "sum", "average", "max", "min", "latest", "percentile", "filter", "percentage"}


def nrql_parts(query: str) -> tuple[str, set[str], set[str]]:
    """(FROM type, attribute names, quoted strings) of an NRQL query."""
    source = re.search(r"\bFROM\s+([A-Za-z_][A-Za-z0-9_]*)", query)
    assert source, f"no FROM in {query}"
    strings = set(re.findall(r"'([^']*)'", query))
    stripped = re.sub(r"'[^']*'", " ", query)
    attrs = set()
    for match in re.finditer(r"[A-Za-z_][A-Za-z0-9_.]*", stripped):
        word = match.group(0)
        following = stripped[match.end() :].lstrip()[:1]
        if word.lower() in NRQL_KEYWORDS or word == source.group(1):
            continue
        if following == "(":
            assert word.lower() in NRQL_FUNCTIONS, f"unexpected NRQL function {word!r} in {query}"
        else:
            attrs.add(word)
    return source.group(1), attrs, strings


def test_the_parsers_catch_a_name_dmipro_does_not_emit(prometheus: dict[str, Any]) -> None:
    metrics, labels = promql_names('sum by (dmipro_status) (rate(dmipro_runs_total{dmipro_state="x"}[5m]))')
    assert metrics == {"dmipro_runs_total"} and not metrics <= prometheus["metrics"]
    assert set(labels) == {"dmipro_status", "dmipro_state"}
    kind, attrs, strings = nrql_parts("SELECT average(cost) FROM OptimizationRun WHERE state = 'failed'")
    assert kind == "OptimizationRun" and attrs == {"cost", "state"} and strings == {"failed"}


# -- schemas of the import formats ----------------------------------------------------------

NR_DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["name", "permissions", "pages"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "permissions": {"enum": ["PRIVATE", "PUBLIC_READ_ONLY", "PUBLIC_READ_WRITE"]},
        "pages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "widgets"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "widgets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["title", "layout", "visualization", "rawConfiguration"],
                            "additionalProperties": False,
                            "properties": {
                                "title": {"type": "string", "minLength": 1},
                                "layout": {
                                    "type": "object",
                                    "required": ["column", "row", "width", "height"],
                                    "properties": {
                                        "column": {"type": "integer", "minimum": 1, "maximum": 12},
                                        "row": {"type": "integer", "minimum": 1},
                                        "width": {"type": "integer", "minimum": 1, "maximum": 12},
                                        "height": {"type": "integer", "minimum": 1},
                                    },
                                },
                                "visualization": {
                                    "type": "object",
                                    "required": ["id"],
                                    "properties": {
                                        "id": {
                                            "enum": [
                                                "viz.line",
                                                "viz.area",
                                                "viz.bar",
                                                "viz.billboard",
                                                "viz.pie",
                                                "viz.table",
                                                "viz.markdown",
                                            ]  # fmt: skip
                                        }
                                    },
                                },
                                "rawConfiguration": {
                                    "type": "object",
                                    "required": ["nrqlQueries"],
                                    "properties": {
                                        "nrqlQueries": {
                                            "type": "array",
                                            "minItems": 1,
                                            "items": {
                                                "type": "object",
                                                "required": ["accountIds", "query"],
                                                "additionalProperties": False,
                                                "properties": {
                                                    "accountIds": {
                                                        "type": "array",
                                                        "items": {"type": "integer"},
                                                    },
                                                    "query": {
                                                        "type": "string",
                                                        "pattern": "(?i)^SELECT .+ FROM ",
                                                    },
                                                },
                                            },
                                        }
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

NR_CONDITION_SCHEMA = {
    "type": "object",
    "required": ["name", "enabled", "nrql", "signal", "terms", "violationTimeLimitSeconds"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "enabled": {"type": "boolean"},
        "nrql": {
            "type": "object",
            "required": ["query"],
            "properties": {"query": {"type": "string", "pattern": "(?i)^SELECT .+ FROM "}},
        },
        "signal": {
            "type": "object",
            "required": ["aggregationWindow", "aggregationMethod"],
            "properties": {
                "aggregationWindow": {"type": "integer", "minimum": 30, "maximum": 21600},
                "aggregationMethod": {"enum": ["EVENT_FLOW", "EVENT_TIMER", "CADENCE"]},
                "aggregationDelay": {"type": "integer", "minimum": 0},
            },
        },
        "terms": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "operator",
                    "threshold",
                    "thresholdDuration",
                    "thresholdOccurrences",
                    "priority",
                ],
                "properties": {
                    "operator": {"enum": ["ABOVE", "ABOVE_OR_EQUALS", "BELOW", "BELOW_OR_EQUALS", "EQUALS"]},
                    "threshold": {"type": "number"},
                    "thresholdDuration": {"type": "integer", "minimum": 60, "maximum": 86400},
                    "thresholdOccurrences": {"enum": ["ALL", "AT_LEAST_ONCE"]},
                    "priority": {"enum": ["CRITICAL", "WARNING"]},
                },
            },
        },
        "violationTimeLimitSeconds": {"type": "integer", "minimum": 300, "maximum": 2592000},
    },
}


def _nr_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((FILES / "newrelic-dashboard.json").read_text())
    alerts = json.loads((FILES / "newrelic-alerts.json").read_text())
    out = [
        (f"dashboard: {w['title']}", q["query"])
        for page in dashboard["pages"]
        for w in page["widgets"]
        for q in w["rawConfiguration"]["nrqlQueries"]
    ]
    return out + [(f"alert: {c['name']}", c["nrql"]["query"]) for c in alerts["conditions"]]


def test_new_relic_files_match_the_nerdgraph_input_formats() -> None:
    dashboard = json.loads((FILES / "newrelic-dashboard.json").read_text())
    jsonschema.validate(dashboard, NR_DASHBOARD_SCHEMA)
    alerts = json.loads((FILES / "newrelic-alerts.json").read_text())
    assert alerts["policy"]["incidentPreference"] in {
        "PER_POLICY",
        "PER_CONDITION",
        "PER_CONDITION_AND_TARGET",
    }
    for condition in alerts["conditions"]:
        jsonschema.validate(condition, NR_CONDITION_SCHEMA)
        for term in condition["terms"]:  # New Relic requires the duration to be a multiple of the window
            assert term["thresholdDuration"] % condition["signal"]["aggregationWindow"] == 0, condition[
                "name"
            ]
    for page in dashboard["pages"]:  # widgets in a page must not overlap on New Relic's 12-column grid
        cells: set[tuple[int, int]] = set()
        for widget in page["widgets"]:
            lay = widget["layout"]
            assert lay["column"] + lay["width"] - 1 <= 12, widget["title"]
            mine = {
                (r, c)
                for r in range(lay["row"], lay["row"] + lay["height"])
                for c in range(lay["column"], lay["column"] + lay["width"])
            }
            assert not mine & cells, f"{widget['title']} overlaps another widget"
            cells |= mine


def test_nrql_names_only_what_dmipro_records(
    newrelic_emitted: dict[str, Any], otel_emitted: dict[str, Any]
) -> None:
    events: dict[str, set[str]] = newrelic_emitted["events"]
    assert set(events) == {"OptimizationRun", "OptimizationTrial", "SignatureDeployed"}
    otel_metrics = {name for name, _, _ in otel_emitted["instruments"]}
    metric_attrs = (
        {"newrelic.timeslice.value", "metricTimesliceName"} | otel_metrics | set(otel_emitted["labels"])
    )
    for where, query in _nr_queries():
        kind, attrs, strings = nrql_parts(query)
        if kind == "Metric":
            assert attrs <= metric_attrs, f"{where}: {attrs - metric_attrs} are not emitted"
            timeslices = {s for s in strings if s.startswith("Custom/")}
            assert timeslices <= newrelic_emitted["metrics"], f"{where}: {timeslices} are not recorded"
            if "newrelic.timeslice.value" in attrs:
                assert timeslices, f"{where}: a timeslice query without a metric name"
        else:
            assert kind in events, f"{where}: no {kind} events are recorded"
            assert attrs <= events[kind], f"{where}: {kind} has no {attrs - events[kind]}"
    # Values compared must be values dmipro writes.
    for where, query in _nr_queries():
        for status in re.findall(r"status = '([^']*)'", query):
            assert status in {"succeeded", "failed", "cancelled"}, where
        for queue in re.findall(r"dmipro\.queue = '([^']*)'", query):
            assert queue in otel_emitted["labels"]["dmipro.queue"], where


GRAFANA_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "schemaVersion": {"type": "integer", "minimum": 30},
        "panels": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "type": {"enum": ["row", "timeseries", "stat", "gauge", "table", "bargauge"]},
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "items": {"type": "object", "required": ["refId", "expr", "datasource"]},
                    },
                },
            },
        },
    },
}


def test_grafana_dashboard_and_prometheus_rules_name_only_emitted_metrics(prometheus: dict[str, Any]) -> None:
    dashboard = json.loads((FILES / "grafana-dashboard.json").read_text())
    jsonschema.validate(dashboard, GRAFANA_SCHEMA)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs: list[tuple[str, str]] = []
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"].strip("${}") in variables
            exprs.append((panel["title"], target["expr"]))
    rules = yaml.safe_load((FILES / "prometheus-alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}
            exprs.append((rule["alert"], rule["expr"]))
    known_labels = set(prometheus["labels"]) | {"le", "job", "instance"}
    used: set[str] = set()
    for where, expr in exprs:
        assert expr.count("(") == expr.count(")"), where
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric"
        assert metrics <= prometheus["metrics"], f"{where}: {metrics - prometheus['metrics']} are not emitted"
        assert set(labels) <= known_labels, f"{where}: labels {set(labels) - known_labels} are not emitted"
        for label, values in labels.items():
            emitted = prometheus["labels"].get(label, set())
            assert values - {""} <= emitted, f"{where}: {label} never takes {values - emitted}"
        used |= metrics
    # The five things an operator must see are covered.
    for needed in (
        "dmipro_optimization_runs_total",  # optimization failures
        "dmipro_lm_calls_total",  # error rate
        "dmipro_lm_cost_USD_total",  # cost per run
        "dmipro_optimization_score_sum",  # improvement over baseline
        "dmipro_queue_depth",  # queue depth
    ):
        assert needed in used, needed


def test_every_alert_is_explained_in_the_runbook() -> None:
    runbook = (REPO / "docs" / "operations.md").read_text()
    alerts = json.loads((FILES / "newrelic-alerts.json").read_text())["conditions"]
    rules = yaml.safe_load((FILES / "prometheus-alerts.yaml").read_text())["groups"][0]["rules"]
    for name in [c["name"] for c in alerts] + [r["alert"] for r in rules]:
        assert name in runbook, f"docs/operations.md does not explain {name!r}"
