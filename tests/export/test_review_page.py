"""index.html in a real headless Chromium: cases in score order, every thumbnail loaded, each nodule as its
hypotheses with their probability bars drawn to the numbers in hypotheses.json."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from export_cohort import NUM_SAMPLES

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=5000",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on PATH (Debian package chromium; .ci/run installs it)")


def test_index_html_lists_cases_by_score_with_every_thumbnail_loaded(exported, tmp_path):
    browser = _chromium()
    page = (exported["dir"] / "index.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, *profile, "--dump-dom", page], capture_output=True, text=True, timeout=120
    ).stdout
    rows = re.findall(r'<tr data-case="([^"]+)" data-score="([0-9.]+)">', dom)
    with open(exported["dir"] / "manifest.csv") as handle:
        manifest = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    assert [case for case, _ in rows] == [r["case_id"] for r in manifest]
    scores = [float(score) for _, score in rows]
    assert scores == sorted(scores, reverse=True) and len(rows) > 1
    images = re.findall(r'<img class="thumb"[^>]*>', dom)
    assert len(images) == len(rows)
    # the page's script marks each thumbnail once the browser has decoded it (or replaces it when broken)
    assert all('data-loaded="yes"' in tag for tag in images), images[:3]
    assert '<span class="missing"' not in dom
    screenshot = tmp_path / "index.png"
    subprocess.run(
        [browser, *CHROMIUM_FLAGS, *profile, "--window-size=1400,900", f"--screenshot={screenshot}", page],
        capture_output=True,
        timeout=120,
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_montage_shows_as_missing_not_as_a_broken_image(exported, tmp_path):
    browser = _chromium()
    copy = tmp_path / "exp"
    shutil.copytree(exported["dir"], copy)
    victim = sorted(copy.glob("*/*/montage.png"))[0]
    victim.unlink()
    dom = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            (copy / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count('<span class="missing"') == 1
    assert victim.relative_to(copy).as_posix() in dom


def test_each_nodule_is_a_strip_per_sample_with_its_slices_in_z_order(exported, tmp_path):
    browser = _chromium()
    page = (exported["dir"] / "index.html").as_uri()
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, "--user-data-dir=" + str(tmp_path / "p"), "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    sections = re.findall(r'<section class="nodule" data-nodule="([^"]+)" data-rank="(\d+)">(.*?)</section>', dom, re.S)
    records = [json.loads(p.read_text()) for p in exported["dir"].glob("*/*/case.json")]
    nodules = {(r["patient_id"], str(r["series_uid"]), str(r["nodule_id"])) for r in records}
    assert len(sections) == len(nodules) and [int(rank) for _, rank, _ in sections] == list(range(1, len(nodules) + 1))
    for folder, _, body in sections:
        assert '<details class="samples">' in body  # the raw samples are one click away
        strips = re.findall(r"<tr class=\"sample\" data-sample=\"(\d+)\">.*?(<img [^>]*>)", body, re.S)
        assert [int(m) for m, _ in strips] == list(range(NUM_SAMPLES))  # one row per sample, one 3D hypothesis each
        for _, tag in strips:
            assert 'data-loaded="yes"' in tag, tag  # decoded by the browser
            zs = [float(z) for z in re.search(r'data-slices="([^"]*)"', tag).group(1).split()]
            assert zs == sorted(zs)
        members = [r for r in records if f"nodule_{r['nodule_id']}" in folder and r["patient_id"] in folder]
        assert len(zs) == len(members)  # every slice of the nodule is in its strip


def _dom(browser: str, page: str, profile: Path) -> str:
    return subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def test_each_nodule_shows_its_hypotheses_most_probable_first_with_bars_drawn_to_their_probabilities(
    exported, tmp_path
):
    browser = _chromium()
    dom = _dom(browser, (exported["dir"] / "index.html").as_uri(), tmp_path / "p")
    sections = re.findall(r'<section class="nodule" data-nodule="([^"]+)" data-rank="\d+">(.*?)</section>', dom, re.S)
    assert sections
    for folder, body in sections:
        expected = json.loads((exported["dir"] / folder / "hypotheses.json").read_text())["hypotheses"]
        before_samples = body.split('<details class="samples"')[0]  # the hypotheses come first, the samples below
        rows = re.findall(r'<tr class="hypothesis" (.*?)</tr>', before_samples, re.S)
        assert len(rows) == len(expected) > 0
        shown = []
        for row, hypothesis in zip(rows, expected):
            attributes = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', row))
            assert int(attributes["rank"]) == hypothesis["rank"]
            assert float(attributes["probability"]) == pytest.approx(hypothesis["probability"], abs=1e-6)
            assert [int(m) for m in attributes["members"].split()] == hypothesis["members"]
            # the label with p and its interval, and the member count, as text on the page
            assert f'<span class="plabel">{hypothesis["label"]}</span>' in row
            assert f"{len(hypothesis['members'])} of {NUM_SAMPLES} samples" in row
            # the representative's strip, decoded by the browser
            [image] = re.findall(r'<img class="strip"[^>]*>', row)
            assert f'src="{folder}/strip_m{hypothesis["representative"]:02d}.png"' in image
            assert 'data-loaded="yes"' in image, image
            # where Chromium drew the bar and the whisker, as fractions of the bar's width
            low, high = hypothesis["interval"]
            assert float(attributes["drawn-p"]) == pytest.approx(hypothesis["probability"], abs=0.01)
            assert float(attributes["drawn-low"]) == pytest.approx(low, abs=0.01)
            assert float(attributes["drawn-high"]) == pytest.approx(high, abs=0.01)
            shown.append(float(attributes["probability"]))
        assert shown == sorted(shown, reverse=True)  # most probable first
