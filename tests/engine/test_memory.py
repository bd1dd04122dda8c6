"""Memory: the planned pool is allocated and a full batch runs in it; on CUDA the warm-up measures
the activation peak and pool + peak fit under gpu_memory_utilization."""
import math
from pathlib import Path

import pytest
import torch

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.engine.kv_pool import bytes_per_page
from dfastllm_ray.engine.memory import (LOGIT_ROWS_PER_SEQ, pages_after_warmup, plan_num_pages,
                                        warmup_shapes, warmup_step)
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.models.shapes import DREAM_7B, LLADA_8B, num_parameters
from dfastllm_ray.sampling.params import SamplingParams

GB = 10 ** 9
TINY = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "llada-tiny"


def test_published_parameter_counts():
    assert 8.0e9 < num_parameters(LLADA_8B) < 8.1e9        # "LLaDA-8B": 8.02B parameters
    assert 7.6e9 < num_parameters(DREAM_7B) < 7.7e9        # Qwen2.5-7B layout: 7.62B


def test_arithmetic_estimate_for_64_llada_8b_requests_of_768_tokens_on_80gb():
    """Arithmetic only (plan_num_pages' *estimate* of the activations, no allocation): the
    fallback plan leaves room for 64 x 768 tokens. The measured check is the gpu test below."""
    cfg = EngineConfig()
    weights = num_parameters(LLADA_8B) * 2                   # bf16
    pages = plan_num_pages(LLADA_8B, torch.bfloat16, cfg.page_size, 80 * GB, weights + 1 * GB,
                           cfg.gpu_memory_utilization, cfg.max_num_batched_tokens, cfg.max_num_seqs)
    needed = 64 * math.ceil(768 / cfg.page_size)
    assert cfg.max_num_seqs >= 64 and cfg.max_num_batched_tokens >= 64 * 768
    assert pages >= needed, f"{pages} pages planned, {needed} needed"
    kv_gb = needed * bytes_per_page(32, cfg.page_size, 32, 128, torch.bfloat16) / GB
    assert 25 < kv_gb < 27                      # 0.5 MB of K/V per token, 49,152 tokens


def test_warmup_shapes_are_the_largest_steps_the_config_allows():
    assert warmup_shapes(64, 65536, 1024) == [(64, 1024)]    # most rows == longest rows
    assert warmup_shapes(64, 65536, 4096) == [(64, 1024), (16, 4096)]
    assert warmup_shapes(4, 65536, 768) == [(4, 768)]        # canvases capped by max_model_len
    assert warmup_shapes(64, 100, 768) == [(64, 1), (1, 100)]    # budget below one canvas
    assert warmup_shapes(8, 3000, 768) == [(8, 375), (3, 768)]


def test_pages_after_warmup_is_what_the_peak_leaves():
    page = 2 * 10 ** 6
    assert pages_after_warmup(100 * GB, 20 * GB, 10 * GB, 0.9, page) == 60 * GB // page
    assert pages_after_warmup(100 * GB, 20 * GB, 75 * GB, 0.9, page) == 0


def _full_batch(eng: Engine, n: int, canvas: int, block: int) -> list:
    sp = SamplingParams(max_tokens=block, block_length=block, steps=block // 4, threshold=None)
    for i in range(n):
        eng.add_request(f"r{i}", [(7 * i + j) % 400 + 1 for j in range(canvas - block)], sp)
    eng.step()
    running = eng.stats()["num_running"]
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    return running, outs


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_planned_pool_is_allocated_and_runs_a_full_batch_cpu(mode):
    """Default sizing on CPU: the pool is allocated for max_num_seqs canvases of max_model_len,
    all of them run in one step together, finish, and give every page back."""
    loaded = load_model(TINY, dtype="float32", device="cpu")
    seqs, canvas, block = 6, 96, 32
    cfg = EngineConfig(kv_cache_mode=mode, max_num_seqs=seqs, max_model_len=canvas,
                       max_num_batched_tokens=seqs * canvas)
    eng = Engine(loaded, cfg)
    pages = seqs * math.ceil(canvas / cfg.page_size)
    assert eng.pool.num_pages == pages and eng.memory_plan is None       # CPU: not measured
    assert eng.pool.data.shape[2] == pages * cfg.page_size + 1           # + the dump slot
    running, outs = _full_batch(eng, seqs, canvas, block)
    assert running == seqs                                               # all admitted at once
    assert len(outs) == seqs and all(o.nfe >= 1 for o in outs)
    assert eng.scheduler.allocator.num_free_pages == pages


def test_warmup_step_runs_the_largest_shape_cpu():
    loaded = load_model(TINY, dtype="float32", device="cpu")
    [(rows, width)] = warmup_shapes(6, 6 * 96, 96)
    conf = warmup_step(loaded.model, loaded.spec, loaded.device, rows, width)
    assert conf.shape == (6, min(96, LOGIT_ROWS_PER_SEQ)) and bool(torch.isfinite(conf).all())


def _run_peak_above_start(eng: Engine, n: int, canvas: int, block: int) -> tuple[int, int, list]:
    """(running after the first step, peak bytes allocated above the start, outputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    running, outs = _full_batch(eng, n, canvas, block)
    torch.cuda.synchronize()
    return running, torch.cuda.max_memory_allocated() - start, outs


# The warm-up forward has no KV hook and decodes 64 rows per canvas; the real steps write K/V in
# place and decode the candidates only. Their extra allocations must stay within the measured
# peak, up to this factor (small fixed costs: packed metadata, counts, the host copy's buffer).
PEAK_SLACK, FIXED_SLACK = 1.25, 8 * 2 ** 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measured_pool_and_peak_fit_cuda():
    """The pool is what the warm-up's measurement left, and a full batch at the warm-up shape
    allocates no more than the measured peak above the pool and weights."""
    loaded = load_model(TINY, dtype="bfloat16", device="cuda")
    seqs, canvas, block, util = 8, 96, 32, 0.5
    eng = Engine(loaded, EngineConfig(kv_cache_mode="dual", max_num_seqs=seqs, max_model_len=canvas,
                                      max_num_batched_tokens=seqs * canvas,
                                      gpu_memory_utilization=util))
    plan = eng.memory_plan
    assert plan is not None and plan.activation_peak > 0
    assert (plan.rows, plan.width) == (seqs, canvas)
    assert eng.pool.num_pages == min(plan.num_pages, seqs * canvas // 16)
    running, extra, outs = _run_peak_above_start(eng, seqs, canvas, block)
    assert running == seqs and len(outs) == seqs
    assert extra <= PEAK_SLACK * plan.activation_peak + FIXED_SLACK, (extra, plan)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_64_llada_8b_requests_of_768_tokens_fit_in_80gb_measured():
    """LLaDA-8B's shape (random bf16 weights), 64 canvases of 768 tokens, the budget of an 80 GB
    card at utilization 0.9: the measured plan holds them and the batch runs under it."""
    from dfastllm_ray.models.random_weights import random_model
    loaded = random_model("llada-8b", device="cuda", dtype="bfloat16")
    total = torch.cuda.mem_get_info()[1]
    util = min(1.0, 0.9 * 80 * GB / total)
    eng = Engine(loaded, EngineConfig(kv_cache_mode="dual", max_num_seqs=64, max_model_len=768,
                                      max_num_batched_tokens=64 * 768,
                                      gpu_memory_utilization=util))
    assert eng.pool.num_pages >= 64 * 768 // 16, eng.memory_plan
    running, extra, outs = _run_peak_above_start(eng, 64, 768, 32)
    assert running == 64 and len(outs) == 64
    assert extra <= PEAK_SLACK * eng.memory_plan.activation_peak + FIXED_SLACK
    assert torch.cuda.max_memory_allocated() <= 0.9 * 80 * GB
