"""Counter-based randomness: every random draw is a pure function of (seed, what, where), so a
run resumed at step k draws exactly what the uninterrupted run drew."""
from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def rng(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))
