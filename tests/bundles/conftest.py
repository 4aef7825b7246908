"""One tiny CAR training run on the preprocessed synthetic cohort, shared by the LIDC bundle tests."""

from __future__ import annotations

import pytest
from lidc_bundle_runs import run_bundle


@pytest.fixture(scope="session")
def trained_lidc_run(tmp_path_factory, clean_run):
    """Output folder of ``run training`` with train.json + demo.json on the synthetic crops (stages of 6 iterations)."""
    out = tmp_path_factory.mktemp("lidc_bundle_run")
    home = tmp_path_factory.mktemp("lidc_bundle_home")
    result = run_bundle("training", ["train.json", "demo.json"], home, dataset_dir=clean_run, output_dir=out)
    assert result.returncode == 0, result.stdout[-4000:]
    return {"output_dir": out, "home": home, "dataset_dir": clean_run, "log": result.stdout}
