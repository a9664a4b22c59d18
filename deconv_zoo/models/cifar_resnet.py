"""CIFAR ResNet-18 (He et al. 2016) with network deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/resnet.py`` (itself the
widely used kuangliu CIFAR layout), so their checkpoints load with a strict ``load_state_dict``.
In deconv mode every Conv2d + BatchNorm2d pair is one FastDeconv and the BN is gone.
"""
from typing import Any, Callable, Dict, List, Optional, Type

import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs

__all__ = ['ResNetCifar', 'BasicBlock']


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dconv: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.conv1 = create_conv(in_planes, planes, 3, stride=stride, padding=1, dconv=dconv)
        self.bn1 = create_norm(planes, dconv)
        self.conv2 = create_conv(planes, planes, 3, padding=1, dconv=dconv)
        self.bn2 = create_norm(planes, dconv)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                create_conv(in_planes, planes, 1, stride=stride, dconv=dconv),
                *([create_norm(planes)] if dconv is None else []))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(DeconvNet):
    """CIFAR ResNet: 3x3 stride-1 stem, four stages of widths 64-512, global pool, classifier.

    Args:
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
    """

    def __init__(
            self,
            block: Type[nn.Module] = BasicBlock,
            layers: List[int] = (2, 2, 2, 2),
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
        self.in_planes = 64
        self.conv1 = create_conv(in_chans, 64, 3, padding=1, dconv=dconv)
        self.bn1 = create_norm(64, dconv)
        self.feature_info = [dict(num_chs=64, reduction=1, module='conv1')]
        for i, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
            setattr(self, f'layer{i + 1}', self._make_layer(block, planes, layers[i], stride, dconv))
            self.feature_info.append(dict(num_chs=planes * block.expansion, reduction=2 ** i, module=f'layer{i + 1}'))
        head = classifier_args(block_fc, delinear, dconv)
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(512 * block.expansion, num_classes, global_pool, drop_rate, head)

    def _make_layer(self, block: Type[nn.Module], planes: int, num_blocks: int, stride: int,
                    dconv: Optional[Dict[str, Any]]) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(block(self.in_planes, planes, s, dconv=dconv))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_final(self, x: Tensor) -> Tensor:
        return x if self.deconv1 is None else self.deconv1(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    return build_zoo_model(ResNetCifar, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return cifar_cfg(first_conv='conv1', classifier='linear', **kwargs)


default_cfgs = zoo_default_cfgs({
    'resnet18_cifar_deconv.cifar10': _cfg(),
    'resnet18_cifar_deconv.cifar100': cifar100(_cfg()),
    'resnet18_cifar.cifar10': _cfg(),
    'resnet18_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def resnet18_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-18 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('resnet18_cifar_deconv', pretrained, **dict(dict(layers=(2, 2, 2, 2), deconv=True, block_fc=512), **kwargs))


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-18 (CIFAR) with batch norm: the paper's baseline."""
    return _create('resnet18_cifar', pretrained, **dict(dict(layers=(2, 2, 2, 2), deconv=False, block_fc=0), **kwargs))
