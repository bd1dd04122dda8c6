"""Write `dashboards/grafana.json`: the Grafana dashboard for dfastllm-ray's Prometheus metrics.

The metrics are defined in `dfastllm_ray/serve/metrics.py` and exported by Ray's metrics agent
with a `ray_` prefix (counters also get `_total`, histograms `_bucket`/`_sum`/`_count`); Ray
Serve adds the `application`, `deployment` and `replica` tags. A few of Ray Serve's own metrics
(`ray_serve_*`) fill the last row. `tests/test_dashboard.py` checks that the JSON is this script's
output and that every series it queries is defined. Regenerate after changing a panel:

    python dashboards/build.py
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
F = 'application=~"$application",model=~"$model"'   # our metrics carry a `model` tag
FS = 'application=~"$application"'                   # Ray Serve's own metrics do not
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


def target(expr: str, legend: str, ref: str) -> dict:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def panel(title: str, desc: str, targets: list[tuple[str, str]], unit: str,
          pos: tuple[int, int, int, int], **defaults) -> dict:
    """A time series panel; pos = (x, y, w, h) on Grafana's 24-column grid."""
    x, y, w, h = pos
    return {
        "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, **defaults,
                                     "custom": {"lineWidth": 1, "fillOpacity": 10}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(targets)],
    }


def row(title: str, y: int) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}


def quantiles(metric: str, by: str = "model") -> list[tuple[str, str]]:
    """p50/p95/p99 of a Ray histogram, per `by` label."""
    return [(f"histogram_quantile({q}, sum by ({by}, le) "
             f"(rate({metric}_bucket{{{F}}}[{RATE}])))", f"p{round(q * 100)} {{{{{by}}}}}")
            for q in QUANTILES]


def rate(metric: str, by: str = "model", selector: str = F) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


def traffic_row(y: int) -> list[dict]:
    errors = (f'sum by (model) (rate(ray_dfastllm_requests_total{{{F},outcome!="ok"}}[{RATE}])) / '
              f"{rate('ray_dfastllm_requests_total')}")
    return [
        row("Traffic", y),
        panel("Requests by outcome", "HTTP requests per second, by model and outcome "
              "(ok, bad_request, rate_limited, overloaded, timeout, client_closed, ...).",
              [(rate("ray_dfastllm_requests_total", "model, outcome"), "{{model}} {{outcome}}")],
              "reqps", (0, y + 1, 8, 8)),
        panel("Error ratio", "Requests whose outcome is not ok, over all requests.",
              [(errors, "{{model}}")], "percentunit", (8, y + 1, 8, 8), min=0),
        panel("Token throughput", "Prompt tokens admitted and tokens generated per second "
              "(real tokens: no masks, no padding).",
              [(rate("ray_dfastllm_prompt_tokens_total"), "prompt {{model}}"),
               (rate("ray_dfastllm_generated_tokens_total"), "generated {{model}}")],
              "short", (16, y + 1, 8, 8)),
        panel("Request latency", "End-to-end latency of finished requests (all routes).",
              quantiles("ray_dfastllm_request_latency_s"), "s", (0, y + 9, 12, 8)),
        panel("Time to first block", "Arrival to the first committed block: what a streaming "
              "client waits for its first chunk.",
              quantiles("ray_dfastllm_time_to_first_block_s"), "s", (12, y + 9, 12, 8)),
    ]


def decoding_row(y: int) -> list[dict]:
    tpf = (f"{rate('ray_dfastllm_generated_tokens_total')} / "
           f"{rate('ray_dfastllm_nfe_total')}")
    return [
        row("Diffusion decoding", y),
        panel("Model forwards (NFE) per second", "One NFE is one model forward over a batch "
              "of active blocks.", [(rate("ray_dfastllm_nfe_total"), "{{model}}")],
              "short", (0, y + 1, 8, 8)),
        panel("Tokens per forward (TPF)", "Generated tokens / NFE. 1 is left-to-right speed; "
              "parallel decoding (threshold, factor, entropy bound) raises it.",
              [(tpf, "overall {{model}}"),
               (quantiles("ray_dfastllm_tokens_per_forward")[0][0], "median request {{model}}")],
              "short", (8, y + 1, 8, 8)),
        panel("Engine step latency", "Mean step time per stats interval, as a distribution.",
              quantiles("ray_dfastllm_step_latency_s"), "s", (16, y + 1, 8, 8)),
    ]


def hybrid_row(y: int) -> list[dict]:
    mean = (f"sum by (model) (rate(ray_dfastllm_accepted_tokens_per_verifier_forward_sum{{{F}}}"
            f"[{RATE}])) / sum by (model) (rate("
            f"ray_dfastllm_accepted_tokens_per_verifier_forward_count{{{F}}}[{RATE}]))")
    return [
        row("Hybrid decoding (APD / speculative)", y),
        panel("Verifier forwards per second", "Forwards of the causal verifier spent on hybrid "
              "requests (models served with a `verifier`).",
              [(rate("ray_dfastllm_verifier_forwards_total"), "{{model}}")], "short",
              (0, y + 1, 12, 8)),
        panel("Accepted tokens per verifier forward", "Per hybrid request: generated tokens / "
              "verifier forwards (speculative: accepted drafts + 1; APD: the accepted run).",
              [(mean, "mean request {{model}}"),
               (quantiles("ray_dfastllm_accepted_tokens_per_verifier_forward")[0][0],
                "median request {{model}}")], "short", (12, y + 1, 12, 8)),
    ]


def capacity_row(y: int) -> list[dict]:
    def gauge(metric: str, how: str = "sum") -> list[tuple[str, str]]:
        return [(f"{how} by (model) ({metric}{{{F}}})", "{{model}}")]

    return [
        row("Capacity", y),
        panel("Queue length", "Requests waiting for admission to an engine (sum of replicas).",
              gauge("ray_dfastllm_queue_length"), "short", (0, y + 1, 6, 8)),
        panel("Running requests", "Requests decoding in an engine (sum of replicas).",
              gauge("ray_dfastllm_running_requests"), "short", (6, y + 1, 6, 8)),
        panel("KV pool usage", "Fraction of KV-cache pages in use; the busiest replica.",
              gauge("ray_dfastllm_kv_pool_usage", "max"), "percentunit", (12, y + 1, 6, 8),
              min=0, max=1),
        panel("Prefix cache hit rate", "Prompt pages served from the prefix cache "
              "(mean over replicas).", gauge("ray_dfastllm_prefix_cache_hit_rate", "avg"),
              "percentunit", (18, y + 1, 6, 8), min=0, max=1),
    ]


def ray_serve_row(y: int) -> list[dict]:
    return [
        row("Ray Serve", y),
        panel("HTTP errors by code", "Ray Serve's proxy: error responses per second.",
              [(rate("ray_serve_num_http_error_requests_total", "error_code", FS),
                "{{error_code}}")], "reqps", (0, y + 1, 8, 8)),
        panel("Healthy replicas", "Per deployment (ingress, batcher, one per model).",
              [(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{FS}}})",
                "{{deployment}}")], "short", (8, y + 1, 8, 8)),
        panel("Queued at the router", "Requests waiting in Serve's routers for a replica slot "
              "(grows when max_ongoing_requests is reached).",
              [(f"sum by (deployment) (ray_serve_deployment_queued_queries{{{FS}}})",
                "{{deployment}}")], "short", (16, y + 1, 8, 8)),
    ]


def variables() -> list[dict]:
    def query_var(name: str, query: str) -> dict:
        return {"name": name, "label": name, "type": "query", "datasource": DS,
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"text": "All", "value": "$__all"}, "sort": 1}

    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0},
        query_var("application", "label_values(ray_dfastllm_requests_total, application)"),
        query_var("model", 'label_values(ray_dfastllm_requests_total{application=~"$application"}'
                           ", model)"),
    ]


def dashboard() -> dict:
    panels = (traffic_row(0) + decoding_row(17) + hybrid_row(26) + capacity_row(35)
              + ray_serve_row(44))
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "title": "dfastllm-ray", "uid": "dfastllm-ray", "tags": ["dfastllm-ray", "ray-serve"],
        "description": "Diffusion LM serving on Ray Serve: traffic, decoding (NFE, TPF), capacity.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "",
        "templating": {"list": variables()}, "annotations": {"list": []}, "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.name}")
