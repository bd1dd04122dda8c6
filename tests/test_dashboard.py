"""`dashboards/grafana.json` parses, is `dashboards/build.py`'s output, and queries only metrics
that exist: ours as `dfastllm_ray/serve/metrics.py` defines them (exported by Ray with a `ray_`
prefix, `_total` on counters, `_bucket`/`_sum`/`_count` on histograms), or Ray Serve's own.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "grafana.json"

# Ray Serve's built-in series the dashboard uses, with their tags (Ray 2.60; the same names
# appear in the Serve dashboard Ray generates for its own Grafana).
RAY_SERVE_BUILTINS = {
    "ray_serve_num_http_error_requests_total": {"application", "route", "method", "error_code"},
    "ray_serve_deployment_replica_healthy": {"application", "deployment", "replica"},
    "ray_serve_deployment_queued_queries": {"application", "deployment", "handle", "actor_id"},
}
SERVE_TAGS = {"application", "deployment", "replica", "route"}   # added to every Serve metric
SCRAPE_TAGS = {"instance", "job"}                                 # added by Prometheus
SERIES = re.compile(r"\b(ray_[A-Za-z0-9_:]+)\s*(\{[^}]*\})?")
LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")

_spec = importlib.util.spec_from_file_location("dashboard_build", ROOT / "dashboards" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build
_spec.loader.exec_module(build)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


class _Recorder:
    """Stands in for `ray.serve.metrics`: records what each metric class would register."""

    def __init__(self) -> None:
        self.defined: dict[str, tuple[str, set[str]]] = {}
        self.Counter = self._factory("counter")
        self.Gauge = self._factory("gauge")
        self.Histogram = self._factory("histogram")

    def _factory(self, kind: str):
        def make(name, description="", tag_keys=(), **kwargs):
            self.defined[name] = (kind, set(tag_keys or ()))
            return SimpleNamespace(inc=lambda *a, **k: None, set=lambda *a, **k: None,
                                   observe=lambda *a, **k: None)
        return make


def exported_series(monkeypatch) -> dict[str, set[str]]:
    """{Prometheus series name: its tag keys} for every metric serve/metrics.py creates."""
    pytest.importorskip("ray.serve")
    from dfastllm_ray.serve import metrics as module

    rec = _Recorder()
    monkeypatch.setattr(module, "metrics", rec)
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and cls.__name__.endswith("Metrics"):
            required = [p for p in list(inspect.signature(cls).parameters.values())
                        if p.default is inspect.Parameter.empty
                        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            cls(*["m"] * len(required))
    assert rec.defined, "serve/metrics.py created no metrics"
    series: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    for name, (kind, tags) in rec.defined.items():
        for suffix in suffixes[kind]:
            series[f"ray_{name}{suffix}"] = tags | ({"le"} if suffix == "_bucket" else set())
    return series


def test_dashboard_parses_and_is_generated(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert DASHBOARD.read_text() == build.render(), "stale: run python dashboards/build.py"


def test_panels_are_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"


def test_every_queried_metric_is_defined(dashboard, monkeypatch):
    known = {**exported_series(monkeypatch), **RAY_SERVE_BUILTINS}
    used = set()
    for expr in queries(dashboard):
        for name, _ in SERIES.findall(expr):
            assert name in known, f"{name} (in {expr!r}) is not defined in serve/metrics.py"
            used.add(name)
    ours = {n for n in known if n.startswith("ray_dfastllm_")}
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in ours}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert bases <= shown, f"metrics without a panel: {sorted(bases - shown)}"


def label_problems(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Series the expression queries that do not exist, and labels they do not carry."""
    found = SERIES.findall(expr)
    missing = [name for name, _ in found if name not in known]
    if missing:
        return [f"unknown series {n}" for n in missing]
    extra = SERVE_TAGS | SCRAPE_TAGS
    problems = [f"{name} has no label {label!r}" for name, matchers in found
                for label in LABEL.findall(matchers) if label not in known[name] | extra]
    allowed = set().union(*(known[n] for n, _ in found)) | extra
    for group in BY.findall(expr):
        problems += [f"no series has label {label!r}" for label in
                     filter(None, (x.strip() for x in group.split(","))) if label not in allowed]
    return problems


def test_every_label_exists_on_its_metric(dashboard, monkeypatch):
    known = {**exported_series(monkeypatch), **RAY_SERVE_BUILTINS}
    for expr in queries(dashboard):
        assert label_problems(expr, known) == [], expr


@pytest.mark.parametrize("bad", [
    'sum by (modle) (rate(ray_dfastllm_nfe_total{application=~"$application"}[5m]))',
    'sum(rate(ray_dfastllm_nfe_total{outcome="ok"}[5m]))',
    "sum(rate(ray_dfastllm_nfe[5m]))",               # a counter is only exported with _total
    "histogram_quantile(0.5, sum by (le) (rate(ray_dfastllm_step_latency_s[5m])))",
])
def test_label_check_catches_mistakes(bad, monkeypatch):
    assert label_problems(bad, exported_series(monkeypatch))


def test_docs_list_every_metric(monkeypatch):
    doc = (ROOT / "docs" / "metrics.md").read_text()
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported_series(monkeypatch)}
    missing = sorted(b for b in bases if f"`{b}`" not in doc)
    assert not missing, f"docs/metrics.md does not list {missing}"
