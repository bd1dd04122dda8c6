"""`Engine`: step-level continuous batching of diffusion LMs.

`step()` is three calls: `schedule()` -> `runner.run()` -> `scheduler.update()` (nano-vllm
`LLMEngine.step`). Requests join at any step boundary and leave as soon as they finish; each
engine step is one model forward per kind of window over every scheduled request.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import replace

import torch

from ..models.loader import LoadedModel
from ..sampling.dream import transfer_probs
from ..sampling.params import DEFAULT_MAX_TOKENS, LLADA_ONLY, SamplingParams, unused_knobs
from ..sampling.rng import seed_to_int64
from ..sampling.speed import SPEED_DIAL, speed_knobs
from .config import EngineConfig
from .detokenizer import Detokenizer
from ..sampling.batch_policies import BATCH_POLICIES
from .graph_runner import GraphRunner
from .hybrid import HybridRunner
from .block_diffusion import check_block_diffusion, resolve_block_diffusion
from .block_plan import BLOCK
from .hybrid_plan import start_hybrid
from .input_batch import InputBatch
from .kv_pool import GIB, KVPool, bytes_per_page, num_pages_for_budget
from .memory import MemoryPlan, measure_and_plan
from .model_runner import ModelRunner
from .outputs import RequestOutput, RunnerOutput, SchedulerOutput
from .paged_attention import PageMap
from .page_allocator import PageAllocator
from .request import Request
from .scheduler import Scheduler


ENGINE_POLICIES = set(BATCH_POLICIES) | {"wino", "klass"}
POLICY_FIELDS = {"klass": "kl_threshold", "wino": "revoke_threshold", "credit": "credit_alpha"}


# Fields that mean "this request chose its decoding": with none set, the engine's default speed
DECODING_KNOBS = ("steps", "threshold", "factor", "entropy_bound", "pc_lambda", "exit_high",
                  "kl_threshold", "revoke_threshold", "credit_alpha", "kv_cache_mode", "refresh_every",
                  "refresh_on", "refresh_budget", "alg", "alg_temp", "top_p", "top_k")


def sets_decoding_knobs(p: SamplingParams) -> bool:
    return any(getattr(p, k, None) is not None for k in DECODING_KNOBS) or \
        p.remasking != "low_confidence" or p.temperature > 0 or p.cfg_scale > 0


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 verifier: LoadedModel | None = None):
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.spec = loaded.spec
        if self.spec.causal or self.spec.mask_token_id is None:
            raise ValueError(f"model {loaded.name!r} ({self.spec.arch}) is a causal LM with no mask "
                             "token: the diffusion engine cannot decode it; use it as a `verifier` "
                             "of a diffusion model, or sampling.ar_generate")
        if self.spec.block_size is not None:
            check_block_diffusion(loaded.name, self.config, verifier)
        self.device, self.dtype = loaded.device, loaded.dtype
        self.max_model_len = min(self.config.max_model_len or self.spec.max_position,
                                 self.spec.max_position)
        if verifier is not None:        # a hybrid canvas must fit the verifier's context too
            self.max_model_len = min(self.max_model_len, verifier.spec.max_position)
        self.pool = self._build_pool()
        allocator = PageAllocator(self.pool.num_pages if self.pool else 0, self.config.page_size,
                                  self.config.enable_prefix_caching)
        self.detokenizer = Detokenizer(loaded.tokenizer)
        page_map = (PageMap(self.pool.num_pages, self.config.page_size, self.device)
                    if self.config.attention_backend == "flex" else None)
        self.batch = InputBatch(self.config.max_num_seqs, self.max_model_len, self.config.page_size,
                                self.spec.mask_token_id, self.device, page_map)
        self.scheduler = Scheduler(self.config, allocator, self.max_model_len,
                                   self.spec.stop_token_ids, self.detokenizer.stop_cut,
                                   slots=(self._take_slot, self._release_slot))
        model = loaded.model
        if self.config.compile and self.device.type == "cuda":
            model = torch.compile(model, dynamic=True)
        self.runner = ModelRunner(model, self.spec, self.pool, self.batch,
                                  getattr(torch, self.config.sampler_dtype),
                                  self.config.exact_ties)
        if self.config.cuda_graphs and self.pool is not None:
            self.runner.graphs = GraphRunner(model, self.pool, self.spec.mask_token_id, self.device)
        self.verifier = verifier
        self.drafter_cache = self._read_drafter_cache()
        if verifier is not None:
            self.runner.hybrid = self._build_hybrid(verifier)
        self._seeds = random.Random()              # keys of unseeded requests
        self._arrivals = itertools.count()
        self._stops: dict[str, tuple[str, ...]] = {}
        self.metrics = StepMetrics()

    @classmethod
    def from_model(cls, model: str, dtype: str = "auto", device: str = "auto",
                   **config) -> "Engine":
        from ..models.loader import load_model
        return cls(load_model(model, dtype=dtype, device=device),
                   EngineConfig(dtype=dtype, device=device, **config))

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids is empty: a request needs at least one prompt token")
        p = self.resolve_params(params or SamplingParams(), len(prompt_token_ids))
        seed = p.seed if p.seed is not None else self._seeds.getrandbits(63)
        req = Request(request_id, list(prompt_token_ids), p, self.spec.mask_token_id,
                      next(self._arrivals), seed=seed_to_int64(seed))
        if p.is_hybrid:
            self._prepare_hybrid(req)
        elif p.block_diffusion:
            if self.spec.mask_token_id in prompt_token_ids:
                raise ValueError(f"the prompt holds the mask token ({self.spec.mask_token_id}): "
                                 "block diffusion decodes masks after the prompt only")
            req.kv_mode, req.fused_store = BLOCK, self.config.block_store == "fused"
        else:
            req.kv_mode = self.request_kv_mode(p)
        if p.alg is not None:           # Dream's time schedule: computed here, not inside a step
            transfer_probs(req.steps_per_block, p.eps)
        self.scheduler.add(req)
        self._stops[request_id] = p.stop

    def encode(self, prompt: str) -> list[int]:
        """Text -> token ids with the checkpoint's tokenizer (as LLaDA's and Dream's chat examples)."""
        if self.loaded.tokenizer is None:
            raise ValueError(f"model {self.loaded.name!r} has no tokenizer: pass prompt_token_ids")
        return list(self.loaded.tokenizer(prompt)["input_ids"])

    def resolve_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """Fill defaults and check what the engine supports for this model."""
        if self.spec.block_size is not None:        # SDAR: its own knobs and canvas
            return resolve_block_diffusion(params, prompt_len, self.spec.block_size,
                                           self.max_model_len)
        defaults = self.loaded.generation_defaults or {}
        alg = params.alg or defaults.get("alg") or ("origin" if self.spec.arch == "dream" else None)
        if self.spec.arch != "dream" and params.alg is not None:
            raise ValueError(f"alg={params.alg!r} is a Dream setting; {self.spec.arch} models use "
                             "remasking / threshold / factor / entropy_bound")
        if self.spec.arch == "dream":
            foreign = unused_knobs({k: getattr(params, k) for k in LLADA_ONLY}, "dream")
            if foreign:
                raise ValueError(f"{foreign[0]}={getattr(params, foreign[0])!r} is a LLaDA-family "
                                 "knob; Dream models decode with alg / alg_temp / threshold / "
                                 "steps (refused, not ignored)")
        if params.is_hybrid:
            return self._resolve_hybrid(params, prompt_len)
        if params.remasking_strategy is not None:
            raise ValueError(f"remasking_strategy={params.remasking_strategy!r} is an SDAR (block "
                             f"diffusion) knob; {self.spec.arch} models do not use it: leave it out")
        if params.policy not in ENGINE_POLICIES:
            raise ValueError(f"the {params.policy!r} policy runs in the reference loop "
                             "(sampling.policy_generate) only, not in the engine yet: drop "
                             f"{POLICY_FIELDS.get(params.policy, 'its knob')} or use another policy")
        if params.cfg_scale > 0:
            raise ValueError(f"cfg_scale={params.cfg_scale} is not supported by the engine (it would "
                             "double every forward); use sampling.llada_generate for guidance")
        p = replace(params, alg=alg)
        if p.speed is None and self._default_speed() and not sets_decoding_knobs(params):
            p = replace(p, speed=self.config.default_speed)
        if p.speed is not None:
            p = self._apply_speed(p)
        mode = self.request_kv_mode(p)
        p = self._resolve_refresh(p, mode)
        if alg is not None and mode == "none":                     # diffusion_generate: one block
            p = replace(p, block_length=p.max_tokens or DEFAULT_MAX_TOKENS)
        p = p.resolve(self.max_model_len, prompt_len)
        if alg is not None and p.threshold is not None and mode == "none":
            if p.max_tokens % p.steps:
                raise ValueError(f"steps={p.steps} must divide max_tokens={p.max_tokens} for "
                                 "Dream's threshold schedule without a KV cache")
        return p

    def request_kv_mode(self, p: SamplingParams) -> str:
        """The request's cache mode: its own (`kv_cache_mode`, or its speed's) or the engine's.
        A request may ask "none" from any engine; prefix / dual need the engine's KV pool."""
        mode = p.kv_cache_mode or self.config.kv_cache_mode
        if mode != "none" and self.pool is None:
            raise ValueError(f"kv_cache_mode={mode!r} needs a KV cache, and this engine has none "
                             "(EngineConfig.kv_cache_mode='none'): drop the field or use 'none'")
        return mode

    def _resolve_refresh(self, p: SamplingParams, mode: str) -> SamplingParams:
        """refresh_every / refresh_on: the request's, else the engine's; only a cached request
        refreshes."""
        if mode == "none":
            for name in ("refresh_every", "refresh_on", "refresh_budget"):
                if getattr(p, name) is not None:
                    raise ValueError(f"{name}={getattr(p, name)} refreshes a KV cache, and this "
                                     "request has none (kv_cache_mode='none'): drop the field or "
                                     "set kv_cache_mode 'prefix' or 'dual'")
            return p
        budget = p.refresh_budget if p.refresh_budget is not None else self.config.refresh_budget
        return replace(p, refresh_every=p.refresh_every or self.config.refresh_every,
                       refresh_on=p.refresh_on or self.config.refresh_on, refresh_budget=budget)

    def _default_speed(self) -> bool:
        """The engine's default speed applies where it is measured for this model family."""
        family = "dream" if self.spec.arch == "dream" else "llada"
        speed = self.config.default_speed
        return speed is not None and SPEED_DIAL.get(family, {}).get(speed) is not None

    def _apply_speed(self, p: SamplingParams) -> SamplingParams:
        """`speed` -> the measured policy, settings and cache mode of this model family
        (sampling/speed.py); knobs the request set itself are kept."""
        family = "dream" if self.spec.arch == "dream" else "llada"
        knobs, mode = speed_knobs(family, p.speed, p.max_tokens or DEFAULT_MAX_TOKENS)
        mine = {k: v for k, v in knobs.items() if getattr(p, k) is None}
        return replace(p, **mine, kv_cache_mode=p.kv_cache_mode or mode)

    def abort(self, request_id: str) -> RequestOutput | None:
        out = self.scheduler.abort(request_id)
        return self._attach([out])[0] if out is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _take_slot(self, req: Request) -> int:
        """Admission's device half: the request's row of the resident batch (and its verifier
        pages for hybrid decoding)."""
        slot = self.batch.add(req.prompt_token_ids, req.canvas_len, req.page_ids, req.params,
                              req.seed)
        if req.params.is_hybrid:
            req.slot = slot
            self.runner.hybrid.admit(req)
        return slot

    def _release_slot(self, req: Request) -> None:
        if req.params.is_hybrid:
            self.runner.hybrid.release(req)
        self.batch.release(req.slot)

    # ---- hybrid diffusion-AR decoding -------------------------------------------------------
    def _build_hybrid(self, verifier: LoadedModel) -> HybridRunner:
        if verifier.device != self.device:
            raise ValueError(f"the verifier is on {verifier.device}, the model on {self.device}: "
                             "load both on the same device")
        pages = self.pool.num_pages if self.pool else self.config.num_pages or \
            self.config.max_num_seqs * -(-self.max_model_len // self.config.page_size)
        return HybridRunner(verifier, self.batch, pages, self.config.page_size,
                            self.spec.vocab_size)

    def _resolve_hybrid(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """Hybrid requests decode the whole generation as one left-to-right span."""
        if self.verifier is None:
            raise ValueError(f"decoding={params.decoding!r} needs a verifier model: this model "
                             "has none (set `verifier` in its config), or use decoding='diffusion'")
        gen = params.max_tokens or DEFAULT_MAX_TOKENS
        p = replace(params, max_tokens=gen, block_length=gen, steps=gen,
                    alg=params.alg or ("maskgit_plus" if self.spec.arch == "dream" else None))
        p = p.resolve(self.max_model_len, prompt_len)
        if p.kv_window is not None and self.drafter_cache and self.pool is None:
            raise ValueError("kv_window needs the drafter's KV cache: use kv_cache_mode "
                             "'prefix' or 'dual' for this engine")
        return p

    def _prepare_hybrid(self, req: Request) -> None:
        req.drafter_cache = self.drafter_cache
        start_hybrid(req)
        eos = self.spec.eos_token_id
        req.stop_after_step = (req.params.decoding == "apd" and eos is not None
                               and eos in req.prompt_token_ids)

    def _read_drafter_cache(self) -> bool:
        """The drafter config's `use_cache` (Dream's default False): APD's kv_window applies
        only with it, as in the official code (`Engine.drafter_cache` may be set after init)."""
        path = self.loaded.path
        if path is None or not (path / "config.json").exists():
            return False
        return bool(json.loads((path / "config.json").read_text()).get("use_cache", False))

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        result = self.runner.run(sched, self.scheduler.running)
        outputs = self.scheduler.update(sched, result)
        self.metrics.record(sched, result)
        return self._attach(outputs)

    def _attach(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        self.detokenizer.attach(outputs, self._stops)
        for o in outputs:
            if o.finished:
                self._stops.pop(o.request_id, None)
        return outputs

    def stats(self) -> dict:
        kv = {"kv_cache_mode": self.config.kv_cache_mode,
              "kv_pool_gb": self.pool.nbytes / GIB if self.pool else 0.0}
        return {**self.scheduler.stats(), **self.metrics.as_dict(), **kv}

    # ---- memory -------------------------------------------------------------------------------
    def _build_pool(self) -> KVPool | None:
        c, s = self.config, self.spec
        self.memory_plan: MemoryPlan | None = None          # set when measured (CUDA)
        if not c.uses_kv_cache:
            return None
        page = bytes_per_page(s.num_layers, c.page_size, s.num_kv_heads, s.head_dim, self.dtype)
        useful = c.max_num_seqs * math.ceil(self.max_model_len / c.page_size)
        if c.enable_prefix_caching:
            useful *= 2                 # room to keep released prompt pages cached
        if c.num_pages is not None:
            num = c.num_pages
        elif c.kv_cache_memory_gb is not None:
            num = num_pages_for_budget(int(c.kv_cache_memory_gb * GIB), page)
        elif self.device.type == "cuda":        # warm-up step measures the activation peak
            self.memory_plan = measure_and_plan(
                self.loaded.model, s, self.dtype, self.device, c.page_size,
                c.gpu_memory_utilization, c.max_num_seqs, c.max_num_batched_tokens,
                self.max_model_len, getattr(torch, c.sampler_dtype))
            num = min(self.memory_plan.num_pages, useful)
        else:
            num = min(num_pages_for_budget(int(c.cpu_kv_cache_gb * GIB), page), useful)
        if num < 1:
            raise ValueError(f"the KV budget leaves no page of {page} bytes: raise "
                             "kv_cache_memory_gb / gpu_memory_utilization or lower page_size")
        return KVPool(s.num_layers, num, c.page_size, s.num_kv_heads, s.head_dim, self.dtype,
                      self.device)


class StepMetrics:
    """Counters over the engine's life: steps, forwards, committed tokens, time."""

    def __init__(self):
        self.steps = self.forwards = self.tokens = self.batched_tokens = 0
        self.forward_ms = self.sample_ms = 0.0
        self.started = time.perf_counter()

    def record(self, sched: SchedulerOutput, result: RunnerOutput) -> None:
        if sched.is_empty:
            return
        self.steps += 1
        self.forwards += result.num_forwards
        self.batched_tokens += sched.num_batched_tokens
        self.tokens += sum(c.num_committed for c in result.committed.values())
        self.forward_ms += result.forward_ms
        self.sample_ms += result.sample_ms

    def as_dict(self) -> dict:
        steps = max(self.steps, 1)
        return {"engine_steps": self.steps, "model_forwards": self.forwards,
                "committed_tokens": self.tokens, "tokens_per_step": self.tokens / steps,
                "ms_per_step": (self.forward_ms + self.sample_ms) / steps,
                "forward_ms_per_step": self.forward_ms / steps,
                "sample_ms_per_step": self.sample_ms / steps,
                "uptime_s": time.perf_counter() - self.started}
