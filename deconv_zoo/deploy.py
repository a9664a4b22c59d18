"""Deployment: fold every deconvolution of a model into plain convolutions and linear layers.

In eval mode a FastDeconv computes ``conv(x, W D, b - W D mu)`` and a Delinear the same with a
linear layer; ChannelDeconv is a fixed per-channel affine mix. ``fold_deconv`` replaces them by
``nn.Conv2d`` / ``nn.Linear`` / ``ChannelLinear`` holding those folded weights, so the deployed
model runs no deconvolution code and exports with ``torch.export`` and ONNX like any CNN.
"""
import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import ChannelDeconv, Delinear, FastDeconv, fold_conv_whitening, fold_linear_whitening

__all__ = ['fold_deconv', 'fold_layer_whitening', 'folded_weight_and_bias', 'ChannelLinear']


def fold_layer_whitening(layer: nn.Module, weight: Tensor, bias: Optional[Tensor], mean: Tensor,
                         deconv: Tensor) -> Tuple[Tensor, Tensor]:
    """``layer``'s fold (FastDeconv: convolution, Delinear: linear) applied to the given tensors:
    the weight and bias acting on raw input when ``deconv``/``mean`` whiten it."""
    if isinstance(layer, FastDeconv):
        return fold_conv_whitening(weight, bias, mean, deconv, layer.groups)
    if isinstance(layer, Delinear):
        return fold_linear_whitening(weight, bias, mean, deconv)
    raise TypeError(f'expected a FastDeconv or Delinear, got {type(layer).__name__}')


def folded_weight_and_bias(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Weight and bias that a FastDeconv or Delinear applies to raw input in eval mode.

    Computed in ``dtype``; the default is the layer's own eval precision (float32 or better), which
    reproduces its eval-mode fold exactly.
    """
    dtype = dtype or torch.promote_types(layer.weight.dtype, torch.float32)
    weight, mean, deconv = (t.detach().to(dtype) for t in (layer.weight, layer.running_mean, layer.running_deconv))
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    return fold_layer_whitening(layer, weight, bias, mean, deconv)


class ChannelLinear(nn.Linear):
    """A linear map over dim 1 (channels) of an (N, C, ...) tensor: a 1x1 convolution that also
    accepts (N, C) input, as ChannelDeconv does."""

    def forward(self, x: Tensor) -> Tensor:
        # A non-negative last dim: the ONNX exporter writes movedim's -1 into Transpose's perm,
        # which onnxruntime rejects.
        last = x.dim() - 1
        return torch.movedim(F.linear(torch.movedim(x, 1, last), self.weight, self.bias), last, 1)


def _channel_deconv_as_linear(layer: ChannelDeconv, channels: int) -> ChannelLinear:
    """ChannelDeconv's eval function on ``channels`` channels as one affine map.

    With c = floor(C / B) * B and k = c / B, output channel r*k + j of the whitened part is
    sum_s D[r, s] (x[s*k + j] - m1[s]), i.e. the matrix kron(D, I_k); the remaining C - c channels
    are standardised with the scalar mean and variance.
    """
    d = layer.running_deconv.detach().double()
    c = channels // layer.block * layer.block
    k = c // layer.block
    matrix = torch.zeros(channels, channels, dtype=torch.float64)
    bias = torch.zeros(channels, dtype=torch.float64)
    if c > 0:
        matrix[:c, :c] = torch.kron(d, torch.eye(k, dtype=torch.float64))
        bias[:c] = -matrix[:c, :c] @ layer.running_mean1.detach().double().reshape(-1).repeat_interleave(k)
    if c < channels:
        inv_std = (layer.running_var.detach().double() + layer.eps).rsqrt().reshape(())
        matrix[c:, c:] = torch.eye(channels - c, dtype=torch.float64) * inv_std
        bias[c:] = -layer.running_mean2.detach().double().reshape(()) * inv_std
    like = layer.running_deconv
    linear = ChannelLinear(channels, channels, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        linear.weight.copy_(matrix)
        linear.bias.copy_(bias)
    return linear


def _plain_layer(layer: nn.Module, channels: Optional[int]) -> Optional[nn.Module]:
    """The plain module computing ``layer``'s eval function, or None for any other module."""
    if isinstance(layer, FastDeconv):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=True,
                          padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype)
    elif isinstance(layer, Delinear):
        plain = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
    elif isinstance(layer, ChannelDeconv):
        if channels is None:
            raise ValueError('fold_deconv: a ChannelDeconv was not reached by the example input; pass an '
                             'example_input that runs it.')
        return _channel_deconv_as_linear(layer, channels)
    else:
        return None
    weight, bias = folded_weight_and_bias(layer)
    with torch.no_grad():
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
    return plain


def _channel_counts(model: nn.Module, example_input: Optional[Tensor]) -> Dict[nn.Module, int]:
    """Input channels of every ChannelDeconv (they are sized at run time), from one eval forward."""
    layers = [m for m in model.modules() if isinstance(m, ChannelDeconv)]
    if not layers:
        return {}
    if example_input is None:
        if not hasattr(model, 'pretrained_cfg'):
            raise ValueError('fold_deconv: the model has ChannelDeconv layers and no pretrained_cfg; pass '
                             'example_input (one input batch) to size them.')
        input_size = tuple(model.pretrained_cfg['input_size'])
        first_conv = model.get_submodule(model.pretrained_cfg['first_conv'])
        example_input = torch.zeros(1, first_conv.in_channels, *input_size[1:], device=first_conv.weight.device,
                                    dtype=first_conv.weight.dtype)
    counts = {}
    handles = [m.register_forward_pre_hook(lambda m, args: counts.__setitem__(m, args[0].shape[1])) for m in layers]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def fold_deconv(model: nn.Module, inplace: bool = False, example_input: Optional[Tensor] = None) -> nn.Module:
    """The model in eval mode with every FastDeconv / Delinear / ChannelDeconv replaced by a plain
    ``nn.Conv2d`` / ``nn.Linear`` / ``ChannelLinear`` computing the same eval-mode function.

    The running statistics are folded once, so the result has no train mode of its own (training
    it trains plain layers; the model's own ``reset_classifier`` still builds its deconvolution
    head, so reset the classifier before folding). A layer under several names (tied) is replaced by
    one plain layer under all of them. ``nn.Identity`` placeholders (where BN was removed) cost
    nothing and vanish from exported graphs. A ChannelDeconv is sized by its input: ``example_input`` (default:
    zeros of the model's ``pretrained_cfg`` input size) is run once to find its channel count.

    Raises ``FloatingPointError`` naming the first layer whose fold is not finite (NaN or inf in its
    weights or running statistics), before any layer is replaced.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    channels = _channel_counts(model, example_input)
    # Every layer is folded and checked before any is replaced: an error leaves an inplace model whole.
    plain_layers = {}  # one plain layer per module, however many names it has (a tied layer stays tied)
    for name, module in model.named_modules():
        plain = _plain_layer(module, channels.get(module))
        if plain is None:
            continue
        if not all(bool(torch.isfinite(p).all()) for p in plain.parameters()):
            raise FloatingPointError(
                f'fold_deconv: {name or type(module).__name__} folds to non-finite weights: its parameters or '
                f'running statistics hold NaN or inf (a diverged or corrupt model), so the deployed model would '
                f'output NaN.')
        plain_layers[module] = plain
    if model in plain_layers:  # the model is itself a layer
        return plain_layers[model]
    places = [(name, module) for name, module in model.named_modules(remove_duplicate=False) if module in plain_layers]
    for name, module in places:
        parent_name, _, child_name = name.rpartition('.')
        setattr(model.get_submodule(parent_name), child_name, plain_layers[module])
    return model
