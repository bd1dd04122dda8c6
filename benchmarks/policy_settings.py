"""Every decoding policy and setting the quality benchmarks sweep, by name (shared by
policy_frontier.py and quality.py, so their rows are the same settings)."""
from __future__ import annotations


def settings(gen: int) -> dict[str, dict]:
    """name -> SamplingParams knobs (steps = forwards of the fixed schedule)."""
    out: dict[str, dict] = {"reference": {"steps": gen}}
    for k in (2, 4, 8):
        out[f"fixed {k}/step"] = {"steps": max(gen // k, 1)}
    for t in (0.9, 0.7, 0.5, 0.3):
        out[f"threshold={t}"] = {"threshold": t}
    for k in (1, 2, 4, 8):
        out[f"pc_sampler l=0.25 {k}/step"] = {"pc_lambda": 0.25, "steps": max(gen // k, 1)}
    for k in (2, 4, 8):
        out[f"dus {k}/step"] = {"dilated": True, "steps": max(gen // k, 1)}
    for hi, lo in ((0.9, 0.6), (0.8, 0.5), (0.7, 0.4)):
        out[f"sched_exit {hi}->{lo}"] = {"exit_high": hi, "exit_low": lo, "steps": gen}
    for k in (2, 4):
        out[f"sched_exit 0.9->0.6 {k}/step"] = {"exit_high": 0.9, "exit_low": 0.6,
                                                "steps": max(gen // k, 1)}
    for conf, kl in ((0.6, 0.015), (0.6, 0.05), (0.4, 0.05)):
        out[f"klass c={conf} kl={kl}"] = {"threshold": conf, "kl_threshold": kl}
    out["klass c=0.6 kl=0.015 4/step"] = {"threshold": 0.6, "kl_threshold": 0.015,
                                          "steps": max(gen // 4, 1)}     # fallback quota 4
    for t in (0.9, 0.7, 0.5):
        out[f"credit a=0.7 threshold={t}"] = {"credit_alpha": 0.7, "threshold": t}
    for wide, back in ((0.6, 0.9), (0.5, 0.8), (0.3, 0.7)):
        out[f"wino {wide}/{back}"] = {"threshold": wide, "revoke_threshold": back}
    return out
