"""CIFAR DenseNet-121 (Huang et al. 2017) with network deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/densenet.py`` (kuangliu's CIFAR
layout: new features are concatenated in FRONT of the block input), so their checkpoints load
with a strict ``load_state_dict``.
"""
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs

__all__ = ['DenseNetCifar', 'Bottleneck', 'Transition']


class Bottleneck(nn.Module):
    """Dense layer: (BN-)ReLU-1x1 conv to ``4 * growth_rate``, (BN-)ReLU-3x3 conv to ``growth_rate``."""

    def __init__(self, in_planes: int, growth_rate: int, dconv: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.bn1 = create_norm(in_planes, dconv)
        self.conv1 = create_conv(in_planes, 4 * growth_rate, 1, dconv=dconv)
        self.bn2 = create_norm(4 * growth_rate, dconv)
        self.conv2 = create_conv(4 * growth_rate, growth_rate, 3, padding=1, dconv=dconv)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """(BN-)ReLU-1x1 conv, then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int, dconv: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.bn = create_norm(in_planes, dconv)
        self.conv = create_conv(in_planes, out_planes, 1, dconv=dconv)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetCifar(DeconvNet):
    """CIFAR DenseNet-BC: 3x3 stem, four dense blocks joined by halving transitions, global pool, classifier.

    Feature levels: the stem, then each dense block's output (the transition before it included).

    Args:
        blocks: dense layers per block.
        growth_rate: channels each dense layer adds (the stem outputs twice that).
        reduction: channel compression of the transitions.
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False; deconv
            mode only, as in the reference: the BN twin keeps its final BatchNorm).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
    """
    final_modules = ('bn', 'channel_deconv')

    def __init__(
            self,
            blocks: Sequence[int] = (6, 12, 24, 16),
            growth_rate: int = 32,
            reduction: float = 0.5,
            num_classes: int = 10,
            in_chans: int = 3,
            deconv: bool = True,
            block_fc: int = 512,
            delinear: bool = True,
            deconv_cfg: Optional[Dict[str, Any]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        dconv = deconv_args(deconv, deconv_cfg)
        planes = 2 * growth_rate
        self.conv1 = create_conv(in_chans, planes, 3, padding=1, dconv=dconv)
        self.feature_info = [dict(num_chs=planes, reduction=1, module='conv1')]
        for i, num_layers in enumerate(blocks):
            if i:
                out_planes = int(math.floor(planes * reduction))
                setattr(self, f'trans{i}', Transition(planes, out_planes, dconv))
                planes = out_planes
            layers = []
            for _ in range(num_layers):
                layers.append(Bottleneck(planes, growth_rate, dconv))
                planes += growth_rate
            setattr(self, f'dense{i + 1}', nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=planes, reduction=2 ** i, module=f'dense{i + 1}'))
        self.bn = create_norm(planes, dconv)
        head = classifier_args(block_fc, delinear, dconv)
        self.channel_deconv = create_channel_deconv(**head) if dconv is not None else None
        self._init_head(planes, num_classes, global_pool, drop_rate, head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1\.', blocks=r'^(?:dense|trans)(\d+)' if coarse else [
            (r'^dense(\d+)\.(\d+)', None), (r'^trans(\d+)', MATCH_PREV_GROUP)])

    def _transition_dense(self, x: Tensor, i: int) -> Tensor:
        return getattr(self, f'dense{i}')(getattr(self, f'trans{i - 1}')(x))

    def level_modules(self, index: int) -> List[str]:
        return [f'trans{index - 1}', f'dense{index}'] if index > 1 else [self.feature_info[index]['module']]

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        stages = [partial(self._transition_dense, i=i) for i in range(2, len(self.feature_info))]
        return [self.conv1, self.dense1, *stages]

    def forward_final(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(x))
        return x if self.channel_deconv is None else self.channel_deconv(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> DenseNetCifar:
    return build_zoo_model(DenseNetCifar, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return cifar_cfg(first_conv='conv1', classifier='linear', **kwargs)


default_cfgs = zoo_default_cfgs({
    'densenet121_cifar_deconv.cifar10': _cfg(),
    'densenet121_cifar_deconv.cifar100': cifar100(_cfg()),
    'densenet121_cifar.cifar10': _cfg(),
    'densenet121_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def densenet121_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> DenseNetCifar:
    """DenseNet-121 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('densenet121_cifar_deconv', pretrained,
                   **dict(dict(blocks=(6, 12, 24, 16), growth_rate=32, deconv=True, block_fc=512), **kwargs))


@register_model
def densenet121_cifar(pretrained: bool = False, **kwargs: Any) -> DenseNetCifar:
    """DenseNet-121 (CIFAR) with batch norm: the paper's baseline."""
    return _create('densenet121_cifar', pretrained,
                   **dict(dict(blocks=(6, 12, 24, 16), growth_rate=32, deconv=False, block_fc=0), **kwargs))
