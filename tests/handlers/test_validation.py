"""SampleValidation during stage 2: when it scores, that its numbers are a one-process evaluation's, and that the
best checkpoint holds the weights of the best validation, also across a resumed run."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import RecordingMLflowHandler, weight_moving_engine
from tiny_car import ambiguous_discs, make_tiny_nets
from torch.utils.data import DataLoader

from car_med.evaluation.sample_metrics import SampleMetricSuite, evaluate_samples, with_case_index
from car_med.handlers import SampleValidation
from car_med.sampling import CARSampler

NUM_SAMPLES = 4  # a multiple of the two readers, as HM-IoU needs
SEED = 5


def _validation_loader() -> DataLoader:
    items = [{"image": item["image"], "label": item["labels"]} for item in ambiguous_discs(6, seed=1)]
    return DataLoader(with_case_index(items), batch_size=4)


def _validation(f, g, **kwargs) -> SampleValidation:
    kwargs.setdefault("interval", 2)
    kwargs.setdefault("key_metric", "ged4")
    return SampleValidation(f, g, _validation_loader(), num_samples=NUM_SAMPLES, seed=SEED, **kwargs)


def test_validates_every_interval_and_at_the_end_and_reports_everywhere(tmp_path):
    f, g, _ = make_tiny_nets()
    engine, _ = weight_moving_engine(g)
    mlflow = RecordingMLflowHandler()
    validation = _validation(
        f,
        g,
        mlflow_handler=mlflow,
        history_file=tmp_path / "validation.json",
        montage_dir=tmp_path / "montages",
        montage_cases=1,
    )
    validation.attach(engine)
    engine.run(range(5), max_epochs=1)

    assert [entry["iteration"] for entry in validation.history] == [2, 4, 5]
    names = ["ged4", "hm_iou4", "diversity4", "presence_gap", "speckle", "ece"]
    assert set(validation.history[-1]) == {"iteration", *names}
    for name in names:
        assert engine.state.metrics[f"val_{name}"] == validation.history[-1][name]
    # the reference rows on the same cases: the majority vote draws one outline, the readers' oracle both
    assert engine.state.metrics["val_ref_majority_vote_diversity4"] == 0.0
    assert engine.state.metrics["val_ref_readers_oracle_diversity4"] > 0.0
    assert set(validation.reference_metrics) == {"readers_oracle", "majority_vote", "f_threshold", "f_bernoulli"}

    summary = json.loads((tmp_path / "validation.json").read_text())
    assert summary["history"] == validation.history and summary["last"] == validation.history[-1]
    assert summary["key_metric"] == "ged4" and summary["best"] == validation.best
    assert sorted(p.name for p in (tmp_path / "montages").iterdir()) == [
        "validation_0000002.png",
        "validation_0000004.png",
        "validation_0000005.png",
    ]
    steps = {(key, step) for _, key, _, step in mlflow.metrics}
    assert {("val_ged4", 2), ("val_hm_iou4", 4), ("val_ece", 5), ("val_ref_majority_vote_ged4", 5)} <= steps
    assert len(mlflow.artifacts) == 3 and {a[2] for a in mlflow.artifacts} == {"validation_montages"}


def test_a_run_that_ends_on_an_interval_is_not_validated_twice():
    f, g, _ = make_tiny_nets()
    engine, _ = weight_moving_engine(g)
    validation = _validation(f, g, reference_rows=())
    validation.attach(engine)
    engine.run(range(4), max_epochs=1)
    assert [entry["iteration"] for entry in validation.history] == [2, 4]
    assert validation.reference_metrics == {}
    assert not any(key.startswith("val_ref_") for key in engine.state.metrics)


def test_the_numbers_are_a_one_process_evaluation_of_the_same_weights():
    f, g, _ = make_tiny_nets()
    engine, _ = weight_moving_engine(g)
    validation = _validation(f, g, interval=3, reference_rows=())
    validation.attach(engine)
    engine.run(range(3), max_epochs=1)
    suite = SampleMetricSuite(ged_counts=(NUM_SAMPLES,), hm_iou_counts=(NUM_SAMPLES,), diversity_count=NUM_SAMPLES)
    evaluated = evaluate_samples(CARSampler(f, g, NUM_SAMPLES), _validation_loader(), suite, SEED)
    (entry,) = validation.history
    assert {k: v for k, v in entry.items() if k != "iteration"} == pytest.approx(evaluated, abs=1e-12)
    # another seed draws other samples: the seed is the handler's, not the loader's
    other = evaluate_samples(CARSampler(f, g, NUM_SAMPLES), _validation_loader(), suite, SEED + 1)
    assert other["ged4"] != entry["ged4"]


@pytest.mark.parametrize(("key_metric", "pick"), [("ged4", min), ("hm_iou4", max)])
def test_the_best_checkpoint_holds_the_weights_of_the_best_validation(tmp_path, key_metric, pick):
    f, g, _ = make_tiny_nets()
    engine, weights = weight_moving_engine(g)
    best_path = tmp_path / "best.pt"
    validation = _validation(
        f, g, interval=1, key_metric=key_metric, save_dict={"refinement_network": g}, best_checkpoint=best_path
    )
    validation.attach(engine)
    engine.run(range(6), max_epochs=1)
    scores = [entry[key_metric] for entry in validation.history]
    assert len(set(scores)) > 1  # the weights moved enough for the choice to matter
    best = pick(validation.history, key=lambda entry: entry[key_metric])
    assert (validation.best, validation.best_iteration) == (best[key_metric], best["iteration"])
    saved = torch.load(best_path, weights_only=True)
    assert saved["validation"] == {"iteration": best["iteration"], "metric": key_metric, "value": best[key_metric]}
    for name, value in weights[best["iteration"]].items():
        torch.testing.assert_close(saved["refinement_network"][name], value, rtol=0, atol=0)
    assert not best_path.with_suffix(".pt.tmp").exists()


def test_a_resumed_handler_remembers_the_best_score_of_the_earlier_run(tmp_path):
    f, g, _ = make_tiny_nets()
    engine, _ = weight_moving_engine(g)
    earlier = {"best": 0.0, "best_iteration": 100, "history": [{"iteration": 100, "ged4": 0.0}]}  # unbeatable GED
    validation = _validation(f, g, save_dict={"refinement_network": g}, best_checkpoint=tmp_path / "best.pt")
    validation.load_state_dict(earlier)
    validation.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert validation.state_dict()["best"] == 0.0 and validation.state_dict()["best_iteration"] == 100
    assert [entry["iteration"] for entry in validation.state_dict()["history"]] == [100, 2]
    assert not (tmp_path / "best.pt").exists()  # nothing beat it, so nothing was written


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"interval": 0}, "validation interval must be >= 1 iteration, got 0"),
        ({"key_metric": "ged16"}, "key_metric must be one of"),  # GED16 needs 16 samples, the handler draws 4
    ],
)
def test_settings_that_cannot_work_are_refused(arguments, message):
    f, g, _ = make_tiny_nets()
    arguments = {"interval": 2, "key_metric": "ged4", **arguments}
    with pytest.raises(ValueError, match=message):
        SampleValidation(f, g, _validation_loader(), num_samples=NUM_SAMPLES, **arguments)
