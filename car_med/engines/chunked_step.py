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
  chunk twice, first for BatchNorm's whole-batch sums, then for the gradient itself (so the gradient at
  BatchNorm's output never exists for the whole batch), applies BatchNorm's exact backward (through the
  batch statistics), and takes the convolution's gradients with ``convolution_backward``, without
  recomputing the convolution.
- :func:`chunked_adversarial_loss` evaluates D on chunks of G's detached samples and back-propagates each
  chunk at once, collecting dL_adv/dsample. D has no normalisation, so this is exact.

Dropout masks are drawn for the whole block at once, as ``nn.Dropout`` or G's ``FastDropout`` draws them,
so on CPU the masks, and with them every number, match the folded batch's for the same seed (on CUDA
PyTorch fuses dropout with another random stream: the masks then differ, with the same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _rows_for(conv: _ConvNd, parts: Sequence[torch.Tensor], budget: int) -> int:
    """Rows per chunk so that neither the block's input nor its conv output exceeds ``budget`` elements."""
    spatial = parts[0].shape[2:]
    row_in = sum(p[0].numel() for p in parts)
    row_out = conv.out_channels * int(torch.Size(_conv_out_spatial(conv, spatial)).numel())
    return max(1, min(parts[0].shape[0], budget // max(row_in, row_out, 1)))


def _gather(parts: Sequence[torch.Tensor], sl: slice) -> torch.Tensor:
    return parts[0][sl] if len(parts) == 1 else torch.cat([p[sl] for p in parts], dim=1)


def _tail(plan: _BlockPlan, y: torch.Tensor, masks: Sequence[torch.Tensor], mod: tuple | None) -> torch.Tensor:
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


def _reduce_dims(t: torch.Tensor) -> list[int]:
    return [0, *range(2, t.ndim)]


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def _cl(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.ndim == 4 else torch.channels_last_3d


def _tail_channels(plan: _BlockPlan) -> int:
    """Channels of a block's output: the injection's 1x1 convolution sets them, else the block's conv."""
    if plan.inject is not None:
        return plan.inject.proj.conv.out_channels
    return plan.conv.out_channels


def _arena(
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
        views.append(_shaped(buffer[offset : offset + nbytes].view(dtype), shape, channels_last))
    return views


def _shaped(flat: torch.Tensor, shape: Sequence[int], channels_last: bool) -> torch.Tensor:
    """A flat buffer seen as ``shape`` (N, C, *spatial), laid out contiguous or channels-last; rows outermost."""
    if not channels_last:
        return flat.view(shape)
    # (N, *spatial, C) in memory, seen as (N, C, *spatial): the strides channels_last gives
    ndim = len(shape)
    return flat.view(shape[0], *shape[2:], shape[1]).permute(0, ndim - 1, *range(1, ndim - 1))


def _is_cl(t: torch.Tensor) -> bool:
    return t.ndim in (4, 5) and not t.is_contiguous() and t.is_contiguous(memory_format=_cl(t))


class _ChunkedBlock(torch.autograd.Function):
    """One G block over the folded batch, evaluated in row chunks (see the module docstring)."""

    @staticmethod
    def forward(ctx, plan: _BlockPlan, n_params: int, noise: torch.Tensor, *tensors: torch.Tensor):
        params, parts = tensors[:n_params], tensors[n_params:]
        total, spatial, dtype = parts[0].shape[0], parts[0].shape[2:], parts[0].dtype
        slices = chunk_slices(total, plan.rows)
        z_spatial = _conv_out_spatial(plan.conv, spatial)
        z_shape = torch.Size((total, plan.conv.out_channels, *z_spatial))
        out_shape = torch.Size((total, _tail_channels(plan), *(plan.crop or z_spatial)))
        n_masks = sum(isinstance(op, _DropoutSite) and 0.0 < op.p < 1.0 for op in plan.row_ops)
        first = plan.conv(_gather(parts, slices[0]))
        # the conv's own memory format (channels-last nets give channels-last outputs): no transposing copies,
        # and dropout masks laid out as nn.Dropout's, so drawn in the same order
        z, *masks, out = _arena(
            parts[0].device,
            [(z_shape, dtype)] + [(z_shape, torch.bool)] * n_masks + [(out_shape, dtype)],
            _is_cl(first),
        )
        z[slices[0]] = first
        del first
        for sl in slices[1:]:
            z[sl] = plan.conv(_gather(parts, sl))
        z_chunks = [z[sl] for sl in slices]
        stats = _norm_forward(plan.norm, z_chunks)
        # masks in forward order, each drawn over the whole batch exactly as nn.Dropout draws it
        it = iter(masks)
        for op in plan.row_ops:
            if isinstance(op, _DropoutSite) and 0.0 < op.p < 1.0:
                mask = next(it)
                fill_keep_mask_(mask, op.p) if op.fast else mask.bernoulli_(1.0 - op.p)
        mod = _modulation(plan, noise, dtype, z.ndim)
        for sl, z_c in zip(slices, z_chunks):
            mod_c = None if mod is None else (mod[0][sl], mod[1][sl])
            out[sl] = _tail(plan, _normalise(z_c, stats), [m[sl] for m in masks], mod_c)
        ctx.plan, ctx.n_params, ctx.stats = plan, n_params, stats
        # intermediates, kept on ctx: they share one allocation with the output (see _arena)
        ctx.z, ctx.masks = z, masks
        ctx.save_for_backward(noise, *params, *parts)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        plan, n_params, stats = ctx.plan, ctx.n_params, ctx.stats
        z, masks = ctx.z, ctx.masks
        if z is None:
            raise RuntimeError(
                "a chunked G block frees its buffers in its backward pass, so the graph of a "
                "memory_saving='chunked' step cannot be back-propagated twice (retain_graph=True)."
            )
        ctx.z = ctx.masks = None
        saved = ctx.saved_tensors
        noise, params, parts = saved[0], saved[1 : 1 + n_params], saved[1 + n_params :]
        needs = ctx.needs_input_grad[3:]
        param_needs, part_needs = needs[:n_params], needs[n_params:]
        total = z.shape[0]
        slices = chunk_slices(total, plan.rows)
        conv, norm = plan.conv, plan.norm
        n_conv = 1 + (conv.bias is not None)
        n_norm = 0 if norm is None or norm.weight is None else 2
        n_noise = sum(1 for m in plan.noise_modules() for _ in m.parameters())
        n_tail = n_params - n_conv - n_norm - n_noise
        tail_params = list(params[n_conv + n_norm : n_conv + n_norm + n_tail])
        tail_needs = param_needs[n_conv + n_norm : n_conv + n_norm + n_tail]
        noise_params = list(params[n_params - n_noise :])
        noise_needs = param_needs[n_params - n_noise :]
        wanted = [p for p, need in zip(tail_params, tail_needs) if need]
        grads_wanted: list[torch.Tensor | None] = [None] * len(wanted)
        dims, ndim = _reduce_dims(z), z.ndim

        # pass 1: recompute the row-wise tail chunk by chunk for dL/d(BN output), the tail's parameter grads
        # and BatchNorm's whole-batch sums
        dy_flat = z.new_empty(z.numel())
        dy = _shaped(dy_flat, z.shape, _is_cl(z))
        sum_dy = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
        dot_p = torch.zeros_like(sum_dy)
        mod = _modulation(plan, noise, z.dtype, ndim)
        grad_mod = None if mod is None else (torch.zeros_like(mod[0]), torch.zeros_like(mod[1]))
        for sl in slices:
            z_c = z[sl]
            y_c = _normalise(z_c, stats).requires_grad_(True)
            leaves = [y_c] if mod is None else [y_c, mod[0][sl].detach().requires_grad_(True)]
            if mod is not None:
                leaves.append(mod[1][sl].detach().requires_grad_(True))
            with torch.enable_grad():
                o_c = _tail(plan, y_c, [m[sl] for m in masks], None if mod is None else tuple(leaves[1:]))
                got = torch.autograd.grad(o_c, [*leaves, *wanted], grad_out[sl], allow_unused=True)
            dy[sl] = got[0]
            if mod is not None:
                for acc, g in zip(grad_mod, got[1:3]):
                    if g is not None:
                        acc[sl] = g
                got = got[:1] + got[3:]
            for k, g in enumerate(got[1:]):
                if g is not None:
                    grads_wanted[k] = g if grads_wanted[k] is None else grads_wanted[k].add_(g)
            if stats is not None:
                dy_c = dy[sl]
                sum_dy += dy_c.sum(dims).double()
                dot_p += ((z_c - _channel_view(stats.mean, ndim)) * dy_c).sum(dims).double()
            del y_c, o_c, got

        grads_noise: list[torch.Tensor | None] = [None] * n_noise
        if mod is not None and any(noise_needs):
            # the injection's linear maps, back-propagated once for the whole batch
            with torch.enable_grad():
                r, s = _modulation(plan, noise, z.dtype, ndim)
                wanted_noise = [p for p, need in zip(noise_params, noise_needs) if need]
                got = torch.autograd.grad([r, s], wanted_noise, list(grad_mod), allow_unused=True)
            it = iter(got)
            grads_noise = [next(it) if need else None for need in noise_needs]

        grads_norm: list[torch.Tensor | None] = []
        if n_norm:
            # BatchNorm's affine grads: dL/dweight = sum(dy * xhat), dL/dbias = sum(dy)
            grads_norm = [(dot_p * stats.invstd.double()).to(z.dtype), sum_dy.to(z.dtype)]

        # pass 2: dL/dz through BatchNorm (exact: with the whole batch's sums), in place of dy; conv grads
        if stats is not None:
            scale = _channel_view(stats.invstd * stats.weight, ndim)
            if stats.batch:
                n = stats.count
                k_coef = _channel_view((dot_p * stats.invstd.double() ** 2 / n).to(z.dtype), ndim)
                grad_mean = _channel_view((sum_dy / n).to(z.dtype), ndim)
                mean = _channel_view(stats.mean, ndim)
        in_shape = (total, sum(p.shape[1] for p in parts), *parts[0].shape[2:])
        grad_in = None
        if any(part_needs):
            row_in, row_z = torch.Size(in_shape[1:]).numel(), z[0].numel()
            # the input's grad overwrites the chunks of dy already used when it fits in them (rows of at most
            # the size of dy's rows land in rows already done); else it gets a buffer of its own
            flat = dy_flat[: total * row_in] if row_in <= row_z else dy_flat.new_empty(total * row_in)
            grad_in = _shaped(flat, in_shape, _is_cl(parts[0]))
        grad_w = grad_b = None
        mask = [grad_in is not None, param_needs[0], n_conv == 2 and param_needs[1]]
        transposed = isinstance(conv, _ConvTransposeNd)
        output_padding = conv.output_padding if transposed else (0,) * len(conv.stride)
        for sl in slices:
            dz_c = dy[sl]
            if stats is not None:
                if stats.batch:
                    # PyTorch's CPU batch_norm backward: (dy - mean(dy) - (z - mean) * k) * invstd * weight
                    dz_c.sub_(grad_mean).sub_((z[sl] - mean).mul_(k_coef)).mul_(scale)
                else:
                    dz_c.mul_(scale)
            gi, gw, gb = torch.ops.aten.convolution_backward(
                dz_c,
                _gather(parts, sl),
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
        del z, masks
        grad_parts: list[torch.Tensor | None] = []
        start = 0
        for p, need in zip(parts, part_needs):
            width = p.shape[1]
            grad_parts.append(grad_in[:, start : start + width] if need else None)
            start += width
        it = iter(grads_wanted)
        grads_tail = [next(it) if need else None for need in tail_needs]
        grads_params = [grad_w] + ([grad_b] if n_conv == 2 else []) + grads_norm + grads_tail + grads_noise
        return (None, None, None, *grads_params, *grad_parts)


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
    channels, dims = first.shape[1], _reduce_dims(first)
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
        rows=_rows_for(conv, parts, budget),
    )
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    if norm is not None and norm.weight is not None:
        params += [norm.weight, norm.bias]
    params += [p for m in plan.tail_modules() for p in m.parameters()]
    params += [p for m in plan.noise_modules() for p in m.parameters()]
    return _ChunkedBlock.apply(plan, len(params), noise, *params, *parts)


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
