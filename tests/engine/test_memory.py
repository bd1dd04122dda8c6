"""The memory plan: 64 concurrent LLaDA-8B requests of 768 tokens fit on one 80 GB GPU."""
import math

import torch

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.kv_pool import bytes_per_page
from dfastllm_ray.engine.memory import plan_num_pages
from dfastllm_ray.models.shapes import LLADA_8B, num_parameters

GB = 10 ** 9


def test_llada_8b_parameter_count_matches_the_published_size():
    assert 8.0e9 < num_parameters(LLADA_8B) < 8.1e9        # "LLaDA-8B": 8.02B parameters


def test_64_requests_of_768_tokens_fit_on_80gb():
    cfg = EngineConfig()                                     # defaults a user gets
    weights = num_parameters(LLADA_8B) * 2                   # bf16
    cuda_context = 1 * GB
    pages = plan_num_pages(LLADA_8B, torch.bfloat16, cfg.page_size, 80 * GB, weights + cuda_context,
                           cfg.gpu_memory_utilization, cfg.max_num_batched_tokens, cfg.max_num_seqs)
    needed = 64 * math.ceil(768 / cfg.page_size)
    assert cfg.max_num_seqs >= 64 and cfg.max_num_batched_tokens >= 64 * 768
    assert pages >= needed, f"{pages} pages planned, {needed} needed"
    kv_gb = needed * bytes_per_page(32, cfg.page_size, 32, 128, torch.bfloat16) / GB
    assert 25 < kv_gb < 27                                   # 0.5 MB of K/V per token, 49,152 tokens


def test_plan_shrinks_when_memory_is_taken():
    args = (LLADA_8B, torch.bfloat16, 16, 80 * GB)
    rest = (0.9, 65536, 64)
    assert plan_num_pages(*args, 70 * GB, *rest) == 0
    assert plan_num_pages(*args, 20 * GB, *rest) > plan_num_pages(*args, 30 * GB, *rest)
