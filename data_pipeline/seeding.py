"""Seeds that are functions of (seed, epoch, position) alone, so that order and augmentation survive a resume and
do not depend on worker or rank counts: splitmix64's finalizer, vectorized over numpy's uint64 (whose arithmetic
wraps modulo 2**64)."""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of each uint64: every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        mixed = (values ^ (values >> np.uint64(30))) * np.uint64(MIX1)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(MIX2)
    return mixed ^ (mixed >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """A well-mixed 32-bit seed for each (seed, epoch, position): torch's generator keeps only the low 32 bits of a
    seed, so the parts cannot simply be stacked into a 64-bit number."""
    base = np.uint64((seed * GOLDEN + epoch * MIX1) % 2**64)
    with np.errstate(over="ignore"):
        stacked = base + np.asarray(positions).astype(np.uint64) * np.uint64(MIX2)  # -1 wraps to 2**64 - 1
    return splitmix64(stacked) & np.uint64(2**32 - 1)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(sample_seeds(seed, epoch, np.array([position]))[0])


def sample_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) for each seed (N x count), each a function of its seed and column alone: the
    top 53 bits of splitmix64 of (seed, column)."""
    columns = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GOLDEN)
    with np.errstate(over="ignore"):
        keys = np.asarray(seeds).astype(np.uint64)[:, None] * np.uint64(MIX1) + columns
    return (splitmix64(keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53
