"""Every PromQL expression the project ships, in one list, ready to be run.

The Grafana dashboard (dashboards/rightfoot-poller.json) and the alert rules
(deploy/prometheus/alerts.yaml) are the two consumers of the service's metrics. This
module extracts their expressions, substitutes Grafana's variables with plain values,
and knows the metric names the service exports, so that

* tests/test_deploy.py checks, offline, that each expression names only real metrics
  and that Prometheus parses it (``promtool check rules`` on generated recording rules);
* an end-to-end test against a real Prometheus scraping the running service can query
  each one through the HTTP API (``/api/v1/query?query=...``) and expect data.

Run it to print them: ``uv run python tests/promql.py [--check]``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "dashboards" / "rightfoot-poller.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"

# The service's metrics (service/metrics.py), by type. Histograms are queried through
# their _bucket/_sum/_count series.
COUNTERS = frozenset(
    {
        "rightfoot_poller_api_requests_total",
        "rightfoot_poller_records_published_total",
        "rightfoot_poller_batches_finished_total",
        "rightfoot_poller_publish_errors_total",
        "rightfoot_poller_transactions_total",
        "rightfoot_poller_dlq_records_total",
        "rightfoot_poller_invalid_input_total",
        "rightfoot_poller_polls_total",
        "rightfoot_poller_sweeps_total",
        "rightfoot_poller_sweep_records_total",
        "rightfoot_poller_records_relisted_total",
        "rightfoot_poller_fingerprint_loads_total",
        "rightfoot_poller_batches_forgotten_total",
    }
)
GAUGES = frozenset(
    {
        "rightfoot_poller_tracked_batches",
        "rightfoot_poller_records_in_flight",
        "rightfoot_poller_records_held",
        "rightfoot_poller_oldest_overdue_poll_seconds",
        "rightfoot_poller_batches_in_backoff",
        "rightfoot_poller_batches_unreadable",
        "rightfoot_poller_api_unauthorized",
        "rightfoot_poller_ready",
        "rightfoot_poller_owned_partitions",
        "rightfoot_poller_build_info",
        "rightfoot_poller_records_behind",
        "rightfoot_poller_kafka_broker_reachable",
        "rightfoot_poller_fingerprints_held",
        "rightfoot_poller_finished_batches",
        "rightfoot_poller_memory_limit_bytes",
        # prometheus_client's standard process series, which the service exports too
        "process_resident_memory_bytes",
    }
)
HISTOGRAMS = frozenset(
    {
        "rightfoot_poller_api_request_duration_seconds",
        "rightfoot_poller_publish_latency_seconds",
        "rightfoot_poller_event_loop_lag_seconds",
    }
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRICS = COUNTERS | GAUGES | HISTOGRAMS

# Values for Grafana's built-in variables. $__rate_interval is at least four scrape
# intervals; 1m suits the default 15 s scrape. Dashboard variables ($namespace, $job,
# $instance) are multi-value with "All" = ".*", used only in regex matchers.
GRAFANA_DEFAULTS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
}
TEMPLATE_DEFAULT = ".*"

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]) with plain values.

    Built-ins default to GRAFANA_DEFAULTS, anything else to ".*"; ``variables`` wins.
    """
    values = {**GRAFANA_DEFAULTS, **(variables or {})}

    def repl(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values.get(name, TEMPLATE_DEFAULT)

    return _VARIABLE.sub(repl, expr)


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))  # panels inside collapsed rows
    return found


def dashboard_panels(path: Path = DASHBOARD) -> list[dict[str, Any]]:
    """All panels of the dashboard, rows' nested panels included."""
    return _panels(json.loads(path.read_text())["panels"])


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(source, raw expr) for every dashboard panel target, variables not substituted."""
    out = []
    for panel in dashboard_panels(path):
        for target in panel.get("targets", []):
            source = f"dashboard:{panel['title']}[{target.get('refId', '?')}]"
            out.append((source, target.get("expr", "")))
    return out


def alert_expressions(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(source, expr) for every rule of the alert rule file."""
    out = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            out.append((f"alert:{name}", rule["expr"].strip()))
    return out


def all_expressions(
    variables: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(source, expr) for every dashboard target and alert expression, with Grafana's
    variables replaced by plain values, so each can be sent to Prometheus as is."""
    return [
        (source, substitute(expr, variables))
        for source, expr in dashboard_expressions() + alert_expressions()
    ]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"})


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (a lexical approximation: drops strings,
    label matchers, ranges and grouping clauses; keeps identifiers not called as
    functions)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        start, end = match.span()
        if start and (text[start - 1].isdigit() or text[start - 1] == "."):
            continue  # a number's exponent or a duration unit
        if text[end:].lstrip().startswith("("):
            continue  # a function
        if match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def unknown_metrics(expr: str) -> set[str]:
    """Metric names in expr that the service does not export."""
    unknown = set()
    for name in metric_names(expr):
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
                base = name.removesuffix(suffix)
        if base not in METRICS or (base in HISTOGRAMS and base == name):
            unknown.add(name)
    return unknown


def recording_rules(expressions: list[tuple[str, str]]) -> dict[str, Any]:
    """A Prometheus rule file with one recording rule per expression: `promtool check
    rules` on it parses every expression, offline."""
    rules = [
        {"record": f"rightfoot_poller:check_{i}", "expr": expr, "labels": {"source": source}}
        for i, (source, expr) in enumerate(expressions)
    ]
    return {"groups": [{"name": "rightfoot-poller-expression-check", "rules": rules}]}


def promtool_check(expressions: list[tuple[str, str]], promtool: str = "promtool") -> str:
    """Run `promtool check rules` over the expressions; raise with its output on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expressions.rules.yaml"
        path.write_text(yaml.safe_dump(recording_rules(expressions), sort_keys=False))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise ValueError(f"promtool rejected an expression:\n{output}")
    return output


def main(argv: list[str]) -> int:
    expressions = all_expressions()
    if "--check" in argv:
        bad = {src: sorted(unknown_metrics(e)) for src, e in expressions if unknown_metrics(e)}
        if bad:
            print(f"unknown metric names: {bad}", file=sys.stderr)
            return 1
        print(promtool_check(expressions).strip())
        print(f"{len(expressions)} expressions parse and use only known metrics")
        return 0
    for source, expr in expressions:
        print(f"# {source}\n{expr}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
