"""A literal implementation of network deconvolution (Ye et al., ICLR 2020), used as the oracle.

Written from the equations in ``reference-architectures.md`` section 1 and independent of
``deconv_zoo.layers``: nothing here imports the package. It favours being obviously right over
being fast:

* Newton-Schulz runs every product of every iteration (no shortcuts);
* statistics come from an explicit im2col (``F.unfold``) in the reference's channel-major column
  layout, with the interleaved channel blocks cut out by explicit strided slices;
* the covariance is written out as ``eps * I + Xc^T Xc / M``;
* the whitening is applied to the PATCHES the convolution sees (``W . D (patch - mu)`` for every
  block, then the output map is reshaped from the patch columns); it is never folded into the
  weight, so comparing against it also checks the layers' weight folding.

Importable on its own (``from oracle import ...`` with ``tests/`` on the path, or
``from tests.oracle import ...`` from the repository root). Functions work in whatever dtype they
are given; use float64 for a reference answer.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'oracle_newton_schulz', 'oracle_block_size', 'oracle_fast_deconv_statistics', 'oracle_whitened_conv',
    'oracle_fast_deconv_forward', 'oracle_delinear_statistics', 'oracle_whitened_linear',
    'oracle_delinear_forward', 'OracleFastDeconv', 'OracleDelinear', 'OracleChannelDeconv',
]


def oracle_newton_schulz(a: Tensor, n_iter: int) -> Tensor:
    """A^(-1/2) by the coupled Newton-Schulz iteration, for (d, d) or a batch (..., d, d).

    normA = Frobenius norm (per matrix); Y = A / normA, Z = I; n_iter times:
    T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z. Result Z / sqrt(normA).
    """
    d = a.shape[-1]
    norm_a = a.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    y = a / norm_a
    z = eye.expand_as(a)
    for _ in range(n_iter):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / norm_a.sqrt()


def oracle_block_size(channels: int, block: int, groups: int = 1) -> int:
    """The reference's block rule: clip to the channels, else gcd; grouped convs use C / groups."""
    if block > channels:
        block = channels
    elif channels % block != 0:
        block = math.gcd(block, channels)
    if groups > 1:
        block = channels // groups
    return block


def _covariance(centred: Tensor, eps: float) -> Tensor:
    """eps * I + Xc^T Xc / M for a centred sample matrix Xc of M rows."""
    eye = torch.eye(centred.shape[1], dtype=centred.dtype, device=centred.device)
    return eps * eye + centred.t() @ centred / centred.shape[0]


def oracle_fast_deconv_statistics(
        x: Tensor, *, kernel_size: int, stride: int, padding: int, dilation: int, groups: int, block: int,
        eps: float, n_iter: int, sampling_stride: int,
) -> Tuple[Tensor, Tensor]:
    """Batch mean and whitening matrix of FastDeconv's sampled patches.

    Returns (mean (nf,), D (nf, nf)) for groups == 1 and (mean (k*k*C,), D (groups, nf, nf))
    for grouped convolutions.
    """
    n, channels, h, w = x.shape
    block = oracle_block_size(channels, block, groups)
    nf = kernel_size * kernel_size * block
    s = sampling_stride * stride
    if kernel_size > 1:
        # One row per sampled patch, columns c * k * k + p (channel-major).
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=s)
        rows = cols.transpose(1, 2).reshape(-1, channels * kernel_size * kernel_size)
    else:
        # Every (s * s)-th row of the pixels flattened in (N, H, W) order.
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, channels)[::s * s]
    if groups == 1:
        g = channels // block
        # Block j owns the columns j, j + G, j + 2G, ...; blocks are stacked as extra samples.
        samples = torch.cat([rows[:, j::g] for j in range(g)], dim=0)
        mean = samples.mean(dim=0)
        return mean, oracle_newton_schulz(_covariance(samples - mean, eps), n_iter)
    mean = rows.mean(dim=0)
    centred = rows - mean
    covs = [_covariance(centred[:, i * nf:(i + 1) * nf], eps) for i in range(groups)]
    return mean, oracle_newton_schulz(torch.stack(covs), n_iter)


def oracle_whitened_conv(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], mean: Tensor, deconv: Tensor, *,
        stride: int, padding: int, dilation: int, groups: int,
) -> Tensor:
    """conv(D (patch - mu)): whiten every im2col patch block, then apply the weight to it."""
    n, channels, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*k*k, L)
    if groups == 1:
        nf = deconv.shape[-1]
        g = channels * kh * kw // nf
        blocks = [deconv @ (cols[:, j::g] - mean[:, None]) for j in range(g)]  # each (N, nf, L)
        whitened = torch.stack(blocks, dim=2).reshape(cols.shape)  # back to column f * G + j
        out = weight.reshape(out_channels, -1) @ whitened
    else:
        nf = deconv.shape[-1]
        per_group = out_channels // groups
        outs = []
        for i in range(groups):
            patch = cols[:, i * nf:(i + 1) * nf] - mean[i * nf:(i + 1) * nf, None]
            outs.append(weight[i * per_group:(i + 1) * per_group].reshape(per_group, nf) @ (deconv[i] @ patch))
        out = torch.cat(outs, dim=1)
    if bias is not None:
        out = out + bias[:, None]
    return out.reshape(n, out_channels, out_h, out_w)


def oracle_fast_deconv_forward(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], *, kernel_size: int, stride: int, padding: int,
        dilation: int, groups: int, block: int, eps: float, n_iter: int, sampling_stride: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One training-mode FastDeconv forward with fresh statistics: (out, mean, deconv)."""
    mean, deconv = oracle_fast_deconv_statistics(
        x, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        block=block, eps=eps, n_iter=n_iter, sampling_stride=sampling_stride)
    out = oracle_whitened_conv(x, weight, bias, mean, deconv, stride=stride, padding=padding,
                               dilation=dilation, groups=groups)
    return out, mean, deconv


def oracle_delinear_statistics(x: Tensor, *, block: int, eps: float, n_iter: int) -> Tuple[Tensor, Tensor]:
    """Mean and whitening matrix of contiguous chunks of ``block`` features (all chunks pooled)."""
    block = oracle_block_size(x.shape[-1], block)
    chunks = x.reshape(-1, block)
    mean = chunks.mean(dim=0)
    return mean, oracle_newton_schulz(_covariance(chunks - mean, eps), n_iter)


def oracle_whitened_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mean: Tensor, deconv: Tensor) -> Tensor:
    """linear(D (chunk - mu)) with every contiguous feature chunk whitened as a column vector."""
    block = deconv.shape[-1]
    chunks = x.reshape(*x.shape[:-1], -1, block)
    whitened = ((deconv @ (chunks - mean)[..., None])[..., 0]).reshape(x.shape)
    return F.linear(whitened, weight, bias)


def oracle_delinear_forward(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], *, block: int, eps: float, n_iter: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One training-mode Delinear forward: (out, mean, deconv)."""
    mean, deconv = oracle_delinear_statistics(x, block=block, eps=eps, n_iter=n_iter)
    return oracle_whitened_linear(x, weight, bias, mean, deconv), mean, deconv


def _ema(running: Tensor, batch: Tensor, momentum: float) -> None:
    """running <- (1 - m) running + m batch, outside autograd."""
    with torch.no_grad():
        running.mul_(1 - momentum).add_(momentum * batch.detach())


class OracleFastDeconv(nn.Conv2d):
    """The FastDeconv module of the reference, literally, with FastDeconv's state_dict keys
    (weight, bias, running_mean, running_deconv, counter); int kernel and stride only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, eps: float = 1e-5, n_iter: int = 5,
                 momentum: float = 0.1, block: int = 64, sampling_stride: int = 3, freeze: bool = False,
                 freeze_iter: int = 100):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.conv_settings = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.block, self.eps, self.n_iter, self.momentum = block, eps, n_iter, momentum
        self.sampling_stride, self.freeze, self.freeze_iter = sampling_stride, freeze, freeze_iter
        resolved = oracle_block_size(in_channels, block, groups)
        nf = kernel_size * kernel_size * resolved
        if groups == 1:
            self.register_buffer('running_mean', torch.zeros(nf))
            self.register_buffer('running_deconv', torch.eye(nf))
        else:
            self.register_buffer('running_mean', torch.zeros(kernel_size * kernel_size * in_channels))
            self.register_buffer('running_deconv', torch.stack([torch.eye(nf)] * groups))
        self.register_buffer('counter', torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        frozen = self.freeze and int(self.counter) > self.freeze_iter
        if self.training:
            self.counter.fill_((int(self.counter) + 1) % (10 * self.freeze_iter))
        if self.training and not frozen:
            mean, deconv = oracle_fast_deconv_statistics(
                x, kernel_size=self.kernel_size[0], block=self.block, eps=self.eps, n_iter=self.n_iter,
                sampling_stride=self.sampling_stride, **self.conv_settings)
            _ema(self.running_mean, mean, self.momentum)
            _ema(self.running_deconv, deconv, self.momentum)
        else:
            mean, deconv = self.running_mean, self.running_deconv
        return oracle_whitened_conv(x, self.weight, self.bias, mean, deconv, **self.conv_settings)


class OracleDelinear(nn.Linear):
    """The reference's Delinear, literally (state: weight, bias, running_mean, running_deconv)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 n_iter: int = 5, momentum: float = 0.1, block: int = 512):
        super().__init__(in_features, out_features, bias=bias)
        self.block, self.eps, self.n_iter, self.momentum = block, eps, n_iter, momentum
        resolved = oracle_block_size(in_features, block)
        self.register_buffer('running_mean', torch.zeros(resolved))
        self.register_buffer('running_deconv', torch.eye(resolved))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean, deconv = oracle_delinear_statistics(x, block=self.block, eps=self.eps, n_iter=self.n_iter)
            _ema(self.running_mean, mean, self.momentum)
            _ema(self.running_deconv, deconv, self.momentum)
        else:
            mean, deconv = self.running_mean, self.running_deconv
        return oracle_whitened_linear(x, self.weight, self.bias, mean, deconv)


class OracleChannelDeconv(nn.Module):
    """The reference's ChannelDeconv, literally, with the documented fixes: eval uses the
    buffers even before the first training batch, and c == 0 skips the whitened part."""

    def __init__(self, block: int, eps: float = 1e-2, n_iter: int = 5, momentum: float = 0.1,
                 sampling_stride: int = 3):
        super().__init__()
        self.block, self.eps, self.n_iter, self.momentum = block, eps, n_iter, momentum
        self.sampling_stride = sampling_stride
        buffers = dict(running_mean1=torch.zeros(block, 1), running_deconv=torch.eye(block),
                       running_mean2=torch.zeros(1, 1), running_var=torch.ones(1, 1),
                       num_batches_tracked=torch.tensor(0, dtype=torch.long))
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def _track(self, running: Tensor, batch: Tensor) -> None:
        """First batch: copy; training: then the EMA (as the reference does both)."""
        with torch.no_grad():
            if int(self.num_batches_tracked) == 0:
                running.copy_(batch)
            _ema(running, batch, self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if x.dim() == 2:
            x = x.reshape(shape[0], shape[1], 1, 1)
        n, channels, h, w = x.shape
        b, s = self.block, self.sampling_stride
        subsample = s > 1 and h >= s and w >= s
        c = channels // b * b
        parts = []
        if c > 0:
            x1 = x[:, :c].permute(1, 0, 2, 3).reshape(b, -1)  # row r: channels r*c/b ... (r+1)*c/b - 1
            if self.training:
                x1_s = x1[:, ::s * s] if subsample else x1
                mean1 = x1_s.mean(dim=1, keepdim=True)
                # The reference's covariance: the UNCENTRED second moment of the subsample.
                cov = x1_s @ x1_s.t() / x1_s.shape[1] + self.eps * torch.eye(b, dtype=x.dtype, device=x.device)
                deconv = oracle_newton_schulz(cov, self.n_iter)
                self._track(self.running_mean1, mean1)
                self._track(self.running_deconv, deconv)
            else:
                mean1, deconv = self.running_mean1, self.running_deconv
            parts.append((deconv @ (x1 - mean1)).reshape(c, n, h, w).permute(1, 0, 2, 3))
        if c < channels:
            rest = x[:, c:]
            if self.training:
                flat = rest.reshape(n, -1)
                sample = flat[:, ::s * s] if subsample else flat
                mean2, var = sample.mean(), sample.var()  # unbiased variance
                self._track(self.running_mean2, mean2.reshape(1, 1))
                self._track(self.running_var, var.reshape(1, 1))
            else:
                mean2, var = self.running_mean2, self.running_var
            parts.append((rest - mean2) / (var + self.eps).sqrt())
        if self.training:
            self.num_batches_tracked.add_(1)
        return torch.cat(parts, dim=1).reshape(shape)
