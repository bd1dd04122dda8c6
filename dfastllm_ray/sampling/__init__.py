"""Diffusion decoding as small pure functions over tensors (docs/DESIGN.md, "The step-level
decoding contract"), plus the two reference loops that reproduce the official samplers."""
from .candidates import Candidates
from .dream_generate import dream_generate
from .llada_generate import llada_generate
from .noise import add_gumbel_noise
from .params import SamplingParams
from .policies import POLICIES, Policy
from .propose import propose
from .schedule import get_num_transfer_tokens, transfer_counts

__all__ = ["Candidates", "POLICIES", "Policy", "SamplingParams", "add_gumbel_noise", "dream_generate",
           "get_num_transfer_tokens", "llada_generate", "propose", "transfer_counts"]
