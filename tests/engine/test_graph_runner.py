"""The static-buffer cached forward (the CUDA-graph path) equals the dynamic one.

On CPU the static path runs eagerly with the same padding as the captured graphs (batch and key
buckets, inert padded rows), so its logic is checked everywhere; the `gpu` test checks that
graph replay equals eager on CUDA."""
from __future__ import annotations

import pytest
import torch

from dfastllm_ray.engine.graph_runner import BATCH_BUCKETS, bucket_of
from engine_models import engine, run_all
from test_batch_invariance import DREAM_KNOBS, LLADA_KNOBS, mixed_requests


def test_buckets_pad_batch_keys_and_candidates():
    assert bucket_of(3, 8, 40, 5) == (4, 8, 256, 8)
    assert bucket_of(17, 32, 300, 32) == (24, 32, 512, 32)
    assert bucket_of(BATCH_BUCKETS[-1] + 1, 8, 8, 8) is None


@pytest.mark.parametrize("model,knobs", [("llada-tiny", LLADA_KNOBS), ("dream-tiny", DREAM_KNOBS)])
@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_static_cached_forward_equals_dynamic(model, knobs, mode):
    reqs = mixed_requests(knobs, n=12, seed=5)
    want = run_all(engine(model, mode), reqs)
    eng = engine(model, mode, cuda_graphs=True)
    got = run_all(eng, reqs)
    assert {r: o.token_ids for r, o in got.items()} == {r: o.token_ids for r, o in want.items()}
    assert {r: o.nfe for r, o in got.items()} == {r: o.nfe for r, o in want.items()}
    assert eng.runner.graphs.steps, "no cached step went through the static path"
    assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_on_cuda():
    from dfastllm_ray.engine.config import EngineConfig
    from dfastllm_ray.engine.engine import Engine
    from dfastllm_ray.models.loader import load_model
    from engine_models import REFERENCE
    loaded = load_model(REFERENCE / "llada-tiny", dtype="float32", device="cuda")
    cfg = dict(kv_cache_mode="dual", page_size=4, num_pages=512, device="cuda")
    reqs = mixed_requests([{}, {"threshold": 0.5}], n=12, seed=5)
    want = run_all(Engine(loaded, EngineConfig(**cfg)), reqs)
    eng = Engine(loaded, EngineConfig(cuda_graphs=True, **cfg))
    got = run_all(eng, reqs)
    assert eng.runner.graphs.replays > 0 and eng.runner.graphs.captures > 0
    assert {r: o.token_ids for r, o in got.items()} == {r: o.token_ids for r, o in want.items()}
