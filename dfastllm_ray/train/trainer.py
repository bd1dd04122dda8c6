"""Train a tiny LLaDA, Dream, AR or SDAR model on the task suite (one trainer, the family is data).

Each training row is `chat prompt + answer + EOT + <|endoftext|> ...` up to the batch's canvas
length, as in LLaDA-Instruct SFT: a diffusion model learns to fill the tail of a generation with
EOS, which lets the engine exit early. Diffusion families mask the row's generation positions
(answer, EOT, EOS padding) independently with probability t ~ U(eps, 1] per row; the loss is the
cross-entropy on masked positions weighted 1/t (LLaDA paper Eq. 5), self-normalised over the batch
(see `diffusion_loss`). The AR family scores the next-token guess of every answer token and the
EOT. The SDAR family masks each block of 4 with its own t and predicts it from the clean earlier
blocks, on rows cut after the block holding the EOT (block_loss.py). The prompt is never masked
and never scored.

Long runs are resumable: `state_dir/state.pt` is rewritten every `save_every_s` seconds (see
checkpoint.py), `state_dir/log.jsonl` gets the loss and, every `eval_every` steps, held-out
accuracy per task; `out` always holds the best model so far by held-out mean accuracy.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, tasks
from .block_loss import block_diffusion_loss
from .evaluate import evaluate
from .families import Family, build_model, family
from .tokenizer import save_tokenizer

EVAL_SEED = 1           # held-out draw used to pick the best checkpoint (reports use seed 0)


@dataclass
class TrainConfig:
    out: str                      # model folder to write (created): the best model so far
    family: str = "llada"         # llada | dream | ar | sdar (families.FAMILIES)
    seed: int = 0                 # model init, data stream and masking all derive from it
    steps: int = 4000             # optimizer steps (the cosine schedule's length)
    batch_size: int = 32          # rows per step, tasks drawn by tasks.WEIGHTS
    lr: float = 2e-3              # peak AdamW learning rate
    min_lr_ratio: float = 0.05    # cosine floor as a fraction of lr
    warmup: int = 100             # linear warmup steps
    weight_decay: float = 0.1     # on matrices only (not norms, not biases)
    grad_clip: float = 1.0        # global grad-norm clip
    d_model: int = 128            # hidden size
    n_layers: int = 4
    n_heads: int = 4              # head_dim = d_model / n_heads
    n_kv_heads: int = 2           # Qwen2 families only (GQA); LLaDA uses n_heads
    mlp_hidden: int = 384         # SwiGLU width
    rope_theta: float = 10000.0   # LLaDA-8B uses 5e5 for 4k contexts; short canvases need faster
                                  # rotations to tell neighbouring positions apart
    gen_min: int = 4              # generation positions per row: at least this many ...
    gen_max: int = 40             # ... at most this many beyond the batch's longest prompt
    eps: float = 1e-3             # smallest mask ratio t
    max_seq: int = 256            # context length written to config.json
    threads: int = 1              # torch CPU threads (fixed: the result depends on it)
    save_dtype: str = "float32"   # dtype of model.safetensors
    device: str = "cpu"
    init_from: str = ""           # a model folder of the same shape to start from ("": random init)
    state_dir: str = ""           # resume state + log ("": runs/<name of out>)
    resume: bool = False          # continue from state_dir/state.pt
    stop_at: int = 0              # stop (state saved) after this step, 0: run to `steps`
    save_every_s: float = 300.0   # wall seconds between resume-state writes
    eval_every: int = 0           # steps between held-out evaluations (0: none; out = final)
    eval_per_task: int = 40       # held-out examples per task in those evaluations
    log_every: int = 50           # steps between loss lines in log.jsonl
    weights: str = ""             # task shares, e.g. "add=3,sort=3,reverse=2,copy=1,greet=3"
                                  # ("": tasks.WEIGHTS)
    focus: float = 0.1            # after each evaluation, task weights become tasks.WEIGHTS x
                                  # (focus + held-out error): compute goes where answers are
                                  # still wrong (0: fixed weights)
    block_mask_share: float = 0.0  # share of diffusion rows masked as the block schedule leaves
                                   # them (see `block_masks`); 0: every row i.i.d. (LLaDA SFT)
    block_mask_length: int = 8    # the block those rows follow (the evaluation's block length)
    block_size: int = 4           # sdar: config.json block_size, the block-causal granule of
                                  # its loss and of its decoding


class Batcher:
    """Examples -> row groups, each (input_ids (B, T) int64, gen (B, T) bool generation positions,
    answer (B, T) bool answer + EOT positions).

    A step draws `gen_len` ~ U[gen_min, gen_max] generation positions beyond the longest prompt.
    Rows whose answer does not fit in that (the greeting) go to a second group whose canvas is its
    longest prompt + answer + 0..8 EOS: one 32-token reply in a batch would otherwise widen every
    row of it (the step cost is rows x width)."""

    def __init__(self, tokenizer, ids: dict[str, int], cfg: TrainConfig):
        self.tok, self.ids, self.cfg = tokenizer, ids, cfg
        self.rng = random.Random(f"lengths:{cfg.seed}")
        self.cache: dict[str, list[int]] = {}          # prompt text -> chat-template ids

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            out = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=True)
            self.cache[prompt] = list(out["input_ids"] if hasattr(out, "keys") else out)
        return self.cache[prompt]

    def __call__(self, examples: list[tasks.Example]) -> list[tuple[torch.Tensor, ...]]:
        pairs = [(self.prompt_ids(e.prompt),
                  self.tok.encode(e.answer, add_special_tokens=False) + [self.ids["eot"]])
                 for e in examples]
        gen_len = self.rng.randint(self.cfg.gen_min, self.cfg.gen_max)
        fits = [pa for pa in pairs if len(pa[1]) <= gen_len]
        long = [pa for pa in pairs if len(pa[1]) > gen_len]
        groups = []
        if fits:
            groups.append(self.rows(fits, max(len(p) for p, _ in fits) + gen_len))
        if long:
            groups.append(self.rows(long, max(len(p) + len(a) for p, a in long)
                                    + self.rng.randint(0, 8)))
        return groups

    def rows(self, pairs: list[tuple[list[int], list[int]]], width: int):
        rows = []
        gen = torch.zeros(len(pairs), width, dtype=torch.bool)
        ans = torch.zeros(len(pairs), width, dtype=torch.bool)
        for i, (p, a) in enumerate(pairs):
            rows.append(p + a + [self.ids["eos"]] * (width - len(p) - len(a)))
            gen[i, len(p):] = True
            ans[i, len(p):len(p) + len(a)] = True
        return torch.tensor(rows), gen, ans


def block_masks(iid: torch.Tensor, gen: torch.Tensor, block: int, share: float,
                g: torch.Generator) -> torch.Tensor:
    """Masks as semi-autoregressive block decoding leaves a canvas: iid (B, T) i.i.d. masks,
    gen (B, T) generation positions -> (B, T). A `share` of the rows picks a block k of its
    generation uniformly: blocks before k are clean, block k keeps the i.i.d. mask, blocks after
    k are fully masked. With only i.i.d. rows a clean prefix followed by a fully masked tail is
    all but unseen in training, yet it is every state the block schedule decodes from: the tiny
    LLaDA misplaced the greeting's characters at block boundaries (measured: 43% held-out greet)."""
    b = gen.shape[0]
    idx = torch.where(gen, gen.long().cumsum(1) - 1, -1)                  # (B, T) index in gen
    blk = torch.where(gen, idx // block, -1)                              # (B, T) block id
    n_blocks = (gen.sum(1) + block - 1) // block                          # (B,)
    k = (torch.rand(b, generator=g) * n_blocks).long()[:, None]           # (B, 1) current block
    structured = (torch.rand(b, generator=g) < share)[:, None]            # (B, 1)
    return torch.where(structured, gen & ((blk > k) | ((blk == k) & iid)), iid & gen)


def diffusion_loss(model: torch.nn.Module, x: torch.Tensor, gen: torch.Tensor, mask_id: int,
                   eps: float, g: torch.Generator, shift: bool = False,
                   block: int = 8, block_share: float = 0.0):
    """LLaDA SFT loss. x (B, T) clean rows, gen (B, T) generation positions -> (sum of weighted
    CE, sum of weights): the loss is their ratio, summed over row groups first.
    shift: the model's logits[:, p-1] score token p (Dream). block_share: see `block_masks`."""
    b = x.shape[0]
    # stratified t: one draw per stratum [i/B, (i+1)/B) (MDLM's low-discrepancy sampler), so every
    # batch covers the noise levels evenly; each row's t is still marginally U(eps, 1]
    u = (torch.arange(b) + torch.rand(b, generator=g))[torch.randperm(b, generator=g)] / b
    t = ((1 - eps) * u + eps)[:, None]                                    # (B, 1) mask ratio
    masked = (torch.rand(x.shape, generator=g) < t) & gen                 # (B, T)
    if block_share > 0:                   # 0 keeps the i.i.d. recipe's random stream unchanged
        masked = block_masks(masked, gen, block, block_share, g)
    logits = model(torch.where(masked, mask_id, x))                       # (B, T, V)
    if shift:                                     # Dream: position p read from hidden p-1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")     # (n_masked,)
    weight = (1.0 / t).expand_as(x)[masked]                               # (n_masked,) 1/t
    # Self-normalised: sum(ce / t) / sum(1 / t). LLaDA's per-row form sum(ce / t) / len lets a
    # few rows with t near eps dominate every (clipped) step; on this suite it stalled near
    # chance while the self-normalised weights learned copy in ~250 steps (same seed and model).
    return (ce * weight).sum(), weight.sum()


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, answer: torch.Tensor):
    """AR SFT loss: CE of the guesses for answer + EOT tokens (logits[:, p-1] -> token p), as
    (sum, count) like `diffusion_loss`."""
    logits = model(x)[:, :-1]                                             # (B, T-1, V)
    target = answer[:, 1:]
    ce = F.cross_entropy(logits[target], x[:, 1:][target], reduction="sum")
    return ce, target.sum().to(ce.dtype)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def parse_weights(text: str) -> dict[str, float]:
    """ "add=3,sort=1" -> {"add": 3.0, "sort": 1.0, other tasks: 0}; "" -> tasks.WEIGHTS."""
    if not text:
        return dict(tasks.WEIGHTS)
    out = dict.fromkeys(tasks.TASKS, 0.0)
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in out or not value:
            raise ValueError(f"weights={text!r}: {item!r} is not task=number with a task in "
                             f"{list(tasks.TASKS)}")
        out[name] = float(value)
    return out


def state_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.state_dir) if cfg.state_dir else Path("runs") / Path(cfg.out).name


def prepare(cfg: TrainConfig):
    """Seed everything; write the tokenizer; return (tokenizer, ids, config dict, model)."""
    from transformers import AutoTokenizer
    fam = family(cfg.family)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(cfg.out)
    ids = save_tokenizer(out, cfg.max_seq, fam.tokenizer_flavor)
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    config = fam.config(cfg, ids)
    model = build_model(fam, config, ids, cfg.seed)
    if cfg.init_from:                 # continue training: same shapes, weights from the folder
        init_weights(model, Path(cfg.init_from) / "model.safetensors")
    return tokenizer, ids, config, model


def init_weights(model: torch.nn.Module, path: Path) -> None:
    """Start from a checkpoint of the same architecture. A smaller vocabulary is grown: tokens
    are only ever appended to the character vocabulary (tokenizer.SPECIALS), so rows 0..V_old-1
    of the embedding and output matrices keep their meaning and new rows keep their fresh init."""
    from safetensors.torch import load_file
    old, own = load_file(str(path)), model.state_dict()
    if set(old) != set(own):
        raise ValueError(f"init_from={path.parent}: parameter names differ from this "
                         f"{type(model).__name__} ({sorted(set(old) ^ set(own))[:4]} ...)")
    for name, w in old.items():
        ok = w.shape == own[name].shape or (w.shape[1:] == own[name].shape[1:]
                                            and w.shape[0] < own[name].shape[0])
        if not ok:
            raise ValueError(f"init_from={path.parent}: {name} has shape {tuple(w.shape)}, this "
                             f"model {tuple(own[name].shape)}; pass the same --d-model/--n-layers/"
                             "--n-heads/--mlp-hidden")
        own[name][: w.shape[0]] = w
    model.load_state_dict(own)


class Run:
    """One training run's mutable state: model, optimizer, schedule, random streams, counters."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.fam = cfg, family(cfg.family)
        self.tokenizer, self.ids, self.config, self.model = prepare(cfg)
        self.model.to(cfg.device).train()
        self.opt = make_optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.batcher = Batcher(self.tokenizer, self.ids, cfg)
        self.base_weights = parse_weights(cfg.weights)
        self.data = tasks.stream("train", cfg.seed, weights=self.base_weights)
        self.g = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.ema, self.best, self.seconds = 0, None, -1.0, 0.0
        self.dir = state_dir(cfg)

    def train_step(self) -> float:
        cfg = self.cfg
        num = den = 0.0
        for x, gen, ans in self.batcher([next(self.data) for _ in range(cfg.batch_size)]):
            n, d = self.loss(x.to(cfg.device), gen.to(cfg.device), ans.to(cfg.device))
            num, den = num + n, den + d
        loss = num / den.clamp_min(1e-12)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        v = loss.item()
        self.ema = v if self.ema is None else 0.98 * self.ema + 0.02 * v
        return v

    def loss(self, x: torch.Tensor, gen: torch.Tensor, ans: torch.Tensor):
        """One row group's (sum, weight) by the family's objective."""
        cfg, mask = self.cfg, self.ids["mask"]
        if self.fam.objective == "diffusion":
            return diffusion_loss(self.model, x, gen, mask, cfg.eps, self.g, self.fam.logits_shift,
                                  cfg.block_mask_length, cfg.block_mask_share)
        if self.fam.objective == "block_diffusion":
            return block_diffusion_loss(self.model, x, gen, ans, mask, cfg.block_size, cfg.eps,
                                        self.g)
        return next_token_loss(self.model, x, ans)

    def state(self) -> dict:
        return {"config": asdict(self.cfg), "step": self.step, "ema": self.ema,
                "best": self.best, "seconds": self.seconds,
                "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "data": self.data.state(),
                "weights": self.data.weights,
                "lengths": self.batcher.rng.getstate(), "mask_rng": self.g.get_state(),
                "torch_rng": torch.get_rng_state()}

    def restore(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.data.restore(s["data"])
        self.data.weights = s["weights"]
        self.batcher.rng.setstate(tasks._as_tuples(s["lengths"]))
        self.g.set_state(s["mask_rng"])
        torch.set_rng_state(s["torch_rng"])
        self.step, self.ema, self.best, self.seconds = s["step"], s["ema"], s["best"], s["seconds"]

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy per task with the reference schedule at configs/tiny.yaml's
        defaults: 32 positions in blocks of 8, one token per step; SDAR: its reference loop in
        blocks of its block_size, greedy (top_k=1), `low_confidence_dynamic`."""
        spec = self.model.spec
        self.model.eval()
        sdar = self.fam.objective == "block_diffusion"
        acc = evaluate(self.model, self.tokenizer,
                       tasks.heldout_set(self.cfg.eval_per_task, EVAL_SEED), 32,
                       spec.block_size if sdar else 8, spec.mask_token_id,
                       set(spec.stop_token_ids), logits_shift=self.fam.logits_shift,
                       causal=self.fam.objective == "next_token",
                       block_strategy="low_confidence_dynamic" if sdar else None)
        self.model.train()
        return acc

    def log(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint_if_best(self) -> None:
        acc = self.evaluate()
        if self.cfg.focus:
            self.data.weights = [self.base_weights[n] * (self.cfg.focus + 1 - acc[n])
                                 for n in self.data.names]
        self.log({"step": self.step, "seconds": round(self.seconds, 1), "heldout": acc,
                  "weights": [round(w, 3) for w in self.data.weights]})
        if acc["mean"] > self.best:
            self.best = acc["mean"]
            sha = checkpoint.save_folder(self.model, self.config, self.ids, self.cfg)
            checkpoint.write_json(Path(self.cfg.out) / "heldout.json",
                                  {"step": self.step, "eval_seed": EVAL_SEED,
                                   "per_task": self.cfg.eval_per_task, "accuracy": acc,
                                   "sha256": sha})


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training loop; write the model folder; returns a summary dict."""
    run = Run(cfg)
    state_path = run.dir / "state.pt"
    if cfg.resume:
        run.restore(checkpoint.load_state(state_path, cfg))
    last = cfg.stop_at or cfg.steps
    saved_at = time.time()
    bar = tqdm(range(run.step, last), desc=f"train {cfg.family}", unit="step")
    for _ in bar:
        t0 = time.time()
        loss = run.train_step()
        run.seconds += time.time() - t0
        if run.step % cfg.log_every == 0:
            run.log({"step": run.step, "loss": round(loss, 5), "loss_ema": round(run.ema, 5),
                     "lr": run.sched.get_last_lr()[0], "seconds": round(run.seconds, 1)})
            bar.set_postfix(loss=f"{run.ema:.4f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
        if cfg.eval_every and run.step % cfg.eval_every == 0:
            run.checkpoint_if_best()
        if time.time() - saved_at > cfg.save_every_s:
            checkpoint.save_state(state_path, run.state())
            saved_at = time.time()
    checkpoint.save_state(state_path, run.state())
    final_sha = checkpoint.weights_sha256(run.model, cfg.save_dtype)
    if not cfg.eval_every:               # no held-out selection: the final model is the output
        checkpoint.save_folder(run.model.eval(), run.config, run.ids, cfg)
    elif run.step % cfg.eval_every:
        run.checkpoint_if_best()
    return {"step": run.step, "train_seconds": round(run.seconds, 1),
            "final_loss_ema": round(run.ema, 5), "sha256": final_sha,
            "best_heldout_mean": run.best if cfg.eval_every else None}
