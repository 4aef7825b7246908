"""What the preprocessing CLIs share: resumable per-item jobs with a progress bar, and the run's final files."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from car_med.files import atomic_write_bytes, atomic_write_json, json_bytes

__all__ = ["run_jobs", "write_run_outputs"]


def run_jobs(
    worker: Callable[[Any], Any], jobs: Sequence[Any], desc: str, unit: str, workers: int, progress: bool
) -> None:
    """Run ``worker(job)`` for every job, in this process (``workers == 1``) or in spawned worker processes.

    A worker writes its own record; a job that raises stops the run (after the others finished), so a rerun
    resumes from the records written. Spawned processes do not inherit the parent's torch/OpenMP state.
    """
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress, file=sys.stderr) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                worker(job)
                bar.update(1)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for future in as_completed([pool.submit(worker, job) for job in jobs]):
                future.result()
                bar.update(1)


def write_run_outputs(
    output_dir: Path, summary: Mapping[str, Any], datalist: Any, extra: Mapping[str, bytes] | None = None
) -> None:
    """Write ``extra`` files, ``summary.json``, then ``datalist.json`` last: its presence means the run finished."""
    for name, payload in (extra or {}).items():
        atomic_write_bytes(output_dir / name, payload)
    atomic_write_json(output_dir / "summary.json", summary)
    atomic_write_bytes(output_dir / "datalist.json", json_bytes(datalist))
