"""FastDeconv: a 2-D convolution that deconvolves (whitens) its input first.

Arguments, defaults, parameter and buffer names follow the authors' ``models/deconv.py`` so that
their checkpoints load unchanged. Runtime bugs of the reference are fixed where marked "fix:".
"""
import collections
from typing import Any, Deque, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from ._stats import (
    WhitenedWeightMixin, check_eps, check_floating, check_momentum, check_positive_int, ensure_finite,
    ensure_finite_input, in_backward_recompute, layer_label, resolve_block, statistics_dtype,
)
from .whitening import conv_patch_mean, conv_whitening_statistics, fold_conv_whitening, patch_sample_count

__all__ = ['FastDeconv']

_size_2_t = Union[int, Tuple[int, int]]

# refresh_every reuses the statistics of large whitening matrices only. Small ones (SE gates,
# 1x1 convolutions with blocks of 64, depthwise convolutions, stems) cost little, and with their
# few samples per batch a reused whitening is far off the next batch's: on digits, SENet-18 did
# not learn with its SE gates on the schedule (10% top-1) and reached 97.5% without them.
REFRESH_MIN_FEATURES = 128

# How many training calls of one layer may precede a backward pass under gradient checkpointing
# with the freeze or refresh_every schedules (each record holds that call's running statistics or
# reused whitening matrix).
RECORDED_CALLS = 8


class _TrainingCall(NamedTuple):
    """What a training call chose, for a gradient-checkpoint recompute of it to choose the same."""
    frozen: Optional[Tensor]  # freeze schedule: whether it used the running statistics (0-dim bool)
    running: Optional[Tuple[Tensor, Tensor]]  # freeze schedule: those statistics, as the call read them
    reused_deconv: Optional[Tensor]  # refresh_every: the whitening matrix it reused (None: fresh or no schedule)


_UNSCHEDULED = _TrainingCall(None, None, None)  # a call of a layer without either schedule: nothing to choose


class FastDeconv(WhitenedWeightMixin, nn.Conv2d):
    """Convolution with network deconvolution (Ye et al. 2020, Alg. 1).

    In training, each call estimates the mean and the covariance of the input's im2col patches
    (sampled every ``sampling_stride * stride`` pixels, channels split into blocks of ``block``
    that share one covariance), computes ``Cov^(-1/2)`` with ``n_iter`` Newton-Schulz steps,
    tracks both with ``momentum``, and folds them into the convolution weight and bias. In eval
    the running statistics are folded once and cached.

    With ``freeze=True`` fresh statistics are used for the first ``freeze_iter + 1`` training
    calls of every ``10 * freeze_iter``, the running ones in between (the reference's schedule).

    ``refresh_every=k > 1`` is an approximation offered for speed (not the paper's layer): a layer
    with at least ``REFRESH_MIN_FEATURES`` patch features computes its whitening matrix on every
    k-th training call only, and the calls in between reuse the last one as a constant (no
    gradient through it), which skips the covariance and Newton-Schulz work of those steps. The
    patch mean is computed on every call, with its gradient (a reduction, without copying the
    patches): reusing it too cost SENet-18 3 points on digits. The running buffers still track
    the statistics in use every step. The schedule restarts with
    a fresh computation after a reload or a device or dtype change (``refresh_state`` and
    ``load_refresh_state`` carry it across a training checkpoint). Layers with ``freeze=True``
    follow the freeze schedule instead, and compiled graphs compute fresh statistics every call.

    Under gradient checkpointing a recompute repeats the choices of the call it recomputes (frozen
    or fresh, reused or fresh), for up to ``RECORDED_CALLS`` calls of the layer before one backward.
    """
    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: _size_2_t,
            stride: _size_2_t = 1,
            padding: _size_2_t = 0,
            dilation: _size_2_t = 1,
            groups: int = 1,
            bias: bool = True,
            eps: float = 1e-5,
            n_iter: int = 5,
            momentum: float = 0.1,
            block: int = 64,
            sampling_stride: int = 3,
            freeze: bool = False,
            freeze_iter: int = 100,
            refresh_every: int = 1,
            padding_mode: str = 'zeros',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        if isinstance(padding, str):
            raise ValueError(f'FastDeconv: padding must be int or a pair of ints, got {padding!r}')
        if padding_mode != 'zeros':
            raise ValueError(f"FastDeconv: padding_mode {padding_mode!r} is not supported: the whitening is estimated "
                             f"on zero-padded patches (padding_mode='zeros')")
        name = type(self).__name__
        check_positive_int(name, 'n_iter', n_iter)
        check_positive_int(name, 'freeze_iter', freeze_iter)  # the counter runs modulo 10 * freeze_iter
        check_positive_int(name, 'sampling_stride', sampling_stride)  # one int, multiplied by each stride
        for step in _pair(stride):  # 0 was a ZeroDivisionError at the first training call
            check_positive_int(name, 'stride', step)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, device=device, dtype=dtype)
        factory = dict(device=device, dtype=dtype)
        if groups > 1:
            block = in_channels // groups  # one whitening per convolution group
        else:
            block = resolve_block(type(self).__name__, in_channels, block)
        self.block = block
        self.eps = check_eps(name, eps)
        self.n_iter = n_iter
        self.momentum = check_momentum(name, momentum)
        self.freeze = freeze
        self.freeze_iter = freeze_iter
        self.refresh_every = check_positive_int(name, 'refresh_every', refresh_every)
        self._reused_deconv: Optional[Tensor] = None  # the whitening matrix refresh_every reuses
        self._reuse_count = 0
        # The choices of the latest training calls, for gradient-checkpoint recomputes to repeat
        # (several calls of one layer may precede a backward pass: two views, a shared layer).
        self._calls: Deque[_TrainingCall] = collections.deque(maxlen=RECORDED_CALLS)
        self._replays = (-1, 0)  # (backward pass, how many of its recomputes of this layer ran so far)
        self.track_running_stats = True
        # fix: the reference accepted only int kernel/stride; pairs work the same way.
        self.sampling_stride = tuple(sampling_stride * s for s in _pair(stride))
        kh, kw = self.kernel_size
        self.num_features = kh * kw * block
        if groups == 1:
            self.register_buffer('running_mean', torch.zeros(self.num_features, **factory))
            self.register_buffer('running_deconv', torch.eye(self.num_features, **factory))
        else:
            self.register_buffer('running_mean', torch.zeros(kh * kw * in_channels, **factory))
            self.register_buffer('running_deconv', torch.eye(self.num_features, **factory).repeat(groups, 1, 1))
        # fix: the reference kept this counter in a Python int, so the freeze schedule restarted
        # after every reload. A reference checkpoint without it loads with counter 0.
        self.register_buffer('counter', torch.zeros((), dtype=torch.long, device=device))
        self._init_fold_cache()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.counter.zero_()  # the freeze schedule starts again
        self._reused_deconv = None  # refresh_every: the next training call computes fresh statistics

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + 'counter', torch.zeros((), dtype=torch.long))
        self._reused_deconv = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def batch_statistics(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Patch mean and whitening matrix of one batch (differentiable), in ``statistics_dtype``
        (float32 or better) whatever the dtype of ``x``; call with autocast off."""
        self._check_input(x)
        samples = self.samples_per_whitening(x.shape)
        if samples < 2:
            # As BatchNorm: one sample has no covariance. Less its own mean it is zero, so the whitening
            # would be about eps^-1/2 * I (a gain of 250 at block 64), moving the running one towards it.
            sampling = (f'every {self.sampling_stride[0] * self.sampling_stride[1]}th pixel of the batch'
                        if self.kernel_size == (1, 1) else f'patches every {self.sampling_stride} pixels')
            raise ValueError(
                f'{layer_label(self)}: the whitening needs more than one sample per training batch, got {samples} '
                f'from input shape {tuple(x.shape)} ({sampling}): train with a larger batch, or a smaller '
                f'sampling_stride')
        return conv_whitening_statistics(x, self.kernel_size, self.dilation, self.padding, self.sampling_stride,
                                         self.groups, self.num_features, self.eps, self.n_iter)

    def samples_per_whitening(self, x_shape: torch.Size) -> int:
        """The samples of each covariance for an input of ``x_shape``: the sampled patches, times the
        channel blocks that share the covariance (groups == 1)."""
        geometry = (self.kernel_size, self.dilation, self.padding, self.sampling_stride)
        blocks = self.in_channels // self.block if self.groups == 1 else 1
        return patch_sample_count(x_shape, geometry) * blocks

    def _check_input(self, x: Tensor) -> None:
        check_floating(self, x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'{layer_label(self)}: expected input (N, {self.in_channels}, H, W), '
                             f'got shape {tuple(x.shape)}')
        padded = [size + 2 * pad for size, pad in zip(x.shape[2:], self.padding)]
        window = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation)]
        if padded[0] < window[0] or padded[1] < window[1]:
            raise ValueError(f'{layer_label(self)}: input of {x.shape[2]}x{x.shape[3]} pixels ({padded[0]}x{padded[1]} '
                             f'padded) is smaller than the {window[0]}x{window[1]} window of the (dilated) kernel')

    def _apply_weights(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return self._conv_forward(x, weight, bias)

    def _takes_statistics(self, x: Tensor) -> bool:
        return x.shape[0] > 0

    def _train_forward(self, x: Tensor) -> Tensor:
        return self._apply_weights(x, *self._train_fold(x))

    def _train_fold(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        # Statistics in float32 at least, read straight from x (a float32 copy of a half-precision
        # x would be kept for the backward pass); only the convolution runs under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            recompute = in_backward_recompute()
            call = self._replayed_call() if recompute else self._new_call(x)
            checked = False
            if call.frozen is not None and self._reads_freeze_schedule(x) and bool(call.frozen):
                # Frozen steps skip the batch statistics, as the reference did (same result as the
                # selection below).
                if self.check_finite:
                    ensure_finite_input(self, x)
                mean, deconv = call.running
            else:
                mean, deconv = self._refreshed_statistics(x, call.reused_deconv)
                if call.frozen is not None:
                    if self.check_finite:  # the batch's own statistics, before a frozen step drops them
                        ensure_finite(self, mean, deconv)
                        checked = True
                    # Frozen steps reuse the running statistics. Selecting with a tensor condition
                    # keeps the step free of host syncs and torch.compile recompiles.
                    mean = torch.where(call.frozen, call.running[0], mean)
                    deconv = torch.where(call.frozen, call.running[1], deconv)
            # lerp(r, r, m) == r exactly, so frozen steps leave the running buffers untouched.
            refresh_schedule = self._follows_refresh_schedule()
            refreshed = refresh_schedule and call.reused_deconv is None
            self._track(mean, deconv, kept=refreshed and not recompute, checked=checked)
            if not recompute:
                # Advanced once _track accepted the batch: a failed call leaves the schedules as they were.
                if refresh_schedule:
                    self._reuse_count = 0 if refreshed else self._reuse_count + 1
                    if refreshed:
                        self._reused_deconv = deconv.detach()
                if self.freeze and self.track_running_stats:
                    self.counter.add_(1).remainder_(10 * self.freeze_iter)
                if call is not _UNSCHEDULED and not torch.compiler.is_compiling():
                    self._calls.append(call)
            return self._fold_in(mean, deconv)

    def _reads_freeze_schedule(self, x: Tensor) -> bool:
        """Whether this call reads the freeze schedule's choice on the host: on CPU, where it costs
        nothing, and wherever the batch is too small for statistics of its own (a frozen step
        needs none, a fresh one raises). Elsewhere the read would be a host sync."""
        if torch.compiler.is_compiling():
            return False
        return x.device.type == 'cpu' or self.samples_per_whitening(x.shape) < 2

    def _new_call(self, x: Tensor) -> _TrainingCall:
        """The choices of a training call: frozen or fresh statistics (the freeze schedule, which
        takes precedence where set: most stems), fresh or reused whitening (refresh_every)."""
        if self.freeze:
            dtype = statistics_dtype(x)
            # fix: copies, as the graph keeps them: the buffers themselves change in place at the
            # next training call, maybe before this step's backward (a shared layer).
            running = (self.running_mean.to(dtype, copy=True), self.running_deconv.to(dtype, copy=True))
            return _TrainingCall(self.counter > self.freeze_iter, running, None)
        if not self._follows_refresh_schedule():
            return _UNSCHEDULED
        reused = self._reused_deconv
        # fix: one kept from a call under inference_mode cannot enter an autograd graph.
        if (reused is None or self._reuse_count + 1 >= self.refresh_every
                or reused.device != x.device or reused.dtype != statistics_dtype(x)
                or (reused.is_inference() and not torch.is_inference_mode_enabled())):
            reused = None
        return _TrainingCall(None, None, reused)

    def _replayed_call(self) -> _TrainingCall:
        """The choices of the call a gradient-checkpoint recompute repeats (a recompute must make
        them again, or its gradients are wrong). Autograd runs the nodes of one backward pass later
        ones first, so its k-th recompute of this layer repeats the k-th latest call; a further
        backward pass through the same graph (``retain_graph``) starts from the latest again."""
        if not (self.freeze or self._follows_refresh_schedule()):
            return _UNSCHEDULED
        task = torch._C._current_graph_task_id()
        last_task, replayed = self._replays
        replayed = replayed if task == last_task else 0
        if replayed >= len(self._calls):
            raise RuntimeError(
                f'{layer_label(self)}: a gradient-checkpoint recompute found no record of the training call it '
                f'repeats (the last {self._calls.maxlen} calls of a layer before one backward pass are kept)')
        self._replays = (task, replayed + 1)
        return self._calls[-1 - replayed]

    def refresh_state(self) -> Optional[Dict[str, Any]]:
        """What ``refresh_every`` carries from one training call to the next (the whitening matrix
        it reuses, as a CPU tensor, and how many calls reused it), for a training checkpoint to resume
        the schedule where it was; None for a layer off the schedule. Not part of the state dict:
        weights files stay those of the paper's layer."""
        if not self._on_refresh_schedule():
            return None
        reused = None if self._reused_deconv is None else self._reused_deconv.cpu()
        return dict(reuse_count=self._reuse_count, reused_deconv=reused)

    def load_refresh_state(self, state: Dict[str, Any]) -> None:
        """Continue the ``refresh_every`` schedule from ``refresh_state()``'s record (after ``load_state_dict``,
        which restarts it)."""
        reused = state['reused_deconv']
        self._reused_deconv = None if reused is None else reused.to(self.running_deconv.device)
        self._reuse_count = state['reuse_count']

    def _on_refresh_schedule(self) -> bool:
        # The reference's freeze schedule, where set (most stems), takes precedence.
        return self.refresh_every > 1 and self.num_features >= REFRESH_MIN_FEATURES and not self.freeze

    def _follows_refresh_schedule(self) -> bool:
        return self._on_refresh_schedule() and not torch.compiler.is_compiling()

    def _refreshed_statistics(self, x: Tensor, reused_deconv: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """This training call's statistics: fresh ones, or under ``refresh_every`` this call's patch
        mean with the whitening matrix it reuses."""
        if reused_deconv is None:
            return self.batch_statistics(x)
        geometry = (self.kernel_size, self.dilation, self.padding, self.sampling_stride)
        return conv_patch_mean(x, geometry, self.groups, self.num_features), reused_deconv

    def _fold(self, weight: Tensor, bias: Optional[Tensor], mean: Tensor, deconv: Tensor) -> Tuple[Tensor, Tensor]:
        return fold_conv_whitening(weight, bias, mean, deconv, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f', block={self.block}, n_iter={self.n_iter}, eps={self.eps}, sampling_stride={self.sampling_stride}'
        if self.freeze:
            s += f', freeze_iter={self.freeze_iter}'
        if self.refresh_every > 1:
            s += f', refresh_every={self.refresh_every}'
        return s
