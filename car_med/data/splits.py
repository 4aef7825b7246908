"""Patient-level train/validation/test splits, shared by the preprocessing CLI and the release readers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["SPLIT_NAMES", "DEFAULT_SPLIT_FRACTIONS", "split_patients"]

SPLIT_NAMES = ("training", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def split_patients(
    patient_ids: Iterable[str], seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> dict[str, str]:
    """Assign each patient to ``"training"``, ``"validation"`` or ``"test"``; a patient is never split.

    The sorted unique ids are permuted with ``numpy.random.default_rng(seed)``, so the result does not
    depend on input order. Validation and test get ``round(f * n)`` patients each (half up), and at least
    one each when there are three or more patients and their fraction is non-zero; training gets the rest.

    Args:
        patient_ids: patient ids; repeats (one per crop) are fine.
        seed: permutation seed.
        fractions: training, validation and test fractions, non-negative and summing to 1.

    Returns:
        ``{patient_id: split name}``.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}.")
    ordered = sorted(set(patient_ids))
    n = len(ordered)
    n_val = int(np.floor(n * fractions[1] + 0.5))
    n_test = int(np.floor(n * fractions[2] + 0.5))
    if n >= 3:
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
    n_train = max(0, n - n_val - n_test)
    n_test = n - n_train - n_val
    order = np.random.default_rng(seed).permutation(n)
    names = [SPLIT_NAMES[0]] * n_train + [SPLIT_NAMES[1]] * n_val + [SPLIT_NAMES[2]] * n_test
    return {ordered[index]: names[rank] for rank, index in enumerate(order)}
