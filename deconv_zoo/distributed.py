"""Deconvolution statistics shared across processes (the SyncBatchNorm of network deconvolution).

Under DistributedDataParallel every process sees only its share of the batch, so by default a
FastDeconv or Delinear whitens with per-process statistics. ``convert_sync_deconv`` switches
them to statistics of the global batch: each process sums its sampled patches and their count,
the sums are all-reduced into the global mean, then the patches' centred second moments are
all-reduced into the global covariance. The result (output, gradients, running statistics) equals
one process on the concatenated batch; the all-reduces are differentiable, so each process'
gradient includes the other processes' dependence on its samples, exactly as in one process.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .layers import ChannelDeconv, Delinear, FastDeconv, isqrt_newton_schulz, sample_patches
from .layers._stats import statistics_dtype, warn_once
from .layers.whitening import pixel_samples

__all__ = ['SyncFastDeconv', 'SyncDelinear', 'convert_sync_deconv', 'global_whitening_statistics', 'average_buffers',
           'TooFewSamplesError']


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is the same sum of the incoming gradients (each
    process' output feeds the losses of all processes)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _is_synced(group: Optional[dist.ProcessGroup]) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class TooFewSamplesError(ValueError):
    """The batches of all processes together hold fewer samples than the statistics need. Raised
    on every process alike (each sees the same total), so that none is left waiting in an
    all-reduce."""

    def __init__(self, total: int, needed: int):
        super().__init__(f'the batches of all processes hold {total} sample(s) in all; the whitening needs {needed}')
        self.total = total


def _global_mean(samples: Tensor, group: Optional[dist.ProcessGroup],
                 min_count: int = 1) -> Tuple[Tensor, Tensor]:
    """Mean (G, nf) of the (G, nf, S) sample columns of all processes, and their total count.
    ``TooFewSamplesError`` when they have fewer than ``min_count`` in all."""
    groups, nf, local_count = samples.shape
    # The count rides along in the statistics' dtype: exact up to 2**24 samples in float32.
    sums = torch.cat([samples.sum(dim=2).reshape(-1), samples.new_full((1,), local_count)])
    sums = _AllReduceSum.apply(sums, group)
    count = sums[-1]
    # Only a process short of min_count can see a total short of it: the others skip the host sync.
    if local_count < min_count and count.item() < min_count:
        raise TooFewSamplesError(int(count.item()), min_count)
    return sums[:-1].reshape(groups, nf) / count, count


def global_whitening_statistics(
        samples: Tensor, eps: float, n_iter: int, group: Optional[dist.ProcessGroup] = None, min_count: int = 1,
) -> Tuple[Tensor, Tensor]:
    """Mean (G, nf) and whitening matrix (G, nf, nf) of the samples of all processes.

    ``samples`` is this process' (G, nf, S) block of sample columns (G independent covariances);
    S may be 0 (an empty local batch still takes part in the all-reduces). Fewer than
    ``min_count`` samples over all processes raise ``TooFewSamplesError`` on every process.
    Two all-reduces instead of one over (sum, sum of squares): centring on the global mean first
    keeps the covariance as accurate as the single-process computation (no cancellation).
    """
    nf = samples.shape[1]
    mean, count = _global_mean(samples, group, min_count)
    centred = samples - mean[:, :, None]
    moment = _AllReduceSum.apply(centred @ centred.transpose(1, 2), group)
    eye = torch.eye(nf, dtype=samples.dtype, device=samples.device)
    return mean, isqrt_newton_schulz(moment / count + eps * eye, n_iter)


def _global_offset(local_count: int, device: torch.device, group: Optional[dist.ProcessGroup]) -> int:
    """Number of elements the lower ranks contribute before this one in the concatenated batch."""
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor(local_count, device=device), group=group)
    return int(sum(c.item() for c in counts[:dist.get_rank(group)]))


class _Synced:
    """For the synced layers: their sample counts are the concatenated batch's, and a process
    whose batch is empty still takes part in the all-reduces, with no samples, and records the
    global statistics as the others do. FastDeconv and Delinear
    skip the statistics of an empty batch, which left the other processes waiting for ever.
    Every batch empty: the layers' own empty output, their state left as it was."""
    process_group: Optional[dist.ProcessGroup] = None

    def samples_per_whitening(self, x_shape: torch.Size) -> int:
        """The samples of each covariance when every process' batch has ``x_shape``: those of the
        concatenated batch."""
        processes = dist.get_world_size(self.process_group) if _is_synced(self.process_group) else 1
        return super().samples_per_whitening((x_shape[0] * processes, *x_shape[1:]))

    def _takes_statistics(self, x: Tensor) -> bool:
        return super()._takes_statistics(x) or _is_synced(self.process_group)

    def _train_forward(self, x: Tensor) -> Tensor:
        try:
            return super()._train_forward(x)
        except TooFewSamplesError as error:
            if error.total:
                raise
            return self._apply_weights(x, self.weight, self.bias)


def _synced_statistics(layer: nn.Module, samples: Tensor, sample_name: str) -> Tuple[Tensor, Tensor]:
    """``global_whitening_statistics`` of a synced layer's (G, nf, S) samples. As in one process, one
    sample in all has no covariance (the whitening would be about eps^-1/2 * I): a ValueError naming
    the layer; no sample at all is ``TooFewSamplesError`` (see ``_Synced``)."""
    try:
        return global_whitening_statistics(samples, layer.eps, layer.n_iter, layer.process_group, min_count=2)
    except TooFewSamplesError as error:
        if error.total == 0:
            raise
        raise ValueError(f'{type(layer).__name__}: the whitening needs more than one {sample_name} in the training '
                         f'batches of all processes, got {error.total}') from None


class SyncFastDeconv(_Synced, FastDeconv):
    """FastDeconv whose training statistics cover the batch of every process in ``process_group``.

    Without an initialised process group of more than one process it behaves as FastDeconv.
    Create it with ``convert_sync_deconv``.
    """

    def batch_statistics(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if not _is_synced(self.process_group):
            return super().batch_statistics(x)
        self._check_input(x)
        mean, deconv = _synced_statistics(self, self._samples(x), 'sample')
        return mean.reshape(-1), (deconv[0] if self.groups == 1 else deconv)

    def _refreshed_statistics(self, x: Tensor, reused_deconv: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if reused_deconv is not None and _is_synced(self.process_group):
            # refresh_every reuses the whitening with this process' patch mean: use the global batch's.
            return _global_mean(self._samples(x), self.process_group)[0].reshape(-1), reused_deconv
        return super()._refreshed_statistics(x, reused_deconv)

    def _samples(self, x: Tensor) -> Tensor:
        """This process' (G, nf, S) patch samples, in ``statistics_dtype`` as FastDeconv's own."""
        if self.kernel_size == (1, 1):
            patches = self._pixel_samples(x)
        else:
            # Patches are sampled per image, so concatenating the processes' samples is the
            # same as sampling the concatenated batch.
            patches = sample_patches(x, self.kernel_size, self.dilation, self.padding, self.sampling_stride)
        columns = patches.numel() // (self.groups * self.num_features)  # not -1: ambiguous when empty
        return patches.to(statistics_dtype(x)).reshape(self.groups, self.num_features, columns)

    def _pixel_samples(self, x: Tensor) -> Tensor:
        """1x1 kernels sample every step-th pixel of the flattened (N, H, W) batch (see
        ``sample_patches``); start where the concatenated batch's sampling grid falls."""
        n, _, h, w = x.shape
        step = self.sampling_stride[0] * self.sampling_stride[1]
        start = -_global_offset(n * h * w, x.device, self.process_group) % step  # every process, empty or not
        return pixel_samples(x, step, start)


class SyncDelinear(_Synced, Delinear):
    """Delinear whose training statistics cover the batch of every process in ``process_group``."""

    def batch_statistics(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if not _is_synced(self.process_group):
            return super().batch_statistics(x)
        self._check_input(x)
        samples = x.reshape(x.numel() // self.block, self.block).t()[None]  # (1, block, chunks); chunks may be 0
        mean, deconv = _synced_statistics(self, samples, f'{self.block}-feature chunk')
        return mean[0], deconv[0]


_SYNC_CLASSES = {FastDeconv: SyncFastDeconv, Delinear: SyncDelinear}


def convert_sync_deconv(module: nn.Module, process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Make every FastDeconv and Delinear in ``module`` use global batch statistics.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, call it before wrapping the model in
    DistributedDataParallel. The layers are converted in place (their class changes; parameters,
    buffers and settings are kept, so state_dicts are unchanged) and ``module`` is returned.
    ChannelDeconv layers and subclasses of the two layers keep per-process statistics (a warning
    says so).
    """
    for name, layer in module.named_modules():
        sync_class = _SYNC_CLASSES.get(type(layer))
        if sync_class is not None:
            layer.__class__ = sync_class
            layer.process_group = process_group
        elif isinstance(layer, (FastDeconv, Delinear, ChannelDeconv)) and type(layer) not in _SYNC_CLASSES.values():
            warn_once(f'convert_sync_deconv: {type(layer).__name__} layers (e.g. {name!r}) keep per-process statistics.')
    return module


def average_buffers(module: nn.Module, average: bool = True) -> None:
    """Make every process hold the same buffers: floating-point ones (running statistics) are
    averaged, the others (step counters) taken from rank 0. Call it at the end of an epoch when
    any statistics are per-process (layers that neither ``convert_sync_deconv`` nor SyncBatchNorm
    converted); timm's ``distribute_bn`` only knows buffers named running_mean/running_var.
    ``average=False`` takes every buffer from rank 0, as DistributedDataParallel's next forward does."""
    if not _is_synced(None):
        return
    world_size = dist.get_world_size()
    with torch.no_grad():
        for buffer in module.buffers():
            if average and buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(world_size)
            else:
                dist.broadcast(buffer, 0)
