"""`SamplingParams`: one request's decoding knobs, validated at construction.

Names follow the papers and the official code (`gen_length` is `max_tokens` here, as in OpenAI's
API; `steps`, `block_length`, `temperature`, `remasking`, `cfg_scale`, `threshold`, `factor`,
`alg`, `alg_temp`). Fields left as None take the model's defaults in `resolve()`.
Every invalid value raises `ValueError` naming the field, the value and the rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
DEFAULT_MAX_TOKENS = 64
DEFAULT_BLOCK_LENGTH = 32


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
    early_exit: bool = True                # stop once a committed block holds EOS/EOT (or a stop string)

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
        _check(self.cfg_scale >= 0, "cfg_scale", self.cfg_scale, "must be >= 0")
        _check(self.threshold is None or 0 < self.threshold <= 1, "threshold", self.threshold,
               "must be in (0, 1]")
        _check(self.factor is None or self.factor > 0, "factor", self.factor, "must be > 0")
        _check(self.entropy_bound is None or self.entropy_bound > 0, "entropy_bound",
               self.entropy_bound, "must be > 0")
        _check(self.alg is None or self.alg in DREAM_ALGS, "alg", self.alg, f"must be one of {DREAM_ALGS}")
        _check(self.alg_temp is None or self.alg_temp >= 0, "alg_temp", self.alg_temp, "must be >= 0")
        _check(0 < self.eps < 1, "eps", self.eps, "must be in (0, 1)")
        if self.max_tokens and self.block_length and self.block_length <= self.max_tokens:
            _check(self.max_tokens % self.block_length == 0, "block_length", self.block_length,
                   f"must divide max_tokens={self.max_tokens}")
        if self.max_tokens and self.block_length and self.steps and self.block_length <= self.max_tokens:
            nb = self.max_tokens // self.block_length
            _check(self.steps % nb == 0, "steps", self.steps,
                   f"must be a multiple of the number of blocks ({nb} = max_tokens {self.max_tokens}"
                   f" / block_length {self.block_length})")

    def resolve(self, max_context: int | None = None, prompt_len: int = 0) -> "SamplingParams":
        """Fill None fields with defaults: block_length = min(32, max_tokens), steps = max_tokens
        (one token per step, the reference schedule). Checks the context length when given."""
        gen = self.max_tokens or DEFAULT_MAX_TOKENS
        block = self.block_length or min(DEFAULT_BLOCK_LENGTH, gen)
        if gen % block:
            block = gen if self.block_length is None else block
        out = replace(self, max_tokens=gen, block_length=min(block, gen), steps=self.steps or gen)
        if max_context is not None:
            _check(prompt_len + gen <= max_context, "max_tokens", gen,
                   f"prompt ({prompt_len} tokens) + max_tokens must fit the model context of {max_context} tokens")
        return out

    @property
    def policy(self) -> str:
        """The decoding policy name this request uses (a key of `sampling.POLICIES`).

        Dream requests (`alg` set) use Dream's rules, named by `sampling.dream.dream_policy`."""
        if self.alg is not None:
            from .dream import dream_policy      # dream.py imports this module: no cycle at call time
            return dream_policy(self)
        if self.factor is not None:
            return "factor"
        if self.threshold is not None:
            return "threshold"
        if self.entropy_bound is not None:
            return "entropy_bound"
        return "fixed"
