"""`EngineConfig`: the engine's knobs, validated at construction, defaults in one place.

Every invalid value raises `ValueError` naming the field, the value and the fix (nano-vllm
`config.py` style). The KV page count is derived from a memory budget by
`kv_pool.num_pages_for_budget` once the model's shapes are known (`Engine.__init__`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..sampling.params import REFRESH_TRIGGERS

KV_CACHE_MODES = ("none", "prefix", "dual")
REFRESH_MODES = ("full", "incremental")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLER_DTYPES = ("float32", "float64")
ATTENTION_BACKENDS = ("sdpa", "flex")
BLOCK_STORES = ("fused", "separate")


def _check(cond: bool, name: str, value, fix: str) -> None:
    if not cond:
        raise ValueError(f"EngineConfig.{name}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    """Most requests decoding at once (the running set). Waiting requests queue FIFO."""

    max_num_batched_tokens: int = 65536
    """Token budget of one engine step: the sum over scheduled requests of the query positions
    of their forward (a full canvas for a refresh / no-cache step, the block for a dual-cache
    step). A request whose full canvas exceeds it is rejected at `add_request`."""

    kv_cache_mode: str = "dual"
    """"none": every step is a full-canvas forward (the exact reference loops).
    "prefix" / "dual": Fast-dLLM v1 semantics: one full refresh forward per block writes the K/V
    of the canvas into the request's pages; the block's later steps attend to the cached prefix
    (prefix: queries = block and everything after it) or to the cached prefix and suffix (dual:
    queries = the block only)."""

    refresh: str = "full"
    """What a block's first (refresh) forward recomputes with a KV cache. "full": the whole
    canvas from the first non-frozen position (Fast-dLLM). "incremental": only the block that
    just finished and everything after it; earlier pages (the prompt, older blocks) keep their
    K/V, and only the new block's masks compete. Cheaper refreshes, an approximation: its
    accuracy cost is measured by benchmarks/quality.py."""

    refresh_every: int | None = None
    """With a KV cache, a block also re-runs its refresh forward every N of its steps (a request's
    `refresh_every` overrides it). The first refresh writes the prompt's K/V while the block is
    all masks; bidirectional attention makes those keys depend on the block, so they go stale as
    it fills (the cache's accuracy cost, measured in docs/policies.md). None: at a block's first
    step only (Fast-dLLM)."""

    refresh_on: str | None = None
    """With a KV cache, "content": a block's step after one that committed a token other than
    EOS/EOT re-runs the refresh forward over the prompt, the earlier blocks and the block (not
    the all-masked blocks after it), so the prompt's keys see every content token the block has
    (a request's `refresh_on` overrides it). Steps that only fill the tail with EOS stay cached.
    Measured in docs/policies.md: no cache's answers, at fewer forwards' cost than refreshing
    every step. None: no content trigger."""

    refresh_budget: int | None = 2
    """With `refresh_on: "content"`: such refreshes per request at most (a request's
    `refresh_budget` overrides it); the first content tokens of an answer get them (they decide
    what follows, e.g. a carry), the rest of the request decodes as the plain cache does. 2 is
    the measured point (docs/policies.md: within 1 point of no cache on three checkpoints with
    one block of 16, at about 0.8x the dual cache's CPU time). None: no bound."""

    chunked_refresh: bool = False
    """Split a refresh forward that does not fit the step's remaining token budget into chunks
    over several steps (as chunked prefill does), so cached requests keep stepping: each chunk
    writes the K/V of part of the canvas before the active block, attending to what is cached;
    the last step decodes as usual. Only the block's masks compete in a chunked refresh. Off:
    such a refresh waits for a step with budget (exact)."""

    page_size: int = 16
    """Token positions per KV page."""

    kv_cache_memory_gb: float | None = None
    """KV pool budget in GiB. None: on CUDA `gpu_memory_utilization` of the memory left after the
    weights are loaded; on CPU enough for `max_num_seqs` canvases of `max_model_len`, capped at
    `cpu_kv_cache_gb`."""

    num_pages: int | None = None
    """Explicit page count (overrides `kv_cache_memory_gb`); mainly for tests."""

    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's total memory the process may use (weights + KV pool + activations)."""

    cpu_kv_cache_gb: float = 1.0
    """Upper bound of the automatic KV budget on CPU."""

    enable_prefix_caching: bool = False
    """Share full prompt pages between requests with the same prefix (content-hash chain,
    reference counts, LRU eviction). With bidirectional attention a prompt's K/V depend on the
    whole canvas, so this is an approximation (dLLM-Cache: prompt features are nearly static
    across denoising steps): the prompt's full pages are computed once, at the request's first
    refresh or by an earlier request, and then frozen. Off by default: outputs then equal the
    Fast-dLLM reference exactly. Needs kv_cache_mode "prefix" or "dual"."""

    max_model_len: int | None = None
    """Longest canvas (prompt + max_tokens) accepted. None: the model's context length."""

    dtype: str = "auto"
    """Weights / activations / KV dtype: "auto" = bfloat16 on CUDA, float32 on CPU."""

    device: str = "auto"
    """"auto" = "cuda" when available, else "cpu"."""

    compile: bool = False
    """CUDA only: `torch.compile` the model forward (dynamic shapes)."""

    default_speed: str | None = "balanced"
    """The `speed` a request gets when it sets no decoding knob at all (no steps, threshold,
    policy knob, speed, cache mode), where the dial is measured for the model family
    (sampling/speed.py: LLaDA and Dream): "balanced" is the measured point at >= 4 tokens per
    forward within 1 point of the reference. None keeps the reference schedule (one position per step)
    for such requests; "exact" is the same with no approximate KV cache."""

    cuda_graphs: bool = False
    """Run cached-window forwards on static buffers padded to batch / key buckets, captured
    as CUDA graphs on first use and replayed (engine/graph_runner.py). On CPU the same
    static-buffer path runs eagerly (no graphs), for tests. Applies to the SDPA + gather path
    (attention_backend="sdpa"); other forwards run eagerly."""

    sampler_dtype: str = "float32"
    """Precision of the batched sampler's softmax and confidences. "float32": the fast path.
    "float64": Fast-dLLM's float64 softmax, for bit-exact ties with the official LLaDA code
    (the engine-vs-reference tests run both and say which cases need it)."""

    exact_ties: bool = False
    """Break ties among equal confidences of the quota policies (fixed, Dream top-k / threshold)
    as `torch.topk` does over the official code's row layout, instead of by position. Only exact
    ties differ: e.g. Dream's top-k margin with top_k, where every position left with a single
    token has margin exactly 1.0 (fixture `dream.topk_margin.s32.topp0.9.topk20`). Costs one
    topk per distinct quota in the step; off on the fast path."""

    block_store: str = "fused"
    """Block diffusion (SDAR) only: when a decoded block's K/V is stored. "fused": by the next
    block's first forward, whose window starts at the decoded block (a block-causal mask keeps
    the new block's queries off nothing they should not see; the prompt's prefill rides on
    block 0's first forward the same way) and not at all after the last block: one forward
    fewer per block. "separate": the official order, one storing forward per block (NFE equal
    to `sampling.sdar_generate.block_diffusion_generate`)."""

    attention_backend: str = "sdpa"
    """How a cached or refresh forward attends to the paged KV cache. "sdpa": each layer
    gathers the canvas K/V from the pages into a dense tensor for SDPA (the CPU and reference
    path). "flex": FlexAttention reads the pages in place through a block mask built from the
    page tables (engine/paged_attention.py): eager and slow on CPU, compiled on CUDA, where
    page_size must be a power of two >= 16. Same results (tests/engine/test_paged_attention.py);
    the default stays "sdpa" until a GPU measurement says which is faster."""

    def __post_init__(self) -> None:
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs",
               self.max_num_seqs, "use an integer >= 1")
        _check(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
               "max_num_batched_tokens", self.max_num_batched_tokens, "use an integer >= 1")
        _check(self.kv_cache_mode in KV_CACHE_MODES, "kv_cache_mode", self.kv_cache_mode,
               f"use one of {KV_CACHE_MODES}")
        _check(self.default_speed in (None, "exact", "balanced", "fast"), "default_speed",
               self.default_speed, 'use "exact", "balanced", "fast" or None')
        _check(self.refresh_every is None or (isinstance(self.refresh_every, int)
                                              and self.refresh_every >= 1),
               "refresh_every", self.refresh_every, "use an integer >= 1 (block steps between "
               "refreshes) or None (a block's first step only)")
        _check(self.refresh_on is None or self.refresh_on in REFRESH_TRIGGERS, "refresh_on",
               self.refresh_on, f"use one of {REFRESH_TRIGGERS} (content: refresh after a step "
               "that committed a non-EOS token) or None")
        _check(self.refresh_budget is None or (isinstance(self.refresh_budget, int)
                                               and self.refresh_budget >= 0),
               "refresh_budget", self.refresh_budget,
               "use an integer >= 0 (content refreshes per request) or None (no bound)")
        _check(self.refresh in REFRESH_MODES, "refresh", self.refresh,
               f"use one of {REFRESH_MODES}")
        _check(not self.chunked_refresh or self.kv_cache_mode != "none", "chunked_refresh",
               self.chunked_refresh, 'chunked refresh needs a KV cache: kv_cache_mode "prefix" or "dual"')
        _check(isinstance(self.page_size, int) and self.page_size >= 1, "page_size",
               self.page_size, "use an integer >= 1 (16 is a good default)")
        _check(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0, "kv_cache_memory_gb",
               self.kv_cache_memory_gb, "use a positive number of GiB or None for automatic sizing")
        _check(self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages >= 1),
               "num_pages", self.num_pages, "use an integer >= 1 or None to size from memory")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
               self.gpu_memory_utilization, "use a fraction in (0, 1]")
        _check(self.cpu_kv_cache_gb > 0, "cpu_kv_cache_gb", self.cpu_kv_cache_gb,
               "use a positive number of GiB")
        _check(not self.enable_prefix_caching or self.kv_cache_mode != "none",
               "enable_prefix_caching", self.enable_prefix_caching,
               'prefix caching needs a KV cache: set kv_cache_mode="prefix" or "dual"')
        _check(self.max_model_len is None or (isinstance(self.max_model_len, int)
                                              and self.max_model_len >= 2),
               "max_model_len", self.max_model_len, "use an integer >= 2 or None")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {DTYPES}")
        _check(self.sampler_dtype in SAMPLER_DTYPES, "sampler_dtype", self.sampler_dtype,
               f"use one of {SAMPLER_DTYPES}")
        _check(self.block_store in BLOCK_STORES, "block_store", self.block_store,
               f"use one of {BLOCK_STORES}")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               self.attention_backend, f"use one of {ATTENTION_BACKENDS}")
        _check(self.attention_backend == "sdpa" or self.kv_cache_mode != "none",
               "attention_backend", self.attention_backend,
               'it reads the paged KV cache: use kv_cache_mode "prefix" or "dual", or "sdpa"')
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
               self.device, 'use "auto", "cpu", "cuda" or "cuda:N"')

    @property
    def uses_kv_cache(self) -> bool:
        return self.kv_cache_mode != "none"
