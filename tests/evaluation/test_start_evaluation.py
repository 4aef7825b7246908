"""How every evaluation starts: the split read, the checkpoint loaded, the sampler built from explicit options."""

from __future__ import annotations

import pytest
import torch
from tiny_car import make_tiny_nets

from car_med.evaluation.start import DEFAULT_EVALUATION_SAMPLER, start_evaluation
from car_med.sampling import CARSampler, SamplerOptions


def _start(tmp_path, f, g, read_split, **changes):
    arguments = {
        "datalist": tmp_path / "datalist.json",
        "split": "test",
        "read_split": read_split,
        "output_dir": tmp_path / "out" / "test",
        "checkpoint": None,
        "device": "cpu",
        "max_cases": None,
        "sampler_options": DEFAULT_EVALUATION_SAMPLER,
        **changes,
    }
    return start_evaluation(f, g, **arguments)


def test_the_sampler_gets_the_given_options_and_the_checkpoint_weights(tmp_path):
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

    options = SamplerOptions(num_samples=6, max_batch=5, noise_std=0.5, min_component_size=4)
    out, cases, sampler = _start(
        tmp_path, f, g, read_split, checkpoint=checkpoint, max_cases=3, sampler_options=options
    )

    assert read == [(tmp_path / "datalist.json", "test")]
    assert out == tmp_path / "out" / "test" and out.is_dir()
    assert [case["case_index"] for case in cases] == [0, 1, 2]
    assert [case["image"] for case in cases] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert (sampler.num_samples, sampler.max_batch, sampler.noise_std, sampler.min_component_size) == (6, 5, 0.5, 4)
    assert sampler.calibration_network is f and sampler.refinement_network is g
    for network, trained in ((f, trained_f), (g, trained_g)):
        for name, value in trained.state_dict().items():
            assert torch.equal(network.state_dict()[name], value), name


def test_default_sampler_options_are_the_samplers_own_defaults_but_an_evaluations_batch():
    f, g, _ = make_tiny_nets()
    plain = CARSampler(f, g)
    built = SamplerOptions().sampler(f, g)
    for name in ("num_samples", "max_batch", "noise_std", "min_component_size"):
        assert getattr(built, name) == getattr(plain, name), name
    assert SamplerOptions(max_batch=32) == DEFAULT_EVALUATION_SAMPLER


def test_a_renamed_option_fails_loudly_instead_of_falling_back_to_a_default(tmp_path):
    f, g, _ = make_tiny_nets()
    with pytest.raises(TypeError, match="noise_sd"):
        SamplerOptions(noise_sd=0.5)
    with pytest.raises(TypeError, match="noise_std"):
        _start(tmp_path, f, g, lambda datalist, split: [{"x": 1}], noise_std=0.5)
    with pytest.raises(TypeError, match="sampler_options"):
        start_evaluation(
            f, g, datalist="d.json", split="test", read_split=lambda d, s: [{"x": 1}], output_dir=tmp_path,
            checkpoint=None, device="cpu", max_cases=None,
        )  # fmt: skip
    with pytest.raises(AttributeError):  # frozen: an option cannot be changed after the caller built it
        DEFAULT_EVALUATION_SAMPLER.noise_std = 0.5


def test_a_split_without_cases_is_refused_by_name(tmp_path):
    f, g, _ = make_tiny_nets()
    with pytest.raises(ValueError, match=r"datalist.json: split 'test' has no cases to evaluate"):
        _start(tmp_path, f, g, lambda datalist, split: [])
