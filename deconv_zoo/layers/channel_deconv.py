"""ChannelDeconv: parameter-free whitening of a feature map's channels (before pooling).

Used by the reference only when a decorrelated classifier is requested without Delinear
(``--delinear False --block-fc B``). Semantics follow ``models/deconv.py``; fixes are marked.
"""
import torch
import torch.nn as nn
from torch import Tensor

from ._stats import (
    check_eps, check_floating, check_momentum, check_positive_int, ensure_finite, ensure_finite_input,
    float32_statistics, in_backward_recompute, layer_label, reset_whitening_, warn_once,
)
from .whitening import isqrt_newton_schulz

__all__ = ['ChannelDeconv']


class ChannelDeconv(nn.Module):
    """Whiten ``block`` groups of adjacent channels; standardise the channels left over.

    With C channels and c = floor(C / block) * block, feature r of the whitening pools the
    c / block adjacent channels r*c/block ... (r+1)*c/block - 1 over batch and space. The
    covariance is the reference's uncentred second-moment matrix of a pixel subsample; the
    remaining C - c channels share one scalar mean and variance. The first training batch
    initialises the running statistics, later ones update them with ``momentum``.
    """
    check_finite: bool = True
    whitening_frozen: bool = False  # freeze_whitening: the running statistics serve training calls too

    def __init__(self, block: int, eps: float = 1e-2, n_iter: int = 5, momentum: float = 0.1,
                 sampling_stride: int = 3):
        super().__init__()
        self.block = check_positive_int('ChannelDeconv', 'block', block)
        self.eps = check_eps('ChannelDeconv', eps)
        self.n_iter = check_positive_int('ChannelDeconv', 'n_iter', n_iter)
        self.momentum = check_momentum('ChannelDeconv', momentum)
        self.sampling_stride = check_positive_int('ChannelDeconv', 'sampling_stride', sampling_stride)
        self.register_buffer('running_mean1', torch.zeros(block, 1))
        self.register_buffer('running_deconv', torch.eye(block))
        self.register_buffer('running_mean2', torch.zeros(1, 1))
        self.register_buffer('running_var', torch.ones(1, 1))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """The initial statistics again, as BatchNorm's method: the next training batch's are copied in whole."""
        reset_whitening_(self.running_mean1, self.running_deconv)
        self.running_mean2.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def samples_per_whitening(self, x_shape: torch.Size) -> int:
        """The fewer of the values a training batch of ``x_shape`` gives each whitened feature and
        the leftover channels' variance (each needs two)."""
        n, channels = x_shape[:2]
        h, w = x_shape[2:] if len(x_shape) == 4 else (1, 1)
        step = self.sampling_stride ** 2 if self.sampling_stride > 1 and h >= self.sampling_stride \
            and w >= self.sampling_stride else 1
        c = channels // self.block * self.block
        counts = []
        if c:
            counts.append(-(-n * h * w * (c // self.block) // step))
        if c < channels:
            counts.append(n * -(-(channels - c) * h * w // step))
        return min(counts)

    def _subsample(self, flat: Tensor, h: int, w: int) -> Tensor:
        s = self.sampling_stride
        return flat[:, ::s * s] if s > 1 and h >= s and w >= s else flat

    def _update(self, running: Tensor, batch: Tensor, first: bool) -> None:
        with torch.no_grad():
            if first:
                running.copy_(batch.detach())
            else:
                running.lerp_(batch.detach().to(running.dtype), self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        # fix: the reference printed an error for 3-D input and then failed obscurely.
        if x.dim() not in (2, 4):
            raise ValueError(f'{layer_label(self)}: expected input (N, C) or (N, C, H, W), got shape {tuple(x.shape)}')
        # fix: integer input used to be whitened in float32 and rounded back to its integer dtype.
        check_floating(self, x)
        if self.training and self.whitening_frozen and self.check_finite:
            ensure_finite_input(self, x)  # no statistics of its own to check
        flat_input = x.dim() == 2
        if flat_input:
            x = x[:, :, None, None]
        n, channels, h, w = x.shape
        c = channels // self.block * self.block
        if c == 0:
            # fix: the reference printed "block should be set smaller" and filled its whitening
            # buffers with NaN; the result (every channel standardised) is the same without that.
            warn_once('ChannelDeconv.block_too_large',
                      f'ChannelDeconv: block {self.block} is larger than the {channels} channels; '
                      f'only a scalar standardisation is applied.')
        # An empty batch has no statistics: as BatchNorm does, it gives an empty output and leaves
        # the state as it was (here by taking the eval path).
        training = self.training and not self.whitening_frozen and x.numel() > 0
        first = training and int(self.num_batches_tracked) == 0
        record = training and not in_backward_recompute()
        parts, tracked = [], []
        with float32_statistics(x) as xs:
            if c > 0:
                # (block, N * H * W * c / block): feature r pools adjacent channels.
                x1 = xs[:, :c].transpose(0, 1).reshape(self.block, -1)
                if training:
                    x1_s = self._subsample(x1, h, w)
                    if x1_s.shape[1] < 2:
                        # One sample: the whitened channels would be zero and the running whitening
                        # about eps^-1/2 * I (the leftover channels below raise the same way).
                        raise ValueError(
                            f'ChannelDeconv: the whitened blocks need more than one value per feature per training '
                            f'batch, got input shape {tuple(x.shape)}')
                    mean1 = x1_s.mean(dim=1, keepdim=True)
                    # Uncentred second moment, as in the reference (its mean is applied below).
                    eye = torch.eye(self.block, dtype=x1.dtype, device=x1.device)
                    cov = torch.addmm(eye, x1_s, x1_s.t(), beta=self.eps, alpha=1.0 / x1_s.shape[1])
                    deconv = isqrt_newton_schulz(cov, self.n_iter)
                    if self.check_finite:
                        ensure_finite(self, mean1, deconv)
                    tracked += [(self.running_mean1, mean1), (self.running_deconv, deconv)]
                else:
                    # fix: the reference raised UnboundLocalError here before any training step;
                    # a fresh layer now applies its initial (identity) statistics, like BatchNorm.
                    mean1 = self.running_mean1.to(x1.dtype)
                    deconv = self.running_deconv.to(x1.dtype)
                x1 = deconv @ (x1 - mean1)
                parts.append(x1.reshape(c, n, h, w).transpose(0, 1))
            if c < channels:
                # fix: .reshape instead of the reference's .view, which failed on channels_last.
                x2 = xs[:, c:]
                if training:
                    x2_s = self._subsample(x2.reshape(n, -1), h, w)
                    if x2_s.numel() < 2:
                        raise ValueError(
                            f'ChannelDeconv: the {channels - c} channel(s) beyond the whitened blocks need more than '
                            f'one value per training batch for their variance, got input shape {tuple(x.shape)}')
                    mean2, var = x2_s.mean().reshape(1, 1), x2_s.var().reshape(1, 1)
                    if self.check_finite:
                        ensure_finite(self, mean2, var)
                    tracked += [(self.running_mean2, mean2), (self.running_var, var)]
                else:
                    mean2, var = self.running_mean2.to(x2.dtype), self.running_var.to(x2.dtype)
                parts.append((x2 - mean2) / (var + self.eps).sqrt())
            out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if record:
            # fix: the buffers move only once both parts passed the finite check (a non-finite
            # remainder used to leave the whitening buffers updated and the rest not).
            for running, batch in tracked:
                self._update(running, batch, first)
            self.num_batches_tracked.add_(1)
        out = out.to(x.dtype)
        return out[:, :, 0, 0] if flat_input else out

    def extra_repr(self) -> str:
        return f'block={self.block}, eps={self.eps}, n_iter={self.n_iter}, sampling_stride={self.sampling_stride}'
