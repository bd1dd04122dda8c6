"""Counter-based random numbers: a uniform per (request seed, step, position, stream), batched.

The engine's batched sampler must give each request its own reproducible draws whatever it is
batched with, in one tensor op chain for the whole batch (no `torch.Generator` per request, no
loop). A counter-based generator does that: the draw is a pure function of its coordinates,
like JAX's threefry keys or Philox in cuRAND. Here the function is the splitmix64 finaliser
(Steele et al., "Fast splittable pseudorandom number generators", 2014) over a wrapping int64
combination of the coordinates; torch's int64 multiply wraps modulo 2**64 on CPU and CUDA.

Streams keep the draws of one step independent: the token draw, the `random` remasking
confidence, Dream `origin`'s coin flips and `alg_temp`'s position draw never share a number.
"""
from __future__ import annotations

import torch
from torch import Tensor

TOKEN, CONFIDENCE, COIN, POSITION = 0, 1, 2, 3      # streams

_GOLDEN = -7046029254386353131          # 0x9E3779B97F4A7C15 as a signed int64
_M1 = -4658895280553007687              # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685              # 0x94D049BB133111EB
_STEP = 0x632BE59BD9B4E019
_POS = 0x2545F4914F6CDD1D
_STREAM = 0x1B873593


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic on signed ints)."""
    return torch.bitwise_right_shift(x, n) & ((1 << (64 - n)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser: int64 -> int64, a bijection with full avalanche."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def row_key(seed: Tensor, step: Tensor) -> Tensor:
    """seed (B,), step (B,) int64 -> (B, 1) int64: the part of the counter fixed per row and step."""
    return (seed * _GOLDEN + step * _STEP)[:, None]


def position_keys(key: Tensor, position: Tensor) -> Tensor:
    """(B, 1) row keys, (B, n) positions -> (B, n) int64 keys, one per draw site."""
    return key + position * _POS


def uniform(keys: Tensor, stream: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(B, n) keys from `position_keys` -> U(0, 1) of the same shape, from stream `stream`.

    Open at both ends ((k + 0.5) / 2**53), so `log(u)` is always finite."""
    bits = torch.bitwise_right_shift(mix64(keys + stream * _STREAM), 11)   # 53 bits, signed
    u = bits.to(torch.float64) * (1.0 / (1 << 53)) + (((1 << 52) + 0.5) / (1 << 53))
    return u if dtype == torch.float64 else u.to(dtype)


def seed_to_int64(seed: int) -> int:
    """Any Python int (OpenAI seeds go up to 2**64 - 1) -> a signed int64 key."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed
