"""Row-chunked evaluation of CAR's G step: the same gradients as the folded batch, with far less memory.

The G step evaluates G on ``B*M`` folded rows (160 at LIDC's B=8, M=20) and D on every one of them. On
CPU much of that step's time goes to the operating system mapping fresh pages for the full-batch
activations (about 335 MB per tensor at 128x128 for G's last block, a new mapping for every one), and
most of its memory to keeping them for the backward pass. Everything in G and D is row-wise except
BatchNorm, whose batch statistics couple the rows. This module evaluates the row-wise parts in chunks
of rows and BatchNorm exactly:

- :func:`chunked_refinement_forward` runs a :class:`~car_med.networks.NoiseInjectedUNet` block by block.
  A block (convolution, BatchNorm, activation, dropout, then G's cropping and noise injection) is one
  autograd node. Its forward pass computes the convolution chunk by chunk into one buffer, takes the
  BatchNorm statistics over the whole folded batch (float64 accumulation, as PyTorch's CPU kernel does),
  updates the running statistics once, and evaluates the rest chunk by chunk. It keeps only the
  convolution output and a boolean dropout mask. The backward pass recomputes the row-wise ops chunk by
  chunk once, for the gradient at BatchNorm's output (one buffer for the whole batch, which the input's
  gradient then reuses) and BatchNorm's whole-batch sums; then, chunk by chunk, it applies BatchNorm's exact
  backward (through the batch statistics) in place and takes the convolution's gradients with
  ``convolution_backward``, without recomputing the convolution.
- :func:`chunked_adversarial_loss` evaluates D on chunks of G's detached samples and back-propagates each
  chunk at once, collecting dL_adv/dsample. D has no normalisation, so this is exact.

Dropout masks are drawn for the whole block at once, as ``nn.Dropout`` or G's ``FastDropout`` draws them,
so on CPU the masks, and with them every number, match the folded batch's for the same seed (on CUDA
PyTorch fuses dropout with another random stream: the masks then differ, with the same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from car_med.networks.dropout import FastDropout, apply_keep_mask, fill_keep_mask_
from car_med.networks.refinement import NoiseInjectedUNet, NoiseInjection, match_size

__all__ = ["chunk_slices", "chunked_adversarial_loss", "chunked_refinement_forward", "check_chunkable_refinement"]


def chunk_slices(total: int, size: int) -> list[slice]:
    """Consecutive row slices of at most ``size`` rows covering ``range(total)``."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


@dataclass
class _DropoutSite:
    """Where a block's ``nn.Dropout`` acts: its mask is drawn once for the whole folded batch."""

    p: float  # 0 when the module is in eval mode: dropout is then the identity
    fast: bool = False  # FastDropout's masks (fill_keep_mask_) rather than nn.Dropout's (bernoulli_)


@dataclass
class _BlockPlan:
    """One G block as the chunked evaluation sees it: conv -> BatchNorm? -> row-wise ops -> crop -> injection."""

    conv: _ConvNd
    norm: _BatchNorm | None
    row_ops: tuple  # nn.Module or _DropoutSite, in order; each acts on every row on its own
    crop: tuple[int, ...] | None
    inject: NoiseInjection | None
    post_act: nn.Module | None
    rows: int  # rows per chunk

    def tail_modules(self) -> list[nn.Module]:
        """Modules called chunk by chunk; the injection's linear maps of the noise run once for all rows."""
        mods = [op for op in self.row_ops if isinstance(op, nn.Module)]
        return mods + [m for m in (None if self.inject is None else self.inject.proj, self.post_act) if m is not None]

    def noise_modules(self) -> list[nn.Module]:
        return [] if self.inject is None else [self.inject.residual, self.inject.scale]


def _modulation(plan: _BlockPlan, noise: torch.Tensor, dtype: torch.dtype, ndim: int):
    """The injection's residual r and scale s for every row at once, ``(N, C, 1, ...)``, or ``None``.

    One matrix product for the whole batch: per chunk these tiny products would cost more in thread
    synchronisation than in arithmetic.
    """
    if plan.inject is None:
        return None
    shape = (noise.shape[0], -1) + (1,) * (ndim - 2)
    noise = noise.to(dtype)
    return plan.inject.residual(noise).view(shape), plan.inject.scale(noise).view(shape)


def _block_parts(block: nn.Module, name: str) -> tuple[_ConvNd, _BatchNorm | None, tuple]:
    """Split a MONAI ``Convolution`` block into its conv, its leading BatchNorm and its row-wise ops."""
    conv = getattr(block, "conv", None)
    if not isinstance(conv, _ConvNd):
        raise ValueError(f"chunked G evaluation needs {name} to be a MONAI Convolution block, got {type(block)}.")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            f"chunked G evaluation supports zero-padded convolutions with explicit padding; {name}.conv has "
            f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}. Use memory_saving='none'."
        )
    ops = list(block.adn.children()) if hasattr(block, "adn") else []
    norm = None
    if ops and isinstance(ops[0], _BatchNorm):
        norm = ops.pop(0)
        if isinstance(norm, nn.SyncBatchNorm):
            raise ValueError(
                f"chunked G evaluation takes BatchNorm statistics on this process only; {name} is a SyncBatchNorm. "
                "Use memory_saving='none'."
            )
    row_ops: list = []
    for op in ops:
        if isinstance(op, _BatchNorm) or (
            isinstance(op, nn.modules.instancenorm._InstanceNorm) and op.track_running_stats
        ):
            raise ValueError(
                f"chunked G evaluation needs {name}'s normalisation right after its convolution (MONAI's 'NAD' "
                f"ordering) and no running statistics elsewhere; got {type(op).__name__} later in the block. "
                "Use memory_saving='none'."
            )
        if type(op) in (nn.Dropout, FastDropout):
            row_ops.append(_DropoutSite(float(op.p) if op.training else 0.0, type(op) is FastDropout))
        elif isinstance(op, nn.modules.dropout._DropoutNd):
            raise ValueError(
                f"chunked G evaluation handles nn.Dropout and FastDropout only, {name} has {type(op).__name__}. "
                "Use memory_saving='none'."
            )
        else:
            row_ops.append(op)
    return conv, norm, tuple(row_ops)


def check_chunkable_refinement(network: nn.Module) -> None:
    """Raise a ``ValueError`` naming the block that :func:`chunked_refinement_forward` cannot evaluate."""
    if not isinstance(network, NoiseInjectedUNet):
        raise ValueError(f"chunked G evaluation needs a NoiseInjectedUNet, got {type(network).__name__}.")
    for i, block in enumerate(network.down):
        _block_parts(block, f"down[{i}]")
    for j, block in enumerate(network.up):
        _block_parts(block, f"up[{j}]")


def _conv_out_spatial(conv: _ConvNd, spatial: Sequence[int]) -> list[int]:
    out = []
    for i, s in enumerate(spatial):
        k, st, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]
        if isinstance(conv, _ConvTransposeNd):
            out.append((s - 1) * st - 2 * p + d * (k - 1) + conv.output_padding[i] + 1)
        else:
            out.append((s + 2 * p - d * (k - 1) - 1) // st + 1)
    return out


def _rows_per_chunk(conv: _ConvNd, parts: Sequence[torch.Tensor], budget: int) -> int:
    """Rows per chunk so that neither the block's input nor its conv output exceeds ``budget`` elements."""
    spatial = parts[0].shape[2:]
    row_in = sum(p[0].numel() for p in parts)
    row_out = conv.out_channels * int(torch.Size(_conv_out_spatial(conv, spatial)).numel())
    return max(1, min(parts[0].shape[0], budget // max(row_in, row_out, 1)))


def _input_rows(parts: Sequence[torch.Tensor], sl: slice) -> torch.Tensor:
    """Rows ``sl`` of the block's input: its parts (G's output and the skip) concatenated along channels."""
    return parts[0][sl] if len(parts) == 1 else torch.cat([p[sl] for p in parts], dim=1)


def _row_wise_tail(plan: _BlockPlan, y: torch.Tensor, masks: Sequence[torch.Tensor], mod: tuple | None) -> torch.Tensor:
    """The row-wise rest of a block after BatchNorm, in G's order (see ``NoiseInjectedUNet.decode``).

    ``mod`` holds this chunk's rows of the injection's r and s (see :func:`_modulation`).
    """
    h = y
    k = 0
    for op in plan.row_ops:
        if isinstance(op, _DropoutSite):
            if op.p == 1.0:
                h = h * torch.zeros((), dtype=h.dtype, device=h.device)
            elif op.p > 0.0:
                h = apply_keep_mask(h, masks[k], op.p)
                k += 1
        else:
            h = op(h)
    if plan.crop is not None:
        h = match_size(h, plan.crop)
    if plan.inject is not None:
        # NoiseInjection.forward, with r and s taken for the whole batch at once
        r, s = mod
        h = plan.inject.proj((h + r) * (s + plan.inject.scale_offset))
    if plan.post_act is not None:
        h = plan.post_act(h)
    return h


def _norm_reduce_dims(t: torch.Tensor) -> list[int]:
    """The dimensions BatchNorm's statistics run over: rows and space, every one but the channels."""
    return [0, *range(2, t.ndim)]


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def _channels_last_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.ndim == 4 else torch.channels_last_3d


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.ndim in (4, 5) and not t.is_contiguous() and t.is_contiguous(memory_format=_channels_last_format(t))


def _output_channels(plan: _BlockPlan) -> int:
    """Channels of a block's output: the injection's 1x1 convolution sets them, else the block's conv."""
    if plan.inject is not None:
        return plan.inject.proj.conv.out_channels
    return plan.conv.out_channels


def _views_of_one_allocation(
    device: torch.device, layout: Sequence[tuple[torch.Size, torch.dtype]], channels_last: bool = False
) -> list[torch.Tensor]:
    """Tensors of the given shapes and dtypes carved out of one allocation, optionally channels-last.

    What a block keeps between its forward and backward passes (conv output, dropout masks, output) lives
    as long as the block's graph. As one allocation it is one mapping of its own, handed back to the system
    when freed; as separate tensors, the smaller ones would sit in the allocator's heap between short-lived
    chunks and keep it from shrinking, which shows up as peak RSS.
    """
    offsets, size = [], 0
    for shape, dtype in layout:
        size = -(-size // 64) * 64  # 64-byte alignment for every tensor
        offsets.append(size)
        size += shape.numel() * torch.empty((), dtype=dtype).element_size()
    buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    views = []
    for (shape, dtype), offset in zip(layout, offsets):
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        views.append(_view_in_layout(buffer[offset : offset + nbytes].view(dtype), shape, channels_last))
    return views


def _view_in_layout(flat: torch.Tensor, shape: Sequence[int], channels_last: bool) -> torch.Tensor:
    """A flat buffer seen as ``shape`` (N, C, *spatial), laid out contiguous or channels-last; rows outermost."""
    if not channels_last:
        return flat.view(shape)
    # (N, *spatial, C) in memory, seen as (N, C, *spatial): the strides channels_last gives
    ndim = len(shape)
    return flat.view(shape[0], *shape[2:], shape[1]).permute(0, ndim - 1, *range(1, ndim - 1))


# ----------------------------------------------------------------------------- what a block keeps for backward
class _BlockParams(NamedTuple):
    """A block's parameters by kind (or one value per parameter, such as whether it needs a gradient).

    :class:`_ChunkedBlock` receives them flat, in this order, after the plan, the counts and the noise.
    """

    conv: tuple  # the convolution's weight, then its bias if it has one
    norm: tuple  # BatchNorm's affine weight and bias, or nothing
    tail: tuple  # the parameters of the row-wise ops after BatchNorm (e.g. the injection's 1x1 projection)
    noise: tuple  # the injection's linear maps of the noise: residual r's, then scale s's

    def flat(self) -> tuple:
        return (*self.conv, *self.norm, *self.tail, *self.noise)

    def counts(self) -> _ParamCounts:
        return _ParamCounts(*(len(group) for group in self))


class _ParamCounts(NamedTuple):
    """How many of a block's flat parameters are of each kind of :class:`_BlockParams`."""

    conv: int
    norm: int
    tail: int
    noise: int

    @property
    def total(self) -> int:
        return sum(self)

    def split(self, flat: Sequence) -> _BlockParams:
        """``flat[:total]`` grouped by kind."""
        groups, start = [], 0
        for size in self:
            groups.append(tuple(flat[start : start + size]))
            start += size
        return _BlockParams(*groups)


class _SavedInputs(NamedTuple):
    """What a block saves through ``ctx.save_for_backward``, unpacked by name in its backward pass."""

    noise: torch.Tensor  # the folded batch's noise (N, noise_dim), detached
    params: _BlockParams
    parts: tuple  # the block's input, in the pieces that are concatenated along channels (output, skip)

    def to_save(self) -> tuple[torch.Tensor, ...]:
        return (self.noise, *self.params.flat(), *self.parts)

    @classmethod
    def unpack(cls, saved: Sequence[torch.Tensor], counts: _ParamCounts) -> _SavedInputs:
        noise, rest = saved[0], saved[1:]
        return cls(noise, counts.split(rest), tuple(rest[counts.total :]))


@dataclass
class _KeptActivations:
    """Intermediates a block keeps on ``ctx`` beside its saved inputs, freed by its backward pass.

    ``z`` and ``masks`` share one allocation with the block's output (see :func:`_views_of_one_allocation`).
    """

    z: torch.Tensor  # the convolution's output for every row
    masks: list[torch.Tensor]  # the dropout keep-masks, in the block's order
    stats: _NormStats | None  # BatchNorm's statistics, as the forward pass used them


# ------------------------------------------------------------------------------------------------ forward steps
def _block_buffers(
    plan: _BlockPlan, parts: Sequence[torch.Tensor], first: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One allocation for the block's conv output ``z``, its dropout masks and its output, in ``first``'s layout.

    ``first`` is the conv output of the first chunk: channels-last nets give channels-last outputs, so the
    buffers follow (no transposing copies), and the dropout masks are laid out as nn.Dropout's, so drawn in
    the same order.
    """
    total, spatial, dtype = parts[0].shape[0], parts[0].shape[2:], parts[0].dtype
    z_spatial = _conv_out_spatial(plan.conv, spatial)
    z_shape = torch.Size((total, plan.conv.out_channels, *z_spatial))
    out_shape = torch.Size((total, _output_channels(plan), *(plan.crop or z_spatial)))
    n_masks = sum(isinstance(op, _DropoutSite) and 0.0 < op.p < 1.0 for op in plan.row_ops)
    z, *masks, out = _views_of_one_allocation(
        parts[0].device,
        [(z_shape, dtype)] + [(z_shape, torch.bool)] * n_masks + [(out_shape, dtype)],
        _is_channels_last(first),
    )
    return z, masks, out


def _draw_dropout_masks(plan: _BlockPlan, masks: Sequence[torch.Tensor]) -> None:
    """The keep-masks in forward order, each drawn over the whole batch exactly as nn.Dropout draws it."""
    it = iter(masks)
    for op in plan.row_ops:
        if isinstance(op, _DropoutSite) and 0.0 < op.p < 1.0:
            mask = next(it)
            fill_keep_mask_(mask, op.p) if op.fast else mask.bernoulli_(1.0 - op.p)


# ----------------------------------------------------------------------------------------------- backward steps
@dataclass
class _TailGrads:
    """Pass 1 of a block's backward: what the row-wise tail gives back, and BatchNorm's whole-batch sums."""

    dy_flat: torch.Tensor  # dy's storage; the input's gradient may reuse it in pass 2
    dy: torch.Tensor  # dL/d(BatchNorm output), laid out as z; pass 2 turns it into dL/dz in place
    params: list[torch.Tensor | None]  # the tail parameters' gradients, None where none is needed
    modulation: tuple[torch.Tensor, torch.Tensor] | None  # dL/dr and dL/ds for every row (with an injection)
    sum_dy: torch.Tensor  # per channel, float64: sum(dy)
    sum_centred_dy: torch.Tensor  # per channel, float64: sum((z - mean) * dy)


def _take_kept_activations(ctx) -> _KeptActivations:
    """The block's kept activations, released from ``ctx``: the backward pass frees them as it goes."""
    kept = ctx.kept
    if kept is None:
        raise RuntimeError(
            "a chunked G block frees its buffers in its backward pass, so the graph of a "
            "memory_saving='chunked' step cannot be back-propagated twice (retain_graph=True)."
        )
    ctx.kept = None
    return kept


def _tail_chunk_backward(
    plan: _BlockPlan,
    y_c: torch.Tensor,
    masks_c: Sequence[torch.Tensor],
    mod_c: tuple[torch.Tensor, torch.Tensor] | None,
    wanted: Sequence[torch.Tensor],
    grad_out_c: torch.Tensor,
) -> tuple[torch.Tensor, tuple, tuple]:
    """The row-wise tail recomputed on one chunk and back-propagated: ``(dL/dy, dL/d(r, s), wanted grads)``."""
    y_c.requires_grad_(True)
    mod_leaves = None if mod_c is None else tuple(t.detach().requires_grad_(True) for t in mod_c)
    with torch.enable_grad():
        o_c = _row_wise_tail(plan, y_c, masks_c, mod_leaves)
        got = torch.autograd.grad(o_c, [y_c, *(mod_leaves or ()), *wanted], grad_out_c, allow_unused=True)
    n_mod = 0 if mod_leaves is None else 2
    return got[0], got[1 : 1 + n_mod], got[1 + n_mod :]


def _tail_backward(
    plan: _BlockPlan,
    kept: _KeptActivations,
    noise: torch.Tensor,
    tail_params: Sequence[torch.Tensor],
    tail_needs: Sequence[bool],
    grad_out: torch.Tensor,
) -> _TailGrads:
    """Pass 1: the row-wise tail recomputed chunk by chunk for dL/d(BN output), the tail's parameter grads
    and BatchNorm's whole-batch sums."""
    z, stats = kept.z, kept.stats
    dims, ndim = _norm_reduce_dims(z), z.ndim
    wanted = [p for p, need in zip(tail_params, tail_needs) if need]
    grads_wanted: list[torch.Tensor | None] = [None] * len(wanted)
    dy_flat = z.new_empty(z.numel())
    dy = _view_in_layout(dy_flat, z.shape, _is_channels_last(z))
    sum_dy = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
    sum_centred_dy = torch.zeros_like(sum_dy)
    mod = _modulation(plan, noise, z.dtype, ndim)
    grad_mod = None if mod is None else (torch.zeros_like(mod[0]), torch.zeros_like(mod[1]))
    for sl in chunk_slices(z.shape[0], plan.rows):
        z_c = z[sl]
        dy[sl], grad_mod_c, grads_c = _tail_chunk_backward(
            plan,
            _normalise(z_c, stats),
            [m[sl] for m in kept.masks],
            None if mod is None else (mod[0][sl], mod[1][sl]),
            wanted,
            grad_out[sl],
        )
        for acc, g in zip(grad_mod or (), grad_mod_c):
            if g is not None:
                acc[sl] = g
        for k, g in enumerate(grads_c):
            if g is not None:
                grads_wanted[k] = g if grads_wanted[k] is None else grads_wanted[k].add_(g)
        del grad_mod_c, grads_c
        if stats is not None:
            dy_c = dy[sl]
            sum_dy += dy_c.sum(dims).double()
            sum_centred_dy += ((z_c - _channel_view(stats.mean, ndim)) * dy_c).sum(dims).double()
    it = iter(grads_wanted)
    grads_tail = [next(it) if need else None for need in tail_needs]
    return _TailGrads(dy_flat, dy, grads_tail, grad_mod, sum_dy, sum_centred_dy)


def _noise_map_grads(
    plan: _BlockPlan,
    noise: torch.Tensor,
    noise_params: Sequence[torch.Tensor],
    noise_needs: Sequence[bool],
    grad_mod: tuple[torch.Tensor, torch.Tensor] | None,
    dtype: torch.dtype,
    ndim: int,
) -> list[torch.Tensor | None]:
    """The gradients of the injection's linear maps of the noise, back-propagated once for the whole batch."""
    if grad_mod is None or not any(noise_needs):
        return [None] * len(noise_params)
    with torch.enable_grad():
        r, s = _modulation(plan, noise, dtype, ndim)
        wanted = [p for p, need in zip(noise_params, noise_needs) if need]
        got = torch.autograd.grad([r, s], wanted, list(grad_mod), allow_unused=True)
    it = iter(got)
    return [next(it) if need else None for need in noise_needs]


def _norm_affine_grads(
    n_norm: int, stats: _NormStats | None, tail: _TailGrads, dtype: torch.dtype
) -> list[torch.Tensor | None]:
    """BatchNorm's affine grads: dL/dweight = sum(dy * xhat), dL/dbias = sum(dy); none without affine params."""
    if not n_norm:
        return []
    return [(tail.sum_centred_dy * stats.invstd.double()).to(dtype), tail.sum_dy.to(dtype)]


@dataclass
class _NormBackward:
    """BatchNorm's exact backward (through the whole batch's statistics), applied to dy in place chunk by chunk."""

    scale: torch.Tensor  # invstd * weight
    coef: torch.Tensor | None  # sum((z - mean) * dy) * invstd^2 / n; None with running statistics
    grad_mean: torch.Tensor | None  # mean(dy); None with running statistics
    mean: torch.Tensor | None

    @classmethod
    def of(cls, stats: _NormStats | None, tail: _TailGrads, dtype: torch.dtype, ndim: int) -> _NormBackward | None:
        if stats is None:
            return None
        scale = _channel_view(stats.invstd * stats.weight, ndim)
        if not stats.batch:
            return cls(scale, None, None, None)
        n = stats.count
        coef = _channel_view((tail.sum_centred_dy * stats.invstd.double() ** 2 / n).to(dtype), ndim)
        grad_mean = _channel_view((tail.sum_dy / n).to(dtype), ndim)
        return cls(scale, coef, grad_mean, _channel_view(stats.mean, ndim))

    def apply_(self, dy_c: torch.Tensor, z_c: torch.Tensor) -> None:
        """``dy_c`` becomes dL/dz for these rows."""
        if self.coef is None:
            dy_c.mul_(self.scale)
            return
        # PyTorch's CPU batch_norm backward: (dy - mean(dy) - (z - mean) * k) * invstd * weight
        dy_c.sub_(self.grad_mean).sub_((z_c - self.mean).mul_(self.coef)).mul_(self.scale)


def _input_grad_buffer(
    tail: _TailGrads, z: torch.Tensor, parts: Sequence[torch.Tensor], part_needs: Sequence[bool]
) -> torch.Tensor | None:
    """Where the gradient of the block's input goes, or ``None`` when no part of the input needs one.

    It overwrites the chunks of dy already used when it fits in them (rows of at most the size of dy's rows
    land in rows already done); else it gets a buffer of its own.
    """
    if not any(part_needs):
        return None
    total = z.shape[0]
    in_shape = (total, sum(p.shape[1] for p in parts), *parts[0].shape[2:])
    row_in, row_z = torch.Size(in_shape[1:]).numel(), z[0].numel()
    flat = tail.dy_flat[: total * row_in] if row_in <= row_z else tail.dy_flat.new_empty(total * row_in)
    return _view_in_layout(flat, in_shape, _is_channels_last(parts[0]))


def _conv_backward(
    plan: _BlockPlan,
    kept: _KeptActivations,
    tail: _TailGrads,
    parts: Sequence[torch.Tensor],
    part_needs: Sequence[bool],
    conv_needs: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Pass 2: dL/dz through BatchNorm in place of dy, chunk by chunk, then the convolution's gradients
    ``(weight, bias, input)`` with ``convolution_backward``, without recomputing the convolution."""
    conv, z = plan.conv, kept.z
    norm_backward = _NormBackward.of(kept.stats, tail, z.dtype, z.ndim)
    grad_in = _input_grad_buffer(tail, z, parts, part_needs)
    grad_w = grad_b = None
    has_bias = len(conv_needs) == 2
    mask = [grad_in is not None, conv_needs[0], has_bias and conv_needs[1]]
    transposed = isinstance(conv, _ConvTransposeNd)
    output_padding = conv.output_padding if transposed else (0,) * len(conv.stride)
    for sl in chunk_slices(z.shape[0], plan.rows):
        dz_c = tail.dy[sl]
        if norm_backward is not None:
            norm_backward.apply_(dz_c, z[sl])
        gi, gw, gb = torch.ops.aten.convolution_backward(
            dz_c,
            _input_rows(parts, sl),
            conv.weight,
            [conv.out_channels] if conv.bias is not None else None,
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            transposed,
            list(output_padding),
            conv.groups,
            mask,
        )
        del dz_c
        if gw is not None:
            grad_w = gw if grad_w is None else grad_w.add_(gw)
        if gb is not None:
            grad_b = gb if grad_b is None else grad_b.add_(gb)
        if gi is not None:
            grad_in[sl] = gi
        del gi
    return grad_w, grad_b, grad_in


def _split_input_grad(
    grad_in: torch.Tensor | None, parts: Sequence[torch.Tensor], part_needs: Sequence[bool]
) -> list[torch.Tensor | None]:
    """The input's gradient cut back into the parts the block's input was concatenated from."""
    grad_parts: list[torch.Tensor | None] = []
    start = 0
    for p, need in zip(parts, part_needs):
        width = p.shape[1]
        grad_parts.append(grad_in[:, start : start + width] if need else None)
        start += width
    return grad_parts


class _ChunkedBlock(torch.autograd.Function):
    """One G block over the folded batch, evaluated in row chunks (see the module docstring).

    Called as ``_ChunkedBlock.apply(plan, counts, noise, *params.flat(), *parts)`` (see :func:`_run_block`).
    """

    @staticmethod
    def forward(ctx, plan: _BlockPlan, counts: _ParamCounts, noise: torch.Tensor, *tensors: torch.Tensor):
        params, parts = counts.split(tensors), tensors[counts.total :]
        slices = chunk_slices(parts[0].shape[0], plan.rows)
        first = plan.conv(_input_rows(parts, slices[0]))
        z, masks, out = _block_buffers(plan, parts, first)
        z[slices[0]] = first
        del first
        for sl in slices[1:]:
            z[sl] = plan.conv(_input_rows(parts, sl))
        z_chunks = [z[sl] for sl in slices]
        stats = _norm_forward(plan.norm, z_chunks)
        _draw_dropout_masks(plan, masks)
        mod = _modulation(plan, noise, parts[0].dtype, z.ndim)
        for sl, z_c in zip(slices, z_chunks):
            mod_c = None if mod is None else (mod[0][sl], mod[1][sl])
            out[sl] = _row_wise_tail(plan, _normalise(z_c, stats), [m[sl] for m in masks], mod_c)
        ctx.plan, ctx.counts = plan, counts
        ctx.kept = _KeptActivations(z, masks, stats)
        ctx.save_for_backward(*_SavedInputs(noise, params, tuple(parts)).to_save())
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        plan, counts = ctx.plan, ctx.counts
        kept = _take_kept_activations(ctx)
        saved = _SavedInputs.unpack(ctx.saved_tensors, counts)
        needs = ctx.needs_input_grad[3:]
        param_needs, part_needs = counts.split(needs), needs[counts.total :]
        dtype, ndim = kept.z.dtype, kept.z.ndim
        tail = _tail_backward(plan, kept, saved.noise, saved.params.tail, param_needs.tail, grad_out)
        grads_noise = _noise_map_grads(
            plan, saved.noise, saved.params.noise, param_needs.noise, tail.modulation, dtype, ndim
        )
        grads_norm = _norm_affine_grads(counts.norm, kept.stats, tail, dtype)
        grad_w, grad_b, grad_in = _conv_backward(plan, kept, tail, saved.parts, part_needs, param_needs.conv)
        del kept  # the conv output and the masks go now
        grads = _BlockParams(
            conv=(grad_w, grad_b)[: counts.conv],
            norm=tuple(grads_norm),
            tail=tuple(tail.params),
            noise=tuple(grads_noise),
        )
        return (None, None, None, *grads.flat(), *_split_input_grad(grad_in, saved.parts, part_needs))


@dataclass
class _NormStats:
    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor  # ones when the norm has no affine weight
    bias: torch.Tensor
    batch: bool  # batch statistics (gradients flow through them) rather than running statistics
    count: int  # values per channel


def _norm_forward(norm: _BatchNorm | None, z_chunks: Sequence[torch.Tensor]) -> _NormStats | None:
    """BatchNorm's statistics over all chunks and its running-statistics update, as ``_BatchNorm.forward`` does."""
    if norm is None:
        return None
    first = z_chunks[0]
    channels, dims = first.shape[1], _norm_reduce_dims(first)
    n = sum(z_c.numel() for z_c in z_chunks) // channels
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    batch = norm.training or (norm.running_mean is None and norm.running_var is None)
    weight = norm.weight.detach() if norm.weight is not None else first.new_ones(channels)
    bias = norm.bias.detach() if norm.bias is not None else first.new_zeros(channels)
    if not batch:
        invstd = torch.rsqrt(norm.running_var.double() + norm.eps).to(first.dtype)
        return _NormStats(norm.running_mean.clone(), invstd, weight, bias, batch=False, count=n)
    if n <= 1:
        shape = (sum(z_c.shape[0] for z_c in z_chunks), *first.shape[1:])
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    # two passes with float64 accumulation, like PyTorch's CPU batch_norm kernel
    total = torch.zeros(channels, dtype=torch.float64, device=first.device)
    for z_c in z_chunks:
        total += z_c.sum(dims).double()
    mean = (total / n).to(first.dtype)
    var_sum = torch.zeros_like(total)
    mean_v = _channel_view(mean, first.ndim)
    for z_c in z_chunks:
        var_sum += (z_c - mean_v).pow_(2).sum(dims).double()
    invstd = torch.rsqrt(var_sum / n + norm.eps).to(first.dtype)
    if norm.running_mean is not None:
        with torch.no_grad():
            norm.running_mean.copy_(momentum * mean.double() + (1 - momentum) * norm.running_mean.double())
            unbiased = var_sum / (n - 1)
            norm.running_var.copy_(momentum * unbiased + (1 - momentum) * norm.running_var.double())
    return _NormStats(mean, invstd, weight, bias, batch=True, count=n)


def _normalise(z_c: torch.Tensor, stats: _NormStats | None) -> torch.Tensor:
    """BatchNorm's output with fixed statistics, in the CPU kernel's form ``z * alpha + beta``."""
    if stats is None:
        return z_c.clone()
    alpha = stats.invstd * stats.weight
    shift = stats.bias - stats.mean * alpha
    return torch.addcmul(_channel_view(shift, z_c.ndim), z_c, _channel_view(alpha, z_c.ndim))


def _run_block(
    block: nn.Module,
    name: str,
    parts: Sequence[torch.Tensor],
    noise: torch.Tensor,
    budget: int,
    crop: Sequence[int] | None = None,
    inject: NoiseInjection | None = None,
    post_act: nn.Module | None = None,
) -> torch.Tensor:
    conv, norm, row_ops = _block_parts(block, name)
    plan = _BlockPlan(
        conv=conv,
        norm=norm,
        row_ops=row_ops,
        crop=None if crop is None else tuple(int(s) for s in crop),
        inject=inject,
        post_act=post_act,
        rows=_rows_per_chunk(conv, parts, budget),
    )
    params = _BlockParams(
        conv=(conv.weight,) + ((conv.bias,) if conv.bias is not None else ()),
        norm=(norm.weight, norm.bias) if norm is not None and norm.weight is not None else (),
        tail=tuple(p for m in plan.tail_modules() for p in m.parameters()),
        noise=tuple(p for m in plan.noise_modules() for p in m.parameters()),
    )
    return _ChunkedBlock.apply(plan, params.counts(), noise, *params.flat(), *parts)


def chunked_refinement_forward(
    network: NoiseInjectedUNet,
    image: torch.Tensor,
    calibration: torch.Tensor,
    noise: torch.Tensor,
    chunk_size: int = 4,
    return_logits: bool = False,
) -> torch.Tensor:
    """``network(image, calibration, noise)`` evaluated block by block in row chunks; same values and gradients.

    Args:
        network: G, a :class:`~car_med.networks.NoiseInjectedUNet` whose blocks are MONAI ``Convolution``
            blocks with BatchNorm first (the default ``"NAD"`` ordering) or no BatchNorm at all.
        image, calibration, noise: as ``NoiseInjectedUNet.forward``, already folded ``(B*M, ...)``.
        chunk_size: rows per chunk in the largest block (G's full-resolution block); a block whose rows
            hold k times fewer numbers takes k times as many rows, so every chunk is about the same size.
        return_logits: return the logits instead of the softmax.

    Returns:
        G's probabilities (or logits), ``(B*M, num_classes, *spatial)``, with an autograd graph to G's
        parameters. BatchNorm's running statistics are updated once, as one forward pass of G would.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    network._check_inputs(image, calibration, noise)
    if getattr(network, "full_resolution_skip", False) or getattr(network, "upsample", "deconv") != "deconv":
        raise ValueError(
            "memory_saving='chunked' supports G's paper architecture only (no full_resolution_skip, upsample "
            "'deconv'); use memory_saving='none' (the setting for GPUs) or those G options' defaults."
        )
    noise = noise.detach()
    # elements per chunk: chunk_size rows of the largest block (G's full-resolution block)
    budget = chunk_size * network.channels[0] * int(torch.Size(image.shape[2:]).numel())
    h = torch.cat([image, calibration.detach().to(image.dtype)], dim=1)
    skips = []
    parts = [h]
    for i, block in enumerate(network.down):
        h = _run_block(block, f"down[{i}]", parts, noise, budget)
        skips.append(h)
        parts = [h]
    n = len(network.up)
    injections = dict(network.inject.items())  # nn.ModuleDict has no .get
    for j, block in enumerate(network.up):
        target = skips[n - 2 - j] if j < n - 1 else image
        inject = injections.get(str(j))
        post_act = network.act if inject is not None and j < n - 1 else None
        h = _run_block(block, f"up[{j}]", parts, noise, budget, target.shape[2:], inject, post_act)
        # the skip concatenation happens chunk by chunk inside the next block
        parts = [h, target] if j < n - 1 else [h]
    return h if return_logits else torch.softmax(h, dim=1)


def chunked_adversarial_loss(
    discriminator: nn.Module,
    image: torch.Tensor,
    samples: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    weight: float,
    chunk_size: int,
    shown: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """D's logits for every row and ``weight * d loss_fn(logits) / d samples``, one chunk of rows at a time.

    ``loss_fn`` must be a mean over rows (as :func:`~car_med.losses.generator_adversarial_loss` is): each
    chunk's loss is weighted by its share of the rows, and its backward pass runs at once, so D's
    activations exist for one chunk only. D's parameters get no gradient.

    Args:
        discriminator: D, called as ``D(image_rows, label_map_rows)``; it must treat rows independently
            (no BatchNorm).
        image: D's image input for every row ``(N, ...)``.
        samples: G's detached samples ``(N, ...)``.
        loss_fn: the adversarial loss of a block of logits.
        weight: factor on the loss (the trainer's ``adversarial_weight``).
        chunk_size: rows per chunk.
        shown: maps a chunk of samples (a leaf requiring grad) and its slice to D's label-map input, e.g.
            to overwrite ignore pixels; identity by default.

    Returns:
        ``(logits, grad)``: D's logits ``(N, 1)`` (detached) and the gradient with respect to ``samples``.
    """
    total = samples.shape[0]
    grad = torch.empty_like(samples)
    logits = []
    requires = [p.requires_grad for p in discriminator.parameters()]
    discriminator.requires_grad_(False)
    try:
        for sl in chunk_slices(total, chunk_size):
            leaf = samples[sl].detach().requires_grad_(True)
            with torch.enable_grad():
                label_map = leaf if shown is None else shown(leaf, sl)
                l_c = discriminator(image[sl], label_map)
                loss_c = loss_fn(l_c) * (weight * l_c.shape[0] / total)
                (g,) = torch.autograd.grad(loss_c, leaf)
            grad[sl] = g
            logits.append(l_c.detach())
    finally:
        for p, r in zip(discriminator.parameters(), requires):
            p.requires_grad_(r)
    return torch.cat(logits), grad
