"""What every format checks of its labels: each one a class, and val's classes those of training."""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import UserError


def first_outside(labels: np.ndarray, classes: int) -> int | None:
    """The position of the first label that is not a class (0 to ``classes`` - 1), or None: a label past the model's
    classes fails the first step with "Target 12 is out of bounds", so each data set checks at opening."""
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    return int(outside[0]) if len(outside) else None


def check_same_classes(expected: list[str], found: list[str], *, where: str, expected_are: str) -> None:
    """Labels are positions in a sorted class list: data scored against another list is scored against the wrong
    labels."""
    if found == expected:
        return
    differing = [f"{a!r} vs {b!r}" for a, b in zip(expected, found, strict=False) if a != b]
    if not differing:
        differing = [f"{len(found)} vs {len(expected)} classes"]
    raise UserError(
        f"{where}: its {len(found)} classes are not the {len(expected)} {expected_are} (first differences: "
        f"{', '.join(differing[:3])})"
    )
