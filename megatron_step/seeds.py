"""Seeds derived from named parts, identical in every process and every parallel layout.

Adapter init (lora.py), random new layers (growth.py) and fresh layers (model.py) each seed a
generator from (run seed, what is being initialised, where it sits in the *whole* model), never
from a process's rank or its generator's history, so the same model comes out at any TP x PP.
Python's `hash()` is salted per process, hence a digest.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined by `parts` (their repr), the same in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
