"""Stage 2 of CAR: train the refinement net G and the discriminator D against a frozen calibration net F."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from torch import nn
from torch.nn import functional as F

from car_med.engines.d_schedule import DiscriminatorSchedule
from car_med.engines.guards import BufferSnapshot, NonFiniteLossError, raise_if_non_finite
from car_med.losses.adversarial import discriminator_loss, generator_adversarial_loss, r1_penalty
from car_med.losses.calibration import categorical_calibration_loss, gaussian_calibration_loss
from car_med.losses.segmentation import class_index_map
from car_med.sampling import calibration_output, fold_for_sampling

__all__ = ["CARTrainer"]

_REGULARISERS = ("calibration", "cross_entropy")
_OUTPUT_TYPES = ("categorical", "continuous")


class CARTrainer(Trainer):
    """Adversarial refinement with the calibration loss (eq. 7), on MONAI's ``Trainer``.

    One iteration: F (frozen, eval mode unless ``calibration_optimizer`` is given) predicts the
    calibration target; G draws ``num_samples`` samples per image, folded into the batch as
    ``(B*M, ...)``; G steps on ``adversarial_weight * L_adv + lambda_cal * L_reg``; then D steps on
    BCE + R1 if ``d_schedule`` allows. ``regulariser="cross_entropy"`` swaps L_cal for the pixelwise
    CE against the label: the cGAN+L_ce baseline is this one switch.

    Args:
        device: torch device.
        max_epochs: epochs to run.
        train_data_loader: yields dicts with ``image_key`` and ``label_key``. Segmentation labels are
            class indices ``(B, 1, *spatial)`` (one annotator per image); regression labels ``(B, D)``.
        calibration_network: F. Its parameters are never touched by the G or D step.
        refinement_network: G, called as ``G(image, calibration, noise)``.
        discriminator: D, called as ``D(image, label_map)`` and returning ``(B, 1)`` logits.
        g_optimizer: optimiser over G's parameters.
        d_optimizer: optimiser over D's parameters.
        noise_dim: size of each sample's noise vector.
        num_samples: M, samples per image in the G step.
        lambda_cal: weight of the regulariser (L_cal, or CE for the baseline).
        adversarial_weight: weight of L_adv (1 in the paper, 10 in the authors' code).
        regulariser: ``"calibration"`` (CAR) or ``"cross_entropy"`` (the cGAN+L_ce baseline).
        output_type: ``"categorical"`` (G returns softmax maps, F returns logits) or
            ``"continuous"`` (regression: F and G return values; L_cal is the Gaussian form).
        num_classes: class count for the one-hot real labels (categorical only).
        ignore_index: label value excluded from L_cal and CE (categorical only).
        r1_gamma: R1 weight; 0 disables it. The penalty is taken over D's whole real input, image and
            one-hot label (the authors' code penalises the concatenation of both).
        r1_half: use Mescheder's 1/2 factor in R1.
        d_schedule: when D steps; default every iteration.
        d_fake_samples: ``"first"`` uses one fake per image in the D step (the authors' code),
            ``"all"`` uses all M. While the schedule's accuracy gate holds D back, D's accuracy is still
            measured on every batch of the window (without a step), so the gate reopens once G catches up.
        calibration_clamp: clamp of both distributions inside L_cal.
        calibration_optimizer: if given, F is trained jointly on CE (its output still detached
            for G), the authors' code's option.
        calibration_loss_function: F's loss for joint training (e.g. ``PixelwiseCrossEntropyLoss``).
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric,
            additional_metrics, metric_cmp_fn, train_handlers: as MONAI's ``Trainer``.
        image_key, label_key: batch dict keys.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        calibration_network: nn.Module,
        refinement_network: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        noise_dim: int,
        num_samples: int = 5,
        lambda_cal: float = 1.0,
        adversarial_weight: float = 1.0,
        regulariser: str = "calibration",
        output_type: str = "categorical",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        r1_gamma: float = 10.0,
        r1_half: bool = False,
        d_schedule: DiscriminatorSchedule | None = None,
        d_fake_samples: str = "first",
        calibration_clamp: float = 1e-3,
        calibration_optimizer: torch.optim.Optimizer | None = None,
        calibration_loss_function: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples (M) must be >= 1, got {num_samples}.")
        if regulariser not in _REGULARISERS:
            raise ValueError(f"regulariser must be one of {_REGULARISERS}, got {regulariser!r}.")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if output_type == "categorical" and (num_classes is None or num_classes < 2):
            raise ValueError(f"categorical CAR needs num_classes >= 2, got {num_classes}.")
        if d_fake_samples not in ("first", "all"):
            raise ValueError(f"d_fake_samples must be 'first' or 'all', got {d_fake_samples!r}.")
        if (calibration_optimizer is None) != (calibration_loss_function is None):
            raise ValueError("joint F training needs both calibration_optimizer and calibration_loss_function.")
        extra = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            decollate=False,
            **extra,
        )
        self.calibration_network = calibration_network
        self.refinement_network = refinement_network
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        # MONAI's MLflow/stats handlers look for `engine.optimizer` to log the learning rate.
        self.optimizer = g_optimizer
        self.noise_dim = noise_dim
        self.num_samples = num_samples
        self.lambda_cal = lambda_cal
        self.adversarial_weight = adversarial_weight
        self.regulariser = regulariser
        self.output_type = output_type
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.r1_gamma = r1_gamma
        self.r1_half = r1_half
        self.d_schedule = d_schedule or DiscriminatorSchedule()
        self.d_fake_samples = d_fake_samples
        self.calibration_clamp = calibration_clamp
        self.calibration_optimizer = calibration_optimizer
        self.calibration_loss_function = calibration_loss_function
        self.image_key = image_key
        self.label_key = label_key
        self._last_d_accuracy: float | None = None

    # ----------------------------------------------------------------------------------------- helpers
    def _checked_label(self, label: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Segmentation: validated ``(B, *spatial)`` class indices. Regression: the float targets."""
        if self.output_type == "continuous":
            if label.shape[0] != image.shape[0]:
                raise ValueError(
                    f"batch['{self.label_key}'] has {label.shape[0]} rows but batch['{self.image_key}'] has {image.shape[0]}."
                )
            return label.float()
        return class_index_map(
            label, image.shape[0], image.shape[2:], self.num_classes, self.ignore_index, name=f"batch['{self.label_key}']"
        )

    def _real_label_map(self, label: torch.Tensor) -> torch.Tensor:
        if self.output_type == "continuous":
            return label
        index_map = label
        if self.ignore_index is not None and self.ignore_index >= self.num_classes:
            # an ignore value outside the class range has no channel; show D those pixels as background
            index_map = torch.where(index_map == self.ignore_index, torch.zeros_like(index_map), index_map)
        return F.one_hot(index_map, self.num_classes).movedim(-1, 1).float()

    def _valid_mask(self, label: torch.Tensor) -> torch.Tensor | None:
        if self.output_type == "continuous" or self.ignore_index is None:
            return None
        return label != self.ignore_index

    def _regulariser_loss(self, fake: torch.Tensor, calibration: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        batch = calibration.shape[0]
        samples = fake.reshape(batch, self.num_samples, *fake.shape[1:])
        if self.regulariser == "calibration":
            if self.output_type == "continuous":
                return gaussian_calibration_loss(samples, calibration)
            return categorical_calibration_loss(
                samples, calibration, clamp=self.calibration_clamp, valid_mask=self._valid_mask(label)
            )
        # cGAN + L_ce baseline: every sample is pulled towards the (single) label.
        label_folded = label.repeat_interleave(self.num_samples, dim=0)
        if self.output_type == "continuous":
            return 0.5 * F.mse_loss(fake, label_folded)
        log_probs = fake.clamp_min(1e-7).log()
        ignore = -100 if self.ignore_index is None else self.ignore_index
        return F.nll_loss(log_probs, label_folded, ignore_index=ignore)

    # --------------------------------------------------------------------------------------- iteration
    def _iteration(self, engine: CARTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("CARTrainer got no batch data for this iteration.")
        if not isinstance(batchdata, dict) or self.image_key not in batchdata or self.label_key not in batchdata:
            keys = list(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
            raise ValueError(f"CARTrainer expects batch dicts with '{self.image_key}' and '{self.label_key}', got {keys}.")
        image = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        label = batchdata[self.label_key].to(engine.state.device, non_blocking=engine.non_blocking)
        raw_label = label
        label = self._checked_label(label, image)
        iteration = engine.state.iteration
        # a NaN batch corrupts BatchNorm statistics in the forward pass, before any loss exists
        snapshot = BufferSnapshot(self.calibration_network, self.refinement_network, self.discriminator)
        try:
            return self._train_step(engine, image, label, raw_label, iteration)
        except NonFiniteLossError:
            snapshot.restore()
            raise

    def _train_step(
        self, engine: CARTrainer, image: torch.Tensor, label: torch.Tensor, raw_label: torch.Tensor, iteration: int
    ) -> dict[str, float]:
        out: dict[str, float] = {}

        # F: frozen target, or jointly trained with its own loss while G only ever sees a detached copy.
        if self.calibration_optimizer is not None:
            self.calibration_network.train()
            f_raw = self.calibration_network(image)
            loss_f = self.calibration_loss_function(f_raw, raw_label)
            raise_if_non_finite({"loss_f": loss_f}, iteration, "CAR stage 2 (joint F)")
            self.calibration_optimizer.zero_grad(set_to_none=True)
            loss_f.backward()
            self.calibration_optimizer.step()
            out["loss_f"] = float(loss_f.detach())
            calibration = calibration_output(f_raw.detach(), self.output_type)
        else:
            self.calibration_network.eval()
            with torch.no_grad():
                calibration = calibration_output(self.calibration_network(image), self.output_type)

        # G step: all M samples of every image in one folded batch.
        self.refinement_network.train()
        self.discriminator.train()
        image_folded, calibration_folded = fold_for_sampling(image, calibration, self.num_samples)
        noise = torch.randn(image_folded.shape[0], self.noise_dim, device=image.device)
        fake = self.refinement_network(image_folded, calibration_folded, noise)
        self.discriminator.requires_grad_(False)
        loss_adv = generator_adversarial_loss(self.discriminator(image_folded, fake))
        self.discriminator.requires_grad_(True)
        loss_reg = self._regulariser_loss(fake, calibration, label)
        loss_g = self.adversarial_weight * loss_adv + self.lambda_cal * loss_reg
        reg_name = "loss_cal" if self.regulariser == "calibration" else "loss_ce"
        raise_if_non_finite({"loss_g": loss_g, "loss_adv": loss_adv, reg_name: loss_reg}, iteration, "CAR stage 2 (G)")
        self.g_optimizer.zero_grad(set_to_none=True)
        loss_g.backward()
        self.g_optimizer.step()
        out.update(loss_g=float(loss_g.detach()), loss_adv=float(loss_adv.detach()), **{reg_name: float(loss_reg.detach())})

        # D step, on the schedule.
        stepped = self.d_schedule.should_step(iteration, self._last_d_accuracy)
        out["d_stepped"] = float(stepped)
        if self.d_fake_samples == "first":
            fake_d, fake_image = fake.detach()[:: self.num_samples], image
        else:
            fake_d, fake_image = fake.detach(), image_folded
        real = self._real_label_map(label)
        if stepped:
            real_image = image.detach().clone()
            if self.r1_gamma > 0:
                real.requires_grad_(True)
                real_image.requires_grad_(True)
            real_logits = self.discriminator(real_image, real)
            fake_logits = self.discriminator(fake_image, fake_d)
            loss_d = discriminator_loss(real_logits, fake_logits)
            loss_r1 = (
                r1_penalty(real_logits, [real_image, real], gamma=self.r1_gamma, half=self.r1_half)
                if self.r1_gamma > 0
                else torch.zeros((), device=image.device)
            )
            raise_if_non_finite({"loss_d": loss_d, "loss_r1": loss_r1}, iteration, "CAR stage 2 (D)")
            self.d_optimizer.zero_grad(set_to_none=True)
            (loss_d + loss_r1).backward()
            self.d_optimizer.step()
            out.update(loss_d=float(loss_d.detach()), loss_r1=float(loss_r1.detach()))
        elif self.d_schedule.in_window(iteration):
            # held back by the accuracy gate: still measure D, or the gate could never reopen
            with torch.no_grad():
                real_logits = self.discriminator(image, real)
                fake_logits = self.discriminator(fake_image, fake_d)
        if stepped or self.d_schedule.in_window(iteration):
            with torch.no_grad():
                accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
            self._last_d_accuracy = float(accuracy)
            out["d_accuracy"] = self._last_d_accuracy
        engine.state.output = out
        return out
