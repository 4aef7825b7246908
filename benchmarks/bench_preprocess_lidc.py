"""Benchmark the LIDC preprocessing against the naive pylidc path on a synthetic DICOM cohort.

Usage::

    python benchmarks/bench_preprocess_lidc.py [--dicom-root DIR | --num-patients N | --patients ID ...]
                                               [--workers 1 2]

Paths compared, each in a fresh subprocess so that peak RSS is its own:

* ``preprocessing.lidc``: header-only scan of the series, decode just the cropped slices, write all NIfTI crops.
* naive: ``scan.to_volume()`` (decodes every slice) plus ``Annotation.boolean_mask()`` for every annotation,
  as pylidc's tutorials do. It writes no crops, so it is a lower bound on the naive pipeline's time. pylidc
  finds the DICOM through ``~/.pylidcrc``; the benchmark writes one under a temporary HOME, never the real one.

Times exclude interpreter start-up and imports. Peak RSS is ``ru_maxrss`` of the process doing the work (for
``--workers N > 1``, the largest worker). Prints a markdown table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from preprocessing.synthetic_lidc import REFERENCE_COHORT  # noqa: E402

DEFAULT_PATIENTS = REFERENCE_COHORT

_OURS = textwrap.dedent(
    """
    import json, resource, sys, time
    from preprocessing.lidc import run
    from preprocessing.lidc_annotations import import_pylidc
    import_pylidc()
    root, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = time.perf_counter()
    summary = run(root, out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "scans": summary["counts"]["scans_with_crops"],
                      "crops": summary["counts"]["crops"], "rss_kb": max(own, children) if workers > 1 else own}))
    """
)

_NAIVE = textwrap.dedent(
    """
    import json, resource, sys, time, warnings, contextlib, io
    from preprocessing.lidc_annotations import import_pylidc
    pl = import_pylidc()
    patients = sys.argv[1].split(",")
    start = time.perf_counter()
    scans = masks = 0
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for scan in pl.query(pl.Scan).filter(pl.Scan.patient_id.in_(patients)).order_by(pl.Scan.id):
            if not scan.annotations:
                continue
            volume = scan.to_volume(verbose=False)
            for nodule in scan.cluster_annotations(verbose=False):
                for annotation in nodule:
                    masks += int(annotation.boolean_mask().sum() > 0)
            scans += 1
            del volume
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "scans": scans, "crops": None,
                      "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def _run_json(code: str, args: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dicom-root", help="existing DICOM root (TCIA layout); default: build a synthetic cohort")
    source.add_argument("--num-patients", type=int, help="synthetic cohort of this many small annotated patients")
    source.add_argument(
        "--patients", nargs="+", help=f"synthetic cohort of these DB patients (default {len(DEFAULT_PATIENTS)})"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_lidc_") as tmp:
        tmp_path = Path(tmp)
        home = tmp_path / "home"
        home.mkdir()
        env = dict(
            os.environ, HOME=str(home), PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        if args.dicom_root:
            root = Path(args.dicom_root).resolve()
            patients = sorted(p.name for p in root.iterdir() if p.name.startswith("LIDC-IDRI-"))
        else:
            from preprocessing.synthetic_lidc import build_cohort, select_small_patients

            os.environ["HOME"] = str(home)
            patients = list(
                args.patients or (select_small_patients(args.num_patients) if args.num_patients else DEFAULT_PATIENTS)
            )
            root = tmp_path / "dicom"
            build_cohort(root, patients)
        (home / ".pylidcrc").write_text(f"[dicom]\npath = {root}\nwarn = True\n")

        rows = []
        for workers in args.workers:
            result = _run_json(_OURS, [str(root), str(tmp_path / f"out_w{workers}"), str(workers)], env)
            rows.append((f"preprocessing.lidc, {workers} worker{'s' if workers > 1 else ''}", result))
        rows.append(("naive: to_volume + boolean_mask", _run_json(_NAIVE, [",".join(patients)], env)))

    print(f"\nLIDC preprocessing on {len(patients)} patients (synthetic RLE DICOM unless --dicom-root)\n")
    print("| path | scans | crops | seconds | scans/min | peak RSS per process (MB) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        per_minute = 60.0 * r["scans"] / r["seconds"] if r["seconds"] > 0 else float("nan")
        crops = "-" if r["crops"] is None else str(r["crops"])
        print(f"| {name} | {r['scans']} | {crops} | {r['seconds']:.1f} | {per_minute:.1f} | {r['rss_kb'] / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
