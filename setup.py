"""Installable car-med: Calibrated Adversarial Refinement for medical image segmentation on MONAI."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [
        line.strip() for line in lines if line.strip() and not line.startswith("#") and not line.startswith("pytest")
    ]


setup(
    name="car-med",
    version="0.1.0",
    description="Calibrated Adversarial Refinement (CAR) for stochastic segmentation, built on MONAI",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["car_med", "car_med.*", "preprocessing", "preprocessing.*"]),
    include_package_data=True,
    install_requires=read_requirements(),
    extras_require={"test": ["pytest>=8.0", "ruff==0.17.6"]},
)
