"""`StepProbe`: per-step measurements of an `Engine`, taken from outside it.

Wraps the three calls of `Engine.step()` on one engine instance (`scheduler.schedule`,
`runner.run`, `scheduler.update`) and reads the runner's own `PhaseTimer` (inputs, forward,
sample, commit), so a step's wall time splits into

    schedule | inputs | forward | sample | commit | copy | update | other

where *copy* is the rest of `runner.run` (the step's one device -> host copy and its unpacking)
and *other* the rest of `step()` (metrics, detokenizing). Each step is labelled by the kinds of
forward it ran (`SchedulerOutput` items: "refresh", "cached", "refresh+cached", "full", ...).

On CUDA these are host times: kernels are queued asynchronously, so the device's time shows up
where the host waits for it (the copy), unless `sync=True` synchronises at every phase boundary
(exact attribution, less overlap). With `count_ops=True` every step also runs under an
`OpCounter` (engine/op_count.py): kernels (views excluded) and syncing ops per step, and the
kernels of the forward alone (a nested counter around the model call).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext

import torch

from dfastllm_ray.engine.model_runner import PhaseTimer
from dfastllm_ray.engine.op_count import OpCounter

PHASES = ("schedule", "inputs", "forward", "sample", "commit", "copy", "update", "other")


class SyncedTimer(PhaseTimer):
    """A PhaseTimer that waits for the device before each lap (device time per phase)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        super().start()

    def lap(self, phase: str) -> None:
        torch.cuda.synchronize(self.device)
        super().lap(phase)


class StepProbe:
    def __init__(self, engine, sync: bool = False, count_ops: bool = False):
        self.eng, self.count_ops = engine, count_ops
        self.sync = sync and engine.device.type == "cuda"
        if self.sync:
            engine.runner.timer = SyncedTimer(engine.device)
        self.steps: dict[str, int] = defaultdict(int)                  # label -> steps
        self.ms: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
        self.ops: dict[str, dict[str, int]] = defaultdict(
            lambda: {"kernels": 0, "forward_kernels": 0, "syncs": 0})
        self._cur: dict = {}               # the step being measured: ms per call, its label
        self._counting = False             # inside a counted step
        self._fwd_kernels = 0
        self._wrap()

    def _wrap(self) -> None:
        eng, probe = self.eng, self
        sched, run, update, model = (eng.scheduler.schedule, eng.runner.run,
                                     eng.scheduler.update, eng.runner.model)

        def timed(fn, key):
            def call(*a, **k):
                self._wait()
                t0 = time.perf_counter()
                out = fn(*a, **k)
                self._wait()
                probe._cur[key] = (time.perf_counter() - t0) * 1e3
                if key == "schedule":
                    probe._cur["label"] = "+".join(sorted({i.kind for i in out.scheduled}))
                return out
            return call

        def counted_model(*a, **k):
            if not probe._counting:
                return model(*a, **k)
            with OpCounter() as inner:             # nested: the step's counter sees these too
                out = model(*a, **k)
            probe._fwd_kernels += inner.kernels
            return out

        self._originals = (sched, run, update, model)
        eng.scheduler.schedule = timed(sched, "schedule")
        eng.runner.run = timed(run, "run")
        eng.scheduler.update = timed(update, "update")
        eng.runner.model = counted_model

    def close(self) -> None:
        """Give the engine its own methods back (and its plain timer)."""
        eng = self.eng
        (eng.scheduler.schedule, eng.runner.run, eng.scheduler.update,
         eng.runner.model) = self._originals
        if self.sync:
            eng.runner.timer = PhaseTimer()

    def _wait(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.eng.device)

    def step(self) -> list:
        """One `Engine.step()`, measured."""
        self._cur = {"label": ""}
        timer = self.eng.runner.timer
        before = dict(timer.ms)
        counter = OpCounter() if self.count_ops else None
        self._counting, self._fwd_kernels = counter is not None, 0
        t0 = time.perf_counter()
        with counter if counter is not None else nullcontext():
            outputs = self.eng.step()
        total = (time.perf_counter() - t0) * 1e3
        self._counting = False
        label = self._cur["label"]
        if not label:                                  # an empty step (nothing scheduled)
            return outputs
        self._record(label, total, {p: timer.ms[p] - before[p] for p in timer.ms}, counter)
        return outputs

    def _record(self, label: str, total: float, runner_ms: dict, counter) -> None:
        c = self._cur
        ms = self.ms[label]
        self.steps[label] += 1
        ms["schedule"] += c["schedule"]
        ms["update"] += c["update"]
        for p, v in runner_ms.items():          # a phase the runner adds later: its own column
            ms[p] = ms.get(p, 0.0) + v
        ms["copy"] += c["run"] - sum(runner_ms.values())
        ms["other"] += total - c["schedule"] - c["run"] - c["update"]
        if counter is not None:
            o = self.ops[label]
            o["kernels"] += counter.kernels
            o["forward_kernels"] += self._fwd_kernels
            o["syncs"] += sum(counter.syncs.values())

    def summary(self) -> dict:
        """Per step label: steps, ms per step (total and per phase), ops per step if counted."""
        out = {}
        for label, n in sorted(self.steps.items()):
            ms = {p: v / n for p, v in self.ms[label].items()}
            row = {"steps": n, "ms_per_step": sum(ms.values()), "phases_ms": ms}
            if self.count_ops:
                row["ops_per_step"] = {k: v / n for k, v in self.ops[label].items()}
            out[label] = row
        return out
