"""ImageNet DenseNet-BC (Huang et al. 2017) with network deconvolution.

Module, parameter and buffer names follow torchvision's DenseNet, as the authors'
``models/densenet_imagenet.py`` does (``features.conv0``, ``features.denseblockD.denselayerI``,
``features.transitionT``, ``classifier``), so their checkpoints load with a strict
``load_state_dict``. In deconv mode every convolution is a FastDeconv and every norm is gone
(``features.norm5`` becomes a ChannelDeconv when the head decorrelates without Delinear).
``deconv=False`` builds torchvision's network; timm's ``densenet121`` is the batch-norm baseline.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet
from ._levels import SequentialLevels
from ._registry import build_zoo_model, imagenet_cfg, zoo_default_cfgs

__all__ = ['DenseNet']


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv, BN-ReLU-3x3 conv; its ``growth_rate`` new channels follow the input's."""

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int, dconv: Optional[Dict[str, Any]] = None):
        super().__init__()
        mid_chs = bn_size * growth_rate
        self.norm1 = create_norm(in_chs, dconv)
        self.conv1 = create_conv(in_chs, mid_chs, 1, dconv=dconv)
        self.norm2 = create_norm(mid_chs, dconv)
        self.conv2 = create_conv(mid_chs, growth_rate, 3, padding=1, dconv=dconv)

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: without a norm the first ReLU would overwrite x, which is concatenated
        # below and may be a feature map handed out by forward_intermediates.
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


def _dense_block(num_layers: int, in_chs: int, growth_rate: int, bn_size: int,
                 dconv: Optional[Dict[str, Any]]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        (f'denselayer{i + 1}', DenseLayer(in_chs + i * growth_rate, growth_rate, bn_size, dconv))
        for i in range(num_layers)))


def _transition(in_chs: int, out_chs: int, dconv: Optional[Dict[str, Any]]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        norm=create_norm(in_chs, dconv),
        relu=nn.ReLU(),  # not in place, as in DenseLayer
        conv=create_conv(in_chs, out_chs, 1, dconv=dconv),
        pool=nn.AvgPool2d(kernel_size=2, stride=2),
    ))


class DenseNet(SequentialLevels, DeconvNet):
    """DenseNet-BC: 7x7 stride-2 stem, max pool, dense blocks joined by halving transitions,
    ReLU, global pool, ``classifier``.

    Args:
        growth_rate, block_config, num_init_features, bn_size: torchvision's DenseNet-BC settings.
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d, torchvision's network (False).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear);
            default: 64 with ``deconv`` (the paper's ImageNet setting), else 0.
        delinear: use Delinear for that (True) or a ChannelDeconv as ``features.norm5`` (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).

    Initialisation as in the reference (torchvision's): plain Conv2d kaiming-normal (fan_in),
    plain Linear bias zero; FastDeconv, Delinear and BatchNorm keep their PyTorch defaults.
    """
    classifier_name = 'classifier'
    features_by_module = True
    final_modules = ('features.norm5',)

    def __init__(
            self,
            growth_rate: int = 32,
            block_config: Sequence[int] = (6, 12, 24, 16),
            num_init_features: int = 64,
            bn_size: int = 4,
            num_classes: int = 1000,
            in_chans: int = 3,
            deconv: bool = True,
            block_fc: Optional[int] = None,
            delinear: bool = True,
            deconv_cfg: Optional[Dict[str, Any]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        dconv = deconv_args(deconv, deconv_cfg)
        head = classifier_args((64 if deconv else 0) if block_fc is None else block_fc, delinear, dconv)
        features = OrderedDict(
            conv0=create_conv(in_chans, num_init_features, 7, stride=2, padding=3, dconv=dconv, freeze=True, n_iter=15),
            norm0=create_norm(num_init_features, dconv),
            relu0=nn.ReLU(inplace=True),
        )
        self.feature_info = [dict(num_chs=num_init_features, reduction=2, module='features.relu0')]
        self._level_ends = [len(features)]
        chs = num_init_features
        for i, num_layers in enumerate(block_config):
            if i == 0:
                features['pool0'] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            else:
                features[f'transition{i}'] = _transition(chs, chs // 2, dconv)
                chs //= 2
            features[f'denseblock{i + 1}'] = _dense_block(num_layers, chs, growth_rate, bn_size, dconv)
            chs += num_layers * growth_rate
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** (i + 2), module=f'features.denseblock{i + 1}'))
            self._level_ends.append(len(features))
        channel_deconv = None if dconv is None else create_channel_deconv(**head)
        features['norm5'] = create_norm(chs, dconv) if channel_deconv is None else channel_deconv
        self.features = nn.Sequential(features)
        self._init_head(chs, num_classes, global_pool, drop_rate, head)
        self._init_weights()

    def _init_weights(self) -> None:
        # Exact types: FastDeconv and Delinear subclass Conv2d / Linear but keep their defaults.
        for m in self.modules():
            if type(m) is nn.Conv2d:
                nn.init.kaiming_normal_(m.weight)
            elif type(m) is nn.Linear:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        blocks = r'^features\.(?:denseblock|transition)(\d+)' if coarse else [
            (r'^features\.denseblock(\d+)\.denselayer(\d+)', None),
            (r'^features\.transition(\d+)', MATCH_PREV_GROUP),
        ]
        return dict(stem=r'^features\.(?:conv0|norm0)', blocks=blocks)

    def forward_final(self, x: Tensor) -> Tensor:
        return F.relu(self.features.norm5(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> DenseNet:
    return build_zoo_model(DenseNet, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4),
                           flatten_sequential=True, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return imagenet_cfg(first_conv='features.conv0', classifier='classifier', **kwargs)


default_cfgs = zoo_default_cfgs({
    'densenet121_deconv.in1k': _cfg(),
})


@register_model
def densenet121_deconv(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-121 with network deconvolution and a Delinear classifier (the reference's densenet121d)."""
    return _create('densenet121_deconv', pretrained, **dict(dict(growth_rate=32, block_config=(6, 12, 24, 16)), **kwargs))
