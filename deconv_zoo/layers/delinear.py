"""Delinear: a linear layer that decorrelates its input features (the paper's classifier)."""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._stats import (
    WhitenedWeightMixin, check_eps, check_floating, check_momentum, check_positive_int, float32_statistics,
    layer_label, resolve_block,
)
from .whitening import fold_linear_whitening, isqrt_newton_schulz, whiten_linear_chunks

__all__ = ['Delinear']


class Delinear(WhitenedWeightMixin, nn.Linear):
    """Linear layer with feature decorrelation (the reference's ``Delinear``).

    The ``in_features`` inputs are cut into contiguous chunks of ``block`` features; all chunks
    of all samples share one ``block x block`` covariance whose Newton-Schulz inverse square root
    is folded into the weight (or, in a training call with fewer input rows than outputs, applied
    to the input chunks: the same function). Running statistics are tracked with ``momentum`` for eval.
    """
    def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            eps: float = 1e-5,
            n_iter: int = 5,
            momentum: float = 0.1,
            block: int = 512,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = resolve_block(type(self).__name__, in_features, block)
        self.eps = check_eps(type(self).__name__, eps)
        self.n_iter = check_positive_int(type(self).__name__, 'n_iter', n_iter)
        self.momentum = check_momentum(type(self).__name__, momentum)
        self.track_running_stats = True
        self.register_buffer('running_mean', torch.zeros(self.block, device=device, dtype=dtype))
        self.register_buffer('running_deconv', torch.eye(self.block, device=device, dtype=dtype))
        self._init_fold_cache()

    def batch_statistics(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and whitening matrix of the input's feature chunks (differentiable)."""
        self._check_input(x)
        chunks = x.reshape(-1, self.block)
        if self.samples_per_whitening(x.shape) < 2:
            # As BatchNorm: one sample has no covariance; it would be centred to zero (the output
            # the bias alone) and add about eps^-1/2 * I to the running whitening.
            raise ValueError(f'{layer_label(self)}: the whitening needs more than one {self.block}-feature chunk '
                             f'per training batch, got input shape {tuple(x.shape)}')
        mean = chunks.mean(dim=0)
        centred = chunks - mean
        eye = torch.eye(self.block, dtype=x.dtype, device=x.device)
        cov = torch.addmm(eye, centred.t(), centred, beta=self.eps, alpha=1.0 / centred.shape[0])
        return mean, isqrt_newton_schulz(cov, self.n_iter)

    def samples_per_whitening(self, x_shape: torch.Size) -> int:
        """The samples of the covariance for an input of ``x_shape``: its ``block``-feature chunks."""
        return math.prod(x_shape) // self.block

    def _check_input(self, x: Tensor) -> None:
        check_floating(self, x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f'{layer_label(self)}: expected input (..., {self.in_features}), got shape {tuple(x.shape)}')

    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    def _takes_statistics(self, x: Tensor) -> bool:
        return x.numel() > 0

    def _train_forward(self, x: Tensor) -> Tensor:
        with float32_statistics(x) as xs:
            mean, deconv = self.batch_statistics(xs)
            self._track(mean, deconv)
            if x.numel() < self.in_features * self.out_features:
                # perf: fewer input rows than outputs, so whitening the input (rows x in x block
                # multiply-adds) is cheaper than folding D into the weight (out x in x block), and
                # the backward pass keeps no weight-sized copy (VGG's 25088 x 4096 classifier: a
                # quarter of the time; README, Performance).
                x, weight, bias = whiten_linear_chunks(xs, mean, deconv).to(x.dtype), self.weight, self.bias
            else:
                weight, bias = self._fold_in(mean, deconv)
        return self._apply_weights(x, weight, bias)  # under autocast, if on

    def _fold(self, weight: Tensor, bias: Optional[Tensor], mean: Tensor, deconv: Tensor) -> Tuple[Tensor, Tensor]:
        return fold_linear_whitening(weight, bias, mean, deconv)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', block={self.block}, n_iter={self.n_iter}, eps={self.eps}'
