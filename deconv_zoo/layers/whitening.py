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

Cost (issue #5): the covariance and Newton-Schulz dominate a training step's extra work. Both
keep the paper's function and are only evaluated more cheaply: the covariance computes half of
its symmetric product and differentiates it with one product, rebuilding large patch matrices
in the backward pass instead of keeping them (``PatchMoments``); on CPU the Newton-Schulz
polynomial is applied to the eigenvalues of ONE symmetric eigendecomposition
(``newton_schulz_eigh``) instead of about 36 matrix products forward and backward; elsewhere the
iteration runs with a written-out backward of fused products (``_NewtonSchulzIteration``). The
``deconv::*`` profiler scopes name the parts for ``scripts/benchmark.py --profile``.
"""
import functools
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from ._stats import statistics_dtype

__all__ = [
    'isqrt_newton_schulz', 'newton_schulz_iteration', 'newton_schulz_eigh', 'newton_schulz_polynomial',
    'PatchMoments', 'symmetric_gram', 'sample_patches', 'patch_sample_count', 'patches_adjoint', 'whitening_statistics',
    'conv_whitening_statistics', 'conv_patch_mean', 'fold_conv_whitening', 'fold_linear_whitening',
    'whiten_linear_chunks',
]

# From this matrix size on, the eigendecomposition route is the faster one on CPU (forward +
# backward on a 2-core VM: even at nf = 147, about 2x at 288, 3x at 576). On GPUs the matrix
# products are cheap and torch.linalg.eigh synchronises with the host, so the iteration stays.
EIGH_MIN_SIZE = 128

# From this many patch features on, the covariance's backward pass rebuilds the centred patch
# matrix from x instead of keeping it: there the products dominate (MACs grow with the features,
# the rebuild does not) and the matrix, as large as x for tiled 3x3 windows, would double what a
# layer holds. Below it (depthwise 3x3: 9 features; 1x1 with blocks of 64; stems) the strided
# copy and centring were half of the covariance's backward, and keeping costs little memory.
REBUILD_MIN_FEATURES = 128


def isqrt_newton_schulz(cov: Tensor, n_iter: int) -> Tensor:
    """The paper's Newton-Schulz approximation of cov^(-1/2), for one (d, d) or a batch (b, d, d).

    ``cov`` must be symmetric (a covariance). Both evaluations below compute the same
    polynomial of ``cov``; the choice only affects speed and rounding, eager or compiled.
    """
    if n_iter < 1:
        raise ValueError(f'n_iter must be >= 1, got {n_iter}')
    with record_function('deconv::newton_schulz'):
        if cov.device.type == 'cpu' and cov.shape[-1] >= EIGH_MIN_SIZE:
            return newton_schulz_eigh(cov, n_iter)
        return newton_schulz_iteration(cov, n_iter)


def _iterates(a: Tensor, n_iter: int) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """The coupled iteration on a batch (b, d, d): s = ||A||_F and the lists Y_0 .. Y_{n-1},
    T_0 .. T_{n-1}, Z_1 .. Z_n of Y0 = A / s, T0 = 1.5 I - 0.5 Y0, Z1 = T0, and for i >= 1
    Y_i = Y_{i-1} T_{i-1}, T_i = 1.5 I - 0.5 Z_i Y_i, Z_{i+1} = T_i Z_i (the scaling fused
    into the products). The result is Z_n / sqrt(s)."""
    norm = torch.linalg.matrix_norm(a, keepdim=True)  # Frobenius, (b, 1, 1)
    eye15 = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).mul_(1.5)
    y = a / norm
    t = torch.add(eye15, y, alpha=-0.5)
    ys, ts, zs = [y], [t], [t]
    for _ in range(1, n_iter):
        y = torch.bmm(y, t)
        t = torch.baddbmm(eye15, zs[-1], y, alpha=-0.5)
        ys.append(y)
        ts.append(t)
        zs.append(torch.bmm(t, zs[-1]))
    return norm, ys, ts, zs


def _differentiable_gradient(a: Tensor, n_iter: int, grad: Tensor) -> Tensor:
    """The iteration's gradient for (b, d, d) by autograd, as a differentiable function of ``a`` and
    ``grad``: what the written-out backward returns under ``create_graph=True``, as its saved
    intermediates would be constants to a second differentiation."""
    norm, _, _, zs = _iterates(a, n_iter)
    return torch.autograd.grad(zs[-1] * norm.rsqrt(), a, grad, create_graph=True)[0]


def _backward_without_autocast(backward: Callable) -> Callable:
    """Run an autograd Function's backward with autocast off, as its forward ran (``_stats``):
    a ``loss.backward()`` called inside an autocast region would otherwise compute the
    statistics' gradients in half precision (and mix dtypes in their in-place products)."""
    @functools.wraps(backward)
    def run(ctx, *grads: Tensor):
        with torch.autocast(device_type=grads[0].device.type, enabled=False):
            return backward(ctx, *grads)
    return run


class _NewtonSchulzIteration(torch.autograd.Function):
    """The coupled iteration (``_iterates``) on a batch (b, d, d), with its reverse sweep written out.

    The backward is what autograd derives from the products, one adjoint per iterate, but each
    step is six GEMMs with the scaling and the accumulation fused in (``baddbmm``): about half
    the kernels of autograd's version (which adds a negation, a scaling and a sum per product),
    which matters on GPUs, where these products are too small to hide launches (on CPU it saves
    about a tenth of the time of small, batched whitenings).
    """

    @staticmethod
    def forward(ctx, a: Tensor, n_iter: int) -> Tensor:
        norm, ys, ts, zs = _iterates(a, n_iter)
        ctx.n_iter = n_iter
        ctx.save_for_backward(a, norm, *ys, *ts, *zs[1:])  # zs[0] is ts[0]
        return zs[-1] * norm.rsqrt()

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        n = ctx.n_iter
        a, norm, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_gradient(a, n, grad), None
        ys, ts = saved[:n], saved[n:2 * n]
        zs = [ts[0]] + saved[2 * n:]  # zs[i] = Z_{i+1}
        gz = grad * norm.rsqrt()  # adjoint of Z_n
        gy = gt = None  # adjoints of Y_i and T_i carried down from step i + 1
        for i in range(n - 1, 0, -1):
            z = zs[i - 1].mT  # Z_i^T
            # Z_{i+1} = T_i Z_i
            gt = torch.bmm(gz, z) if gt is None else gt.baddbmm_(gz, z)
            gz = torch.bmm(ts[i].mT, gz)
            # T_i = 1.5 I - 0.5 Z_i Y_i
            gz.baddbmm_(gt, ys[i].mT, alpha=-0.5)
            gy = torch.baddbmm(gt, z, gt, beta=0.0, alpha=-0.5) if gy is None else gy.baddbmm_(z, gt, alpha=-0.5)
            # Y_i = Y_{i-1} T_{i-1}
            gt = torch.bmm(ys[i - 1].mT, gy)
            gy = torch.bmm(gy, ts[i - 1].mT)
        # Z_1 = T_0 = 1.5 I - 0.5 Y_0
        gt = gz if gt is None else gt.add_(gz)
        gy = gt * -0.5 if gy is None else gy.add_(gt, alpha=-0.5)
        # Y_0 = A / s and the result's 1 / sqrt(s), with ds/dA = A / s.
        grad_norm = (-(gy * a).sum(dim=(-2, -1), keepdim=True) / norm.square()
                     - 0.5 * (grad * zs[-1]).sum(dim=(-2, -1), keepdim=True) * norm.pow(-1.5))
        return torch.addcmul(gy, a, grad_norm).div_(norm), None


def newton_schulz_iteration(cov: Tensor, n_iter: int) -> Tensor:
    """Coupled Newton-Schulz iteration (Alg. 1 lines 6-10) for (d, d) or (..., d, d).

    Y0 = A / ||A||_F, Z0 = I; T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z; result Z / sqrt(||A||_F).
    The paper runs a fixed, small number of iterations (5 by default), which is NOT converged:
    that truncated polynomial is the function the models were trained with, so it is kept.
    Two products are skipped because they cannot change the result: with Z0 = I the first
    Z Y and T Z are Y0 and T, and the last iteration's Y update is never read.
    """
    if n_iter < 1:
        raise ValueError(f'n_iter must be >= 1, got {n_iter}')
    d = cov.shape[-1]
    return _NewtonSchulzIteration.apply(cov.reshape(-1, d, d), n_iter).view(cov.shape)


def newton_schulz_polynomial(mu: Tensor, n_iter: int) -> Tuple[Tensor, Tensor]:
    """The Newton-Schulz iteration on scalars: p(mu) and the divided differences p[mu_i, mu_j].

    Every iterate of the matrix iteration is a polynomial in Y0 (they all commute), so on an
    eigenvalue mu of Y0 it reads: w = mu, z = 1; t = (3 - w) / 2, z <- z t, w <- phi(w) = w t^2
    (w stands for Z Y). p = z after ``n_iter`` steps, for ``mu`` of shape (..., d).

    The divided differences K[a, b] = (p(a) - p(b)) / (a - b), with p'(a) on the diagonal, follow
    the same recursion by the product and chain rules, with no subtraction of close values (so
    close or equal eigenvalues lose nothing to cancellation):
        z[a, b] <- z[a, b] t(b) - z(a) w[a, b] / 2,
        w[a, b] <- phi[w(a), w(b)] w[a, b],  phi[x, y] = (9 - 6 (x + y) + x^2 + x y + y^2) / 4.
    Returns (p, K) with K of shape (..., d, d).
    """
    z, w = torch.ones_like(mu), mu
    dz = torch.zeros(mu.shape + mu.shape[-1:], dtype=mu.dtype, device=mu.device)
    dw, phi = torch.ones_like(dz), torch.empty_like(dz)  # (d, d) buffers, updated in place
    for i in range(n_iter):
        t = 0.5 * (3.0 - w)
        dz.mul_(t[..., None, :]).addcmul_(z[..., :, None], dw, value=-0.5)
        if i < n_iter - 1:  # the last w is not used
            h = (4.5 - 6.0 * w + w * w) / 4  # phi[x, y] = h(x) + h(y) + x y / 4
            torch.mul((0.25 * w)[..., :, None], w[..., None, :], out=phi)
            dw.mul_(phi.add_(h[..., :, None]).add_(h[..., None, :]))
        z, w = z * t, w * t * t
    return z, dz


class _NewtonSchulzEigh(torch.autograd.Function):
    """newton_schulz_iteration(A, n) evaluated through A = U diag(lambda) U^T.

    With s = ||A||_F and mu = lambda / s, the result is F(A) = U diag(p(mu)) U^T / sqrt(s). Its
    gradient is the Daleckii-Krein formula for the polynomial plus the terms of the Frobenius
    normalisation: for an upstream gradient G, with H = U^T G U / sqrt(s) and K the divided
    differences of p,
        dL/dA = U (K o H - c diag(mu)) U^T / s,   c = sum_i (K o H)_ii mu_i + 0.5 H_ii p_i.
    Four matrix products backward and one eigendecomposition plus one product forward, instead of
    about 12 products forward and 24 backward. The polynomial formula holds for any direction dA,
    so the gradient equals the iteration's autograd gradient also for non-symmetric G. It has no
    second derivatives (they would need the covariance kept for every layer: 7% more peak memory
    in a ResNet-18 step), so ``create_graph=True`` raises instead of returning a gradient whose
    saved eigenvectors would be constants to the next differentiation.
    """

    @staticmethod
    def forward(ctx, cov: Tensor, n_iter: int) -> Tensor:
        norm = torch.linalg.matrix_norm(cov, keepdim=True)
        eigenvalues, u = torch.linalg.eigh(cov)
        mu = eigenvalues / norm[..., 0]
        p, divided = newton_schulz_polynomial(mu, n_iter)
        ctx.save_for_backward(u, mu, p, divided, norm)
        return (u * (p[..., None, :] * norm.rsqrt())) @ u.transpose(-1, -2)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], None]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                'newton_schulz_eigh (the CPU route for whitenings of EIGH_MIN_SIZE or more features) has no second '
                'derivatives (create_graph=True); the matrix iteration has them: set '
                'deconv_zoo.layers.whitening.EIGH_MIN_SIZE above the whitening size to take it.')
        u, mu, p, divided, norm = ctx.saved_tensors
        h = u.transpose(-1, -2) @ (grad * norm.rsqrt()) @ u
        inner = divided * h
        c = (inner.diagonal(dim1=-2, dim2=-1) * mu + 0.5 * h.diagonal(dim1=-2, dim2=-1) * p).sum(-1, keepdim=True)
        inner.diagonal(dim1=-2, dim2=-1).sub_(c * mu)
        return u @ (inner / norm) @ u.transpose(-1, -2), None


def newton_schulz_eigh(cov: Tensor, n_iter: int) -> Tensor:
    """newton_schulz_iteration(cov, n_iter) through one symmetric eigendecomposition of ``cov``.

    Exactly the same truncated polynomial (not the true inverse square root); ``cov`` must be
    symmetric, as only its lower triangle is read.
    """
    if n_iter < 1:
        raise ValueError(f'n_iter must be >= 1, got {n_iter}')
    return _NewtonSchulzEigh.apply(cov, n_iter)


Geometry = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def pixel_samples(x: Tensor, step: int, start: int = 0) -> Tensor:
    """Every ``step``-th pixel of the flattened (N, H, W) order, from ``start``, as (C, S): the
    samples of a 1x1 kernel. A strided view of the channel-major copy of ``x``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)[:, start::step]


def _patch_view(padded: Tensor, geometry: Geometry) -> Tensor:
    """The sampled patches of the zero-padded input as a view (C, kh, kw, N, Lh, Lw), no copy:
    element [c, a, b, n, i, j] is padded[n, c, i * sh + a * dh, j * sw + b * dw]."""
    (kh, kw), (dh, dw), _, (sh, sw) = geometry
    windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (N, C, Lh, Lw, ., .)
    return windows[..., ::dh, ::dw].permute(1, 4, 5, 0, 2, 3)


def _sample_view(x: Tensor, geometry: Geometry) -> Tensor:
    """The patch matrix of ``sample_patches`` before its reshape to (C*kh*kw, S): a strided view
    (C, kh, kw, N, Lh, Lw) of ``x`` for kernels above 1x1, the sampled pixels (C, S) for
    1x1 kernels."""
    (kh, kw), _, (ph, pw), (sh, sw) = geometry
    if (kh, kw) == (1, 1):
        return pixel_samples(x, sh * sw)
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    return _patch_view(padded, geometry)


def patch_sample_count(x_shape: torch.Size, geometry: Geometry) -> int:
    """How many patches ``sample_patches`` takes from an input of ``x_shape`` (N, C, H, W)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = geometry
    n, _, h, w = x_shape
    if (kh, kw) == (1, 1):
        return -(-n * h * w // (sh * sw))  # every (sh*sw)-th pixel of the flattened batch, from the first
    rows = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    cols = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return n * rows * cols


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
    with record_function('deconv::patches'):
        view = _sample_view(x, (kernel_size, dilation, padding, sampling_stride))
        return view.reshape(x.shape[1] * kernel_size[0] * kernel_size[1], -1)


def conv_patch_mean(x: Tensor, geometry: Geometry, groups: int, nf: int) -> Tensor:
    """The mean of ``conv_whitening_statistics`` alone, for ``geometry`` = (kernel_size, dilation,
    padding, sampling_stride); differentiable, reduced straight from the strided view of the
    patches (no copy): what ``refresh_every`` recomputes on the calls that reuse the whitening."""
    dtype = statistics_dtype(x)
    if geometry[0] == (1, 1):
        rows = _sample_view(x, geometry).mean(dim=-1, dtype=dtype)
    else:
        # Every image is sampled at the same pixels: summing the batch first (one contiguous
        # pass) leaves a strided reduction over one image, 1/N of the work.
        view = _sample_view(x.sum(dim=0, keepdim=True, dtype=dtype), geometry)  # (C, kh, kw, 1, Lh, Lw)
        rows = view.mean(dim=(-3, -2, -1)).reshape(-1) / x.shape[0]  # one per im2col row
    # groups == 1: the interleaved channel blocks share one mean (see whitening_statistics).
    return rows.view(nf, -1).mean(dim=-1) if groups == 1 else rows


def symmetric_gram(x: Tensor, block_rows: int = 128) -> Tensor:
    """x x^T for x (..., n, M), computing only the lower block triangle (a BLAS syrk, which
    torch lacks): with n split into k row blocks of at least ``block_rows``, (k + 1) / 2k of
    the full product's work (5/8 for n = 576), then the upper blocks are mirrored."""
    n = x.shape[-2]
    parts = max(1, min(4, n // block_rows))
    if parts == 1:
        return torch.matmul(x, x.transpose(-1, -2))
    gram = x.new_empty(x.shape[:-1] + (n,))
    bounds = [n * i // parts for i in range(parts + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = x[..., lo:hi, :] @ x[..., :hi, :].transpose(-1, -2)
        gram[..., lo:hi, :hi] = rows
        gram[..., :lo, lo:hi] = rows[..., :lo].transpose(-1, -2)
    return gram


def patches_adjoint(
        grad: Tensor,
        x_shape: torch.Size,
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int],
        padding: Tuple[int, int],
        sampling_stride: Tuple[int, int],
) -> Tensor:
    """The transpose of ``sample_patches``: adds a patch-matrix gradient (C*kh*kw, S) back
    onto the pixels the patches were taken from; returns a gradient of shape ``x_shape``."""
    n, c, h, w = x_shape
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, sampling_stride
    if (kh, kw) == (1, 1):
        # Written channel-major, where the samples are one strided slice (an index_put into the
        # (N, C, H*W) layout took four times as long); handed back in x's layout.
        pixels = grad.new_zeros(c, n * h * w)
        pixels[:, ::sh * sw] = grad
        return pixels.view(c, n, h, w).transpose(0, 1)
    geometry = (kernel_size, dilation, padding, sampling_stride)
    if sh > dh * (kh - 1) and sw > dw * (kw - 1):
        # perf: windows that do not overlap (e.g. kernel 3, sampling stride 3) hit every pixel at
        # most once, so the adjoint is one strided copy instead of a col2im accumulation.
        tiled = (dh, dw) == (1, 1) and (sh, sw) == (kh, kw)
        # When the windows tile the image, only the strips past the last window need zeros:
        # zero-filling the whole image cost as much as the copy (MobileNet-v2's expanded layers).
        padded = (grad.new_empty if tiled else grad.new_zeros)(n, c, h + 2 * ph, w + 2 * pw)
        view = _patch_view(padded, geometry)
        view.copy_(grad.view(view.shape))
        if tiled:
            padded[:, :, view.shape[4] * kh:].zero_()
            padded[:, :, :, view.shape[5] * kw:].zero_()
        return padded[:, :, ph:ph + h, pw:pw + w]
    cols = grad.reshape(grad.shape[0], n, -1).transpose(0, 1)
    return F.fold(cols, (h, w), kernel_size, dilation=dilation, padding=padding, stride=sampling_stride)


class PatchMoments(torch.autograd.Function):
    """Mean and centred second moment of the samples of every whitening block.

    ``samples = sample_patches(x, *geometry).reshape(shape)`` (or ``x.reshape(shape)`` when
    ``geometry`` is None and ``x`` already is the patch matrix) has shape (..., nf, M); returns
    mean (..., nf) and Xc Xc^T / M (..., nf, nf) with Xc = samples - mean.

    Autograd would differentiate Xc Xc^T with two products (one per factor); as both factors
    are the same matrix, dL/dX = (G + G^T) Xc / M + dL/dmean / M is ONE product (the centring
    term vanishes because the rows of Xc sum to zero). With ``REBUILD_MIN_FEATURES`` or more
    features only ``x`` (which the convolution keeps anyway) and the mean are saved, and the
    backward rebuilds the patch matrix instead of holding an activation-sized copy per layer until
    then; smaller whitenings keep Xc too. The patches are copied once, straight out of a strided
    view of ``x``, into the layout of the products (in ``statistics_dtype``: a half-precision ``x``
    is converted by that copy, not kept as a float32 copy of its own), and centred in place. Under
    ``create_graph=True`` the backward always rebuilds them from ``x``: a kept copy has no graph,
    so second derivatives through it would lose the patches' dependence on ``x``.
    """

    @staticmethod
    def _centred(x: Tensor, geometry: Optional[Geometry], shape: Tuple[int, ...],
                 mean: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The samples minus their mean (computed unless given), as a new contiguous (..., nf, M)
        tensor in ``statistics_dtype`` made by one strided copy out of ``x``; and the mean."""
        with record_function('deconv::patches'):
            view = x.reshape(shape) if geometry is None else _sample_view(x, geometry)
            samples = view.new_empty(view.shape, dtype=statistics_dtype(x)).copy_(view).view(shape)
        mean = samples.mean(dim=-1) if mean is None else mean
        return samples.sub_(mean[..., None]), mean

    @staticmethod
    def forward(ctx, x: Tensor, geometry: Optional[Geometry], shape: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
        centred, mean = PatchMoments._centred(x, geometry, shape)
        ctx.geometry, ctx.shape, ctx.x_shape = geometry, shape, x.shape
        kept = [centred] if centred.shape[-2] < REBUILD_MIN_FEATURES else []
        ctx.save_for_backward(x, mean, *kept)  # x costs nothing: the convolution keeps it anyway
        return mean, symmetric_gram(centred).div_(centred.shape[-1])

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad_mean: Tensor, grad_cov: Tensor) -> Tuple[Tensor, None, None]:
        x, mean, *kept = ctx.saved_tensors
        if kept and not torch.is_grad_enabled():
            centred = kept[0]
        else:  # rebuilt, and differentiable in x under create_graph=True
            centred = PatchMoments._centred(x, ctx.geometry, ctx.shape, mean)[0]
        m = centred.shape[-1]
        # (G + G^T) Xc / M + dL/dmean / M, with the mean term as the product's added input.
        grad = torch.baddbmm(grad_mean[..., None] / m, (grad_cov + grad_cov.transpose(-1, -2)) / m, centred) \
            if centred.dim() == 3 else torch.addmm(grad_mean[..., None] / m, (grad_cov + grad_cov.t()) / m, centred)
        grad = grad.to(x.dtype)  # before the scatter onto the pixels, which then runs in x's precision
        if ctx.geometry is None:
            return grad.reshape(ctx.x_shape), None, None
        rows = ctx.x_shape[1] * ctx.geometry[0][0] * ctx.geometry[0][1]  # C*kh*kw
        return patches_adjoint(grad.reshape(rows, -1), ctx.x_shape, *ctx.geometry), None, None


def whitening_statistics(patches: Tensor, groups: int, nf: int, eps: float, n_iter: int) -> Tuple[Tensor, Tensor]:
    """Mean and whitening matrix of a patch matrix (C*k*k, S).

    groups == 1: the G = C*k*k / nf interleaved channel blocks are pooled into one nf x nf
    covariance; returns mean (nf,) and D (nf, nf).
    groups > 1: one covariance per convolution group over its own contiguous channels;
    returns mean (groups*nf,) and D (groups, nf, nf).
    Cov = (X - mu)(X - mu)^T / M + eps * I over the M samples of a block, D = NS(Cov).
    """
    return _whitening(patches, None, groups, nf, eps, n_iter)


def conv_whitening_statistics(
        x: Tensor,
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int],
        padding: Tuple[int, int],
        sampling_stride: Tuple[int, int],
        groups: int,
        nf: int,
        eps: float,
        n_iter: int,
) -> Tuple[Tensor, Tensor]:
    """``whitening_statistics(sample_patches(x, ...), groups, nf, eps, n_iter)``, computed
    without keeping large patch matrices alive for the backward pass (see ``PatchMoments``)."""
    return _whitening(x, (kernel_size, dilation, padding, sampling_stride), groups, nf, eps, n_iter)


def _whitening(x: Tensor, geometry: Optional[tuple], groups: int, nf: int, eps: float,
               n_iter: int) -> Tuple[Tensor, Tensor]:
    # groups == 1: (nf, G*S), the block index is the fast axis; else (groups, nf, S).
    shape = (nf, -1) if groups == 1 else (groups, nf, -1)
    with record_function('deconv::covariance'):
        mean, cov = PatchMoments.apply(x, geometry, shape)
        cov = cov + eps * torch.eye(nf, dtype=cov.dtype, device=cov.device)
    return mean.reshape(-1), isqrt_newton_schulz(cov, n_iter)


def fold_conv_whitening(
        weight: Tensor, bias: Tensor, mean: Tensor, deconv: Tensor, groups: int,
) -> Tuple[Tensor, Tensor]:
    """Fold x -> D (x - mu) into a convolution: returns (W D, b - W D mu) in W's shape.

    ``bias`` may be None (treated as zero). For groups == 1 the same D acts on every channel
    block, so the block's rows of W are multiplied separately and their mean terms summed.
    """
    out_ch, nf = weight.shape[0], deconv.shape[-1]
    with record_function('deconv::fold'):
        if groups == 1:
            # One (O*G, nf) @ (nf, nf) product. Left to matmul, the transposed 3-D operand is
            # not folded when D needs no gradient (reused or running statistics): it broadcasts D
            # into O small products, 1.5 to 7 times slower on CPU.
            w = (weight.reshape(out_ch, nf, -1).transpose(1, 2).reshape(-1, nf) @ deconv).view(out_ch, -1, nf)
            # Summing the blocks before the product leaves autograd an (O, nf) tensor to keep
            # instead of a second weight-sized one.
            shift = w.sum(dim=1) @ mean
            folded = w.transpose(1, 2).reshape(weight.shape)
        else:
            w = weight.reshape(groups, out_ch // groups, nf) @ deconv  # (groups, O/groups, nf)
            shift = (w @ mean.reshape(groups, nf, 1)).reshape(out_ch)
            folded = w.reshape(weight.shape)
        return folded, (-shift if bias is None else bias - shift)


def fold_linear_whitening(weight: Tensor, bias: Tensor, mean: Tensor, deconv: Tensor) -> Tuple[Tensor, Tensor]:
    """Fold the decorrelation of contiguous feature chunks into a linear layer (Delinear):
    returns (W D, b - W D mu) with D acting on every chunk."""
    block = deconv.shape[-1]
    with record_function('deconv::fold'):
        w = weight.reshape(-1, block) @ deconv
        # The chunks of a row share D and mu, so the shift is (sum of W's chunks) D mu: no product
        # with the folded weight, whose gradient would then be one more weight-sized tensor.
        shift = weight.reshape(weight.shape[0], -1, block).sum(dim=1) @ (deconv @ mean)
        return w.reshape(weight.shape), (-shift if bias is None else bias - shift)


def whiten_linear_chunks(x: Tensor, mean: Tensor, deconv: Tensor) -> Tensor:
    """x -> D (x - mu) on every contiguous chunk of x (..., F): what ``fold_linear_whitening``
    folds into the weight, applied to the input instead."""
    block = deconv.shape[-1]
    with record_function('deconv::fold'):
        return ((x.reshape(-1, block) - mean) @ deconv.t()).reshape(x.shape)
