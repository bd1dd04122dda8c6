"""benchmarks/offline.py's helpers: device timing and memory, percentiles, per-kind merges, and
the printed lines."""
from __future__ import annotations

import gc
import math

import torch

from benchmarks.step_probe import PHASES

PERCENTILES = (50, 90, 99)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """GiB allocated at the peak since the last reset (CUDA); None on CPU (no per-mode peak)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50 / p90 / p99 (ms)."""
    s = sorted(values)
    return {f"p{p}": (s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else None)
            for p in PERCENTILES}


def merge_kinds(timed: dict, warm: dict) -> dict:
    """Per step kind: the timed run's steps and phases, the warm-up's op counts."""
    out = {}
    for label, row in timed.items():
        out[label] = {**row, "ops_per_step": warm.get(label, {}).get("ops_per_step")}
    return out


def weighted(by_kind: dict, key: str) -> dict | None:
    """A per-kind dict of per-step values -> its average over all steps."""
    rows = [(r["steps"], r[key]) for r in by_kind.values() if r.get(key)]
    if not rows:
        return None
    n = sum(s for s, _ in rows)
    return {k: sum(s * v[k] for s, v in rows) / n for k in rows[0][1]}


def fmt(v, spec: str = "8.1f") -> str:
    return "n/a".rjust(len(format(0.0, spec))) if v is None else format(v, spec)


def main_line(r: dict) -> str:
    lat, ttfb = r["latency_ms"] or {}, r["ttfb_ms"] or {}
    vf = r.get("verifier_forwards_per_token")
    verifier = f" | verifier fwd/token {vf:5.2f}" if vf is not None else ""
    return (f"{r['path']:<10} batch {r['batch']:>3} | {r['tokens_per_s']:9.1f} tok/s | "
            f"NFE {r['nfe']:6.1f} | TPF {r['tpf']:5.2f} | {r['ms_per_step']:7.1f} ms/step | "
            f"TTFB p50 {fmt(ttfb.get('p50'))} ms | latency p50/p90/p99 {fmt(lat.get('p50'))} "
            f"{fmt(lat.get('p90'))} {fmt(lat.get('p99'))} ms | peak {fmt(r['peak_gb'], '6.2f')} GB"
            f"{verifier}")


def kind_lines(r: dict) -> list[str]:
    lines = []
    for label, k in (r["by_kind"] or {}).items():
        ph = " ".join(f"{p} {k['phases_ms'][p]:.2f}" for p in PHASES)
        ops = k.get("ops_per_step")
        counts = (f" | kernels {ops['kernels']:.0f} (forward {ops['forward_kernels']:.0f}) "
                  f"syncs {ops['syncs']:.0f}" if ops else "")
        lines.append(f"  {label:<16} {k['steps']:>5} steps | {k['ms_per_step']:7.2f} ms/step: "
                     f"{ph}{counts}")
    return lines


def header_lines(h: dict) -> str:
    return (f"# {h['model']} ({h['dtype']}) on {h['hardware']} ({h['device']}, torch {h['torch']}, "
            f"{h['threads']} threads), commit {h['commit']}\n# prompt {h['prompt_len']}, gen "
            f"{h['gen_len']}, block {h['block_len']}, batch {h['batch']}, {h['tpf_source']}\n"
            f"# {h['command']}")
