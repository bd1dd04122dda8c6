"""The step is GPU-shaped: no data-dependent (syncing) op anywhere in `Engine.step()`, and the
sampling phase dispatches the same, small number of ops whatever the batch size.

Counted with a TorchDispatchMode (engine/op_count.py) on CPU, where every aten op the step
dispatches, but the views (select, unsqueeze, ...: metadata only), would be a kernel launch
on a GPU. The step's single device -> host copy is a plain
`.cpu()` (a no-op on CPU); everything else counted here would also run on the device."""
from __future__ import annotations

import random

import pytest

from dfastllm_ray.engine import sampler
from dfastllm_ray.engine.op_count import count_ops
from dfastllm_ray.sampling import batch_propose
from dfastllm_ray.sampling.params import SamplingParams
from engine_models import engine

SETTINGS = {
    "threshold": dict(threshold=0.9),
    "fixed": dict(),
    "factor": dict(factor=1.0),
    "entropy_bound": dict(entropy_bound=0.5),
    "sampled": dict(temperature=0.7, threshold=0.9, seed=3),
    "random": dict(remasking="random", seed=5),
}


def _engine_with(model: str, mode: str, batch: int, params: SamplingParams):
    eng = engine(model, mode, max_num_seqs=max(batch, 1))
    rng = random.Random(0)
    vocab = eng.spec.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(1, vocab - 8) for _ in range(rng.randint(6, 14))]
        eng.add_request(str(i), prompt, params)
    return eng


def _sampling_ops(eng, steps: int, monkeypatch) -> tuple[dict, dict]:
    """Ops of sampler.sample + sampler.commit per op chain (every occurrence), and the syncs
    of whole `Engine.step()` calls. A chain is what the host knows of a group before its step:
    its kind, whether some row is padded (fewer candidates than the widest) and whether every
    candidate range starts at the active block; never its batch size."""
    per_kind: dict[str, set] = {}
    syncs: dict[str, int] = {}
    orig_sample, orig_commit = sampler.sample, sampler.commit
    box = {}

    def sample(logits, plan, *a, **k):
        with count_ops() as c:
            out = orig_sample(logits, plan, *a, **k)
        box["chain"], box["n"] = (plan.kind, plan.dense, plan.in_block), c.kernels
        return out

    def commit(*a, **k):
        with count_ops() as c:
            out = orig_commit(*a, **k)
        per_kind.setdefault(box["chain"], set()).add(box["n"] + c.kernels)
        return out

    monkeypatch.setattr(sampler, "sample", sample)
    monkeypatch.setattr(sampler, "commit", commit)
    for _ in range(steps):
        if not eng.has_unfinished():
            break
        with count_ops() as whole:
            eng.step()
        for k, v in whole.syncs.items():
            syncs[k] = syncs.get(k, 0) + v
    return per_kind, syncs


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model,mode", [("llada-tiny", "dual"), ("llada-tiny", "none"),
                                        ("dream-tiny", "dual")])
def test_step_has_no_sync_and_sampling_ops_do_not_grow_with_batch(model, mode, setting,
                                                                   monkeypatch):
    if model == "dream-tiny" and setting in ("factor", "entropy_bound", "random"):
        pytest.skip("LLaDA-only knobs")
    params = SamplingParams(max_tokens=16, block_length=8, **SETTINGS[setting])
    # the CPU argmax tiles only large inputs (a CPU compute choice; a GPU runs one argmax)
    monkeypatch.setattr(batch_propose, "ARGMAX_TILED_MIN", float("inf"))
    counts = {}
    for batch in (1, 16, 64):
        eng = _engine_with(model, mode, batch, params)
        ops, syncs = _sampling_ops(eng, 3, monkeypatch)
        assert syncs == {}, f"batch {batch}: data-dependent ops in a step: {syncs}"
        counts[batch] = ops
    for chain, ops in counts[64].items():          # one op count per chain, at every batch size
        assert len(ops) == 1 and max(ops) <= 60, counts
        assert all(counts[b].get(chain, ops) == ops for b in (1, 16)), counts
    assert set(counts[64]) & set(counts[16]), counts   # the comparison is not vacuous
