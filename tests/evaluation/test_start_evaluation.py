"""How every evaluation starts: the split read, the checkpoint loaded, the sampler built from its own arguments."""

from __future__ import annotations

import pytest
import torch
from tiny_car import make_tiny_nets

from car_med.evaluation.report_files import start_evaluation


def _arguments(tmp_path, f, g, **extra) -> dict:
    return {
        "calibration_network": f,
        "refinement_network": g,
        "datalist": tmp_path / "datalist.json",
        "split": "test",
        "output_dir": tmp_path / "out" / "test",
        "checkpoint": None,
        "device": "cpu",
        "max_cases": None,
        "progress": False,  # an argument start_evaluation has no use for is left alone
        **extra,
    }


def test_the_sampler_gets_the_evaluations_own_sampler_options_and_the_checkpoint_weights(tmp_path):
    f, g, _ = make_tiny_nets(seed=0)
    trained_f, trained_g, _ = make_tiny_nets(seed=1)
    checkpoint = tmp_path / "stage2.pt"
    torch.save(
        {"calibration_network": trained_f.state_dict(), "refinement_network": trained_g.state_dict()}, checkpoint
    )
    items = [{"image": f"case{i}.nii.gz"} for i in range(5)]
    read = []

    def read_split(datalist, split):
        read.append((datalist, split))
        return items

    arguments = _arguments(
        tmp_path, f, g, checkpoint=checkpoint, max_cases=3, num_samples=6, max_batch=5, noise_std=0.5,
        min_component_size=4,
    )  # fmt: skip
    out, cases, sampler = start_evaluation(arguments, read_split)

    assert read == [(tmp_path / "datalist.json", "test")]
    assert out == tmp_path / "out" / "test" and out.is_dir()
    assert [case["case_index"] for case in cases] == [0, 1, 2]
    assert [case["image"] for case in cases] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert (sampler.num_samples, sampler.max_batch, sampler.noise_std, sampler.min_component_size) == (6, 5, 0.5, 4)
    assert sampler.calibration_network is f and sampler.refinement_network is g
    for network, trained in ((f, trained_f), (g, trained_g)):
        for name, value in trained.state_dict().items():
            assert torch.equal(network.state_dict()[name], value), name


def test_options_an_evaluation_does_not_take_keep_the_samplers_defaults(tmp_path):
    f, g, _ = make_tiny_nets()
    _, _, sampler = start_evaluation(_arguments(tmp_path, f, g, max_batch=7), lambda datalist, split: [{"x": 1}])
    assert (sampler.num_samples, sampler.max_batch, sampler.noise_std, sampler.min_component_size) == (16, 7, 1.0, 0)


def test_a_split_without_cases_is_refused_by_name(tmp_path):
    f, g, _ = make_tiny_nets()
    with pytest.raises(ValueError, match=r"datalist.json: split 'test' has no cases to evaluate"):
        start_evaluation(_arguments(tmp_path, f, g), lambda datalist, split: [])
