"""Stochastic-class conventions of the Cityscapes protocol: the class flips, the 2^K label modes and their weights.

Kohl et al. (2018) make Cityscapes ambiguous by flipping five whole classes per image to new classes with fixed
probabilities (sidewalk 1 -> 19 with 8/17, person 11 -> 20 with 7/17, car 13 -> 21 with 6/17, vegetation 8 -> 22
with 5/17, road 0 -> 23 with 4/17). Every image then has ``2**5 = 32`` ground-truth modes with analytic
probabilities, which weight the GED's label terms.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from monai.utils import convert_to_tensor

__all__ = [
    "CITYSCAPES_STOCHASTIC_CLASSES",
    "CITYSCAPES_SWITCHABLE_CLASSES",
    "CITYSCAPES_IGNORE_INDEX",
    "check_stochastic_classes",
    "stochastic_mode_flips",
    "stochastic_mode_weights",
    "stochastic_label_modes",
]

#: ``(base class, flipped class, flip probability)`` for the stochastic Cityscapes classes (trainIds).
CITYSCAPES_STOCHASTIC_CLASSES: tuple[tuple[int, int, float], ...] = (
    (1, 19, 8 / 17),
    (11, 20, 7 / 17),
    (13, 21, 6 / 17),
    (8, 22, 5 / 17),
    (0, 23, 4 / 17),
)

#: The 10 classes the Cityscapes GED is taken over: the five base classes and their flipped twins.
CITYSCAPES_SWITCHABLE_CLASSES: tuple[int, ...] = (0, 1, 8, 11, 13, 19, 20, 21, 22, 23)

#: Label values excluded from every Cityscapes metric: class 24 (mapped ignore) and raw 255.
CITYSCAPES_IGNORE_INDEX: tuple[int, ...] = (24, 255)


def check_stochastic_classes(
    stochastic_classes: Sequence[tuple[int, int, float]],
) -> tuple[tuple[int, int, float], ...]:
    """Validate ``(base, flipped, probability)`` triples and return them as a tuple.

    Raises:
        ValueError: on malformed triples, negative or repeated class ids, or probabilities outside [0, 1].
    """
    triples = tuple(tuple(t) for t in stochastic_classes)
    if not triples:
        raise ValueError("stochastic_classes must hold at least one (base, flipped, probability) triple.")
    seen: list[int] = []
    for t in triples:
        if len(t) != 3:
            raise ValueError(f"each stochastic class must be (base, flipped, probability), got {t!r}.")
        base, flipped, p = t
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in (base, flipped)):
            raise ValueError(f"class id out of range: stochastic class ids must be ints >= 0, got {t!r}.")
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"flip probability must lie in [0, 1], got {p!r} in {t!r}.")
        seen += [base, flipped]
    if len(set(seen)) != len(seen):
        raise ValueError(f"stochastic_classes repeat a class id: {triples!r}.")
    return tuple((int(b), int(f), float(p)) for b, f, p in triples)


def stochastic_mode_flips(n_classes: int) -> torch.Tensor:
    """The ``(2**K, K)`` flip decisions of every mode, in ``itertools.product((False, True), repeat=K)`` order.

    Mode ``m`` flips pair ``k`` iff bit ``K - 1 - k`` of ``m`` is set: mode 0 flips nothing, the last mode flips
    everything, and the first pair is the most significant bit (the order of the authors' evaluation code).
    """
    return torch.tensor(list(itertools.product((False, True), repeat=n_classes)), dtype=torch.bool)


def stochastic_mode_weights(
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> torch.Tensor:
    """Analytic probability of each of the ``2**K`` label modes, ``(2**K,)`` float64, summing to 1.

    Use as the GED's ``label_weights`` with labels from :func:`stochastic_label_modes`. The weights do not depend
    on the image: where a class is absent, the modes that differ only in it are identical maps whose weights add
    up to the right probability.
    """
    triples = check_stochastic_classes(stochastic_classes)
    probs = torch.tensor([p for _, _, p in triples], dtype=torch.float64)
    flips = stochastic_mode_flips(len(triples))
    return torch.where(flips, probs, 1.0 - probs).prod(dim=1)


def stochastic_label_modes(
    label: torch.Tensor,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> torch.Tensor:
    """Every ground-truth mode of integer label maps ``(B, *spatial)``: ``(B, 2**K, *spatial)``.

    Pixels of either class of a pair are set to the base class in the modes that do not flip it and to the flipped
    class in those that do, so an already-flipped label gives the same modes as its base label.
    """
    t = convert_to_tensor(label, track_meta=False)
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.ndim < 2:
        raise ValueError(
            f"label must be an integer label map of shape (B, *spatial), got {getattr(t, 'dtype', type(t))} "
            f"with shape {tuple(getattr(t, 'shape', ()))}."
        )
    triples = check_stochastic_classes(stochastic_classes)
    flips = stochastic_mode_flips(len(triples)).to(t.device)
    modes = t.unsqueeze(1).repeat(1, flips.shape[0], *([1] * (t.ndim - 1)))
    shape = (1, flips.shape[0]) + (1,) * (t.ndim - 1)
    for k, (base, flipped, _) in enumerate(triples):
        member = ((t == base) | (t == flipped)).unsqueeze(1)
        target = torch.where(flips[:, k], flipped, base).to(t.dtype).view(shape)
        modes = torch.where(member, target, modes)
    return modes
