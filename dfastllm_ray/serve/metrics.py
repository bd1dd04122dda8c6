"""Prometheus metrics through Ray's metrics system (`ray.serve.metrics`).

Each Serve replica is its own process, so a `/metrics` route on the ingress would only show the
ingress; Ray aggregates every process's metrics on its metrics port (8080 on KubeRay pods) with the
`deployment`, `replica` and `application` tags added. Exported names get a `ray_` prefix and
counters a `_total` suffix: `ray_dfastllm_requests_total{model, route, outcome}`.

Metrics are created in the deployment constructors (not at import) so Serve's tags are attached.
"""
from __future__ import annotations

from typing import Any, Optional

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
STEP_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
TPF_BOUNDARIES = [1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32]


class IngressMetrics:
    """What the client sees: outcomes, end-to-end latency, time to the first committed block."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "dfastllm_requests", description="HTTP requests by model, route and outcome.",
            tag_keys=("model", "route", "outcome"))
        self.latency = metrics.Histogram(
            "dfastllm_request_latency_s", description="End-to-end request latency (s).",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model", "route"))
        self.ttfb = metrics.Histogram(
            "dfastllm_time_to_first_block_s",
            description="Request arrival to its first committed block (s).",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model",))

    def request(self, model: str, route: str, outcome: str, latency_s: float) -> None:
        self.requests.inc(1, tags={"model": model, "route": route, "outcome": outcome})
        self.latency.observe(latency_s, tags={"model": model, "route": route})

    def first_block(self, model: str, seconds: float) -> None:
        self.ttfb.observe(seconds, tags={"model": model})


# gauge key -> (metric name, description); values come from `engine_gauges(engine.stats())`.
ENGINE_GAUGES = {
    "queue_length": ("dfastllm_queue_length", "Requests waiting for admission to the engine."),
    "running": ("dfastllm_running_requests", "Requests decoding in the engine."),
    "kv_pool_usage": ("dfastllm_kv_pool_usage", "Fraction of KV-cache pages in use (0..1)."),
    "prefix_cache_hit_rate": ("dfastllm_prefix_cache_hit_rate",
                              "Prompt pages served from the prefix cache (0..1)."),
}


def _num(stats: dict[str, Any], key: str) -> Optional[float]:
    value = stats.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def engine_gauges(stats: dict[str, Any]) -> dict[str, float]:
    """The engine's stats dict (scheduler + page allocator + step counters) -> gauge values;
    a key the engine does not report leaves its gauge untouched."""
    out = {"queue_length": _num(stats, "num_waiting"), "running": _num(stats, "num_running"),
           "prefix_cache_hit_rate": _num(stats, "prefix_hit_rate")}
    pages, free = _num(stats, "num_pages"), _num(stats, "free_pages")
    if pages and free is not None:
        out["kv_pool_usage"] = 1.0 - free / pages
    return {k: v for k, v in out.items() if v is not None}


def step_totals(stats: dict[str, Any]) -> Optional[tuple[float, float]]:
    """(engine steps, seconds spent in them) since start, from the engine's running mean."""
    steps, ms = _num(stats, "engine_steps"), _num(stats, "ms_per_step")
    if steps is None or ms is None:
        return None
    return steps, steps * ms / 1000.0


class ReplicaMetrics:
    """Engine-side totals per finished request, and gauges polled from `engine.stats()`."""

    def __init__(self, model_id: str) -> None:
        self.tags = {"model": model_id}
        keys = ("model",)
        self.prompt_tokens = metrics.Counter("dfastllm_prompt_tokens",
                                             description="Prompt tokens admitted.", tag_keys=keys)
        self.generated_tokens = metrics.Counter(
            "dfastllm_generated_tokens", description="Generated tokens (real tokens, no masks).",
            tag_keys=keys)
        self.nfe = metrics.Counter("dfastllm_nfe",
                                   description="Model forwards (NFE) spent on requests.",
                                   tag_keys=keys)
        self.tpf = metrics.Histogram("dfastllm_tokens_per_forward",
                                     description="Generated tokens / NFE, per request.",
                                     boundaries=TPF_BOUNDARIES, tag_keys=keys)
        self.verifier_forwards = metrics.Counter(
            "dfastllm_verifier_forwards",
            description="Verifier forwards spent on hybrid (APD / speculative) requests.",
            tag_keys=keys)
        self.accepted_per_verifier_forward = metrics.Histogram(
            "dfastllm_accepted_tokens_per_verifier_forward",
            description="Hybrid requests: generated tokens / verifier forwards, per request "
                        "(tokens each verifier forward accepted, the bonus token included).",
            boundaries=TPF_BOUNDARIES, tag_keys=keys)
        self.step_latency = metrics.Histogram(
            "dfastllm_step_latency_s", description="Mean engine step latency per poll interval (s).",
            boundaries=STEP_BOUNDARIES_S, tag_keys=keys)
        self.gauges = {key: metrics.Gauge(name, description=desc, tag_keys=keys)
                       for key, (name, desc) in ENGINE_GAUGES.items()}
        self._last_steps: Optional[tuple[float, float]] = None   # (num_steps, step_time_s)

    def request_done(self, prompt_tokens: int, generated: int, nfe: int,
                     verifier_forwards: int = 0) -> None:
        """nfe: the (drafter) model's forwards; verifier_forwards: 0 unless hybrid."""
        self.prompt_tokens.inc(prompt_tokens, tags=self.tags)
        if generated:
            self.generated_tokens.inc(generated, tags=self.tags)
        if nfe:
            self.nfe.inc(nfe, tags=self.tags)
            self.tpf.observe(generated / nfe, tags=self.tags)
        if verifier_forwards:
            self.verifier_forwards.inc(verifier_forwards, tags=self.tags)
            self.accepted_per_verifier_forward.observe(generated / verifier_forwards,
                                                       tags=self.tags)

    def engine_stats(self, stats: dict[str, Any]) -> None:
        for key, value in engine_gauges(stats).items():
            self.gauges[key].set(value, tags=self.tags)
        totals = step_totals(stats)
        if totals is None:
            return
        # The mean step time over the poll interval is one sample (the engine keeps totals only).
        last = self._last_steps
        if last is not None and totals[0] > last[0]:
            mean = (totals[1] - last[1]) / (totals[0] - last[0])
            self.step_latency.observe(max(mean, 0.0), tags=self.tags)
        self._last_steps = totals
