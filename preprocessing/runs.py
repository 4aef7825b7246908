"""What the preprocessing CLIs share: resumable per-item jobs with a progress bar, and the run's final files."""

from __future__ import annotations

import argparse
import inspect
import logging
import multiprocessing
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from car_med.files import atomic_write_bytes, atomic_write_json, json_bytes

__all__ = ["run_command", "run_jobs", "write_run_outputs"]


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


def run_command(
    run: Callable[..., dict[str, Any]],
    arguments: argparse.Namespace,
    describe: Callable[[dict[str, Any]], str],
    logger: logging.Logger,
) -> dict[str, Any]:
    """What a preprocessing CLI does once its arguments are parsed: log at INFO, call ``run`` and log its result.

    Each of ``run``'s parameters takes the parsed argument of the same name (``--output-dir`` for ``output_dir``);
    ``progress`` is the negation of ``--no-progress``. The final log line is ``describe(summary)`` followed by
    the output folder.

    Returns:
        ``run``'s summary.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parameters = inspect.signature(run).parameters
    values = {name: getattr(arguments, name) for name in parameters if hasattr(arguments, name)}
    if "progress" in parameters:
        values["progress"] = not arguments.no_progress
    summary = run(**values)
    logger.info("%s; outputs in %s", describe(summary), arguments.output_dir)
    return summary
