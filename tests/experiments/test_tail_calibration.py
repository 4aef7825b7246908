"""The 2D calibration check, short: CAR draws a hidden tail whole and about as often as annotators do; the
cGAN+L_ce baseline, trained the same way, gives soft, undecided outputs (car_med.experiments.tail_calibration).

A smaller problem than the docs/core.md run (24x24 images, batch 8, M=6, 2000 stage-2 iterations: about 3
minutes on 2 CPU cores), so the tolerances are wide; the long run's numbers are in docs/core.md.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import pytest
import torch

from car_med.data.ambiguous_tail import AmbiguousTailDataset
from car_med.experiments.tail_calibration import TailCheckConfig, mode_iou, run_tail_check, tail_hypotheses

SHORT = TailCheckConfig(
    size=24,
    radius=3.0,
    tail_length=5,
    tail_width=3,
    num_train_images=64,
    num_test_images=16,
    f_iterations=600,
    g_iterations=2000,
    batch_size=8,
    num_samples=6,
    g_learning_rate=1e-3,
    d_learning_rate=1e-3,
    lambda_cal=5.0,
    r1_gamma=1.0,
    eval_samples=16,
    variants=("CAR", "cGAN+L_ce"),
)


@pytest.fixture(scope="module")
def short_check():
    """Both variants, each in its own process on one thread: they share nothing but F, which each process trains
    from the same seed, and each variant reseeds before its G/D training: the training of one sequential run (up
    to float rounding on another thread count), in 90 s instead of 155 s on 2 cores."""
    spawn = multiprocessing.get_context("spawn")  # a fork would copy this process's OpenMP thread pool
    with ProcessPoolExecutor(2, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        runs = [pool.submit(run_tail_check, replace(SHORT, variants=(name,))) for name in SHORT.variants]
        parts = [run.result() for run in runs]
    results = {name: part[0][name] for name, part in zip(SHORT.variants, parts)}
    samples = {name: part[1][name] for name, part in zip(SHORT.variants, parts)}
    return results, samples, parts[0][2]


@pytest.mark.slow
def test_car_samples_the_hidden_tail_whole_and_at_about_its_probability(short_check):
    car = short_check[0]["CAR"]
    # F itself learns the tail's probability (0.3) up to the blur of a small CNN at the tail's far end
    assert 0.18 <= car["f_tail_probability"] <= 0.36
    assert car["disc_recall"] >= 0.95 and car["background_false_positive"] <= 0.01
    # samples draw the whole tail in about 0.3 of cases (true: 0.3), seldom a fragment of it
    assert 0.1 <= car["tail_frequency"] <= 0.5
    assert car["partial_share"] <= 0.3
    # G's mean follows F on the tail (L_cal) and G has decided nearly every tail pixel (L_adv)
    assert car["mean_vs_f_tail"] <= 0.15
    assert car["undecided_tail_probabilities"] <= 0.25


@pytest.mark.slow
def test_the_cross_entropy_baseline_does_measurably_worse(short_check):
    car, baseline = short_check[0]["CAR"], short_check[0]["cGAN+L_ce"]
    # CE pulls every sample towards the per-pixel label frequency: soft, undecided tail probabilities
    assert baseline["undecided_tail_probabilities"] >= 2 * car["undecided_tail_probabilities"]
    assert baseline["undecided_tail_probabilities"] >= 0.4
    # and more of its hard samples hold a fragment of the tail than CAR's
    assert baseline["partial_share"] > car["partial_share"]


@pytest.mark.slow
def test_samples_are_returned_per_variant_for_the_figure(short_check):
    _, samples, test = short_check
    assert set(samples) == {"CAR", "cGAN+L_ce"}
    assert samples["CAR"].shape == (SHORT.num_test_images, SHORT.eval_samples, SHORT.size, SHORT.size)
    assert len(test) == SHORT.num_test_images


@pytest.mark.slow
def test_car_hypotheses_partition_each_images_samples_and_find_the_tail(short_check):
    _, samples, test = short_check
    batch = test.batch()
    between = (mode_iou(batch["tail"], batch["disc"]) + 1) / 2
    out = tail_hypotheses(samples["CAR"], batch["tail"], true_probability=0.3, min_iou=between)
    assert out["max_partition_error"] < 1e-12
    assert 0.1 <= out["tail_probability"] <= 0.5
    assert 1 <= out["hypotheses_per_image"] <= SHORT.eval_samples


def test_tail_hypotheses_count_the_mass_whose_representative_draws_the_tail():
    data = AmbiguousTailDataset(2, 24, 0.3, seed=0, radius=3.0, tail_length=5, tail_width=3)
    batch = data.batch()
    disc, tail = batch["disc"], batch["tail"]
    # image 0: 3 of 10 samples draw disc + tail, 7 the disc; image 1: 5 of 10 draw it, 4 the disc, 1 a far speck
    samples = disc[:, None].repeat(1, 10, 1, 1).long()
    samples[0, :3] |= tail[0].long()
    samples[1, :5] |= tail[1].long()
    samples[1, 9] = 0
    samples[1, 9, 0, 0] = 1
    assert mode_iou(tail, disc) == pytest.approx(
        min(float(disc[i].sum() / (disc[i] | tail[i]).sum()) for i in range(2))
    )
    out = tail_hypotheses(samples, tail, true_probability=0.3, min_iou=(mode_iou(tail, disc) + 1) / 2)
    assert out["tail_probability"] == pytest.approx((0.3 + 0.5) / 2)
    assert out["hypotheses_per_image"] == pytest.approx((2 + 3) / 2)
    assert out["fragment_mass"] == pytest.approx((0 + 0.1) / 2)
    assert out["max_partition_error"] == 0.0
    # 0.3 lies in the Wilson interval of 3/10 and of 5/10 (0.24..0.76)
    assert out["interval_coverage"] == 1.0
    # below the modes' IoU the disc and disc + tail merge: the tail is no longer a hypothesis of its own
    merged = tail_hypotheses(samples, tail, true_probability=0.3, min_iou=mode_iou(tail, disc) / 2)
    assert merged["hypotheses_per_image"] < out["hypotheses_per_image"]
