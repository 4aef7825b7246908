"""How every evaluation starts: the split read, the checkpoint loaded, the sampler built from the given options."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from car_med.engines.checkpoints import load_car_networks
from car_med.evaluation.sample_metrics import with_case_index
from car_med.sampling import CARSampler, SamplerOptions

__all__ = ["DEFAULT_EVALUATION_SAMPLER", "StartedEvaluation", "start_evaluation"]

DEFAULT_EVALUATION_SAMPLER = SamplerOptions(max_batch=32)
"""An evaluation's sampler unless told otherwise: 32 folded rows per G pass, G's training noise, no cleanup."""


class StartedEvaluation(NamedTuple):
    """What :func:`start_evaluation` gives: the output folder, the cases and the sampler over the loaded F and G."""

    output_dir: Path
    cases: list[dict]
    sampler: CARSampler


def start_evaluation(
    calibration_network: torch.nn.Module,
    refinement_network: torch.nn.Module,
    *,
    datalist: str | os.PathLike,
    split: str,
    read_split: Callable[[str | os.PathLike, str], list[dict]],
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None,
    device: str | torch.device,
    max_cases: int | None,
    sampler_options: SamplerOptions,
) -> StartedEvaluation:
    """The output folder (created), F and G loaded from the checkpoint if one is given, the cases and the sampler.

    Args:
        calibration_network: F.
        refinement_network: G.
        datalist: the dataset's ``datalist.json``, read with ``read_split(datalist, split)``.
        split: the split to evaluate.
        read_split: the dataset's split reader (e.g. :func:`car_med.data.lidc.load_lidc_datalist`).
        output_dir: the evaluation folder.
        checkpoint: a stage-2 checkpoint holding both networks' weights, or ``None`` to keep them as given.
        device: where the checkpoint's tensors are loaded.
        max_cases: the split's first cases only; ``None`` for all. Each case gets its ``case_index``.
        sampler_options: the sampler's options.

    Raises:
        ValueError: no case is left; the message names the datalist and the split.
    """
    items = read_split(datalist, split)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        load_car_networks(calibration_network, refinement_network, checkpoint, map_location=device)
    cases = with_case_index(items)[:max_cases]
    if not cases:
        raise ValueError(f"{datalist}: split {split!r} has no cases to evaluate.")
    return StartedEvaluation(out, cases, sampler_options.sampler(calibration_network, refinement_network))
