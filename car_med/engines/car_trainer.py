"""Stage 2 of CAR: train the refinement net G and the discriminator D against a frozen calibration net F."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from car_med.engines.chunked_step import (
    check_chunkable_refinement,
    chunked_adversarial_loss,
    chunked_refinement_forward,
)
from car_med.engines.d_schedule import DiscriminatorSchedule
from car_med.engines.distributed import mean_over_ranks
from car_med.engines.guards import BufferSnapshot, NonFiniteLossError, raise_if_non_finite
from car_med.engines.keys import CARKeys
from car_med.losses.adversarial import discriminator_loss, generator_adversarial_loss, r1_penalty
from car_med.losses.calibration import categorical_calibration_loss, gaussian_calibration_loss
from car_med.losses.segmentation import class_index_map
from car_med.networks.refinement import NoiseInjectedUNet
from car_med.sampling import calibration_output, fold_for_sampling

__all__ = ["CARTrainer"]

_REGULARISERS = ("calibration", "cross_entropy")
_OUTPUT_TYPES = ("categorical", "continuous")
_MEMORY_SAVING = ("none", "chunked", "checkpoint")


def _checked_amp_dtype(amp_dtype: torch.dtype | str) -> torch.dtype:
    """``amp_dtype`` as a torch dtype (a name such as ``"bfloat16"`` is looked up), which must be bfloat16."""
    if isinstance(amp_dtype, str):
        amp_dtype = getattr(torch, amp_dtype, None)
    if amp_dtype is not torch.bfloat16:
        raise ValueError(
            f"amp_dtype must be torch.bfloat16, got {amp_dtype!r}: float16 needs loss scaling, which R1's "
            "gradient penalty does not survive."
        )
    return amp_dtype


@dataclass
class _ScoredSamples:
    """D's score of G's samples for L_adv, and what the regulariser differentiates."""

    fake_logits: torch.Tensor  # D's logits for every folded row
    fake_shown: torch.Tensor  # G's samples as D saw them (ignore pixels overwritten with the real one-hot)
    reg_input: torch.Tensor  # G's samples, or (chunked) a leaf standing for them
    adv_grad: torch.Tensor | None  # chunked: dL_adv/dsamples, already weighted; else None (L_adv has its graph)


class CARTrainer(Trainer):
    """Adversarial refinement with the calibration loss (eq. 7), on MONAI's ``Trainer``.

    One iteration: F (frozen, eval mode unless ``calibration_optimizer`` is given) predicts the
    calibration target; G draws ``num_samples`` samples per image, folded into the batch as
    ``(B*M, ...)``; G steps on ``adversarial_weight * L_adv + lambda_cal * L_reg``; then D steps on
    BCE + R1 if ``d_schedule`` allows. ``regulariser="cross_entropy"`` swaps L_cal for the pixelwise
    CE against the label: the cGAN+L_ce baseline is this one switch.

    Like MONAI's ``SupervisedTrainer``, each iteration fires ``IterationEvents.FORWARD_COMPLETED`` (after
    G's samples and D's score of them), ``LOSS_COMPLETED`` (G's losses are in the output, before any
    backward pass: where :class:`~car_med.engines.NonFiniteLossGuard` checks), ``BACKWARD_COMPLETED``
    (G's gradients exist, before G's step) and ``MODEL_COMPLETED`` (after the D step; ``postprocessing``
    runs here). So MONAI handlers and ``postprocessing`` attach as to any MONAI trainer.

    ``memory_saving="chunked"`` evaluates the G step in chunks of ``chunk_size`` folded rows, with the same
    losses, gradients and BatchNorm statistics as the folded batch (to float rounding; see
    :mod:`car_med.engines.chunked_step`). D scores the samples one chunk at a time, each chunk's backward pass
    to the samples running at once (D must have no BatchNorm); with a
    :class:`~car_med.networks.NoiseInjectedUNet` G, G too runs block by block in chunks, with BatchNorm's
    statistics and their gradients taken over the whole folded batch and only each block's convolution
    output and dropout mask kept for the backward pass. At LIDC's B=8, M=20, 128x128 on two CPU threads
    this cuts the iteration's time and peak memory (numbers in docs/performance.md). In this mode D's
    backward pass to the samples runs before ``LOSS_COMPLETED``; it touches no parameter's gradient. On
    CPU the dropout masks, and so every number, match the plain step's for the same seed; on CUDA the
    masks differ (PyTorch fuses dropout there with its own random stream), with the same distribution.

    Ignore pixels (``ignore_index``, e.g. Cityscapes' void): D must not tell real from fake by them, so
    G's output there is overwritten with the one-hot the real label shows (as the authors' code does),
    in D's input for L_adv and for the D step alike; L_cal and CE skip them.

    Returns (``engine.state.output``, keys of :class:`~car_med.engines.CARKeys`):
        ``image``, ``label`` (the batch's), ``calibration`` (F's probabilities), ``samples`` (G's softmax
        ``(B, M, C, *spatial)``, detached), ``pred`` (their mean Gbar), ``loss`` and ``loss_g`` (G's total),
        ``loss_adv``, ``loss_cal`` or ``loss_ce``, ``loss_f`` (joint F only), ``loss_d`` and ``loss_r1``
        (when D stepped), ``d_accuracy`` (when D was measured) and ``d_stepped`` (0 or 1). Losses are
        0-dim tensors, detached after their backward pass.

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
        num_samples: M, samples per image in the G step. The default 5 is the authors' code's; the
            paper uses 20 for LIDC and 7 for Cityscapes (the bundles set those).
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
        ce_log_floor: floor on G's probabilities before the log in the cGAN+L_ce baseline's CE.
        noise_std: standard deviation of G's noise eps (1, a standard normal, in the paper); the
            sampler must use the same value.
        calibration_optimizer: if given, F is trained jointly on CE (its output still detached
            for G), the authors' code's option.
        calibration_loss_function: F's loss for joint training (e.g. ``PixelwiseCrossEntropyLoss``).
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric,
            additional_metrics, metric_cmp_fn, train_handlers: as MONAI's ``Trainer``.
        decollate: decollate batch and output after ``MODEL_COMPLETED`` (MONAI's option; off by default,
            as the losses are per batch).
        image_key, label_key: batch dict keys.
        memory_saving: ``"none"`` (default: the folded batch in one pass), ``"chunked"`` (see above) or
            ``"checkpoint"``: G's blocks run under ``torch.utils.checkpoint`` (G must have a boolean
            ``checkpoint_blocks`` attribute, as :class:`~car_med.networks.NoiseInjectedUNet` has); BatchNorm's
            running statistics are updated once (docs/performance.md compares the three).
        chunk_size: rows per chunk with ``memory_saving="chunked"`` in G's full-resolution block; G's
            smaller blocks take proportionally more rows, D twice as many (its widest map holds half of
            G's per row). With the default LIDC nets at 128x128 the default 4 makes 8 MB chunks, which the
            allocator recycles instead of mapping fresh pages; larger chunks mean fewer, larger operations
            (better on a machine shared with other jobs) at a higher peak memory (docs/performance.md).
        amp: run F, G and D under ``torch.autocast`` in ``amp_dtype`` (mixed precision, for GPUs). The
            losses, the optimisers and the parameters stay in float32: every network output is cast to
            float32 before a loss sees it. Not with ``memory_saving="chunked"``, whose hand-written
            backward pass is float32 only.
        amp_dtype: ``torch.bfloat16`` (or ``"bfloat16"``), the only one offered: float16 would need loss
            scaling, and a ``GradScaler`` cannot scale R1's gradient penalty, which is itself a gradient.
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
        ce_log_floor: float = 1e-7,
        noise_std: float = 1.0,
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
        decollate: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        memory_saving: str = "none",
        chunk_size: int = 4,
        amp: bool = False,
        amp_dtype: torch.dtype | str = torch.bfloat16,
    ) -> None:
        # kept and checked before MONAI's Trainer attaches any handler, so a wrong option raises before that
        self.calibration_network = calibration_network
        self.refinement_network = refinement_network
        self.discriminator = discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.calibration_optimizer, self.calibration_loss_function = calibration_optimizer, calibration_loss_function
        # G's samples and its loss
        self.noise_dim, self.noise_std, self.num_samples = noise_dim, noise_std, num_samples
        self.regulariser, self.lambda_cal, self.adversarial_weight = regulariser, lambda_cal, adversarial_weight
        self.output_type, self.num_classes, self.ignore_index = output_type, num_classes, ignore_index
        self.calibration_clamp, self.ce_log_floor = calibration_clamp, ce_log_floor
        # D's step
        self.r1_gamma, self.r1_half, self.d_fake_samples = r1_gamma, r1_half, d_fake_samples
        self.d_schedule = d_schedule or DiscriminatorSchedule()
        self._last_d_accuracy: float | None = None
        self.image_key, self.label_key = image_key, label_key
        self.memory_saving, self.chunk_size = memory_saving, chunk_size
        self._check_options()
        # not `self.amp`: MONAI's Trainer would then build a float16 GradScaler that this step never uses
        self.autocast, self.amp_dtype = bool(amp), _checked_amp_dtype(amp_dtype)
        self._check_memory_saving()
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
            decollate=decollate,
            **extra,
        )
        # MONAI's handlers look for `engine.network` / `engine.optimizer` (e.g. to log the learning rate):
        # G is the network this engine trains.
        self.network, self.optimizer = refinement_network, g_optimizer
        if memory_saving == "checkpoint":
            refinement_network.checkpoint_blocks = True

    # ----------------------------------------------------------------------------------------- options
    def _check_options(self) -> None:
        """Raise a ``ValueError`` naming the first option outside its range."""
        if self.num_samples < 1:
            raise ValueError(f"num_samples (M) must be >= 1, got {self.num_samples}.")
        if self.regulariser not in _REGULARISERS:
            raise ValueError(f"regulariser must be one of {_REGULARISERS}, got {self.regulariser!r}.")
        if self.output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {self.output_type!r}.")
        if self.output_type == "categorical" and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(f"categorical CAR needs num_classes >= 2, got {self.num_classes}.")
        if self.d_fake_samples not in ("first", "all"):
            raise ValueError(f"d_fake_samples must be 'first' or 'all', got {self.d_fake_samples!r}.")
        if not 0.0 < self.ce_log_floor < 1.0:
            raise ValueError(f"ce_log_floor must be in (0, 1), got {self.ce_log_floor}.")
        if self.noise_std <= 0.0:
            raise ValueError(f"noise_std must be > 0, got {self.noise_std}.")
        if (self.calibration_optimizer is None) != (self.calibration_loss_function is None):
            raise ValueError("joint F training needs both calibration_optimizer and calibration_loss_function.")
        if self.memory_saving not in _MEMORY_SAVING:
            raise ValueError(f"memory_saving must be one of {_MEMORY_SAVING}, got {self.memory_saving!r}.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")

    def _check_memory_saving(self) -> None:
        """Raise a ``ValueError`` where the memory-saving mode cannot keep the step exact with these nets or amp."""
        if self.autocast and self.memory_saving == "chunked":
            raise ValueError("amp=True runs with memory_saving='none' only; the chunked step is float32 only.")
        if self.memory_saving == "chunked":
            coupled = [n for n, mod in self.discriminator.named_modules() if isinstance(mod, _BatchNorm)]
            if coupled:
                raise ValueError(
                    f"memory_saving='chunked' scores the samples with D in chunks of rows, which changes a D with "
                    f"BatchNorm ({coupled}); use memory_saving='none'."
                )
            if isinstance(self.refinement_network, NoiseInjectedUNet):
                check_chunkable_refinement(self.refinement_network)
        if self.memory_saving == "checkpoint" and not hasattr(self.refinement_network, "checkpoint_blocks"):
            raise ValueError(
                f"memory_saving='checkpoint' needs a G with a checkpoint_blocks switch (NoiseInjectedUNet); "
                f"{type(self.refinement_network).__name__} has none. Use memory_saving='none'."
            )

    # ----------------------------------------------------------------------------------------- helpers
    def _run(self, network: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """``network(*inputs)``, under autocast when ``amp`` is on; the output in float32 either way."""
        if not self.autocast:
            return network(*inputs)
        with torch.autocast(device_type=inputs[0].device.type, dtype=self.amp_dtype):
            out = network(*inputs)
        return out.float()

    def _checked_label(self, label: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Segmentation: validated ``(B, *spatial)`` class indices. Regression: the float targets."""
        if self.output_type == "continuous":
            if label.shape[0] != image.shape[0]:
                raise ValueError(
                    f"batch['{self.label_key}'] has {label.shape[0]} rows but batch['{self.image_key}'] "
                    f"has {image.shape[0]}."
                )
            return label.float()
        return class_index_map(
            label,
            image.shape[0],
            image.shape[2:],
            self.num_classes,
            self.ignore_index,
            name=f"batch['{self.label_key}']",
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

    @staticmethod
    def _hide_ignored(fake: torch.Tensor, real: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """G's output with the real one-hot at ignore pixels, so D cannot use them to tell the two apart."""
        if valid is None:
            return fake
        return torch.where(valid.unsqueeze(1), fake, real.to(fake.dtype))

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
        log_probs = fake.clamp_min(self.ce_log_floor).log()
        ignore = -100 if self.ignore_index is None else self.ignore_index
        return F.nll_loss(log_probs, label_folded, ignore_index=ignore)

    # --------------------------------------------------------------------------------------- iteration
    def _iteration(self, engine: CARTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("CARTrainer got no batch data for this iteration.")
        if not isinstance(batchdata, dict) or self.image_key not in batchdata or self.label_key not in batchdata:
            keys = list(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
            raise ValueError(
                f"CARTrainer expects batch dicts with '{self.image_key}' and '{self.label_key}', got {keys}."
            )
        image = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking)
        raw_label = batchdata[self.label_key].to(engine.state.device, non_blocking=engine.non_blocking)
        label = self._checked_label(raw_label, image)
        # a NaN batch corrupts BatchNorm statistics in the forward pass, before any loss exists
        snapshot = BufferSnapshot(self.calibration_network, self.refinement_network, self.discriminator)
        try:
            return self._train_step(engine, image, label, raw_label)
        except NonFiniteLossError:
            snapshot.restore()
            raise

    def _calibration_target(self, engine: CARTrainer, image: torch.Tensor, raw_label: torch.Tensor) -> torch.Tensor:
        """F's output as G's target: frozen in eval mode, or trained jointly while G sees a detached copy."""
        if self.calibration_optimizer is None:
            self.calibration_network.eval()
            with torch.no_grad():
                return calibration_output(self._run(self.calibration_network, image), self.output_type)
        self.calibration_network.train()
        f_raw = self._run(self.calibration_network, image)
        loss_f = self.calibration_loss_function(f_raw, raw_label)
        raise_if_non_finite({CARKeys.LOSS_F: loss_f}, engine.state.iteration, "CAR stage 2 (joint F)")
        self.calibration_optimizer.zero_grad(set_to_none=True)
        loss_f.backward()
        self.calibration_optimizer.step()
        engine.state.output[CARKeys.LOSS_F] = loss_f.detach()
        return calibration_output(f_raw.detach(), self.output_type)

    def _train_step(
        self, engine: CARTrainer, image: torch.Tensor, label: torch.Tensor, raw_label: torch.Tensor
    ) -> dict[str, Any]:
        iteration = engine.state.iteration
        # the output keeps the batch's MetaTensors (affine, file names) for handlers; the losses need plain
        # tensors, as slicing the folded rows of a batched MetaTensor would try to slice its metadata too
        out: dict[str, Any] = {CARKeys.IMAGE: image, CARKeys.LABEL: raw_label}
        engine.state.output = out
        image, label, raw_label = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (image, label, raw_label))
        calibration = self._calibration_target(engine, image, raw_label)
        out[CARKeys.CALIBRATION] = calibration

        self.refinement_network.train()
        self.discriminator.train()
        image_folded, fake = self._generate_samples(image, calibration)
        real = self._real_label_map(label)
        scored = self._score_samples(image_folded, fake, real, label)
        samples = fake.detach().reshape(image.shape[0], self.num_samples, *fake.shape[1:])
        out[CARKeys.SAMPLES] = samples
        out[CARKeys.PRED] = samples.mean(dim=1)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        self._generator_step(engine, out, fake, scored, calibration, label)
        self._discriminator_step(out, image, image_folded, scored.fake_shown.detach(), real, iteration)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _generate_samples(self, image: torch.Tensor, calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G's M samples of every image, folded into the batch as ``(B*M, ...)``: ``(image_folded, samples)``."""
        image_folded, calibration_folded = fold_for_sampling(image, calibration, self.num_samples)
        noise = self.noise_std * torch.randn(image_folded.shape[0], self.noise_dim, device=image.device)
        if self.memory_saving == "chunked" and isinstance(self.refinement_network, NoiseInjectedUNet):
            fake = chunked_refinement_forward(
                self.refinement_network, image_folded, calibration_folded, noise, self.chunk_size
            )
        else:
            fake = self._run(self.refinement_network, image_folded, calibration_folded, noise)
        return image_folded, fake

    def _score_samples(
        self, image_folded: torch.Tensor, fake: torch.Tensor, real: torch.Tensor, label: torch.Tensor
    ) -> _ScoredSamples:
        """D's logits for G's samples (ignore pixels hidden), with D's parameters left out of the graph."""
        m = self.num_samples
        valid = self._valid_mask(label)
        valid_folded = None if valid is None else valid.repeat_interleave(m, dim=0)
        real_folded = real.repeat_interleave(m, dim=0)
        if self.memory_saving == "chunked":
            # D's part of L_adv one chunk at a time; the regulariser then sees a leaf standing for G's samples
            def shown(rows: torch.Tensor, sl: slice) -> torch.Tensor:
                return self._hide_ignored(rows, real_folded[sl], None if valid_folded is None else valid_folded[sl])

            fake_logits, adv_grad = chunked_adversarial_loss(
                self.discriminator,
                image_folded,
                fake.detach(),
                generator_adversarial_loss,
                self.adversarial_weight,
                2 * self.chunk_size,
                shown,
            )
            fake_shown = self._hide_ignored(fake.detach(), real_folded, valid_folded)
            return _ScoredSamples(fake_logits, fake_shown, fake.detach().requires_grad_(True), adv_grad)
        fake_shown = self._hide_ignored(fake, real_folded, valid_folded)
        self.discriminator.requires_grad_(False)
        try:
            fake_logits = self._run(self.discriminator, image_folded, fake_shown)
        finally:
            self.discriminator.requires_grad_(True)
        return _ScoredSamples(fake_logits, fake_shown, fake, None)

    def _generator_step(
        self,
        engine: CARTrainer,
        out: dict[str, Any],
        fake: torch.Tensor,
        scored: _ScoredSamples,
        calibration: torch.Tensor,
        label: torch.Tensor,
    ) -> None:
        """G steps on ``adversarial_weight * L_adv + lambda_cal * L_reg``; fires LOSS_ and BACKWARD_COMPLETED."""
        loss_adv = generator_adversarial_loss(scored.fake_logits)
        loss_reg = self._regulariser_loss(scored.reg_input, calibration, label)
        loss_g = self.adversarial_weight * loss_adv + self.lambda_cal * loss_reg
        reg_key = CARKeys.LOSS_CAL if self.regulariser == "calibration" else CARKeys.LOSS_CE
        out.update({CARKeys.LOSS: loss_g, CARKeys.LOSS_G: loss_g, CARKeys.LOSS_ADV: loss_adv, reg_key: loss_reg})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        raise_if_non_finite(
            {CARKeys.LOSS_G: loss_g, CARKeys.LOSS_ADV: loss_adv, reg_key: loss_reg},
            engine.state.iteration,
            "CAR stage 2 (G)",
        )
        self.g_optimizer.zero_grad(set_to_none=True)
        if scored.adv_grad is not None:
            # loss_g's graph reaches the samples only through the regulariser; D's part came chunk by chunk
            (reg_grad,) = torch.autograd.grad(loss_g, scored.reg_input)
            fake.backward(scored.adv_grad + reg_grad)
        else:
            loss_g.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.g_optimizer.step()
        for key in (CARKeys.LOSS, CARKeys.LOSS_G, CARKeys.LOSS_ADV, reg_key):
            out[key] = out[key].detach()

    def _discriminator_step(
        self,
        out: dict[str, Any],
        image: torch.Tensor,
        image_folded: torch.Tensor,
        fake_shown: torch.Tensor,
        real: torch.Tensor,
        iteration: int,
    ) -> None:
        """D's BCE + R1 step on the schedule; while the accuracy gate holds D back, D is still measured."""
        stepped = self.d_schedule.should_step(iteration, self._last_d_accuracy)
        in_window = self.d_schedule.in_window(iteration)
        out[CARKeys.D_STEPPED] = float(stepped)
        if not (stepped or in_window):
            return
        if self.d_fake_samples == "first":
            # sample 0 of every image: folded rows 0, M, 2M, ...
            fake_d, fake_image = fake_shown[:: self.num_samples], image
        else:
            fake_d, fake_image = fake_shown, image_folded
        if stepped:
            real_image = image.detach().clone()
            if self.r1_gamma > 0:
                real.requires_grad_(True)
                real_image.requires_grad_(True)
            real_logits = self._run(self.discriminator, real_image, real)
            fake_logits = self._run(self.discriminator, fake_image, fake_d)
            loss_d = discriminator_loss(real_logits, fake_logits)
            loss_r1 = (
                r1_penalty(real_logits, [real_image, real], gamma=self.r1_gamma, half=self.r1_half)
                if self.r1_gamma > 0
                else torch.zeros((), device=image.device)
            )
            raise_if_non_finite({CARKeys.LOSS_D: loss_d, CARKeys.LOSS_R1: loss_r1}, iteration, "CAR stage 2 (D)")
            self.d_optimizer.zero_grad(set_to_none=True)
            (loss_d + loss_r1).backward()
            self.d_optimizer.step()
            out.update({CARKeys.LOSS_D: loss_d.detach(), CARKeys.LOSS_R1: loss_r1.detach()})
        else:
            # held back by the accuracy gate: still measure D, or the gate could never reopen
            with torch.no_grad():
                real_logits = self._run(self.discriminator, image, real)
                fake_logits = self._run(self.discriminator, fake_image, fake_d)
        with torch.no_grad():
            accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
            # every rank must take the same gate decision, or only some would join D's gradient all-reduce
            accuracy = mean_over_ranks(accuracy)
        self._last_d_accuracy = float(accuracy)
        out[CARKeys.D_ACCURACY] = self._last_d_accuracy
