"""The metric classes inside MONAI: buffering, reductions, decollated lists, ignite handlers, an evaluator and DDP."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine
from metrics_reference import MULTI_CLASSES, MULTI_IGNORE, make_maps
from monai.data import decollate_batch
from monai.engines import SupervisedEvaluator
from monai.handlers import IgniteMetricHandler, from_engine

from car_med.metrics import (
    ExpectedCalibrationError,
    GeneralizedEnergyDistance,
    HungarianMatchedIoU,
    SampleDiversity,
    expected_calibration_error,
    generalized_energy_distance,
    hungarian_matched_iou,
    sample_diversity,
)


def _batches(seed=0, n_batches=3, batch=2, n=8, r=4, spatial=(6, 6), multiclass=False):
    return [make_maps(seed + i, batch, n, r, spatial, multiclass) for i in range(n_batches)]


def test_metric_classes_buffer_per_image_values_and_reduce():
    batches = _batches(multiclass=True)
    kw = dict(classes=MULTI_CLASSES, ignore_index=MULTI_IGNORE)
    ged = GeneralizedEnergyDistance(**kw)
    hm = HungarianMatchedIoU(**kw)
    div = SampleDiversity(**kw)
    for s, y in batches:
        out = ged(y_pred=s, y=y)
        assert out.shape == (2,)  # a batch-first tensor is computed per image, not decollated
        hm(y_pred=s, y=y)
        div(y_pred=s, y=y)
    all_s = torch.cat([s for s, _ in batches])
    all_y = torch.cat([y for _, y in batches])
    per_image = generalized_energy_distance(all_s, all_y, **kw)
    torch.testing.assert_close(ged.aggregate("none"), per_image)
    torch.testing.assert_close(ged.aggregate(), per_image.mean())
    torch.testing.assert_close(ged.aggregate("sum"), per_image.sum())
    torch.testing.assert_close(hm.aggregate(), hungarian_matched_iou(all_s, all_y, **kw).mean())
    torch.testing.assert_close(div.aggregate(), sample_diversity(all_s, all_y, **kw).mean())
    assert len(ged) == 6
    ged.reset()
    with pytest.raises(ValueError, match="before any batch"):
        ged.aggregate()


def test_decollated_lists_and_per_call_label_weights():
    s, y = make_maps(3, 3, 8, 4, (5, 5), multiclass=False)
    metric = GeneralizedEnergyDistance(reduction="none")
    metric(y_pred=decollate_batch(s), y=decollate_batch(y))
    torch.testing.assert_close(metric.aggregate(), generalized_energy_distance(s, y))

    w = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    fixed = GeneralizedEnergyDistance(label_weights=w, reduction="none")
    fixed(y_pred=s, y=y)
    per_call = GeneralizedEnergyDistance(reduction="none")
    per_call(y_pred=s, y=y, label_weights=w.expand(3, 4))
    expected = generalized_energy_distance(s, y, label_weights=w)
    torch.testing.assert_close(fixed.aggregate(), expected)
    torch.testing.assert_close(per_call.aggregate(), expected)


def test_ignite_metric_handlers_on_an_engine():
    batches = _batches(seed=10, n=8)
    torch.manual_seed(0)
    prob_batches = [torch.softmax(2 * torch.randn(2, 2, 6, 6), dim=1) for _ in batches]

    def step(engine, batch):
        (s, y), p = batch
        return {"pred": s, "label": y, "probs": p, "target": y[:, 0]}

    engine = Engine(step)
    samples_and_labels = from_engine(["pred", "label"])
    IgniteMetricHandler(GeneralizedEnergyDistance(), output_transform=samples_and_labels).attach(engine, "ged")
    IgniteMetricHandler(HungarianMatchedIoU(), output_transform=samples_and_labels).attach(engine, "hm_iou")
    probs_and_target = from_engine(["probs", "target"])
    IgniteMetricHandler(ExpectedCalibrationError(), output_transform=probs_and_target).attach(engine, "ece")
    engine.run(list(zip(batches, prob_batches)), max_epochs=1)

    all_s = torch.cat([s for s, _ in batches])
    all_y = torch.cat([y for _, y in batches])
    assert engine.state.metrics["ged"] == pytest.approx(float(generalized_energy_distance(all_s, all_y).mean()))
    assert engine.state.metrics["hm_iou"] == pytest.approx(float(hungarian_matched_iou(all_s, all_y).mean()))
    ece, _ = expected_calibration_error(torch.cat(prob_batches), all_y[:, 0])
    assert engine.state.metrics["ece"] == pytest.approx(float(ece))
    assert engine.state.metric_details["ged"].shape == (6,)


def test_plugs_into_a_monai_supervised_evaluator():
    batches = _batches(seed=20, n=8)
    data = [{"image": s, "label": y} for s, y in batches]
    # the "network" passes the hard samples through, so the evaluator's output holds them as `pred`
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        epoch_length=len(data),
        network=torch.nn.Identity(),
        key_val_metric={
            "val_ged": IgniteMetricHandler(GeneralizedEnergyDistance(), output_transform=from_engine(["pred", "label"]))
        },
        additional_metrics={
            "val_hm_iou": IgniteMetricHandler(HungarianMatchedIoU(), output_transform=from_engine(["pred", "label"]))
        },
    )
    evaluator.run()
    all_s = torch.cat([s for s, _ in batches])
    all_y = torch.cat([y for _, y in batches])
    assert evaluator.state.metrics["val_ged"] == pytest.approx(float(generalized_energy_distance(all_s, all_y).mean()))
    assert evaluator.state.metrics["val_hm_iou"] == pytest.approx(float(hungarian_matched_iou(all_s, all_y).mean()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    # a forked child must not reuse the parent's intra-op thread pool (the same reason DataLoader workers do this)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, y = make_maps(0, 5, 8, 4, (6, 6), multiclass=False)
        probs = torch.softmax(torch.from_numpy(np.random.default_rng(0).normal(size=(5, 2, 6, 6))), dim=1)
        # uneven shards (3 and 2 images) exercise the padding in MONAI's all-gather
        part = slice(0, 3) if rank == 0 else slice(3, 5)
        ged = GeneralizedEnergyDistance(reduction="none")
        ece = ExpectedCalibrationError()
        ged(y_pred=s[part], y=y[part])
        ece(y_pred=probs[part], y=y[part, 0])
        queue.put((rank, ged.aggregate().numpy(), float(ece.aggregate())))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_are_gathered_by_the_base_class():
    # fork: the children reuse the parent's imports; spawn would re-import torch and MONAI in each rank
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the 2-rank gloo workers did not finish within 120 s")
    results = [queue.get() for _ in range(2)]
    s, y = make_maps(0, 5, 8, 4, (6, 6), multiclass=False)
    probs = torch.softmax(torch.from_numpy(np.random.default_rng(0).normal(size=(5, 2, 6, 6))), dim=1)
    expected_ged = generalized_energy_distance(s, y).numpy()
    expected_ece = float(expected_calibration_error(probs, y[:, 0])[0])
    for _, ged, ece in results:
        np.testing.assert_allclose(ged, expected_ged, atol=1e-12)
        assert ece == pytest.approx(expected_ece, abs=1e-12)


def test_metric_handlers_build_from_a_bundle_config():
    from monai.bundle import ConfigParser

    config = {
        "val_metrics": {
            "ged": {
                "_target_": "monai.handlers.IgniteMetricHandler",
                "metric_fn": {
                    "_target_": "car_med.metrics.GeneralizedEnergyDistance",
                    "classes": "$car_med.metrics.CITYSCAPES_SWITCHABLE_CLASSES",
                    "ignore_index": "$car_med.metrics.CITYSCAPES_IGNORE_INDEX",
                    "label_weights": "$car_med.metrics.stochastic_mode_weights()",
                },
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            },
            "ece": {
                "_target_": "monai.handlers.IgniteMetricHandler",
                "metric_fn": {"_target_": "car_med.metrics.ExpectedCalibrationError", "n_bins": 10, "ignore_index": 24},
                "output_transform": "$monai.handlers.from_engine(['probs', 'target'])",
            },
        },
        "imports": ["$import car_med", "$import car_med.metrics"],
    }
    parser = ConfigParser(config)
    parser.get_parsed_content("imports")  # as a bundle workflow does before anything else
    handlers = parser.get_parsed_content("val_metrics")
    assert isinstance(handlers["ged"], IgniteMetricHandler)
    assert isinstance(handlers["ged"].metric_fn, GeneralizedEnergyDistance)
    assert handlers["ged"].metric_fn.label_weights.shape == (32,)
    assert isinstance(handlers["ece"].metric_fn, ExpectedCalibrationError)
