"""Draw M coherent samples per image from a trained CAR model, folded into the batch and chunked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.data import MetaTensor
from monai.networks.utils import eval_mode
from torch import nn

from car_med.components import remove_small_components

__all__ = ["SampleSet", "CARSampler", "SamplerOptions", "calibration_output", "fold_for_sampling"]


def calibration_output(raw: torch.Tensor, output_type: str = "categorical") -> torch.Tensor:
    """F's raw output as the calibration target: softmax probabilities, or the regression value itself."""
    return torch.softmax(raw, dim=1) if output_type == "categorical" else raw


def fold_for_sampling(
    image: torch.Tensor, calibration: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat every image M times along the batch: row ``b * M + m`` is sample m of image b."""
    return image.repeat_interleave(num_samples, dim=0), calibration.repeat_interleave(num_samples, dim=0)


@dataclass(frozen=True)
class SamplerOptions:
    """The :class:`CARSampler` options a caller chooses, built once by the caller and passed on by name.

    Attributes:
        num_samples: M, samples per image when a call gives no count.
        max_batch: folded image-sample rows per G pass (bounds memory for any M).
        noise_std: std of G's noise, as in training.
        min_component_size: foreground components of a sample under this many pixels become background; 0
            keeps G's plain argmax.
    """

    num_samples: int = 16
    max_batch: int = 8
    noise_std: float = 1.0
    min_component_size: int = 0

    def sampler(self, calibration_network: nn.Module, refinement_network: nn.Module) -> CARSampler:
        """A :class:`CARSampler` over F and G with these options (it checks their ranges)."""
        return CARSampler(
            calibration_network,
            refinement_network,
            num_samples=self.num_samples,
            max_batch=self.max_batch,
            noise_std=self.noise_std,
            min_component_size=self.min_component_size,
        )


@dataclass
class SampleSet:
    """What the sampler returns. The sample axis is dim 1 everywhere.

    Attributes:
        samples: hard samples: argmax class maps ``(B, M, *spatial)`` (long) for segmentation, or the
            regression values ``(B, M, *feature)``.
        mean: Gbar, the mean of G's outputs over the M samples ``(B, C, *spatial)``.
        calibration: F(x) as probabilities ``(B, C, *spatial)`` (or F's regression value).
        noise: the noise vectors used ``(B, M, noise_dim)``, to reproduce any sample.
        probs: G's softmax of every sample ``(B, M, C, *spatial)``; ``None`` when not kept.
        entropy: H(F(x)) in nats ``(B, *spatial)``, the aleatoric uncertainty map; ``None`` for regression.
    """

    samples: torch.Tensor
    mean: torch.Tensor
    calibration: torch.Tensor
    noise: torch.Tensor
    probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


class CARSampler:
    """M samples per image from F and G in eval mode, without gradients.

    The M draws are folded into the batch, ``(B*M, ...)``, and G runs over at most ``max_batch``
    folded rows at a time, so memory stays bounded for any M. Gbar is accumulated chunk by chunk, so
    with ``return_probs=False`` the per-sample probabilities are never all held at once.

    Args:
        calibration_network: F, returning logits (segmentation) or values (regression).
        refinement_network: G, called as ``G(image, calibration, noise)``.
        num_samples: default M.
        noise_dim: size of one noise vector; read from ``refinement_network.noise_dim`` if omitted.
        max_batch: folded rows per G forward pass.
        output_type: ``"categorical"`` or ``"continuous"``.
        return_probs: keep every sample's probabilities in ``SampleSet.probs``.
        noise_std: standard deviation of the drawn noise; must be the ``noise_std`` G was trained with
            (1, a standard normal, by default as in the paper).
        min_component_size: for two-class maps (background 0, foreground 1): foreground components of a hard
            sample (4-connected) with fewer pixels than this become background, so a sample holding only
            stray pixels is empty. 0 (the paper's plain argmax) keeps every pixel. Gbar, ``probs`` and F are
            not changed. docs/lidc.md, section 11, measures it.

    Example::

        sampler = CARSampler(f, g, num_samples=16)
        out = sampler(images, generator=torch.Generator().manual_seed(0))
        out.samples.shape  # (B, 16, H, W)
    """

    def __init__(
        self,
        calibration_network: nn.Module,
        refinement_network: nn.Module,
        num_samples: int = 16,
        noise_dim: int | None = None,
        max_batch: int = 8,
        output_type: str = "categorical",
        return_probs: bool = True,
        noise_std: float = 1.0,
        min_component_size: int = 0,
    ) -> None:
        if output_type not in ("categorical", "continuous"):
            raise ValueError(f"output_type must be 'categorical' or 'continuous', got {output_type!r}.")
        noise_dim = noise_dim if noise_dim is not None else getattr(refinement_network, "noise_dim", None)
        if noise_dim is None or noise_dim < 1:
            raise ValueError("CARSampler needs noise_dim >= 1 (pass it, or give G a `noise_dim` attribute).")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        if noise_std <= 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}.")
        if not isinstance(min_component_size, int) or min_component_size < 0:
            raise ValueError(f"min_component_size must be an integer >= 0 pixels, got {min_component_size!r}.")
        if min_component_size and output_type != "categorical":
            raise ValueError(
                "min_component_size removes components of class maps; use it with output_type='categorical'."
            )
        self._check_num_samples(num_samples)
        self.calibration_network = calibration_network
        self.refinement_network = refinement_network
        self.num_samples = num_samples
        self.noise_dim = int(noise_dim)
        self.max_batch = max_batch
        self.output_type = output_type
        self.return_probs = return_probs
        self.noise_std = noise_std
        self.min_component_size = min_component_size

    def _refine_in_chunks(self, image, calibration, noise_folded, num_samples):
        """Yield ``(first folded row, G output)`` over the B*M folded rows, at most ``max_batch`` at a time.

        G's noise enters only in its decoder, so when G exposes ``encode``/``decode`` each image is
        encoded once and only the decoder runs per sample; otherwise the folded rows go through
        ``G.forward``.
        """
        g = self.refinement_network
        total = image.shape[0] * num_samples
        if hasattr(g, "encode") and hasattr(g, "decode"):
            images_per_chunk = max(1, self.max_batch // num_samples)
            for first_image in range(0, image.shape[0], images_per_chunk):
                last_image = min(first_image + images_per_chunk, image.shape[0])
                *skips, g_input = g.encode(image[first_image:last_image], calibration[first_image:last_image])
                first_row, last_row = first_image * num_samples, last_image * num_samples
                for start in range(first_row, last_row, self.max_batch):
                    stop = min(start + self.max_batch, last_row)
                    owner = torch.arange(start, stop, device=image.device) // num_samples - first_image
                    features = [f.index_select(0, owner) for f in [*skips, g_input]]
                    yield start, g.decode(features, noise_folded[start:stop])
            return
        image_folded, calibration_folded = fold_for_sampling(image, calibration, num_samples)
        for start in range(0, total, self.max_batch):
            stop = min(start + self.max_batch, total)
            yield start, g(image_folded[start:stop], calibration_folded[start:stop], noise_folded[start:stop])

    @staticmethod
    def _check_num_samples(num_samples: int) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"the number of samples M must be an integer >= 1, got {num_samples!r}.")

    def draw_noise(
        self, batch: int, num_samples: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normal noise ``(B, M, noise_dim)`` with std ``noise_std``, on ``device``.

        The draw happens on the generator's device (a CPU generator gives the same numbers whatever
        device the model is on), then moves to ``device``.
        """
        source = generator.device if generator is not None else device
        noise = torch.randn(batch, num_samples, self.noise_dim, generator=generator, device=source)
        return (self.noise_std * noise).to(device)

    @staticmethod
    def _check_finite(image: torch.Tensor) -> None:
        # A NaN image gives NaN probabilities whose argmax is class 0 everywhere: an empty mask that would
        # silently count as a confident "no lesion" in GED and HM-IoU.
        finite = torch.isfinite(image.reshape(image.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            kinds = []
            for index in bad[:5]:
                row = image[index]
                kinds.append(f"{index} ({'NaN' if torch.isnan(row).any() else 'Inf'})")
            raise ValueError(
                f"CARSampler: image batch index {', '.join(kinds)}{' ...' if len(bad) > 5 else ''} holds non-finite "
                "values; check the input (e.g. intensity scaling or resampling) before sampling."
            )

    def __call__(
        self,
        image: torch.Tensor,
        num_samples: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SampleSet:
        """Sample.

        Args:
            image: batch of images ``(B, C, *spatial)`` (or ``(B, D)`` inputs for regression).
            num_samples: M for this call; defaults to the sampler's.
            noise: explicit noise ``(B, M, noise_dim)``; drawn when omitted.
            generator: torch generator for reproducible noise (on any device).

        Returns:
            a :class:`SampleSet` (``samples``, ``mean``, ``calibration``, ``noise``, ``probs``, ``entropy``).

        Raises:
            ValueError: the image is not a batched tensor, holds NaN or Inf (the message names the batch
                index), or ``num_samples`` / ``noise`` do not fit.
        """
        if not isinstance(image, torch.Tensor) or image.ndim < 2:
            raise ValueError(
                f"CARSampler expected a batched image tensor (B, C, ...), got {getattr(image, 'shape', image)}."
            )
        if isinstance(image, MetaTensor):
            # slicing a batched MetaTensor also slices its metadata, which fails for mixed LIDC batches
            image = image.as_tensor()
        if image.is_floating_point() or image.is_complex():
            self._check_finite(image)
        batch = image.shape[0]
        if noise is not None:
            if noise.ndim != 3 or noise.shape[0] != batch or noise.shape[2] != self.noise_dim:
                raise ValueError(
                    f"noise must have shape (B={batch}, M, noise_dim={self.noise_dim}), got {tuple(noise.shape)}."
                )
            num_samples = noise.shape[1]
        num_samples = self.num_samples if num_samples is None else num_samples
        self._check_num_samples(num_samples)
        if noise is None:
            noise = self.draw_noise(batch, num_samples, image.device, generator)
        noise = noise.to(image.device)

        with eval_mode(self.calibration_network, self.refinement_network):
            calibration = calibration_output(self.calibration_network(image), self.output_type)
            noise_folded = noise.reshape(batch * num_samples, self.noise_dim)
            mean = torch.zeros_like(calibration) if self.output_type == "categorical" else None
            hard, kept = [], []
            for start, out in self._refine_in_chunks(image, calibration, noise_folded, num_samples):
                if self.output_type == "categorical":
                    hard.append(out.argmax(dim=1))
                    rows = torch.arange(start, start + out.shape[0], device=out.device) // num_samples
                    mean.index_add_(0, rows, out)
                    if self.return_probs:
                        kept.append(out)
                else:
                    hard.append(out)
            samples = torch.cat(hard).reshape(batch, num_samples, *hard[0].shape[1:])
            if self.output_type == "categorical":
                if self.min_component_size:
                    if calibration.shape[1] != 2:
                        raise ValueError(
                            f"min_component_size needs two-class maps (background, foreground); this model has "
                            f"{calibration.shape[1]} classes. Use min_component_size=0."
                        )
                    samples = remove_small_components(samples, self.min_component_size)
                mean = mean / num_samples
                probs = torch.cat(kept).reshape(batch, num_samples, *kept[0].shape[1:]) if self.return_probs else None
                entropy = -(calibration * calibration.clamp_min(1e-12).log()).sum(dim=1)
            else:
                mean, probs, entropy = samples.mean(dim=1), None, None
        return SampleSet(samples=samples, mean=mean, calibration=calibration, noise=noise, probs=probs, entropy=entropy)
