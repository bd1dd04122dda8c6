"""`SamplingParams`: one request's decoding knobs, validated at construction.

Names follow the papers and the official code (`gen_length` is `max_tokens` here, as in OpenAI's
API; `steps`, `block_length`, `temperature`, `remasking`, `cfg_scale`, `threshold`, `factor`,
`alg`, `alg_temp`). Fields left as None take the model's defaults in `resolve()`.
Every invalid value raises `ValueError` naming the field, the value and the rule.

A `max_tokens` that is not a multiple of `block_length` decodes on a canvas rounded up to whole
blocks (`resolve()`); `output_limit` keeps the requested count and the edges (the offline `LLM`,
the Serve replica) cut the output there with `output_limit.cut_output`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

REMASKING = ("low_confidence", "random")
# SDAR's `remasking_strategy` (block diffusion) -> the engine's batched policy of each
BLOCK_STRATEGIES = {"sequential": "sdar_sequential", "low_confidence_static": "sdar_static",
                    "low_confidence_dynamic": "sdar_dynamic"}
SDAR_THRESHOLD = 0.85         # SDAR's confidence_threshold default (low_confidence_dynamic)
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
DEFAULT_MAX_TOKENS = 64
DEFAULT_BLOCK_LENGTH = 32
SEED_BOUND = 2**64            # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_STOP = 16                 # stop strings per request (OpenAI allows 4; lm-eval tasks send more)
MAX_STOP_CHARS = 256          # characters per stop string (each is searched in every block's text)

# Knobs one model family reads and the other does not, with the value that means "not set".
# A request setting one of them to anything else on the other family is refused (never ignored).
DREAM_ONLY = {"alg": None, "alg_temp": None, "top_p": None, "top_k": None, "eps": 1e-3}
SDAR_ONLY = {"remasking_strategy": None}
LLADA_ONLY = {"remasking": "low_confidence", "cfg_scale": 0.0, "factor": None,
              "entropy_bound": None, "logits_eos_inf": False, "confidence_eos_eot_inf": False,
              "pc_lambda": None, "exit_high": None, "exit_low": None, "kl_threshold": None,
              "kl_history": None, "revoke_threshold": None, "credit_alpha": None, "dilated": None}

# Policy knobs (docs/policies.md): each selects its policy; the papers' defaults fill the rest.
POLICY_KNOBS = ("factor", "entropy_bound", "pc_lambda", "exit_high", "kl_threshold",
                "revoke_threshold", "credit_alpha", "dilated")
SCHED_EXIT_LOW = 0.6          # SchED: tau at the end of the block when only exit_high is set
KLASS_CONF = 0.6              # KLASS / WINO confidence threshold when `threshold` is unset
KLASS_HISTORY = 2             # KLASS: consecutive small-KL steps (the official LLaDA scripts)
WINO_THRESHOLD = 0.6          # WINO wide-in threshold (official `decoding_wino` default)
NEUTRAL = {"top_p": (1.0,)}
DECODINGS = ("diffusion", "apd", "speculative")
SPEEDS = ("exact", "balanced", "fast")
KV_MODES = ("none", "prefix", "dual")
REFRESH_TRIGGERS = ("content",)   # refresh_on: what commit makes the next step a refresh
MAX_REFRESH_EVERY = 4096    # a refresh every N block steps; past any block length it never fires
HYBRID_KNOBS = {"apd_mixture_weight": "apd", "kv_window": "apd", "max_lookahead": "apd",
                "draft_tokens": "speculative"}
APD_MIXTURE_WEIGHT = 0.7      # the APD paper's R for Dream-7B + Qwen2.5-0.5B
DRAFT_TOKENS = 4              # speculative default k
MAX_DRAFT_TOKENS = 64
MAX_HYBRID_WINDOW = 4096   # values OpenAI clients send by default that change nothing


# Per family, the other families' knobs it does not read (LLaDA: any arch without its own entry)
FOREIGN = {"llada": {**DREAM_ONLY, **SDAR_ONLY}, "dream": {**LLADA_ONLY, **SDAR_ONLY},
           "sdar": {**LLADA_ONLY, "alg": None, "alg_temp": None, "eps": 1e-3}}


def unused_knobs(fields: dict[str, Any], arch: str) -> list[str]:
    """The knobs in `fields` (a request's own settings) that the model family `arch` does not
    read: Dream's knobs on LLaDA-family models (LLaDA samples Gumbel-max at `temperature`,
    with no nucleus/top-k filter or time schedule), LLaDA's on Dream, and on SDAR (block
    diffusion: temperature, top_k, top_p, threshold, remasking_strategy) the others' rules."""
    foreign = FOREIGN.get(arch, FOREIGN["llada"])
    return [k for k, unset in foreign.items()
            if k in fields and fields[k] != unset and fields[k] not in NEUTRAL.get(k, ())]


def dus_groups(p: SamplingParams) -> float:
    """DUS's group count: the request's steps per block (NaN when DUS is off)."""
    if not p.dilated or not p.steps or not p.max_tokens or not p.block_length:
        return float("nan")
    return float(max(p.steps // (p.max_tokens // p.block_length), 1))


def canvas_length(max_tokens: int, block_length: int) -> int:
    """Generated positions on the canvas: max_tokens rounded up to whole blocks."""
    return math.ceil(max_tokens / block_length) * block_length


def _check(cond: bool, name: str, value, rule: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {rule}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None          # gen_length: positions appended to the prompt
    steps: int | None = None               # model forwards for the whole generation (fixed schedules)
    block_length: int | None = None        # semi-autoregressive block size (LLaDA); must divide max_tokens
    temperature: float = 0.0               # 0 = greedy
    top_p: float | None = None             # Dream nucleus filtering
    top_k: int | None = None               # Dream top-k filtering
    remasking: str = "low_confidence"      # LLaDA: which positions to commit, "low_confidence" | "random"
    remasking_strategy: str | None = None  # SDAR: "sequential" | "low_confidence_static" | "low_confidence_dynamic"
    cfg_scale: float = 0.0                 # LLaDA unsupervised classifier-free guidance
    threshold: float | None = None         # Fast-dLLM: commit every position with confidence >= threshold
    factor: float | None = None            # Fast-dLLM: factor rule (threshold ignored when set)
    entropy_bound: float | None = None     # EB-sampler: commit lowest-entropy positions up to this summed entropy (nats)
    alg: str | None = None                 # Dream: "origin" | "maskgit_plus" | "topk_margin" | "entropy"
    alg_temp: float | None = None          # Dream: sample the positions with softmax(conf / alg_temp)
    eps: float = 1e-3                      # Dream: final time of the linear schedule t = linspace(1, eps, steps+1)
    seed: int | None = None                # per-request generator seed (None: nondeterministic unless temperature=0)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings: text is cut before the first one
    logits_eos_inf: bool = False           # LLaDA: never predict EOS
    confidence_eos_eot_inf: bool = False   # LLaDA: never commit EOS/EOT early by confidence
    pc_lambda: float | None = None         # PC-Sampler: position decay exp(-pc_lambda * offset in block)
    exit_high: float | None = None         # SchED: block exit threshold at progress 0 (mean confidence)
    exit_low: float | None = None          # SchED: ... at progress 1 (default SCHED_EXIT_LOW)
    kl_threshold: float | None = None      # KLASS: commit conf > threshold with KL(step||step-1) < this
    kl_history: int | None = None          # KLASS: consecutive steps the KL must stay small (default 2)
    revoke_threshold: float | None = None  # WINO: re-mask committed tokens whose re-check prob < this
    credit_alpha: float | None = None      # dInfer credit fusion weight (threshold rule on fused logits)
    dilated: bool | None = None            # DUS: each step commits one dilated group (offset mod steps per block)
    early_exit: bool = True                # stop once a committed block holds EOS/EOT (or a stop string)
    speed: str | None = None               # "exact" | "balanced" | "fast": a measured policy + cache mode (sampling/speed.py)
    kv_cache_mode: str | None = None       # this request's cache: "none" | "prefix" | "dual" (None: the engine's)
    refresh_every: int | None = None       # with a KV cache: also refresh a block's K/V every N of its steps (None: the engine's)
    refresh_on: str | None = None          # with a KV cache: "content" also refreshes after a step that committed a non-EOS token
    refresh_budget: int | None = None      # refresh_on "content": such refreshes per request at most (None: the engine's)
    decoding: str = "diffusion"            # "diffusion" | "apd" | "speculative" (hybrid: needs a verifier)
    apd_mixture_weight: float | None = None  # APD R: target = R * dLLM + (1 - R) * verifier logits
    kv_window: int | None = None           # APD W: recompute the last W committed positions (drafter cache)
    max_lookahead: int | None = None       # APD M: draft at most M positions per step
    draft_tokens: int | None = None        # speculative: positions drafted per step (adaptive up to this)
    output_limit: int | None = None        # tokens returned at most (None: max_tokens); set by
                                           # resolve() when max_tokens is rounded up to whole blocks

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        self.validate()

    def validate(self) -> None:
        for name in ("max_tokens", "steps", "block_length"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v >= 1), name, v, "must be an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
               "top_k", self.top_k, "must be an integer >= 1")
        _check(self.remasking in REMASKING, "remasking", self.remasking, f"must be one of {REMASKING}")
        _check(self.remasking_strategy is None or self.remasking_strategy in BLOCK_STRATEGIES,
               "remasking_strategy", self.remasking_strategy,
               f"must be one of {tuple(BLOCK_STRATEGIES)} (SDAR block diffusion; "
               "'entropy_bounded' has no working official behaviour)")
        _check(self.cfg_scale >= 0, "cfg_scale", self.cfg_scale, "must be >= 0")
        _check(self.threshold is None or 0 < self.threshold <= 1, "threshold", self.threshold,
               "must be in (0, 1]")
        _check(self.factor is None or self.factor > 0, "factor", self.factor, "must be > 0")
        _check(self.entropy_bound is None or self.entropy_bound > 0, "entropy_bound",
               self.entropy_bound, "must be > 0")
        self._validate_policy_knobs()
        self._validate_hybrid()
        _check(self.alg is None or self.alg in DREAM_ALGS, "alg", self.alg, f"must be one of {DREAM_ALGS}")
        _check(self.alg_temp is None or self.alg_temp >= 0, "alg_temp", self.alg_temp, "must be >= 0")
        _check(0 < self.eps < 1, "eps", self.eps, "must be in (0, 1)")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < SEED_BOUND),
               "seed", self.seed, f"must be an integer in [0, 2**64 - 1] ({SEED_BOUND - 1})")
        self._validate_stop()
        if self.output_limit is not None:
            _check(isinstance(self.output_limit, int) and 1 <= self.output_limit
                   <= (self.max_tokens or self.output_limit), "output_limit", self.output_limit,
                   f"must be in [1, max_tokens={self.max_tokens}]")
        if self.max_tokens and self.block_length and self.steps and not self.block_diffusion:
            nb = math.ceil(self.max_tokens / self.block_length)
            _check(self.steps % nb == 0, "steps", self.steps,
                   f"must be a multiple of the number of blocks ({nb} = max_tokens "
                   f"{self.max_tokens} / block_length {self.block_length}, rounded up)")

    def _validate_policy_knobs(self) -> None:
        set_ = [k for k in POLICY_KNOBS if getattr(self, k) is not None]
        if len(set_) > 1 and set_[-1] not in ("factor", "entropy_bound"):   # (factor wins over
            # entropy_bound, as before: only the newer policy knobs are exclusive)
            _check(False, set_[-1], getattr(self, set_[-1]), f"selects a decoding policy, and so "
                   f"does {set_[0]}: set only one of {POLICY_KNOBS}")
        _check(self.pc_lambda is None or self.pc_lambda >= 0, "pc_lambda", self.pc_lambda,
               "must be >= 0")
        _check(self.dilated in (None, True), "dilated", self.dilated,
               "must be true (DUS) or left out (null)")
        for name in ("exit_high", "exit_low", "revoke_threshold"):
            v = getattr(self, name)
            _check(v is None or 0 < v <= 1, name, v, "must be in (0, 1]")
        _check(self.exit_low is None or self.exit_high is not None, "exit_low", self.exit_low,
               "needs exit_high (SchED's threshold at progress 0)")
        if self.exit_high is not None:
            _check(self.exit_low_or_default <= self.exit_high, "exit_low",
                   self.exit_low_or_default, f"must be <= exit_high={self.exit_high}")
        _check(self.credit_alpha is None or self.credit_alpha > 0, "credit_alpha",
               self.credit_alpha, "must be > 0")
        _check(self.kl_threshold is None or self.kl_threshold > 0, "kl_threshold",
               self.kl_threshold, "must be > 0")
        _check(self.kl_history is None or (isinstance(self.kl_history, int) and
                                           1 <= self.kl_history <= 8),
               "kl_history", self.kl_history, "must be an integer in [1, 8]")
        _check(self.kl_history is None or self.kl_threshold is not None, "kl_history",
               self.kl_history, "needs kl_threshold (KLASS)")

    @property
    def exit_low_or_default(self) -> float:
        return SCHED_EXIT_LOW if self.exit_low is None else min(self.exit_low, 1.0)

    def _validate_stop(self) -> None:
        _check(len(self.stop) <= MAX_STOP, "stop", list(self.stop),
               f"at most {MAX_STOP} stop strings")
        for s in self.stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS, "stop", s,
                   f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} "
                   "characters")

    def _validate_hybrid(self) -> None:
        """Hybrid diffusion-AR knobs: only with their decoding, each in its range."""
        _check(self.decoding in DECODINGS, "decoding", self.decoding, f"must be one of {DECODINGS}")
        _check(self.speed is None or self.speed in SPEEDS, "speed", self.speed,
               f"must be one of {SPEEDS}")
        _check(self.kv_cache_mode is None or self.kv_cache_mode in KV_MODES, "kv_cache_mode",
               self.kv_cache_mode, f"must be one of {KV_MODES}")
        _check(self.refresh_every is None or (isinstance(self.refresh_every, int)
                                              and 1 <= self.refresh_every <= MAX_REFRESH_EVERY),
               "refresh_every", self.refresh_every,
               f"must be an integer in [1, {MAX_REFRESH_EVERY}] (steps between K/V refreshes)")
        _check(self.refresh_on is None or self.refresh_on in REFRESH_TRIGGERS, "refresh_on",
               self.refresh_on, f"must be one of {REFRESH_TRIGGERS} or null")
        _check(self.refresh_budget is None or (isinstance(self.refresh_budget, int)
                                               and 0 <= self.refresh_budget <= MAX_REFRESH_EVERY),
               "refresh_budget", self.refresh_budget,
               f"must be an integer in [0, {MAX_REFRESH_EVERY}] (content refreshes per request)")
        for name, mode in HYBRID_KNOBS.items():
            v = getattr(self, name)
            if v is not None:
                _check(self.decoding == mode, name, v, f'applies to decoding="{mode}" only '
                       f'(this request has decoding="{self.decoding}")')
        r = self.apd_mixture_weight
        _check(r is None or 0.0 <= r <= 1.0, "apd_mixture_weight", r, "must be in [0, 1]")
        for name, top in (("kv_window", MAX_HYBRID_WINDOW), ("max_lookahead", MAX_HYBRID_WINDOW),
                          ("draft_tokens", MAX_DRAFT_TOKENS)):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and 1 <= v <= top), name, v,
                   f"must be an integer in [1, {top}]")

    @property
    def block_diffusion(self) -> bool:
        """SDAR's block diffusion: blocks aligned to the canvas start, block-causal attention."""
        return self.remasking_strategy is not None

    @property
    def is_hybrid(self) -> bool:
        return self.decoding != "diffusion"

    def resolve(self, max_context: int | None = None, prompt_len: int = 0) -> "SamplingParams":
        """Fill None fields with defaults: block_length = min(32, max_tokens) (max_tokens when 32
        does not divide it), steps = the canvas
        (one position per step, the reference schedule). A max_tokens that is not a multiple of
        the block length is rounded up to whole blocks and `output_limit` keeps the request's
        count. With `max_context`, the canvas must fit beside the prompt and steps must not
        exceed the context (no schedule is longer than one forward per position)."""
        gen = self.max_tokens or DEFAULT_MAX_TOKENS
        block = min(self.block_length or DEFAULT_BLOCK_LENGTH, gen)
        if self.block_length is None and gen % block:
            block = gen                      # no block asked for: one block (the reference's)
        canvas = canvas_length(gen, block)
        if max_context is not None and prompt_len + canvas > max_context >= prompt_len + gen:
            # The rounded canvas does not fit but the request does: the largest block <= the
            # asked one that divides max_tokens (a block of 1 always does).
            block = max(b for b in range(1, block + 1) if gen % b == 0)
            canvas = gen
        limit = self.output_limit or gen
        if max_context is not None:
            _check(prompt_len + gen <= max_context, "max_tokens", gen,
                   f"prompt ({prompt_len} tokens) + max_tokens must fit the model context of "
                   f"{max_context} tokens: at most {max(max_context - prompt_len, 0)}")
            _check(self.steps is None or self.steps <= max_context, "steps", self.steps,
                   f"must be at most the model context of {max_context}")
        return replace(self, max_tokens=canvas, block_length=block, steps=self.steps or canvas,
                       output_limit=limit if limit < canvas else None)

    @cached_property              # read several times per request per engine step; fields are frozen
    def policy(self) -> str:
        """The decoding policy name this request uses (a key of `sampling.POLICIES`).

        Dream requests (`alg` set) use Dream's rules, named by `sampling.dream.dream_policy`."""
        if self.remasking_strategy is not None:
            return BLOCK_STRATEGIES[self.remasking_strategy]
        if self.alg is not None:
            from .dream import dream_policy      # dream.py imports this module: no cycle at call time
            return dream_policy(self)
        if self.revoke_threshold is not None:
            return "wino"
        if self.kl_threshold is not None:
            return "klass"
        if self.credit_alpha is not None:
            return "credit"
        if self.factor is not None:
            return "factor"
        if self.threshold is not None:
            return "threshold"
        if self.entropy_bound is not None:
            return "entropy_bound"
        if self.pc_lambda is not None:
            return "pc_sampler"
        if self.exit_high is not None:
            return "sched_exit"
        if self.dilated:
            return "dus"
        return "fixed"
