"""Bringing existing weights into the zoo.

- ``convert_reference_checkpoint``: a checkpoint of the authors' training scripts becomes a zoo
  model. The zoo keeps the reference's module, parameter and buffer names, so this unwraps the
  state dict, strips DataParallel's ``module`` levels and loads strictly; the only keys the zoo
  adds (FastDeconv's step counter) are filled in and reported.
- ``bn_to_deconv``: a batch-norm model (the zoo's BN twins, timm's ``resnet*`` and ``vgg*_bn``)
  becomes its deconv twin computing the same eval-mode function. Each BatchNorm that directly
  follows a convolution (or linear layer) is folded into it,
  ``BN(conv(x)) = conv'(x)`` with ``W' = W g / s``, ``b' = (b - m) g / s + beta``,
  ``s = sqrt(var + eps)``, and every deconvolution gets identity statistics (zero mean,
  identity whitening), so in eval ``W' D (x - mu) + b' = W' x + b'``.

  Exact conversion needs every BatchNorm to normalise the output of a single convolution that
  nothing else reads (post-activation networks): ResNet (CIFAR and ImageNet), VGG, ResNeXt-29,
  MobileNetV2, DPN-92, PNASNet-A, EfficientNet-B0 (CIFAR). Pre-activation networks normalise
  *before* a ReLU (``relu(bn(x))``) a tensor that also feeds other layers, or a concatenation;
  their deconv twins have no per-channel affine there, so no exact conversion exists:
  PreAct-ResNet-18, SENet-18 (pre-activation blocks), DenseNet-121 (CIFAR and ImageNet).
  ``bn_to_deconv`` raises for them, naming the BatchNorms it cannot fold.
- ``calibrate_whitening``: estimates real whitening statistics on data and re-solves each
  layer's weights so the eval function is unchanged (``W' = W D^-1``, ``b' = b + W mu``); the
  converted model then behaves the same in train mode (batch statistics) as in eval, a better
  start for fine-tuning than identity statistics.
"""
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.fx as fx
import torch.nn as nn
from safetensors.torch import load_file
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .deploy import fold_layer_whitening, folded_weight_and_bias
from .evaluation import ModelArgumentsError, create_model_with_weights
from .layers import ChannelDeconv, Delinear, FastDeconv
from .loading import (
    compare_state_dict, is_safetensors_path, load_torch_checkpoint, optional_state_keys, refuse_non_finite,
    verify_weights_file,
)
from .weights import CheckpointMismatchError

__all__ = ['REFERENCE_CHECKPOINT_KEYS', 'read_checkpoint', 'reference_state_dict', 'checkpoint_geometry',
           'ConversionReport', 'convert_reference_checkpoint', 'conv_bn_pairs', 'bn_twin_names',
           'deconv_state_dict_from_bn', 'bn_to_deconv', 'calibrate_whitening']

# Where the authors' scripts keep the model: main.py saves {'net': ...}, main_imagenet.py
# {'state_dict': ...}; 'model' is the other common wrapper.
REFERENCE_CHECKPOINT_KEYS = ('net', 'state_dict', 'model')

Checkpoint = Union[str, os.PathLike, Mapping[str, Any]]


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """A checkpoint file's content (safetensors or torch), after checking the file is intact."""
    path = os.fspath(path)
    if not is_safetensors_path(path):
        return load_torch_checkpoint(path)  # checks the file itself
    verify_weights_file(path)
    return load_file(path)


def _source_name(checkpoint: Any) -> str:
    """How error messages name a checkpoint: its path, or what was passed."""
    return os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else f'the {type(checkpoint).__name__}'


def _without_data_parallel(key: str) -> str:
    """``key`` without the ``module`` levels of DataParallel wrappers: main.py wraps the whole
    network (``module.conv1.weight``), main_imagenet.py only VGG's ``features``
    (``features.module.0.weight``). No zoo model names a submodule ``module``."""
    return '.'.join(part for part in key.split('.') if part != 'module')


def reference_state_dict(checkpoint: Checkpoint) -> Dict[str, Tensor]:
    """The model state dict in a checkpoint (a path or a loaded object): a plain state dict, or a
    dict holding it under one of ``REFERENCE_CHECKPOINT_KEYS``; DataParallel's ``module`` levels removed."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    if not isinstance(checkpoint, Mapping):  # a pickled list or a bare tensor
        raise CheckpointMismatchError(f'No state dict found in the checkpoint: it holds a {type(checkpoint).__name__}, '
                                      f'not a dict of tensors.')
    for key in REFERENCE_CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise CheckpointMismatchError(
            f'No state dict found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]}); expected tensors, '
            f'or a dict holding them under one of {REFERENCE_CHECKPOINT_KEYS}.')
    return {_without_data_parallel(k): v for k, v in checkpoint.items()}


def checkpoint_geometry(state_dict: Mapping[str, Tensor], arch: str) -> Dict[str, int]:
    """``num_classes`` and ``in_chans`` of a state dict of ``arch``, read from its classifier and
    first-layer weights (named by the architecture's pretrained cfg)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ModelArgumentsError(f"Unknown model '{arch}' (is deconv_zoo imported?)")
    geometry = {}
    classifier = _classifier_weight(state_dict, cfg.classifier)
    if classifier is not None:
        geometry['num_classes'] = classifier.shape[0]
    first_conv = state_dict.get(f'{cfg.first_conv}.weight')
    if first_conv is not None and first_conv.dim() == 4:
        geometry['in_chans'] = first_conv.shape[1]
    return geometry


def _classifier_weight(state_dict: Mapping[str, Tensor], name: str) -> Optional[Tensor]:
    """The weight of the classifier ``name``, or, for a layer of a Sequential head (``classifier.6``),
    of its last weighted layer after that index: a head variant with more layers numbers it higher
    (the ImageNet VGG with ChannelDeconv instead of Delinear, ``delinear=False``: ``classifier.9``)."""
    if f'{name}.weight' in state_dict:
        return state_dict[f'{name}.weight']
    head, _, index = name.rpartition('.')
    if not index.isdigit():
        return None
    later = re.compile(rf'{re.escape(head)}\.(\d+)\.weight')
    indices = [int(match[1]) for match in map(later.fullmatch, state_dict) if match and int(match[1]) > int(index)]
    return state_dict[f'{head}.{max(indices)}.weight'] if indices else None


@dataclass
class ConversionReport:
    """How every key of a converted checkpoint was accounted for."""
    loaded: List[str]
    filled: List[str]

    def describe(self) -> str:
        filled = f'; filled in by the model: {", ".join(self.filled)}' if self.filled else ''
        return f'{len(self.loaded)} keys loaded{filled}; no key missing or unexpected.'


def convert_reference_checkpoint(
        checkpoint: Checkpoint, arch: str, **model_kwargs: Any) -> Tuple[nn.Module, ConversionReport]:
    """A zoo model (eval mode) holding an authors' checkpoint, and how its keys were used.

    ``num_classes``/``in_chans`` come from the checkpoint unless given. Raises
    ``CheckpointMismatchError`` listing every missing, unexpected or mis-shaped key,
    ``CorruptWeightsError`` for weights holding NaN or inf, and ``ModelArgumentsError`` for an
    unknown ``arch`` or arguments it does not take.
    """
    state_dict = reference_state_dict(checkpoint)
    refuse_non_finite(state_dict, _source_name(checkpoint))
    model = create_model_with_weights(arch, **dict(checkpoint_geometry(state_dict, arch), **model_kwargs))
    expected = model.state_dict()
    mismatch = compare_state_dict(state_dict, expected, optional=optional_state_keys(model))
    if mismatch:
        raise CheckpointMismatchError(f'The checkpoint does not fit {arch}:\n{mismatch.describe()}')
    model.load_state_dict(state_dict)
    return model.eval(), ConversionReport(loaded=sorted(state_dict), filled=sorted(set(expected) - set(state_dict)))


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps timm's (and the zoo's) no-trace modules and functions as leaves."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))  # FastDeconv and Delinear included


def conv_bn_pairs(model: nn.Module) -> Dict[str, str]:
    """``{conv: bn}`` for every BatchNorm whose input is the output of one convolution or linear
    layer that nothing else reads: exactly the BatchNorms that fold into a layer (found in the
    model's fx graph, so the model may live on the meta device)."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != 'call_module' or not isinstance(modules[node.target], _BatchNorm):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == 'call_module' and len(source.users) == 1
                and _is_weight_layer(modules[source.target])):
            pairs[source.target] = node.target
    return pairs


def _bn_structure(state_dict: Mapping[str, Tensor], bn_arch: str) -> nn.Module:
    """``bn_arch`` built on the meta device with the state dict's geometry, checked against it."""
    with torch.device('meta'):
        model = timm.create_model(bn_arch, **checkpoint_geometry(state_dict, bn_arch))
    mismatch = compare_state_dict(state_dict, model.state_dict())
    if mismatch:
        raise CheckpointMismatchError(f'The batch-norm state dict does not fit {bn_arch}:\n{mismatch.describe()}')
    return model


def _fold_batchnorm(weight: Tensor, bias: Tensor, state_dict: Mapping[str, Tensor], bn: str,
                    eps: float) -> Tuple[Tensor, Tensor]:
    """(W, b) of ``bn(layer(x))`` in float64: W g / s and (b - m) g / s + beta, s = sqrt(var + eps)."""
    if f'{bn}.running_var' not in state_dict:
        raise CheckpointMismatchError(f'{bn} tracks no running statistics; it cannot be folded into a layer.')
    scale = (state_dict[f'{bn}.running_var'].double() + eps).rsqrt()
    shift = -state_dict[f'{bn}.running_mean'].double() * scale
    if f'{bn}.weight' in state_dict:  # affine BatchNorm
        gamma = state_dict[f'{bn}.weight'].double()
        scale, shift = scale * gamma, shift * gamma + state_dict[f'{bn}.bias'].double()
    return weight * scale.reshape(-1, *[1] * (weight.dim() - 1)), bias * scale + shift


def _identity_statistics(module: nn.Module) -> Dict[str, Tensor]:
    """State of a deconvolution layer whose eval function is the identity whitening."""
    def eye_like(t: Tensor) -> Tensor:
        return torch.eye(t.shape[-1], dtype=t.dtype, device=t.device).expand_as(t).clone()

    if isinstance(module, (FastDeconv, Delinear)):
        state = dict(running_mean=torch.zeros_like(module.running_mean),
                     running_deconv=eye_like(module.running_deconv))
        if isinstance(module, FastDeconv):
            state['counter'] = torch.zeros_like(module.counter)
        return state
    if isinstance(module, ChannelDeconv):
        # running_var = 1 - eps makes the leftover channels' (x - 0) / sqrt(var + eps) exactly x.
        return dict(running_mean1=torch.zeros_like(module.running_mean1),
                    running_deconv=eye_like(module.running_deconv),
                    running_mean2=torch.zeros_like(module.running_mean2),
                    running_var=torch.full_like(module.running_var, 1.0 - module.eps),
                    num_batches_tracked=torch.zeros_like(module.num_batches_tracked))
    return {}


def bn_twin_names(arch: str) -> Tuple[str, ...]:
    """The batch-norm architectures whose weights convert into ``arch``: itself built with BN
    layers, the name without ``_deconv`` (resnet18_cifar, timm's resnet50), and timm's ``_bn``
    VGGs (vgg16_bn for vgg16_deconv)."""
    arch = arch.split('.')[0]
    base = arch[:-len('_deconv')] if arch.endswith('_deconv') else arch
    return arch, base, f'{base}_bn'


def deconv_state_dict_from_bn(
        bn_state_dict: Mapping[str, Tensor], bn_model: Union[str, nn.Module], deconv_model: nn.Module,
        headless: bool = False,
) -> Dict[str, Tensor]:
    """State dict for ``deconv_model`` computing what the BN model computes in eval with ``bn_state_dict``.

    ``bn_model`` is the BN model or its architecture name (it is then built on the meta device).

    Convolution and linear layers are matched in module order (the twins list them alike; VGG's
    indices differ), folded BatchNorms disappear, BatchNorms the deconv model keeps (ImageNet
    ResNet's downsample) are copied by name, and deconvolution statistics are set to identity.
    Weights keep the state dict's shapes, so a model built with other ``num_classes``/``in_chans``
    can adapt them afterwards (timm's pretrained loading does). ``headless``: the deconv model was
    built without a classifier (``num_classes=0``; VGG's MLP too with ``global_pool=''``), so the BN
    model's last layers, which it lacks, are left out.
    """
    if isinstance(bn_model, str):
        bn_model = _bn_structure(bn_state_dict, bn_model)
    bn_arch = getattr(bn_model, 'pretrained_cfg', {}).get('architecture', type(bn_model).__name__)
    deconv_arch = getattr(deconv_model, 'pretrained_cfg', {}).get('architecture')
    # Layers are paired by order: only twins pair up right (other models can match in count alone).
    if deconv_arch and bn_arch not in bn_twin_names(deconv_arch):
        raise CheckpointMismatchError(
            f'{bn_arch} is not the batch-norm twin of {deconv_arch}; its weights convert from '
            f'{" or ".join(bn_twin_names(deconv_arch)[1:])}.')
    bn_modules = dict(bn_model.named_modules())
    deconv_modules = dict(deconv_model.named_modules())
    bn_layers = [n for n, m in bn_modules.items() if _is_weight_layer(m)]
    deconv_layers = [n for n, m in deconv_modules.items() if _is_weight_layer(m)]
    used = set()
    if headless and len(bn_layers) > len(deconv_layers):
        # The head is the last of the weight layers in module order: the pairing below still checks shapes.
        used = {k for layer in bn_layers[len(deconv_layers):] for k in bn_state_dict if k.startswith(f'{layer}.')}
        bn_layers = bn_layers[:len(deconv_layers)]
    if len(bn_layers) != len(deconv_layers):
        raise CheckpointMismatchError(
            f'{bn_arch} has {len(bn_layers)} convolution/linear layers, {type(deconv_model).__name__} has '
            f'{len(deconv_layers)}: they are not twins.')
    kept_bns = {n for n, m in deconv_modules.items() if isinstance(m, _BatchNorm)}
    folds = {conv: bn for conv, bn in conv_bn_pairs(bn_model).items() if bn not in kept_bns}
    not_folded = [n for n, m in bn_modules.items()
                  if isinstance(m, _BatchNorm) and n not in kept_bns and n not in folds.values()]
    if not_folded:
        raise CheckpointMismatchError(
            f'{bn_arch} cannot be converted exactly: {len(not_folded)} BatchNorms do not directly follow a single '
            f'convolution ({", ".join(not_folded[:6])}{", ..." if len(not_folded) > 6 else ""}). Pre-activation '
            f'networks (PreAct-ResNet, SENet-18, DenseNet) normalise before a ReLU, which their deconv twins '
            f'cannot express.')

    state_dict: Dict[str, Tensor] = {}
    for bn_layer, deconv_layer in zip(bn_layers, deconv_layers):
        weight = bn_state_dict[f'{bn_layer}.weight']
        bias = bn_state_dict.get(f'{bn_layer}.bias', weight.new_zeros(weight.shape[0]))
        used |= {f'{bn_layer}.weight', f'{bn_layer}.bias'}
        source = bn_modules[bn_layer]
        if isinstance(source, (FastDeconv, Delinear)):
            # A whitening layer of the source (the Delinear head a zoo model built with deconv=False
            # keeps): its eval function, folded, is a plain layer's.
            mean, deconv = (bn_state_dict[f'{bn_layer}.{k}'].double() for k in ('running_mean', 'running_deconv'))
            weight, bias = fold_layer_whitening(source, weight.double(), bias.double(), mean, deconv)
            used |= {k for k in bn_state_dict if k.startswith(f'{bn_layer}.')}
        if bn_layer in folds:
            bn = folds[bn_layer]
            weight, bias = _fold_batchnorm(weight.double(), bias.double(), bn_state_dict, bn, bn_modules[bn].eps)
            used |= {k for k in bn_state_dict if k.startswith(f'{bn}.')}
        target = deconv_modules[deconv_layer]
        # VGG: timm's 7x7 / 1x1 convolution head becomes the twin's linear classifier.
        kernel = target.weight.shape[2:]
        if weight.numel() % (weight.shape[0] * kernel.numel()):
            raise CheckpointMismatchError(f'{bn_layer} {tuple(weight.shape)} does not fit {deconv_layer} '
                                          f'{tuple(target.weight.shape)}: the models are not twins.')
        state_dict[f'{deconv_layer}.weight'] = weight.reshape(weight.shape[0], -1, *kernel).to(target.weight.dtype)
        if target.bias is not None:
            state_dict[f'{deconv_layer}.bias'] = bias.to(target.bias.dtype)
        elif bn_layer in folds or f'{bn_layer}.bias' in bn_state_dict or isinstance(source, (FastDeconv, Delinear)):
            raise CheckpointMismatchError(f'{deconv_layer} has no bias for the bias of {bn_layer} (or its BatchNorm).')
    for bn in kept_bns:
        kept = {k: v for k, v in bn_state_dict.items() if k.startswith(f'{bn}.')}
        if not kept:
            raise CheckpointMismatchError(f'{bn_arch} has no BatchNorm {bn} for the deconv model to keep.')
        state_dict.update(kept)
        used |= set(kept)
    unused = sorted(set(bn_state_dict) - used)
    if unused:
        raise CheckpointMismatchError(f'{bn_arch} state the deconv model has no place for: {", ".join(unused[:10])}')
    for name, module in deconv_modules.items():
        state_dict.update({f'{name}.{k}': v for k, v in _identity_statistics(module).items()})
    return state_dict


def bn_to_deconv(
        bn_model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]],
        arch: str,
        calibrate_loader: Optional[Iterable[Any]] = None,
        bn_arch: Optional[str] = None,
        **model_kwargs: Any,
) -> nn.Module:
    """The deconv model ``arch`` (eval mode) computing the eval function of a batch-norm model.

    Args:
        bn_model_or_state_dict: a timm/zoo BN model, or its state dict or another module holding one
            (torchvision's ``resnet50``); ``bn_arch`` then names the architecture (default: ``arch``
            without ``_deconv``, e.g. resnet18_cifar or timm's resnet18; timm's VGG with BN is ``vgg11_bn``).
        arch: the deconv twin, e.g. ``resnet18_cifar_deconv``, ``resnet50_deconv``, ``vgg16_deconv``.
        calibrate_loader: optional data (tensors or (input, target) batches) to estimate real
            whitening statistics on (``calibrate_whitening``); the function is kept either way.
        model_kwargs: further arguments of the deconv model (block_fc, deconv_cfg, ...).

    Raises ``CheckpointMismatchError`` for architectures without an exact conversion (see the
    module docstring), for state dicts that do not fit ``bn_arch`` and for weights that do not fit
    the deconv model as built (``num_classes``, ``in_chans``); ``CorruptWeightsError`` for weights
    holding NaN or inf; ``ModelArgumentsError`` for unknown architectures or arguments the model
    does not take.
    """
    if not timm.is_model(arch):
        raise ModelArgumentsError(f"Unknown model '{arch}' (is deconv_zoo imported?)")
    source_cfg = getattr(bn_model_or_state_dict, 'pretrained_cfg', None)
    if source_cfg is not None:  # a timm or zoo model (also a zoo model built with deconv=False)
        bn_state_dict = bn_model_or_state_dict.state_dict()
        bn_model = bn_model_or_state_dict
        bn_arch = source_cfg['architecture']
    else:
        bn_state_dict = dict(bn_model_or_state_dict.state_dict() if isinstance(bn_model_or_state_dict, nn.Module)
                             else bn_model_or_state_dict)
        bn_arch = bn_arch or (arch[:-len('_deconv')] if arch.endswith('_deconv') else None)
        if not bn_arch:
            raise ModelArgumentsError('Name the batch-norm architecture of the weights: bn_to_deconv(..., bn_arch=...)')
        if not timm.is_model(bn_arch):
            raise ModelArgumentsError(f"Unknown batch-norm model '{bn_arch}': name it with bn_to_deconv(..., bn_arch=...)")
        bn_model = bn_arch
    model = create_model_with_weights(arch, **dict(checkpoint_geometry(bn_state_dict, bn_arch), **model_kwargs))
    state_dict = deconv_state_dict_from_bn(bn_state_dict, bn_model, model)
    refuse_non_finite(bn_state_dict, f'the {bn_arch} weights')  # after the structure checks, which take meta models
    mismatch = compare_state_dict(state_dict, model.state_dict())
    if mismatch:
        raise CheckpointMismatchError(
            f'The {bn_arch} weights do not fit {arch} as built (num_classes, in_chans and model_kwargs must be '
            f'those of the weights):\n{mismatch.describe()}')
    model.load_state_dict(state_dict)
    model.eval()
    if calibrate_loader is not None:
        calibrate_whitening(model, calibrate_loader)
    return model


@torch.no_grad()
def _refit_whitening(layer: nn.Module, mean: Tensor, deconv: Tensor) -> None:
    """Give ``layer`` the statistics (mean, deconv) and weights that keep its eval function.

    The current function is (We, be) = fold(W, b, mu0, D0). The new weights satisfy
    fold(W', b', mean, deconv) = (We, be): W' = We D^-1 blockwise and b' = be + sum We mean. D is
    a truncated Newton-Schulz iterate, whose eigenvalues the unconverged iteration keeps within a
    small range (at most 1.5^n_iter apart), so inverting it in float64 is well conditioned; the
    inverse is checked anyway.
    """
    effective_weight, effective_bias = folded_weight_and_bias(layer, torch.float64)
    deconv = deconv.double()
    inverse = torch.linalg.inv(deconv)
    eye = torch.eye(deconv.shape[-1], dtype=torch.float64).expand_as(deconv)
    residual = (deconv @ inverse - eye).abs().max().item()
    if not residual < 1e-6:
        raise FloatingPointError(f'{type(layer).__name__}: calibrated whitening matrix is not invertible '
                                 f'(|D D^-1 - I| = {residual:.2e}).')
    # The fold multiplies the weight by its deconv argument blockwise: with D^-1 it divides.
    weight, _ = fold_layer_whitening(layer, effective_weight, None, torch.zeros_like(mean, dtype=torch.float64),
                                     inverse)
    _, minus_shift = fold_layer_whitening(layer, effective_weight, None, mean.double(), eye)  # -sum We mean
    layer.weight.copy_(weight)
    layer.bias.copy_(effective_bias - minus_shift)
    layer.running_mean.copy_(mean)
    layer.running_deconv.copy_(deconv)


@torch.no_grad()
def calibrate_whitening(model: nn.Module, loader: Iterable[Any], max_batches: Optional[int] = None) -> nn.Module:
    """Estimate every FastDeconv / Delinear's whitening statistics on ``loader`` and re-solve its
    weights so that the model's eval-mode function is unchanged (see ``_refit_whitening``).

    Each layer's statistics are the average over batches of what a training step would compute
    (the quantity its running averages track), collected in one eval pass: since every layer keeps
    its function, the inputs of later layers do not depend on the order of refitting.
    """
    layers = [m for m in model.modules() if isinstance(m, (FastDeconv, Delinear))]
    biasless = [name for name, m in model.named_modules() if isinstance(m, (FastDeconv, Delinear)) and m.bias is None]
    if biasless:
        # The re-solved function moves the mean shift W mu into the bias.
        raise ValueError(f'calibrate_whitening: {", ".join(biasless[:6])}{", ..." if len(biasless) > 6 else ""} '
                         f'have no bias to take the mean shift of calibrated statistics; build the model with '
                         f'bias=True (the paper\'s setting).')
    sums: Dict[nn.Module, List[Any]] = {m: [0, 0.0, 0.0] for m in layers}
    names = {m: name for name, m in model.named_modules()}

    def record(layer: nn.Module, args: Tuple[Tensor, ...]) -> None:
        mean, deconv = layer.batch_statistics(args[0].float())
        if not (torch.isfinite(mean).all() and torch.isfinite(deconv).all()):
            # Refused before any layer is refitted: the model is left as it was.
            raise FloatingPointError(
                f'calibrate_whitening: batch {sums[layer][0]} gives {names[layer]} non-finite whitening '
                f'statistics (NaN or inf in the calibration data, or in the output of an earlier layer).')
        total = sums[layer]
        total[0] += 1
        total[1] = total[1] + mean.double()
        total[2] = total[2] + deconv.double()

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            model((batch[0] if isinstance(batch, (list, tuple)) else batch).to(device))
    finally:
        for handle in handles:
            handle.remove()
    if any(total[0] == 0 for total in sums.values()):
        raise ValueError('calibrate_whitening: the loader gave no batch (or some layers were never run).')
    for layer, (count, mean_sum, deconv_sum) in sums.items():
        _refit_whitening(layer, (mean_sum / count).to(layer.running_mean.dtype),
                         (deconv_sum / count).to(layer.running_deconv.dtype))
    return model.train(was_training)
