"""The mathematics of network deconvolution (Ye et al., ICLR 2020, Sec. 3 and Alg. 1).

A deconvolution layer whitens the im2col patches that a convolution sees. With X the matrix
of sampled patches (one row per sample, one column per patch feature), mu its column mean and
Cov = (X - mu)^T (X - mu) / M + eps * I, the layer computes

    conv(D (x - mu))  with  D = Cov^(-1/2)  (Newton-Schulz, Alg. 1 lines 6-10)

and, because both D and mu are linear, folds them into the convolution itself:
    W' = W D,   b' = b - W' mu.

Channel blocks: the C input channels are split into G = C / B blocks of B channels; every block
contributes its patches as extra samples of ONE shared covariance of size nf = k*k*B. The block
index is the fastest-moving axis of the reference's (channel-major) patch layout, so block j holds
columns j, j + G, j + 2G, ... of the im2col matrix. This module works on a feature-major
"patch matrix" P of shape (C*k*k, S) (S samples), where that interleaving is a plain view
(nf, G, S).

Everything here is differentiable: the paper back-propagates through the statistics.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'isqrt_newton_schulz', 'sample_patches', 'whitening_statistics',
    'fold_conv_whitening', 'fold_linear_whitening',
]


def isqrt_newton_schulz(cov: Tensor, n_iter: int) -> Tensor:
    """Coupled Newton-Schulz iteration for cov^(-1/2), for one (d, d) or a batch (b, d, d).

    Y0 = A / ||A||_F, Z0 = I; T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z; result Z / sqrt(||A||_F).
    The paper runs a fixed, small number of iterations (5 by default), which is NOT converged:
    that truncated polynomial is the function the models were trained with, so it is kept.
    Two products are skipped because they cannot change the result: with Z0 = I the first
    Z Y and T Z are Y0 and T, and the last iteration's Y update is never read.
    """
    if n_iter < 1:
        raise ValueError(f'n_iter must be >= 1, got {n_iter}')
    d = cov.shape[-1]
    norm = torch.linalg.matrix_norm(cov, keepdim=True)  # Frobenius, per matrix
    y = cov / norm
    eye3 = torch.eye(d, dtype=cov.dtype, device=cov.device).mul_(3.0)
    t = 0.5 * (eye3 - y)
    z = t
    for i in range(1, n_iter):
        y = y @ t
        t = 0.5 * (eye3 - z @ y)
        z = t @ z
    return z / norm.sqrt()


def sample_patches(
        x: Tensor,
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int],
        padding: Tuple[int, int],
        sampling_stride: Tuple[int, int],
) -> Tensor:
    """Sampled im2col patches of ``x`` as a feature-major matrix of shape (C*kh*kw, S).

    Row c*kh*kw + p is channel c at kernel position p (PyTorch's unfold order). Patches are
    taken every ``sampling_stride`` pixels. For 1x1 kernels the reference instead keeps every
    (sh*sw)-th pixel of the flattened (N, H, W) order, which is reproduced exactly.
    """
    n, c, h, w = x.shape
    if kernel_size == (1, 1):
        pixels = x.transpose(0, 1).reshape(c, n * h * w)
        return pixels[:, ::sampling_stride[0] * sampling_stride[1]]
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=sampling_stride)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def whitening_statistics(patches: Tensor, groups: int, nf: int, eps: float, n_iter: int) -> Tuple[Tensor, Tensor]:
    """Mean and whitening matrix of a patch matrix (C*k*k, S).

    groups == 1: the G = C*k*k / nf interleaved channel blocks are pooled into one nf x nf
    covariance; returns mean (nf,) and D (nf, nf).
    groups > 1: one covariance per convolution group over its own contiguous channels;
    returns mean (groups*nf,) and D (groups, nf, nf).
    """
    if groups == 1:
        samples = patches.reshape(nf, -1)  # (nf, G*S): block index is the fast axis
        mean = samples.mean(dim=1)
        centred = samples - mean[:, None]
        eye = torch.eye(nf, dtype=patches.dtype, device=patches.device)
        cov = torch.addmm(eye, centred, centred.t(), beta=eps, alpha=1.0 / centred.shape[1])
        return mean, isqrt_newton_schulz(cov, n_iter)
    samples = patches.reshape(groups, nf, -1)
    mean = samples.mean(dim=2)
    centred = samples - mean[:, :, None]
    eye = torch.eye(nf, dtype=patches.dtype, device=patches.device).expand(groups, nf, nf)
    cov = torch.baddbmm(eye, centred, centred.transpose(1, 2), beta=eps, alpha=1.0 / centred.shape[2])
    return mean.reshape(-1), isqrt_newton_schulz(cov, n_iter)


def fold_conv_whitening(
        weight: Tensor, bias: Tensor, mean: Tensor, deconv: Tensor, groups: int,
) -> Tuple[Tensor, Tensor]:
    """Fold x -> D (x - mu) into a convolution: returns (W D, b - W D mu) in W's shape.

    ``bias`` may be None (treated as zero). For groups == 1 the same D acts on every channel
    block, so the block's rows of W are multiplied separately and their mean terms summed.
    """
    out_ch = weight.shape[0]
    if groups == 1:
        nf = deconv.shape[-1]
        w = weight.reshape(out_ch, nf, -1).transpose(1, 2) @ deconv  # (O, G, nf)
        shift = (w @ mean).sum(dim=1)
        folded = w.transpose(1, 2).reshape(weight.shape)
    else:
        nf = deconv.shape[-1]
        w = weight.reshape(groups, out_ch // groups, nf) @ deconv  # (groups, O/groups, nf)
        shift = (w @ mean.reshape(groups, nf, 1)).reshape(out_ch)
        folded = w.reshape(weight.shape)
    return folded, (-shift if bias is None else bias - shift)


def fold_linear_whitening(weight: Tensor, bias: Tensor, mean: Tensor, deconv: Tensor) -> Tuple[Tensor, Tensor]:
    """Fold the decorrelation of contiguous feature chunks into a linear layer (Delinear)."""
    block = deconv.shape[-1]
    w = weight.reshape(-1, block) @ deconv
    shift = (w @ mean).reshape(weight.shape[0], -1).sum(dim=1)
    return w.reshape(weight.shape), (-shift if bias is None else bias - shift)
