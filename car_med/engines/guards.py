"""Stop training on a non-finite loss before it reaches the weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine

__all__ = ["NonFiniteLossError", "raise_if_non_finite", "NonFiniteLossGuard", "BufferSnapshot"]


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN or infinite; the optimiser step for that iteration never ran."""


def raise_if_non_finite(losses: Mapping[str, torch.Tensor | float], iteration: int, where: str) -> None:
    """Raise :class:`NonFiniteLossError` naming every non-finite loss, before any backward pass.

    Checking before ``backward``/``step`` keeps the weights, and so every checkpoint written so
    far, free of NaNs.
    """
    values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise NonFiniteLossError(
            f"{where}: non-finite loss at iteration {iteration} ({shown}). Training stopped before the optimiser "
            "step, so the weights and the last saved checkpoint are intact. Lower the learning rate or check the "
            "input data for NaNs, then resume from the last checkpoint."
        )


class BufferSnapshot:
    """Copies of a module's buffers (BatchNorm running statistics) taken before a forward pass.

    A NaN input poisons the running statistics during the forward pass itself, before any loss can
    be checked; restoring the snapshot keeps the in-memory model as good as the last checkpoint.
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        self._saved = [(buf, buf.detach().clone()) for m in modules for buf in m.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for buf, saved in self._saved:
                buf.copy_(saved)


class NonFiniteLossGuard:
    """Ignite handler for MONAI's ``SupervisedTrainer`` and :class:`~car_med.engines.CARTrainer`.

    Both fire ``IterationEvents.LOSS_COMPLETED`` after the loss and before ``backward``, so raising
    here prevents the bad update (ignite's ``TerminateOnNan`` only looks after the step). The buffers
    (BatchNorm statistics) of every network the engine holds are restored to their state at the start
    of the iteration.

    Args:
        output_keys: keys of ``engine.state.output`` to check; ``"loss"`` is the total loss of either
            trainer (G's for ``CARTrainer``); e.g. ``("loss_g", "loss_adv", "loss_cal")`` names the terms.
        name: label for the error message, e.g. "stage 1 (F)".
    """

    network_attributes = ("network", "calibration_network", "refinement_network", "discriminator")

    def __init__(self, output_keys: Sequence[str] = ("loss",), name: str = "training") -> None:
        self.output_keys = tuple(output_keys)
        self.name = name

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        self._snapshot: BufferSnapshot | None = None
        engine.add_event_handler(Events.ITERATION_STARTED, self._take_snapshot)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def _take_snapshot(self, engine: Engine) -> None:
        modules = {
            id(m): m for a in self.network_attributes if isinstance(m := getattr(engine, a, None), torch.nn.Module)
        }
        self._snapshot = BufferSnapshot(*modules.values()) if modules else None

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        losses = {k: output[k] for k in self.output_keys if k in output}
        try:
            raise_if_non_finite(losses, engine.state.iteration, self.name)
        except NonFiniteLossError:
            if self._snapshot is not None:
                self._snapshot.restore()
            raise
