"""The reference implementation of :func:`~drbench.ops.functional.region_conv2d`, registered as ``"reference"``."""

from __future__ import annotations

import torch

from drbench.ops.region_conv_base import guide_gradient, per_sample_conv2d, register_region_conv_impl


@register_region_conv_impl("reference")
class RegionConv2dReference(torch.autograd.Function):
    """Straightforward implementation: every region's output everywhere, then one kept per position.

    It costs m convolutions and holds m outputs; it is the reference that faster implementations are tested
    against, not the one to time.
    """

    @staticmethod
    def forward(ctx, x, guide, filters, stride, padding, dilation):
        region_outputs = _all_region_outputs(x, filters, stride, padding, dilation)  # (B, m, O, H', W')
        mask = guide.argmax(dim=1)
        ctx.save_for_backward(x, guide, filters, mask)
        ctx.conv_args = (stride, padding, dilation)
        return _select_regions(region_outputs, mask)

    @staticmethod
    def backward(ctx, grad_out):
        x, guide, filters, mask = ctx.saved_tensors
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[0])
            filters_ = filters.detach().requires_grad_(ctx.needs_input_grad[2])
            region_outputs = _all_region_outputs(x_, filters_, *ctx.conv_args)
            selected = _select_regions(region_outputs, mask)
            wanted = [t for t, need in ((x_, ctx.needs_input_grad[0]), (filters_, ctx.needs_input_grad[2])) if need]
            grads = iter(torch.autograd.grad(selected, wanted, grad_out) if wanted else ())
        grad_x = next(grads) if ctx.needs_input_grad[0] else None
        grad_filters = next(grads) if ctx.needs_input_grad[2] else None
        grad_guide = None
        if ctx.needs_input_grad[1]:
            region_scores = torch.einsum("bmohw,bohw->bmhw", region_outputs.detach(), grad_out)
            grad_guide = guide_gradient(guide, region_scores)
        return grad_x, grad_guide, grad_filters, None, None, None


def _all_region_outputs(x, filters, stride, padding, dilation):
    batch, regions, out_channels = filters.shape[:3]
    stacked = filters.reshape(batch, regions * out_channels, *filters.shape[3:])
    out = per_sample_conv2d(x, stacked, stride, padding, dilation)
    return out.view(batch, regions, out_channels, *out.shape[-2:])


def _select_regions(region_outputs, mask):
    index = mask[:, None, None].expand(-1, 1, region_outputs.shape[2], -1, -1)
    return region_outputs.gather(1, index).squeeze(1)
