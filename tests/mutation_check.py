"""Break CAR on purpose, one change at a time, and check that the test suite notices each break.

Each mutant below is a plausible bug that would still train and still produce the right shapes, but a
silently wrong model. The script copies the working tree, applies one mutant, runs the tests and reports
which tests failed; a mutant that passes every test is a hole in the suite. Not a pytest module (its name
does not start with ``test_``): run it by hand after changing the trainer, the sampler or their tests.

Usage:
    python tests/mutation_check.py                 # all mutants, on tests/engines tests/sampling tests/losses
    python tests/mutation_check.py --tests tests   # the whole suite (slow)
    python tests/mutation_check.py --only 2 7      # mutants by number
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER, SAMPLER, CAL_LOSS = "car_med/engines/car_trainer.py", "car_med/sampling.py", "car_med/losses/calibration.py"

# number -> (what breaks, [(file, exact text, replacement), ...])
MUTANTS: dict[int, tuple[str, list[tuple[str, str, str]]]] = {
    1: (
        "the sampler encodes each image once per sample",
        [(SAMPLER, 'if hasattr(g, "encode") and hasattr(g, "decode"):', "if False:")],
    ),
    2: (
        "D is shown argmax one-hot fakes instead of G's soft probabilities",
        [
            (
                TRAINER,
                "fake_shown = self._hide_ignored(fake, ",
                "fake_shown = self._hide_ignored("
                "F.one_hot(fake.argmax(1), self.num_classes).movedim(-1, 1).to(fake.dtype) + 0 * fake, ",
            )
        ],
    ),
    3: ("adversarial_weight is ignored", [(TRAINER, "self.adversarial_weight * loss_adv + ", "loss_adv + ")]),
    4: (
        "F is left in train mode during stage 2",
        [(TRAINER, "            self.calibration_network.eval()\n", "            self.calibration_network.train()\n")],
    ),
    5: ("the ignore mask is dropped from L_cal", [(TRAINER, "valid_mask=self._valid_mask(label)", "valid_mask=None")]),
    6: (
        'd_fake_samples="first" takes the first B folded rows, not sample 0 of each image',
        [(TRAINER, "fake_shown[:: self.num_samples]", "fake_shown[: image.shape[0]]")],
    ),
    7: (
        "L_adv is computed on the first sample only",
        [
            (
                TRAINER,
                "loss_adv = generator_adversarial_loss(fake_logits_g)",
                "loss_adv = generator_adversarial_loss(fake_logits_g[:: self.num_samples])",
            )
        ],
    ),
    8: (
        "joint F: its output reaches G's losses undetached (L_cal trains F)",
        [
            (
                TRAINER,
                "calibration_output(f_raw.detach(), self.output_type)",
                "calibration_output(f_raw, self.output_type)",
            ),
            (CAL_LOSS, "target = calibration_probs.detach().clamp", "target = calibration_probs.clamp"),
        ],
    ),
    9: (
        "ignore pixels are not hidden from D",
        [(TRAINER, "        if valid is None:\n            return fake\n", "        return fake\n")],
    ),
    10: (
        "a D held back by the accuracy gate is never measured again",
        [(TRAINER, "        if not (stepped or in_window):\n", "        if not stepped:\n")],
    ),
}


def run_mutant(number: int, tests: list[str]) -> tuple[int, list[str], str]:
    """Apply one mutant to a copy of the tree, run ``tests``; returns (exit code, failed test ids, summary)."""
    _, edits = MUTANTS[number]
    with tempfile.TemporaryDirectory(prefix=f"car-med-mutant{number}-") as folder:
        tree = Path(folder) / "tree"
        ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "runs", "demo_output", ".pytest_cache")
        shutil.copytree(ROOT, tree, ignore=ignore)
        for path, old, new in edits:
            file = tree / path
            text = file.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"mutant {number}: expected the text once in {path}, found it {text.count(old)} times")
            file.write_text(text.replace(old, new))
        # the copy comes first on sys.path (python -m), ahead of an editable install of the original
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            cwd=tree,
            capture_output=True,
            text=True,
        )
    failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)))
    lines = done.stdout.strip().splitlines()
    return done.returncode, failed, lines[-1] if lines else done.stderr[-300:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", nargs="+", default=["tests/engines", "tests/sampling", "tests/losses"])
    parser.add_argument("--only", nargs="+", type=int, default=sorted(MUTANTS))
    args = parser.parse_args(argv)
    survivors = []
    for number in args.only:
        code, failed, summary = run_mutant(number, args.tests)
        print(f"mutant {number} ({MUTANTS[number][0]}): {'caught' if code else 'SURVIVED'}: {summary}", flush=True)
        for test in failed:
            print(f"    {test}")
        if code == 0:
            survivors.append(number)
    print(f"\n{len(args.only) - len(survivors)} of {len(args.only)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
