"""Dynamic (CondInst-style) mask convolutions of RTMDet-Ins.

Each instance predicts 169 numbers that parameterise three 1x1 convs applied to
``cat([relative coords (2), prototypes (8)])`` on the stride-8 mask feature map:
10 -> 8, ReLU, 8 -> 8, ReLU, 8 -> 1. The flat layout is ``[w0(80) | w1(64) | w2(8) | b0(8) | b1(8) | b2(1)]``,
weights out-major ((8, 10), (8, 8), (1, 8)).
"""

from __future__ import annotations

import torch

# Relative coordinates are divided by (prior stride * 8) upstream; the 8 is a fixed normaliser.
REL_COORD_NORM = 8.0


def dynamic_param_sizes(
    num_prototypes: int = 8, dyconv_channels: int = 8, num_dyconvs: int = 3
) -> tuple[list[int], list[int]]:
    """(weight sizes, bias sizes) of the dynamic convs; their total is the kernel length (169 by default)."""
    weights, biases = [], []
    for i in range(num_dyconvs):
        cin = num_prototypes + 2 if i == 0 else dyconv_channels
        cout = 1 if i == num_dyconvs - 1 else dyconv_channels
        weights.append(cin * cout)
        biases.append(cout)
    return weights, biases


def num_dynamic_params(num_prototypes: int = 8, dyconv_channels: int = 8, num_dyconvs: int = 3) -> int:
    """Length of the per-instance kernel vector (169 for RTMDet-Ins)."""
    w, b = dynamic_param_sizes(num_prototypes, dyconv_channels, num_dyconvs)
    return sum(w) + sum(b)


def relative_coords(priors: torch.Tensor, height: int, width: int, mask_stride: int = 8) -> torch.Tensor:
    """``(..., N, 4)`` priors ``[x, y, s, s]`` -> ``(..., N, 2, h, w)`` ``(prior - pixel) / (8 * s)``.

    Pixel ``(i, j)`` of the mask map sits at ``(j * mask_stride, i * mask_stride)`` in input pixels.
    """
    dtype, device = priors.dtype, priors.device
    gx = torch.arange(width, device=device, dtype=dtype) * mask_stride
    gy = torch.arange(height, device=device, dtype=dtype) * mask_stride
    norm = (priors[..., 2] * REL_COORD_NORM)[..., None, None]
    rel_x = (priors[..., 0, None, None] - gx.view(1, width)) / norm
    rel_y = (priors[..., 1, None, None] - gy.view(height, 1)) / norm
    return torch.stack(torch.broadcast_tensors(rel_x, rel_y), dim=-3)


def dynamic_mask_logits(
    mask_feat: torch.Tensor,
    kernels: torch.Tensor,
    priors: torch.Tensor,
    mask_stride: int = 8,
    dyconv_channels: int = 8,
) -> torch.Tensor:
    """Run each instance's dynamic convs on the prototypes.

    Args:
        mask_feat: ``(P, h, w)`` prototypes of one image, or ``(B, P, h, w)`` for a batch.
        kernels: ``(N, K)`` kernel vectors (``K = 169`` for P = 8), or ``(B, N, K)``.
        priors: ``(N, 4)`` ``[x, y, stride, stride]`` of each instance's prior, or ``(B, N, 4)``.
        mask_stride: stride of the mask feature map in input pixels.
        dyconv_channels: hidden width of the dynamic convs.

    Returns:
        ``(N, h, w)`` mask logits at mask-feature resolution (``(B, N, h, w)`` when batched).
    """
    batched = mask_feat.dim() == 4
    if not batched:
        if mask_feat.dim() != 3 or kernels.dim() != 2 or priors.dim() != 2:
            raise ValueError(
                f"expected mask_feat (P,h,w), kernels (N,K), priors (N,4); got {tuple(mask_feat.shape)}, "
                f"{tuple(kernels.shape)}, {tuple(priors.shape)}"
            )
        mask_feat, kernels, priors = mask_feat[None], kernels[None], priors[None]
    b, p, h, w = mask_feat.shape
    if priors.dim() == 2:
        priors = priors.expand(b, *priors.shape)
    n = kernels.shape[1]
    w_sizes, b_sizes = dynamic_param_sizes(p, dyconv_channels)
    if kernels.shape[-1] != sum(w_sizes) + sum(b_sizes):
        raise ValueError(f"kernel length {kernels.shape[-1]} does not match {p} prototypes ({sum(w_sizes + b_sizes)})")
    if n == 0:
        out = mask_feat.new_zeros(b, 0, h, w)
        return out if batched else out[0]
    parts = torch.split(kernels, w_sizes + b_sizes, dim=-1)
    w0 = parts[0].reshape(b, n, dyconv_channels, p + 2)
    w1 = parts[1].reshape(b, n, dyconv_channels, dyconv_channels)
    w2 = parts[2].reshape(b, n, 1, dyconv_channels)
    b0, b1, b2 = (t[..., None, None] for t in parts[3:])

    # Coordinates in fp32 (pixel positions up to ~1000 lose too much in half precision), then the kernels' dtype.
    rel = relative_coords(priors.float(), h, w, mask_stride).to(kernels.dtype)  # (B, N, 2, h, w)
    # First layer split in its coordinate and prototype parts, so the prototypes are not copied per instance.
    x = torch.einsum("bnoc,bnchw->bnohw", w0[..., :2], rel)
    x = x + torch.einsum("bnoc,bchw->bnohw", w0[..., 2:], mask_feat) + b0
    x = torch.relu(x)
    x = torch.relu(torch.einsum("bnoc,bnchw->bnohw", w1, x) + b1)
    x = (torch.einsum("bnoc,bnchw->bnohw", w2, x) + b2)[:, :, 0]
    return x if batched else x[0]
