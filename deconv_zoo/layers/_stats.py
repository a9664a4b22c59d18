"""Running-statistics plumbing shared by the deconvolution layers.

Kept apart from the maths (whitening.py): float32 statistics under autocast, the non-finite
guard, the gradient-checkpoint recompute guard, and the eval-mode cache of folded weights.
"""
import math
import numbers
import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

_warned: Set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` comes up in this process (the reference printed every time)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def resolve_block(layer: str, channels: int, block: int) -> int:
    """The reference's block-size rule: clip to the channels, else fall back to the gcd."""
    if block < 1:
        raise ValueError(f'{layer}: block must be >= 1, got {block}')
    if block > channels:
        return channels
    if channels % block != 0:
        new_block = math.gcd(block, channels)
        warn_once(f'{layer}.gcd_block', f'{layer}: block {block} does not divide {channels} channels; using block '
                  f'{new_block} (the reference rule gcd(block, channels); said once, for the first such layer).')
        return new_block
    return block


def check_momentum(layer: str, momentum: float) -> float:
    """The running statistics' EMA factor, refused up front unless it is in [0, 1]. BatchNorm's
    None (a cumulative average) is not offered; it used to fail only at the first running update,
    with a TypeError from ``lerp_``."""
    if momentum is None or not 0 <= momentum <= 1:
        raise ValueError(f'{layer}: momentum must be a number in [0, 1], got {momentum!r} (momentum=None, '
                         f'the cumulative average of BatchNorm, is not supported)')
    return momentum


def check_eps(layer: str, eps: float) -> float:
    """The covariance's diagonal shift, refused up front unless finite and >= 0 (a negative or NaN
    one was taken as given and whitened the batch into NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f'{layer}: eps must be a finite number >= 0, got {eps!r}')
    return eps


def check_positive_int(layer: str, name: str, value: int) -> int:
    """A count or stride setting, refused up front unless it is an int >= 1 (0 used to fail only
    at the first training call, some with a ZeroDivisionError; a pair was silently mangled)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{layer}: {name} must be an int >= 1, got {value!r}')
    return value


def check_floating(layer: torch.nn.Module, x: Tensor) -> None:
    """Refuse integer or boolean input by name: it cannot be whitened in its own dtype (uint8
    images need converting to float first)."""
    if not x.is_floating_point():
        raise TypeError(f'{layer_label(layer)}: expected a floating-point input, got {x.dtype}')


@torch.no_grad()
def reset_whitening_(running_mean: Tensor, running_deconv: Tensor) -> None:
    """The initial running statistics, in place: zero mean, identity whitening (one per group)."""
    running_mean.zero_()
    running_deconv.zero_().diagonal(dim1=-2, dim2=-1).fill_(1)


def statistics_dtype(x: Tensor) -> torch.dtype:
    """float32, or ``x``'s dtype if wider: covariance and Newton-Schulz never run in half
    precision (they overflow and lose positive-definiteness there)."""
    return torch.promote_types(x.dtype, torch.float32)


@contextmanager
def float32_statistics(x: Tensor) -> Iterator[Tensor]:
    """Yield ``x`` in ``statistics_dtype`` with autocast off."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield x.to(statistics_dtype(x))


def in_backward_recompute() -> bool:
    """True while autograd re-runs a forward for gradient checkpointing; the running
    statistics must not be updated twice for one training step.

    False while torch.compile traces: a compiled graph recomputes checkpointed regions inside
    its own backward and never re-runs this Python (and the query would break the graph).
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def ensure_finite(layer: torch.nn.Module, mean: Tensor, deconv: Tensor) -> None:
    """Raise before the running statistics see a non-finite batch (they would stay poisoned)."""
    if not bool(torch.isfinite(mean.sum() + deconv.sum())):
        raise FloatingPointError(
            f'{layer_label(layer)}: the batch covariance is not finite (non-finite input or activations); '
            f"this layer's running statistics were left unchanged.")


def ensure_finite_input(layer: torch.nn.Module, x: Tensor) -> None:
    """Raise on a non-finite training batch that a layer with frozen whitening would pass on: it
    takes no statistics to check, and the batch-norm layers after it (EfficientNet's blocks, a
    ResNet's downsampling) would record the NaN in theirs."""
    if not bool(torch.isfinite(x.sum(dtype=torch.float32))):  # NaN and inf survive a sum
        raise FloatingPointError(
            f'{layer_label(layer)}: the input is not finite (NaN or inf) in a training call with frozen whitening; '
            f'refused before any later layer recorded it.')


def update_running(running: Tensor, batch: Tensor, momentum: float) -> None:
    """EMA running <- (1 - m) running + m batch, in place and outside autograd."""
    with torch.no_grad():
        running.lerp_(batch.detach().to(running.dtype), momentum)


# fix: fused optimizers (``fused=True`` Adam, AdamW, SGD) update parameters without bumping their
# version counters, so every optimizer step also advances this count, which is part of the key.
_optimizer_steps = 0


def _count_optimizer_step(*_) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _set_on_layers(module: torch.nn.Module, attribute: str, value: bool) -> torch.nn.Module:
    """Set ``attribute`` on every deconvolution layer in ``module`` (those that have it); returns ``module``."""
    for layer in module.modules():
        if hasattr(layer, attribute):
            setattr(layer, attribute, value)
    return module


def layer_label(layer: torch.nn.Module) -> str:
    """How error messages name a layer: its class, and its place in the model once ``name_layers``
    recorded it (a module does not know where it sits)."""
    name = getattr(layer, 'layer_name', '')
    return f'{type(layer).__name__} ({name})' if name else type(layer).__name__


def name_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Record in every deconvolution layer of ``model`` its name there (``layer2.0.conv1``), for
    its error messages: a refused batch then says which layer refused it. Returns ``model``."""
    for name, layer in model.named_modules():
        if hasattr(layer, 'check_finite'):
            layer.layer_name = name
    return model


def set_finite_checks(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Turn the non-finite check of every deconvolution layer in ``model`` on or off.

    The check reads a value back from the device; off, a training step has no host sync, so it can
    be captured whole by CUDA graphs or compiled with ``fullgraph=True``. Returns ``model``.
    """
    return _set_on_layers(model, 'check_finite', enabled)


def freeze_whitening(module: torch.nn.Module, frozen: bool = True) -> torch.nn.Module:
    """Freeze (or, with ``frozen=False``, unfreeze) the whitening statistics of every
    deconvolution layer in ``module``: what timm's ``freeze_batch_norm_2d`` does for batch norm.

    A frozen layer whitens with its running statistics in training mode too, as in eval, and no
    longer updates them: fine-tuning then keeps the function a pretrained backbone computes, where
    training-mode calls would otherwise whiten with each batch's statistics and move the running
    ones. Its weights still train unless their ``requires_grad`` is off (``deconv_zoo.freeze``
    does both). Returns ``module``.
    """
    return _set_on_layers(module, 'whitening_frozen', frozen)


def smallest_training_batch(model: torch.nn.Module, input_size: Sequence[int]) -> Tuple[int, str]:
    """The fewest images of ``input_size`` (C, H, W) in a training batch of ``model`` that give every
    whitening the two samples it needs, and every batch norm two values per channel (fewer raise a
    ValueError), and the name of the layer that needs the most ('' when one image is enough).

    Layers that subsample small maps need several images: a 1x1 FastDeconv takes every 9th pixel
    of the batch (SENet-18's SE gates, on pooled 1x1 maps, one sample per 9 images); batch norm on
    1x1 maps (EfficientNet's SE gates, a ResNet's last stage at a small input) needs two images.
    Read from the layers' input shapes in one eval-mode forward of a blank image, which changes no state.
    """
    layers = {name: m for name, m in model.named_modules()
              if hasattr(m, 'samples_per_whitening') or isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    shapes = []  # (name, input shape) of every call: a layer used twice sees two shapes

    def record(name: str) -> Callable[[torch.nn.Module, Tuple[Tensor, ...]], None]:
        def hook(layer: torch.nn.Module, args: Tuple[Tensor, ...]) -> None:
            shapes.append((name, args[0].shape))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            # A model without parameters (a lone ChannelDeconv) has buffers to take the device from.
            like = next(iter(model.parameters()), None)
            like = like if like is not None else next(iter(model.buffers()), torch.zeros(()))
            dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
            model(torch.zeros(1, *input_size, device=like.device, dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    smallest, needing = 1, ''
    for name, shape in shapes:
        batch = 1  # a few steps at most: past sh * sw images every layer has two samples
        while _samples_of(layers[name], torch.Size((batch, *shape[1:]))) < 2:
            batch += 1
        if batch > smallest:
            smallest, needing = batch, name
    return smallest, needing


def _samples_of(layer: torch.nn.Module, x_shape: torch.Size) -> int:
    """The samples of the batch statistics of a whitening or batch-norm layer for an input of ``x_shape``."""
    if hasattr(layer, 'samples_per_whitening'):
        return layer.samples_per_whitening(x_shape)
    values = math.prod(x_shape) // x_shape[1] if len(x_shape) > 1 else x_shape[0]  # per channel
    if isinstance(layer, torch.nn.SyncBatchNorm) and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        values *= torch.distributed.get_world_size(layer.process_group)  # it checks the global batch
    return values


class FoldCache:
    """Folded (weight, bias) of an eval-mode layer, valid while its inputs are unchanged.

    Validity is keyed on each source tensor's identity, storage and in-place version counter,
    so an optimizer step, ``load_state_dict``, ``.to()``, a replaced parameter or an in-place
    edit all invalidate it. Edits through ``.data`` do not: PyTorch gives that alias a version
    counter of its own. ``train()`` / ``eval()`` clear the cache, so calling ``model.eval()``
    after such an edit is enough. Copies and pickles of a layer start with an empty cache. A fold
    made under ``torch.inference_mode()`` serves only forwards in that mode.
    """

    def __init__(self) -> None:
        self.clear()

    @staticmethod
    def key(*tensors: Optional[Tensor]) -> Optional[tuple]:
        """What a fold of ``tensors`` depends on; None where it cannot be told (do not cache)."""
        # A fold made under inference_mode is an inference tensor, which autograd cannot save:
        # it must not serve a forward outside that mode.
        parts: list = [_optimizer_steps, torch.is_inference_mode_enabled()]
        for t in tensors:
            if t is None:
                parts.append(None)
                continue
            if t.is_inference():
                return None  # inference tensors carry no version counter; do not cache
            try:
                pointer = t.data_ptr()
            except RuntimeError:
                return None  # no storage (torch.func transforms, meta tensors): nothing to key on
            parts.append((pointer, t._version, t.dtype, t.device))
        return tuple(parts)

    def get(self, *tensors: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
        """The value folded from ``tensors`` if they are unchanged and the very tensors it was
        computed from (a freed tensor's memory can come back with the same key)."""
        key = self.key(*tensors)
        if key is None or key != self._key:
            return None
        if any((ref is None) != (t is None) or (ref is not None and ref() is not t)
               for ref, t in zip(self._sources, tensors)):
            return None
        return self._value

    def put(self, value: Tuple[Tensor, Tensor], *tensors: Optional[Tensor]) -> None:
        """Keep ``value``, folded from ``tensors``, unless they cannot be keyed."""
        key = self.key(*tensors)
        if key is not None:
            self._key, self._value = key, value
            self._sources = tuple(None if t is None else weakref.ref(t) for t in tensors)

    def clear(self) -> None:
        self._key: Optional[tuple] = None
        self._value: Optional[Tuple[Tensor, Tensor]] = None
        self._sources: tuple = ()

    def __getstate__(self) -> dict:
        return {}  # weak references do not pickle, and a copy's sources are other tensors

    def __setstate__(self, state: dict) -> None:
        self.clear()


def use_fold_cache(*tensors: Optional[Tensor]) -> bool:
    """Cache only when no gradient w.r.t. any of the fold's ``tensors`` is being taken (a cached
    fold is a constant: a trainable bias next to a frozen weight would get no gradient), and not
    while compiling (the compiled graph folds on its own; Python-side caching would break the trace)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


class WhitenedWeightMixin:
    """Training-step bookkeeping and the eval-mode fold shared by FastDeconv and Delinear.

    The host class has ``weight``, ``bias``, ``running_mean``, ``running_deconv``, ``momentum``,
    ``track_running_stats`` and implements ``_check_input(x)``, ``_takes_statistics(x)``,
    ``_train_forward(x)`` (a training call with batch statistics), ``_apply_weights(x, weight,
    bias)`` (its convolution or linear map) and ``_fold(weight, bias, mean, deconv) -> (weight, bias)``.
    """
    # Turn off to run under CUDA graphs / fullgraph compile: the check synchronises the device.
    check_finite: bool = True
    # freeze_whitening: the running statistics serve training calls too, and stay as they are.
    whitening_frozen: bool = False

    def _init_fold_cache(self) -> None:
        self._fold_cache = FoldCache()

    def train(self, mode: bool = True):
        self._fold_cache.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        # fix: with track_running_stats off, training still uses the batch statistics (as the
        # reference and BatchNorm do); only their recording stops.
        batch_statistics = self.training and not self.whitening_frozen
        if batch_statistics and self._takes_statistics(x):
            return self._train_forward(x)
        # An empty training batch has no statistics: as BatchNorm does, it gives an empty output and
        # leaves the layer's state as it was.
        if self.training and self.whitening_frozen and self.check_finite:
            ensure_finite_input(self, x)
        weight, bias = (self.weight, self.bias) if batch_statistics else self._eval_fold()
        return self._apply_weights(x, weight, bias)

    def _fold(self, weight: Tensor, bias: Optional[Tensor], mean: Tensor, deconv: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def reset_running_stats(self) -> None:
        """The initial statistics again, as BatchNorm's method: e.g. before re-estimating them for
        averaged (SWA) weights by training-mode passes under ``torch.no_grad()``."""
        reset_whitening_(self.running_mean, self.running_deconv)

    def _track(self, mean: Tensor, deconv: Tensor, kept: bool = False, checked: bool = False) -> None:
        """Validate one batch's statistics and fold them into the running buffers. ``kept``: the
        caller keeps them for later calls too (``refresh_every``), so they are validated even
        without running statistics. ``checked``: the caller validated them already."""
        if self.check_finite and not checked and (self.track_running_stats or kept):
            ensure_finite(self, mean, deconv)
        if self.track_running_stats and not in_backward_recompute():
            update_running(self.running_mean, mean, self.momentum)
            update_running(self.running_deconv, deconv, self.momentum)

    def _fold_in(self, mean: Tensor, deconv: Tensor) -> Tuple[Tensor, Tensor]:
        """Fold in the statistics' precision; return tensors in the weight's dtype."""
        dtype = mean.dtype
        weight, bias = self._fold(
            self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype), mean, deconv)
        return weight.to(self.weight.dtype), bias.to(self.weight.dtype)

    def _eval_fold(self) -> Tuple[Tensor, Tensor]:
        sources = (self.weight, self.bias, self.running_mean, self.running_deconv)
        cacheable = use_fold_cache(*sources)
        cached = self._fold_cache.get(*sources) if cacheable else None
        if cached is not None:
            return cached
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            weight, bias = self._fold_in(self.running_mean.to(dtype), self.running_deconv.to(dtype))
        if cacheable:
            weight, bias = weight.detach(), bias.detach()
            self._fold_cache.put((weight, bias), *sources)
        return weight, bias
