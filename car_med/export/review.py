"""The review queue: ``manifest.csv`` and a static ``index.html``, most ambiguous case first.

The page shows each nodule as its hypotheses (``hypotheses.json``), most probable first: the representative's
strip, a bar to the probability with its interval drawn as a whisker, the label and the member count; the M raw
sample strips sit one click away, in a ``<details>`` element. It needs no server and no internet resource.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MANIFEST_COLUMNS", "manifest_csv", "queue_order", "review_index_html"]

MANIFEST_COLUMNS = (
    "rank",
    "status",
    "ambiguity",
    "mean_entropy_in_union",
    "area_mean_mm2",
    "area_min_mm2",
    "area_max_mm2",
    "patient_id",
    "case_id",
    "folder",
    "series_uid",
    "sop_instance_uid",
    "nodule_id",
    "slice_index",
    "slice_z",
    "num_annotators",
    "case_index",
    "case_seed",
    "samples_ct",
    "dicom_seg",
    "hypotheses",
    "error",
)


def queue_order(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Exported cases by decreasing ambiguity (ties: patient, case id), then the failed ones."""
    done = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    done.sort(key=lambda r: (-float(r["ambiguity"]), str(r["patient_id"]), str(r["case_id"])))
    failed.sort(key=lambda r: (str(r.get("patient_id")), str(r.get("case_id"))))
    return [*done, *failed]


def manifest_csv(records: Sequence[Mapping[str, Any]]) -> bytes:
    """``manifest.csv``: one row per case in queue order; failed cases carry their error and no rank."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rank, record in enumerate(queue_order(records), start=1):
        row = {key: record.get(key, "") for key in MANIFEST_COLUMNS}
        row["rank"] = rank if record.get("status") == "ok" else ""
        row["hypotheses"] = "; ".join(record.get("hypotheses") or [])  # the crop's own, e.g. "H1 p=0.75 (...)"
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue().encode()


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; font-size: 13px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.thumb { width: 560px; height: auto; display: block; }
img.strip { height: 110px; width: auto; display: block; }
section.nodule { margin-bottom: 1.5em; }
table.hypotheses th.rank { font-size: 15px; }
div.bar { position: relative; width: 200px; height: 14px; background: #eee; border: 1px solid #999; }
div.bar div.fill { position: absolute; left: 0; top: 0; bottom: 0; background: #4a7bd0; }
div.bar div.whisker { position: absolute; top: 2px; height: 10px; box-sizing: border-box;
  border-left: 2px solid #111; border-right: 2px solid #111;
  background: linear-gradient(#111, #111) center / 100% 2px no-repeat; }
span.plabel { display: block; font-variant-numeric: tabular-nums; margin-top: 2px; }
p.warning { color: #a00; }
details.samples summary { cursor: pointer; color: #225; margin: 4px 0; }
tr.failed td { color: #a00; }
.missing { color: #a00; font-style: italic; }
"""

# Marks each thumbnail as loaded or broken once the browser has tried it, so a broken picture is shown as text
# (and a headless browser's DOM says which ones loaded).
_SCRIPT = """
for (const img of document.querySelectorAll('img.thumb, img.strip')) {
  const mark = () => {
    const ok = img.complete && img.naturalWidth > 0;
    img.dataset.loaded = ok ? 'yes' : 'no';
    if (!ok) { const note = document.createElement('span'); note.className = 'missing';
      note.textContent = 'montage missing'; img.replaceWith(note); note.dataset.broken = img.getAttribute('src'); }
  };
  if (img.complete) mark(); else { img.addEventListener('load', mark); img.addEventListener('error', mark); }
}
// Records where each probability bar and interval whisker were drawn, as fractions of the bar's width, so a
// headless browser's DOM can be checked against the numbers.
for (const bar of document.querySelectorAll('div.bar')) {
  const width = bar.clientWidth, fill = bar.querySelector('.fill'), whisker = bar.querySelector('.whisker');
  bar.dataset.drawnP = (fill.offsetWidth / width).toFixed(3);
  bar.dataset.drawnLow = (whisker.offsetLeft / width).toFixed(3);
  bar.dataset.drawnHigh = ((whisker.offsetLeft + whisker.offsetWidth) / width).toFixed(3);
}
"""


def _link(folder: str, name: str | None, label: str) -> str:
    if not name:
        return ""
    return f'<a href="{html.escape(folder)}/{html.escape(name)}">{html.escape(label)}</a>'


def _percent(value: float) -> str:
    return f"{100.0 * min(max(float(value), 0.0), 1.0):.3f}%"


def _hypothesis_rows(rows: Sequence[Mapping[str, Any]], num_samples: int, nodule: str) -> str:
    """One table row per hypothesis: rank, representative's strip, probability bar with its interval, members."""
    out = []
    for row in rows:
        p, (low, high) = float(row["probability"]), (float(v) for v in row["interval"])
        members = " ".join(str(m) for m in row["members"])
        listed = ", ".join(str(m) for m in row["members"])
        label = html.escape(str(row["label"]))
        what = "draws nothing" if row.get("no_lesion") else f"representative: sample {row['representative']}"
        out.append(
            f'<tr class="hypothesis" data-rank="{int(row["rank"])}" data-probability="{p:.6f}" '
            f'data-low="{low:.6f}" data-high="{high:.6f}" data-members="{members}" '
            f'data-representative="{int(row["representative"])}">'
            f'<th class="rank">H{int(row["rank"])}</th>'
            f'<td><img class="strip" src="{html.escape(str(row["strip"]))}" alt="hypothesis H{int(row["rank"])} '
            f'of nodule {html.escape(nodule)}: sample {int(row["representative"])}"></td>'
            f'<td><div class="bar" role="img" aria-label="{label}" title="{label}">'
            f'<div class="fill" style="width:{_percent(p)}"></div>'
            f'<div class="whisker" style="left:{_percent(low)};width:{_percent(high - low)}"></div></div>'
            f'<span class="plabel">{label}</span></td>'
            f'<td class="num members">{len(row["members"])} of {num_samples} samples<br>'
            f"<small>{html.escape(what)}; samples {html.escape(listed)}</small></td></tr>"
        )
    return "".join(out)


def _nodule_sections(records: Sequence[Mapping[str, Any]], confidence: float | None) -> str:
    """One section per nodule: its hypotheses, most probable first, then (one click away) its M samples as
    rows, each the sample on every slice in z order; nodules by decreasing mean ambiguity of their crops."""
    nodules: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("status") == "ok" and record.get("strips"):
            nodules.setdefault(str(record["strips"][0]).rsplit("/", 1)[0], []).append(record)
    ranked = sorted(nodules.items(), key=lambda kv: (-sum(float(r["ambiguity"]) for r in kv[1]) / len(kv[1]), kv[0]))
    sections = []
    for rank, (folder, members) in enumerate(ranked, start=1):
        first = members[0]
        nodule = str(first.get("nodule_id"))
        zs = " ".join(f"{z:.2f}" for z in first.get("strip_slices_z", []))
        score = sum(float(r["ambiguity"]) for r in members) / len(members)
        samples = "".join(
            f'<tr class="sample" data-sample="{m}"><th>{m}</th><td><img class="strip" src="{html.escape(name)}" '
            f'data-slices="{zs}" alt="sample {m} of nodule {html.escape(nodule)}"></td></tr>'
            for m, name in enumerate(first["strips"])
        )
        hypotheses = first.get("hypothesis_rows") or []
        body = ""
        if hypotheses:
            link = html.escape(str(first.get("nodule_hypotheses") or f"{folder}/hypotheses.json"))
            warning = (
                ""
                if first.get("hypotheses_shared_noise", True)
                else '<p class="warning">The slices were drawn apart (--independent-slices): a sample\'s volume joins '
                "unrelated draws, so these groups are not 3D outlines.</p>"
            )
            body = (
                f'{warning}<table class="hypotheses"><thead><tr><th></th><th>representative, slices left to right in '
                f"z</th><th>probability and {_confidence_text(confidence)} interval</th><th>samples</th></tr></thead>"
                f"<tbody>{_hypothesis_rows(hypotheses, len(first['strips']), nodule)}</tbody></table>"
                f'<p><a href="{link}">hypotheses.json</a></p>'
            )
        sections.append(
            f'<section class="nodule" data-nodule="{html.escape(folder)}" data-rank="{rank}">'
            f"<h3>{rank}. {html.escape(str(first.get('patient_id')))} nodule {html.escape(nodule)}"
            f" ({len(members)} slices, z {html.escape(zs)} mm; mean ambiguity {score:.3f};"
            f" {len(hypotheses)} hypotheses)</h3>{body}"
            f'<details class="samples"{"" if hypotheses else " open"}><summary>all {len(first["strips"])} samples, '
            f'one row each (sample m is strip_mNN.png)</summary><table class="strips"><tbody>{samples}</tbody>'
            "</table></details></section>"
        )
    if not sections:
        return ""
    return (
        "<h2>Nodules: each as its hypotheses, most probable first</h2>\n<p>A hypothesis is a group of samples "
        "whose every two members overlap with IoU &ge; min_iou; p is the share of the M samples it holds, the "
        "whisker its Wilson interval, and its row shows the representative sample (the member closest to the "
        "others) on every slice of the nodule, left to right in z. With the noise shared by a nodule's slices "
        "(the default), each sample is one 3D outline of the whole nodule.</p>\n" + "\n".join(sections)
    )


def _confidence_text(confidence: float | None) -> str:
    return "Wilson" if confidence is None else f"{100 * confidence:g}% Wilson"


def _failed_row(record: Mapping[str, Any]) -> str:
    return (
        f'<tr class="failed" data-case="{html.escape(str(record.get("case_id")))}"><td></td><td></td>'
        f"<td>{html.escape(str(record.get('patient_id')))}<br>{html.escape(str(record.get('case_id')))}</td>"
        f'<td colspan="5">failed: {html.escape(str(record.get("error", "")))}</td></tr>'
    )


def _case_links(record: Mapping[str, Any], folder: str) -> str:
    """Links to a case's crop-grid and model-grid files, its CT-grid files and SEGs, and its hypotheses."""
    files = record.get("files", {})
    links = " ".join(
        _link(folder, files.get(name), name.split(".")[0])
        for name in ("image.nii.gz", "samples.nii.gz", "mean.nii.gz", "calibration.nii.gz", "entropy.nii.gz")
    )
    links += " " + _link(folder, files.get("annotations.nii.gz"), "annotations")
    for key, label in (("samples_ct", "samples on CT"), ("mean_ct", "mean on CT"), ("ct", "CT")):
        if record.get(key):
            links += " " + f'<a href="{html.escape(str(record[key]))}">{label}</a>'
    if record.get("dicom_seg"):
        links += " " + f'<a href="{html.escape(str(record["dicom_seg"]))}">DICOM SEG</a>'
    if record.get("hypotheses_seg"):
        links += " " + f'<a href="{html.escape(str(record["hypotheses_seg"]))}">hypotheses SEG</a>'
    return links + " " + _link(folder, files.get("hypotheses.json"), "hypotheses")


def _case_row(rank: int, record: Mapping[str, Any]) -> str:
    """One queue row: rank, montage, ids, ambiguity, sample areas, entropy, the slice's hypotheses, links."""
    if record.get("status") != "ok":
        return _failed_row(record)
    folder = str(record.get("folder", ""))
    links = _case_links(record, folder)
    crop_hypotheses = "<br>".join(html.escape(str(label)) for label in record.get("hypotheses") or [])
    areas = ", ".join(f"{a:.0f}" for a in record.get("sample_areas_mm2", []))
    return (
        f'<tr data-case="{html.escape(str(record["case_id"]))}" data-score="{record["ambiguity"]:.6f}">'
        f'<td class="num">{rank}</td>'
        f'<td><a href="{html.escape(folder)}/montage.png"><img class="thumb" '
        f'src="{html.escape(folder)}/montage.png" alt="montage of {html.escape(str(record["case_id"]))}"></a></td>'
        f"<td>{html.escape(str(record['patient_id']))}<br>{html.escape(str(record['case_id']))}</td>"
        f'<td class="num">{record["ambiguity"]:.3f}</td>'
        f'<td class="num">{record["area_mean_mm2"]:.1f} ({record["area_min_mm2"]:.1f} to '
        f"{record['area_max_mm2']:.1f})<br><small>{areas}</small></td>"
        f'<td class="num">{record.get("mean_entropy_in_union", 0.0):.3f}</td>'
        f"<td><small>{crop_hypotheses}</small></td>"
        f"<td>{links}</td></tr>"
    )


def _page_header(settings: Mapping[str, Any], done: int, failed: int) -> str:
    """The paragraph under the title: model, M, seed, counts, the score, and the hypotheses' settings."""
    model = settings.get("model", {})
    grouping = settings.get("hypotheses") or {}
    version = f" version {model.get('version')}" if model.get("version") is not None else ""
    return (
        f"<p>Model <code>{html.escape(str(model.get('uri', '')))}</code>{html.escape(version)}; "
        f"{int(settings.get('num_samples', 0))} samples per case, seed {int(settings.get('seed', 0))}. "
        f"{done} cases exported, {failed} failed. Most ambiguous first: the score is the "
        "mean pairwise 1 - IoU between the samples (0: all samples agree)."
        + (
            f" Hypotheses: min_iou {float(grouping['min_iou']):g}, {_confidence_text(grouping.get('confidence'))} "
            "intervals; samples are numbered from 0, as in the file names."
            if "min_iou" in grouping
            else ""
        )
        + "</p>"
    )


def review_index_html(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> bytes:
    """The static review page (no server, relative links), cases in queue order.

    Args:
        records: the case records.
        settings: model URI and version, M and seed, shown in the header.
    """
    ordered = queue_order(records)
    done = sum(1 for r in ordered if r.get("status") == "ok")
    rows = [_case_row(rank, record) for rank, record in enumerate(ordered, start=1)]
    grouping = settings.get("hypotheses") or {}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>CAR review queue</title><style>{_STYLE}</style></head>
<body><h1>CAR review queue</h1>
{_page_header(settings, done, len(ordered) - done)}
{_nodule_sections(records, grouping.get("confidence"))}
<h2>Crops, most ambiguous first</h2>
<table id="queue"><thead><tr><th>#</th><th>montage</th><th>patient / case</th><th>ambiguity</th>
<th>sample area mm&sup2; mean (min to max)</th><th>mean entropy in samples (nats)</th><th>hypotheses of the slice</th>
<th>files</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
    return page.encode()
