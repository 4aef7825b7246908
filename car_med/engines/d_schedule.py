"""When the discriminator takes a step: every iteration, or the authors' windowed, accuracy-gated rule."""

from __future__ import annotations

__all__ = ["DiscriminatorSchedule"]


class DiscriminatorSchedule:
    """Decides per iteration whether D is updated.

    The CAR code steps D only while ``iteration % period < active`` (250 and 50) and only while D's
    accuracy on the previous batch is below ``max_accuracy`` (0.85), so D cannot run away from G.
    The defaults here step D every iteration (the paper's plain alternating GAN update); the bundle
    configs set the code's values where they apply.

    Args:
        period: length of the repeating window, in iterations. ``1`` means every iteration.
        active: number of iterations at the start of each window in which D may step.
        max_accuracy: D skips its step while its accuracy on the previous batch is at or above
            this value; ``None`` disables the gate.
    """

    def __init__(self, period: int = 1, active: int = 1, max_accuracy: float | None = None) -> None:
        if period < 1 or not 1 <= active <= period:
            raise ValueError(
                f"DiscriminatorSchedule needs period >= 1 and 1 <= active <= period, got {period}, {active}."
            )
        if max_accuracy is not None and not 0.0 < max_accuracy <= 1.0:
            raise ValueError(f"max_accuracy must be in (0, 1] or None, got {max_accuracy}.")
        self.period = period
        self.active = active
        self.max_accuracy = max_accuracy

    def in_window(self, iteration: int) -> bool:
        """Whether this (1-based, ignite-style) iteration lies in the part of the period where D may step."""
        return (iteration - 1) % self.period < self.active

    def should_step(self, iteration: int, last_accuracy: float | None) -> bool:
        """Whether D steps at this iteration given its accuracy on the previous batch."""
        if not self.in_window(iteration):
            return False
        return self.max_accuracy is None or last_accuracy is None or last_accuracy < self.max_accuracy

    def __repr__(self) -> str:
        return f"DiscriminatorSchedule(period={self.period}, active={self.active}, max_accuracy={self.max_accuracy})"
