"""``export_cases``: a datalist split through a registered CAR model into review files (see docs/review.md)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import car_med
from car_med.ct.volume import CTSeries, paste_plane, read_ct_series
from car_med.data.lidc import DEFAULT_HU_WINDOW, load_lidc_datalist
from car_med.evaluation.sample_metrics import case_seed
from car_med.evaluation.volumes import with_nodule_noise
from car_med.export.crop import AMBIGUITY_SCORE, CASE_RECORD, case_id_of, export_case
from car_med.export.files import ExportFiles, safe_path_part
from car_med.export.hypothesis_files import (
    GROUPING,
    HYPOTHESES_FILE,
    SAMPLE_NUMBERING,
    HypothesisSettings,
    crop_hypotheses,
    hypotheses_payload,
    nodule_hypotheses,
    read_model_grid_samples,
)
from car_med.export.model_source import ModelSource, load_export_model, resolve_model_source
from car_med.export.review import manifest_csv, review_index_html
from car_med.files import json_bytes
from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU, Hypothesis
from car_med.visualize.review import sample_strip_png

__all__ = ["ExportOptions", "ExportSummary", "export_cases", "export_items", "print_summary", "raise_if_failed"]

logger = logging.getLogger(__name__)

EXPORT_RECORD = "export.json"
HYPOTHESES_SEG = "hypotheses_seg.dcm"
_ID_FIELDS = (
    "patient_id",
    "scan_id",
    "series_uid",
    "sop_instance_uid",
    "source_file",
    "nodule_id",
    "slice_index",
    "slice_z",
    "num_annotators",
)


@dataclass
class ExportSummary:
    """What an export did, case by case.

    Attributes:
        output_dir: the export folder.
        exported: case ids written by this run.
        existing: case ids already complete in the folder and left as they were (no ``overwrite``).
        failed: ``{case id: error}``.
        records: every case record, in datalist order.
    """

    output_dir: Path
    exported: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every case exported (now or before), 1 when any failed."""
        return 1 if self.failed else 0

    def message(self) -> str:
        parts = [f"{len(self.exported)} cases exported"]
        if self.existing:
            parts.append(f"{len(self.existing)} already in {self.output_dir} and not overwritten (pass --overwrite)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed (errors in manifest.csv)")
        return "; ".join(parts) + f"; review queue: {self.output_dir / 'index.html'}"


@dataclass(frozen=True)
class ExportOptions:
    """How an export samples and writes, the same for a datalist split and a new patient's crops.

    Attributes as the arguments of :func:`export_cases`; callers build it with every field named.
    """

    num_samples: int = 16
    seed: int = 0
    overwrite: bool = False
    tracking_uri: str | None = None
    device: str = "cpu"
    roi_size: Sequence[int] = (128, 128)
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW
    progress: bool = True
    command: str | None = None
    min_iou: float = DEFAULT_MIN_IOU
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        # a bad min_iou or confidence is refused (ValueError) before anything is read or written
        HypothesisSettings(min_iou=self.min_iou, confidence=self.confidence)

    @property
    def hypotheses(self) -> HypothesisSettings:
        """The grouping of samples into hypotheses."""
        return HypothesisSettings(min_iou=self.min_iou, confidence=self.confidence)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _settings_of(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it away or export into another folder.") from err


def _check_same_settings(previous: Mapping[str, Any] | None, source: ModelSource, options: ExportOptions) -> None:
    """Refuse to mix two exports' results in one folder: another model, M, seed, ``min_iou`` or ``confidence``.

    An export written before hypotheses existed records no ``min_iou``; its hypotheses are then made for the
    first time, from its own samples, so nothing is mixed and it is not refused.
    """
    if previous is None:
        return
    grouping = previous.get("hypotheses")
    before = [previous.get("model", {}).get("uri"), previous.get("num_samples"), previous.get("seed")]
    now = [source.uri, options.num_samples, options.seed]
    if isinstance(grouping, Mapping):
        before += [grouping.get("min_iou"), grouping.get("confidence")]
        now += [options.min_iou, options.confidence]

    def settings(values: list) -> str:
        text = f"model {values[0]}, M={values[1]}, seed {values[2]}"
        return text + (f", min_iou {values[3]}, confidence {values[4]}" if len(values) > 3 else "")

    if before != now:
        raise ValueError(
            f"the export folder already holds an export of {settings(before)}; this run asks for "
            f"{settings(now)}. Export into another folder, or pass --overwrite to replace every case."
        )


def _select(items: list[dict[str, Any]], cases: Sequence[str] | None) -> list[dict[str, Any]]:
    if not cases:
        return items
    wanted = {str(c) for c in cases}
    chosen = [it for it in items if it["case_id"] in wanted or str(it.get("patient_id")) in wanted]
    known = {it["case_id"] for it in items} | {str(it.get("patient_id")) for it in items}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"--cases {unknown} match no case id or patient id of the split (case ids look like "
            f"{items[0]['case_id'] if items else 'scan12_n00_k0042'})."
        )
    return chosen


def _case_maps(case_dir: Path, record: Mapping[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(case_dir / record["files"][name]))
    data = np.asarray(image.dataobj)
    data = data.reshape(data.shape[0], data.shape[1], -1)  # (I, J, 1[, N]) -> (I, J, N)
    return data, np.asarray(image.affine, dtype=np.float64)


def _export_series(
    series: CTSeries,
    cases: list[tuple[dict[str, Any], Path]],
    series_dir: Path,
    files: ExportFiles,
    source: ModelSource,
    seed: int,
    write_ct: bool,
    dicom_seg: bool,
    rewrite_nodules: set,
    groups: Mapping[str, _NoduleGroups],
    min_iou: float,
) -> None:
    """Write ``ct.nii.gz`` and, per nodule, the samples, mean and annotations on the CT grid (and the SEGs).

    A nodule's files are rewritten when its crops were exported by this run, a file is missing, or its
    hypotheses differ from its ``hypotheses.json`` (the SEGs name them).
    """
    if write_ct:
        files.write_nifti(series_dir / "ct.nii.gz", series.hu, series.affine)
    by_nodule: dict[Any, list[tuple[dict[str, Any], Path]]] = defaultdict(list)
    for record, case_dir in cases:
        by_nodule[record.get("nodule_id")].append((record, case_dir))
    for nodule_id, members in sorted(by_nodule.items(), key=lambda kv: str(kv[0])):
        nodule_dir = series_dir / f"nodule_{safe_path_part(nodule_id, 'nodule id')}"
        targets = _nodule_targets(nodule_dir, dicom_seg)
        group = groups.get(nodule_dir.relative_to(files.root).as_posix())
        stale = (
            nodule_id in rewrite_nodules
            or (group is not None and group.changed)
            or any(not path.is_file() for key, path in targets.items() if key != "annotations")
        )
        if stale:
            planes, depth = _paste_nodule_planes(series, members)
            _write_nodule_volumes(files, series, planes, depth, targets)
            hypotheses = None if group is None else group.hypotheses
            if dicom_seg:
                _write_segs(series, planes, depth["samples"], targets, files, source, seed, hypotheses, min_iou)
            else:
                # a SEG of earlier samples would contradict the new ones
                (nodule_dir / "seg.dcm").unlink(missing_ok=True)
                (nodule_dir / HYPOTHESES_SEG).unlink(missing_ok=True)
            if group is not None:
                group.segs_current = True
        _record_nodule_files(members, targets, series_dir / "ct.nii.gz", files.root)


def _nodule_targets(nodule_dir: Path, dicom_seg: bool) -> dict[str, Path]:
    """The CT-grid files of one nodule by key (``samples``, ``mean``, ``annotations``, and the SEGs)."""
    names = {"samples": "samples_ct.nii.gz", "mean": "mean_ct.nii.gz", "annotations": "annotations_ct.nii.gz"}
    targets = {key: nodule_dir / name for key, name in names.items()}
    if dicom_seg:
        targets["seg"] = nodule_dir / "seg.dcm"
        targets["hypotheses_seg"] = nodule_dir / HYPOTHESES_SEG
    return targets


def _paste_nodule_planes(
    series: CTSeries, members: Sequence[tuple[dict[str, Any], Path]]
) -> tuple[dict[str, dict[int, Any]], dict[str, int]]:
    """Paste each crop's samples, mean and annotations onto the CT grid.

    Returns:
        ``planes``: ``{key: {CT slice: pasted plane}}`` and ``depth``: ``{key: volumes}`` (M for the samples,
        the readers for the annotations), for the keys ``samples``, ``mean`` and ``annotations``.

    Raises:
        ValueError: a crop lies on another CT slice than its source SOP instance.
    """
    planes: dict[str, dict[int, Any]] = {"samples": {}, "mean": {}, "annotations": {}}
    depth = {"samples": 1, "mean": 1, "annotations": 1}
    for record, case_dir in members:
        k_expected = series.slice_of(record.get("sop_instance_uid", ""))
        for key, file_name, binary in (
            ("samples", "samples.nii.gz", True),
            ("mean", "mean.nii.gz", False),
            ("annotations", "annotations.nii.gz", True),
        ):
            if file_name not in record["files"]:
                continue
            maps, affine = _case_maps(case_dir, record, file_name)
            pasted = paste_plane(maps, affine, series.affine, series.shape, binary=binary)
            if k_expected is not None and pasted.k != k_expected:
                raise ValueError(
                    f"case {record['case_id']}: its crop lies on CT slice {pasted.k}, but its source "
                    f"SOP instance {record.get('sop_instance_uid')} is slice {k_expected}."
                )
            planes[key][pasted.k] = pasted
            depth[key] = max(depth[key], maps.shape[-1])
    return planes, depth


def _write_nodule_volumes(
    files: ExportFiles,
    series: CTSeries,
    planes: Mapping[str, Mapping[int, Any]],
    depth: Mapping[str, int],
    targets: Mapping[str, Path],
) -> None:
    """Write the pasted planes as sparse CT-grid NIfTIs: the mean as float32 ``(X, Y, Z)``, the samples and
    annotations as uint8 ``(X, Y, Z, N)``; a key with no plane writes nothing."""
    for key in ("samples", "mean", "annotations"):
        if not planes[key]:
            continue
        dtype = np.float32 if key == "mean" else np.uint8
        shape = series.shape if key == "mean" else (*series.shape, depth[key])
        sparse = {
            (k, n): (p.window, p.values[..., n]) for k, p in planes[key].items() for n in range(p.values.shape[-1])
        }
        files.write_sparse_nifti(targets[key], shape, dtype, series.affine, sparse)


def _record_nodule_files(
    members: Sequence[tuple[dict[str, Any], Path]], targets: Mapping[str, Path], ct_path: Path, root: Path
) -> None:
    """Name the series' CT and the nodule's CT-grid files (those that exist, else "") in each crop's record."""
    relative = {key: path.relative_to(root).as_posix() for key, path in targets.items() if path.is_file()}
    for record, _ in members:
        record["ct"] = ct_path.relative_to(root).as_posix()
        record["samples_ct"] = relative.get("samples", "")
        record["mean_ct"] = relative.get("mean", "")
        record["annotations_ct"] = relative.get("annotations", "")
        record["dicom_seg"] = relative.get("seg", "")
        record["hypotheses_seg"] = relative.get("hypotheses_seg", "")


def _write_segs(
    series: CTSeries,
    planes: Mapping[str, Mapping[int, Any]],
    num_samples: int,
    targets: Mapping[str, Path],
    files: ExportFiles,
    source: ModelSource,
    seed: int,
    hypotheses: Sequence[Hypothesis] | None,
    min_iou: float,
) -> None:
    """``seg.dcm`` (every sample, named with its hypothesis, and Gbar >= 0.5) and ``hypotheses_seg.dcm`` (each
    hypothesis's representative)."""
    import io

    from car_med.export.dicom_seg import hypotheses_segmentation, nodule_segmentation

    ks = sorted(planes["samples"])
    columns, rows = series.shape[:2]
    samples = np.zeros((len(ks), rows, columns, num_samples), dtype=bool)
    mean = np.zeros((len(ks), rows, columns), dtype=bool)
    for f, k in enumerate(ks):
        window = planes["samples"][k].window
        # (column, row) on the CT grid -> DICOM [row, column]
        samples[f][window[1], window[0]] = planes["samples"][k].values.transpose(1, 0, 2) > 0
        if k in planes["mean"]:
            mean_plane = planes["mean"][k]
            mean[f][mean_plane.window[1], mean_plane.window[0]] = mean_plane.values[..., 0].T >= 0.5
    datasets = series.datasets(ks)
    model_name = source.name or "car-med CAR"
    model_version = str(source.version if source.version is not None else source.run_id or source.uri)
    segs = {
        "seg": nodule_segmentation(
            datasets,
            samples,
            mean,
            model_name=model_name,
            model_version=model_version,
            series_description="CAR samples and mean",
            seed=seed,
            hypotheses=hypotheses,
        )
    }
    if hypotheses:
        segs["hypotheses_seg"] = hypotheses_segmentation(
            datasets, samples, hypotheses, model_name=model_name, model_version=model_version, min_iou=min_iou
        )
    for key, seg in segs.items():
        buffer = io.BytesIO()
        seg.save_as(buffer)
        files.write_bytes(targets[key], buffer.getvalue())
    if "hypotheses_seg" not in segs:
        targets["hypotheses_seg"].unlink(missing_ok=True)


def export_cases(
    model: str | os.PathLike,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    cases: Sequence[str] | None = None,
    num_samples: int = 16,
    seed: int = 0,
    dicom_root: str | os.PathLike | None = None,
    full_volume: bool = False,
    dicom_seg: bool = False,
    overwrite: bool = False,
    tracking_uri: str | None = None,
    device: str = "cpu",
    roi_size: Sequence[int] = (128, 128),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    progress: bool = True,
    command: str | None = None,
    independent_slices: bool = False,
    min_iou: float = DEFAULT_MIN_IOU,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ExportSummary:
    """Export every case of a split (or the ``cases`` given) for review.

    Args:
        model: MLflow model URI or bundle output folder (see :func:`resolve_model_source`).
        datalist: the preprocessing output's ``datalist.json``.
        output_dir: the export folder ``EXP``.
        split: ``training``, ``validation`` or ``test``.
        cases: case ids (``scan<id>_n<nodule>_k<slice>``) or patient ids; default all of the split.
        num_samples: M, at least 2.
        seed: export seed; case ``i`` of the split draws with seed ``seed * 1000003 + i`` (as evaluation does).
        dicom_root: the LIDC-IDRI DICOM root the crops were made from (``--full-volume``, ``--dicom-seg``).
        full_volume: also write ``ct.nii.gz`` per series and the samples, mean and annotations on its grid.
        dicom_seg: also write one DICOM SEG per nodule.
        overwrite: replace cases already exported; without it they are left untouched and reported.
        tracking_uri: MLflow tracking/registry URI for a ``models:/`` MODEL.
        device: torch device of the model.
        roi_size: the model input window (the training ``roi_size``).
        hu_window: grey window of the montages.
        progress: show a progress bar over cases.
        command: the command line, recorded in ``export.json``.
        independent_slices: draw each crop's noise on its own. By default the crops of one nodule share their
            noise seed (``seed * 1000003 +`` the position of the nodule's first crop in the split), so sample m
            of a nodule is one 3D outline: volume m of ``samples_ct.nii.gz`` and segment m + 1 of the SEG.
        min_iou: samples are grouped into hypotheses whose every two members overlap with at least this IoU
            (:func:`car_med.hypotheses.group_samples`); written to ``hypotheses.json`` per crop and per nodule.
        confidence: the confidence of each hypothesis probability's Wilson interval.

    Returns:
        The summary; its ``exit_code`` is 1 when any case failed (the others are still exported).

    Raises:
        ValueError: bad arguments, an unreadable datalist, an unknown model or case id, or an export folder
            holding another model's, M's, seed's, ``min_iou``'s or ``confidence``'s export (without
            ``overwrite``).
    """
    options = ExportOptions(
        num_samples=num_samples,
        seed=seed,
        overwrite=overwrite,
        tracking_uri=tracking_uri,
        device=device,
        roi_size=roi_size,
        hu_window=hu_window,
        progress=progress,
        command=command,
        min_iou=min_iou,
        confidence=confidence,
    )
    _check_arguments(options, full_volume, dicom_seg, dicom_root)
    noise = "case" if independent_slices else "nodule"
    items = _select(with_nodule_noise(_split_items(datalist, split), noise), cases)
    origin = _split_origin(datalist, split, independent_slices)
    return export_items(
        model, items, output_dir, origin, options, dicom_root=dicom_root, full_volume=full_volume, dicom_seg=dicom_seg
    )


def _split_origin(datalist: str | os.PathLike, split: str, independent_slices: bool) -> dict[str, str]:
    """Where a datalist split's items come from and how their case seeds are made, for ``export.json``."""
    return {
        "split": split,
        "datalist": str(Path(datalist).resolve()),
        "case_seed": "seed * 1000003 + "
        + (
            "case_index (the case's position in its split)"
            if independent_slices
            else "the position of the nodule's first crop in its split: a nodule's crops share their noise"
        ),
    }


def export_items(
    model: str | os.PathLike,
    items: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    origin: Mapping[str, Any],
    options: ExportOptions = ExportOptions(),
    *,
    dicom_root: str | os.PathLike | None = None,
    volumes: Mapping[str, CTSeries] | None = None,
    full_volume: bool = False,
    dicom_seg: bool = False,
) -> ExportSummary:
    """Export crop items (datalist-style dicts with absolute paths, a ``case_index`` and a ``case_id``).

    :func:`export_cases` gives it a datalist split; :mod:`car_med.predict` gives it the crops it cut from a new
    patient's CT (no readers' masks). An item's ``noise_index`` (default its ``case_index``) sets its noise
    seed, ``seed * 1000003 + noise_index``: items with one ``noise_index`` get the same M noise vectors, so
    sample m of a nodule's slices is one hypothesis. ``origin`` goes into ``export.json`` (where the items came
    from, and how the case seeds are made). ``volumes`` holds CT volumes already read, by series UID (a NIfTI
    CT, which has no DICOM folder); other series are read from ``dicom_root``. ``options``: sampling and
    writing, as the arguments of :func:`export_cases`; the other arguments as there.
    """
    _check_arguments(options, full_volume, dicom_seg, dicom_root, volumes)
    out = Path(output_dir)
    files = ExportFiles(out)
    if files.clear_staging():
        logger.warning("removed the partial files an interrupted export left in %s", files.staging)
    source = resolve_model_source(model, options.tracking_uri)
    previous = _settings_of(out / EXPORT_RECORD)
    if not options.overwrite:
        _check_same_settings(previous, source, options)
    run = _ExportRun(out, files, source, ExportSummary(output_dir=out), options)
    crops = _export_crops(run, items)
    _gather_earlier_records(run)
    groups = _group_hypotheses(run)
    if full_volume or dicom_seg:
        _export_full_volumes(run, crops, dicom_root, dicom_seg, volumes or {}, groups)
    _write_case_records(run)
    _write_nodule_reviews(run, groups)
    settings = _export_settings(run, previous, origin, dicom_root)
    _write_queue(run, settings)
    logger.info(run.summary.message())
    return run.summary


def _check_arguments(
    options: ExportOptions,
    full_volume: bool,
    dicom_seg: bool,
    dicom_root: Any,
    volumes: Mapping[str, CTSeries] | None = None,
) -> None:
    if options.num_samples < 2:
        raise ValueError(
            f"num_samples must be at least 2 (the ambiguity score compares samples), got {options.num_samples}."
        )
    if (full_volume or dicom_seg) and dicom_root is None and not volumes:
        raise ValueError("--full-volume and --dicom-seg need --dicom-root, the DICOM folder the crops were made from.")
    if dicom_root is not None and not Path(dicom_root).is_dir():
        raise ValueError(f"--dicom-root {dicom_root} is not a folder.")


def _split_items(datalist: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The split's items with their ``case_index`` and ``case_id``; two items may not share a case folder."""
    items = load_lidc_datalist(datalist, split, check_files=False)
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(items):
        item["case_index"] = index
        item["case_id"] = case_id_of(item)
        key = (safe_path_part(item.get("patient_id", "unknown"), "patient id"), item["case_id"])
        if key in seen:
            raise ValueError(
                f"{datalist} split {split!r}: items {seen[key]} and {index} both give the case folder "
                f"{key[0]}/{key[1]}; case ids must be unique."
            )
        seen[key] = index
    return items


@dataclass
class _ExportRun:
    """What every step of one export shares."""

    out: Path
    files: ExportFiles
    source: ModelSource
    summary: ExportSummary
    options: ExportOptions


@dataclass
class _Crops:
    """What the crop step leaves for the next ones."""

    located: list[tuple[dict[str, Any], Path, dict[str, Any]]] = field(default_factory=list)
    """``(case record, case folder, datalist item)`` of every case exported now or before."""
    written_nodules: set = field(default_factory=set)
    """``(patient, series, nodule)`` of the cases written by this run."""


def _export_crops(
    run: _ExportRun,
    items: Sequence[dict[str, Any]],
) -> _Crops:
    """Write every case's crop-grid files (or keep a finished case); a failed case is recorded, not raised."""
    from tqdm.auto import tqdm

    out, summary, crops, loaded = run.out, run.summary, _Crops(), None
    for item in tqdm(items, desc="export", unit="case", disable=not run.options.progress):
        patient = safe_path_part(item.get("patient_id", "unknown"), "patient id")
        case_dir = out / patient / item["case_id"]
        base = {
            "case_id": item["case_id"],
            "case_index": item["case_index"],
            "folder": f"{patient}/{item['case_id']}",
            **{key: _plain(item.get(key)) for key in _ID_FIELDS},
        }
        base["patient_id"] = str(item.get("patient_id", "unknown"))
        done_record = case_dir / CASE_RECORD
        if done_record.is_file() and not run.options.overwrite:
            record = json.loads(done_record.read_text())
            summary.existing.append(item["case_id"])
        else:
            try:
                if loaded is None:
                    loaded = load_export_model(run.source, device=run.options.device)
                record = export_case(
                    loaded,
                    item,
                    case_dir,
                    run.files,
                    run.options.num_samples,
                    case_seed(run.options.seed, item.get("noise_index", item["case_index"])),
                    base,
                    hu_window=run.options.hu_window,
                    roi_size=run.options.roi_size,
                )
            except (ValueError, OSError) as err:
                record = {**base, "status": "error", "error": str(err)}
                summary.failed[item["case_id"]] = str(err)
                logger.error("case %s (%s): %s", item["case_id"], base["patient_id"], err)
            else:
                summary.exported.append(item["case_id"])
                crops.written_nodules.add((base["patient_id"], base.get("series_uid"), base.get("nodule_id")))
        summary.records.append(record)
        if record.get("status") == "ok":
            crops.located.append((record, case_dir, item))
    return crops


def _export_full_volumes(
    run: _ExportRun,
    crops: _Crops,
    dicom_root: str | os.PathLike | None,
    dicom_seg: bool,
    volumes: Mapping[str, CTSeries],
    groups: Mapping[str, _NoduleGroups],
) -> None:
    """Per series: the CT volume, the cases' maps pasted onto it and the DICOM SEGs; a failure marks its cases."""
    from tqdm.auto import tqdm

    by_series: dict[tuple[str, str], list] = defaultdict(list)
    for record, case_dir, item in crops.located:
        if record.get("status") != "ok":  # its nodule's hypotheses failed
            continue
        by_series[(record["patient_id"], str(item.get("series_uid")))].append((record, case_dir, item))
    for (patient_id, series_uid), members in tqdm(
        sorted(by_series.items()), desc="full volume", unit="series", disable=not run.options.progress
    ):
        series_dir = run.out / safe_path_part(patient_id, "patient id") / f"series_{safe_path_part(series_uid, 'uid')}"
        try:
            series = volumes.get(series_uid)
            if series is None:
                source_file = members[0][2].get("source_file")
                if not source_file:
                    raise ValueError("the datalist item has no source_file (made by an older preprocessing?)")
                if dicom_root is None:
                    raise ValueError("no DICOM root to read the series from (--dicom-root)")
                series = read_ct_series((Path(dicom_root) / source_file).parent, series_uid)
            rewrite = {n for (p, s, n) in crops.written_nodules if p == patient_id and s == series_uid}
            _export_series(
                series,
                [(record, case_dir) for record, case_dir, _ in members],
                series_dir,
                run.files,
                run.source,
                run.options.seed,
                write_ct=run.options.overwrite or not (series_dir / "ct.nii.gz").is_file(),
                dicom_seg=dicom_seg,
                rewrite_nodules=rewrite if not run.options.overwrite else {r.get("nodule_id") for r, _, _ in members},
                groups=groups,
                min_iou=run.options.min_iou,
            )
        except (ValueError, OSError) as err:
            message = f"full volume of series {series_uid}: {err}"
            logger.error("%s (%s)", message, patient_id)
            for record, _, _ in members:
                record["status"] = "error"
                record["error"] = message
                run.summary.failed[record["case_id"]] = message


def _gather_earlier_records(run: _ExportRun) -> None:
    """Add the complete cases an earlier run exported into the folder (not among this run's items), so the
    hypotheses, strips and queue cover every case in the folder."""
    listed = {record["folder"] for record in run.summary.records}
    for path in sorted(run.out.glob(f"*/*/{CASE_RECORD}")):
        if path.parent.relative_to(run.out).as_posix() not in listed:
            run.summary.records.append(json.loads(path.read_text()))


def _write_case_records(run: _ExportRun) -> None:
    """Each complete case's ``case.json``, rewritten only when its record changed."""
    for record in run.summary.records:
        if record.get("status") == "ok":
            run.files.write_if_changed(run.out / record["folder"] / CASE_RECORD, json_bytes(record))


def nodule_folder(record: Mapping[str, Any]) -> str:
    """``<patient>/series_<uid>/nodule_<id>``: where a nodule's CT-grid files, strips and hypotheses go."""
    return "/".join(
        [
            safe_path_part(record.get("patient_id", "unknown"), "patient id"),
            f"series_{safe_path_part(record.get('series_uid'), 'uid')}",
            f"nodule_{safe_path_part(record.get('nodule_id'), 'nodule id')}",
        ]
    )


def _nodules(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The complete cases by nodule folder, each nodule's in z order (the order of its strips' slices)."""
    by_nodule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("status") == "ok":
            by_nodule[nodule_folder(record)].append(record)
    for members in by_nodule.values():
        members.sort(key=lambda r: float(r.get("slice_z") or 0.0))
    return dict(sorted(by_nodule.items()))


@dataclass
class _NoduleGroups:
    """One nodule's hypotheses, made before its SEGs (which name them) and written after them."""

    hypotheses: list[Hypothesis]
    payload: dict[str, Any]
    changed: bool
    """Its ``hypotheses.json`` is missing or holds other hypotheses: the nodule's SEGs are rewritten."""
    existed: bool
    """A ``hypotheses.json`` was there before this run."""
    segs_current: bool = False
    """The SEG step rewrote (or removed) this nodule's SEGs with these hypotheses."""


def _write_crop_hypotheses(
    run: _ExportRun, record: dict[str, Any], samples: np.ndarray, affine: np.ndarray, model: Mapping[str, Any]
) -> None:
    """A crop's ``hypotheses.json`` from its M 2D samples; its labels go into the case record."""
    settings = run.options.hypotheses
    hypotheses, spacing = crop_hypotheses(samples, affine, settings)
    payload = hypotheses_payload(
        hypotheses,
        level="crop",
        ids={key: record.get(key) for key in ("patient_id", "series_uid", "nodule_id", "case_id", "slice_z")},
        model=model,
        num_samples=samples.shape[0],
        seed=run.options.seed,
        case_seed=record.get("case_seed"),
        settings=settings,
        samples={
            "file": "samples.nii.gz",
            "shape": list(samples.shape),
            "axes": ["sample", "model grid i", "model grid j"],
            "spacing_mm": [round(v, 6) for v in spacing],
        },
    )
    run.files.write_if_changed(run.out / record["folder"] / HYPOTHESES_FILE, json_bytes(payload))
    record["files"][HYPOTHESES_FILE] = HYPOTHESES_FILE
    record["hypotheses"] = [row["label"] for row in payload["hypotheses"]]


def _nodule_payload(
    run: _ExportRun,
    members: Sequence[Mapping[str, Any]],
    stack: Sequence[np.ndarray],
    affine: np.ndarray,
    model: Mapping[str, Any],
) -> tuple[list[Hypothesis], dict[str, Any]]:
    """A nodule's hypotheses from its M sample volumes (the crops' samples stacked in z order)."""
    settings = run.options.hypotheses
    zs = [float(r.get("slice_z") or 0.0) for r in members]
    hypotheses, spacing = nodule_hypotheses(stack, affine, zs, settings)
    seeds = {r.get("case_seed") for r in members}
    shared = len(seeds) == 1
    noise = (
        "shared by the nodule's slices: sample m is one 3D outline of the whole nodule"
        if shared
        else "drawn per slice (--independent-slices): sample m's volume joins unrelated 2D draws, so these groups "
        "are not 3D outlines; read each crop's hypotheses.json instead"
    )
    first = members[0]
    payload = hypotheses_payload(
        hypotheses,
        level="nodule",
        ids={key: first.get(key) for key in ("patient_id", "series_uid", "nodule_id")},
        model=model,
        num_samples=stack[0].shape[0],
        seed=run.options.seed,
        case_seed=next(iter(seeds)) if shared else None,
        settings=settings,
        samples={
            "files": "samples.nii.gz of each case, stacked in z order",
            "cases": [r["case_id"] for r in members],
            "slices_z": zs,
            "shape": [stack[0].shape[0], len(stack), *stack[0].shape[1:]],
            "axes": ["sample", "slice (z order)", "model grid i", "model grid j"],
            "spacing_mm": None if spacing is None else [round(v, 6) for v in spacing],
        },
        extra={"noise": noise, "shared_noise": shared},
    )
    for row in payload["hypotheses"]:
        row["strip"] = f"strip_m{row['representative']:02d}.png"
    return hypotheses, payload


def _group_hypotheses(run: _ExportRun) -> dict[str, _NoduleGroups]:
    """Every complete case's and every nodule's hypotheses, from the samples on disk.

    Crops' ``hypotheses.json`` are written here; a nodule's are returned, for its SEGs, and written by
    :func:`_write_nodule_reviews` once the SEGs are, so a run killed in between rewrites the SEGs next time. A
    nodule whose samples cannot be grouped marks its cases failed.
    """
    model = run.source.to_json()
    groups: dict[str, _NoduleGroups] = {}
    for folder, members in _nodules(run.summary.records).items():
        try:
            stack = []
            for record in members:
                samples, affine = read_model_grid_samples(run.out / record["folder"], record)
                _write_crop_hypotheses(run, record, samples, affine, model)
                stack.append(samples)
            hypotheses, payload = _nodule_payload(run, members, stack, affine, model)
        except (ValueError, OSError) as err:
            message = f"hypotheses of nodule {folder}: {err}"
            logger.error(message)
            for record in members:
                record["status"] = "error"
                record["error"] = message
                run.summary.failed[record["case_id"]] = message
            continue
        path = run.out / folder / HYPOTHESES_FILE
        existed = path.is_file()
        changed = not existed or path.read_bytes() != json_bytes(payload)
        groups[folder] = _NoduleGroups(hypotheses, payload, changed=changed, existed=existed)
        for record in members:
            record["nodule_hypotheses"] = f"{folder}/{HYPOTHESES_FILE}"
    return groups


def _drop_outdated_segs(run: _ExportRun, groups: Mapping[str, _NoduleGroups]) -> None:
    """Remove the SEGs of a nodule whose hypotheses changed but whose SEGs this run did not rewrite (a case
    outside ``--cases`` after ``--overwrite`` with another ``--min-iou``): they name the old hypotheses."""
    for folder, group in groups.items():
        if not (group.existed and group.changed) or group.segs_current:
            continue
        for name in ("seg.dcm", HYPOTHESES_SEG):
            path = run.out / folder / name
            if path.is_file():
                path.unlink()
                logger.warning(
                    "removed %s: it names hypotheses made with other settings; export the nodule's cases again with "
                    "--dicom-seg to rebuild it",
                    path,
                )
        for record in run.summary.records:
            if record.get("nodule_hypotheses") == f"{folder}/{HYPOTHESES_FILE}":
                record["dicom_seg"] = record["hypotheses_seg"] = ""


def _write_nodule_reviews(run: _ExportRun, groups: Mapping[str, _NoduleGroups]) -> None:
    """Per nodule: ``strip_mNN.png`` for each sample m (its outline on each of the nodule's slices, in z order)
    and ``hypotheses.json``; the page shows the nodule as its hypotheses, each with its representative's strip.
    """
    _drop_outdated_segs(run, groups)
    for folder, members in _nodules(run.summary.records).items():
        images, samples = [], []
        for record in members:
            case_dir = run.out / record["folder"]
            hu, _ = _case_maps(case_dir, record, "image.nii.gz")
            maps, _ = _case_maps(case_dir, record, "samples.nii.gz")
            (i, j), (h, w) = record["grids"]["model"]["offset_in_crop"], record["grids"]["model"]["shape"]
            images.append(hu[i : i + h, j : j + w, 0])
            samples.append(maps)
        labels = [f"z {float(r.get('slice_z') or 0.0):.1f}" for r in members]
        names = []
        for m in range(min(s.shape[-1] for s in samples)):
            strip = [s[..., m] for s in samples]
            png = sample_strip_png(images, strip, labels, f"sample {m}", run.options.hu_window)
            run.files.write_if_changed(run.out / folder / f"strip_m{m:02d}.png", png)
            names.append(f"{folder}/strip_m{m:02d}.png")
        group = groups.get(folder)
        if group is not None:
            run.files.write_if_changed(run.out / folder / HYPOTHESES_FILE, json_bytes(group.payload))
        for record in members:
            record["strips"] = names
            record["strip_slices_z"] = [float(r.get("slice_z") or 0.0) for r in members]
            if group is not None:
                record["hypothesis_rows"] = [
                    {**row, "strip": f"{folder}/{row['strip']}"} for row in group.payload["hypotheses"]
                ]
                record["hypotheses_shared_noise"] = group.payload["shared_noise"]


def _export_settings(
    run: _ExportRun,
    previous: Mapping[str, Any] | None,
    origin: Mapping[str, Any],
    dicom_root: str | os.PathLike | None,
) -> dict[str, Any]:
    """The content of ``export.json``: the model, M, the seeds, the inputs, every command that wrote the folder."""
    series_uids = sorted({str(r.get("series_uid")) for r in run.summary.records if r.get("series_uid")})
    commands = list((previous or {}).get("commands", [])) if not run.options.overwrite else []
    command, roi_size = run.options.command, run.options.roi_size
    if command and command not in commands:
        commands.append(command)
    return {
        "car_med_version": car_med.__version__,
        "model": run.source.to_json(),
        "num_samples": int(run.options.num_samples),
        "seed": int(run.options.seed),
        **origin,
        "dicom_root": None if dicom_root is None else str(Path(dicom_root).resolve()),
        "commands": commands,
        "series_uids": sorted(set((previous or {}).get("series_uids", [])) | set(series_uids)),
        "ambiguity_score": AMBIGUITY_SCORE,
        "hypotheses": {
            **run.options.hypotheses.to_json(),
            "files": f"{HYPOTHESES_FILE} in every case folder (the crop's M samples) and nodule folder (the "
            f"nodule's M sample volumes); {HYPOTHESES_SEG}: one segment per hypothesis (its representative)",
            "grouping": GROUPING,
            "sample_numbering": SAMPLE_NUMBERING,
        },
        "grids": {
            "crop": "180x180 crop at 0.5 mm as preprocessing.lidc wrote it: image.nii.gz, annotations.nii.gz",
            "model": f"{roi_size[0]}x{roi_size[1]} model input centred in the crop (MONAI CenterSpatialCrop; each "
            "case.json gives the offset): samples, mean, calibration, entropy",
            "ct": "the source series' own voxel grid (as dcm2niix writes it): ct.nii.gz, *_ct.nii.gz",
        },
    }


def _write_queue(run: _ExportRun, settings: Mapping[str, Any]) -> None:
    """The review queue (``manifest.csv``, ``index.html``) and ``export.json``; then the staging folder goes."""
    run.files.write_if_changed(run.out / "manifest.csv", manifest_csv(run.summary.records))
    run.files.write_if_changed(run.out / "index.html", review_index_html(run.summary.records, settings))
    run.files.write_if_changed(run.out / EXPORT_RECORD, json_bytes(settings))
    run.files.finish()


def print_summary(summary: ExportSummary) -> int:
    """Print the summary line and every failed case (stderr); return the command's exit code."""
    print(summary.message())
    for case_id, error in summary.failed.items():
        print(f"failed: {case_id}: {error}", file=sys.stderr)
    return summary.exit_code


def raise_if_failed(summary: ExportSummary) -> None:
    """Fail (non-zero exit of ``monai.bundle run export``) when any case failed; the others are exported."""
    if summary.failed:
        listed = "; ".join(f"{case}: {error}" for case, error in list(summary.failed.items())[:5])
        raise RuntimeError(f"{len(summary.failed)} cases failed to export (see manifest.csv): {listed}")
