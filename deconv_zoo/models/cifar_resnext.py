"""CIFAR ResNeXt-29 32x4d (Xie et al. 2017) with network deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/resnext.py`` (the network the
reference ``main.py`` builds for 'resnext'), so their checkpoints load with a strict
``load_state_dict``. The network is a ``ResNetCifar`` with 1x1 stem, three stages and grouped blocks.
"""
from typing import Any, Dict, Optional

import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import create_conv, create_norm
from ._base import stochastic_depth
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs
from .cifar_resnet import ResNetCifar, projection_shortcut

__all__ = ['ResNeXtBlock']


class ResNeXtBlock(nn.Module):
    """Grouped bottleneck: 1x1 conv to ``planes`` (the group width), 3x3 conv in ``cardinality``
    groups, 1x1 conv to ``2 * planes``, then the residual shortcut."""
    expansion = 2

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dconv: Optional[Dict[str, Any]] = None,
                 cardinality: int = 32, drop_path: float = 0.0):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = create_conv(in_planes, planes, 1, dconv=dconv)
        self.bn1 = create_norm(planes, dconv)
        # The reference runs fewer Newton-Schulz steps on the (small, per-group) grouped whitening.
        self.conv2 = create_conv(planes, planes, 3, stride=stride, padding=1, groups=cardinality, dconv=dconv, n_iter=3)
        self.bn2 = create_norm(planes, dconv)
        self.conv3 = create_conv(planes, out_planes, 1, dconv=dconv)
        self.bn3 = create_norm(out_planes, dconv)
        self.shortcut = projection_shortcut(in_planes, out_planes, stride, dconv)
        self.drop_path = stochastic_depth(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.drop_path(out) + self.shortcut(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    return build_zoo_model(ResNetCifar, variant, pretrained, default_out_indices=(0, 1, 2, 3), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(cifar_cfg(first_conv='conv1', classifier='linear', **kwargs), pool_size=(8, 8))


default_cfgs = zoo_default_cfgs({
    'resnext29_32x4d_cifar_deconv.cifar10': _cfg(),
    'resnext29_32x4d_cifar_deconv.cifar100': cifar100(_cfg()),
    'resnext29_32x4d_cifar.cifar10': _cfg(),
    'resnext29_32x4d_cifar.cifar100': cifar100(_cfg()),
})

# 32 groups of 4, 8, 16 channels; the 1x1 stem's whitening is frozen after a while, as in the reference.
_RESNEXT29_32X4D = dict(block=ResNeXtBlock, layers=(3, 3, 3), widths=(128, 256, 512), block_args=dict(cardinality=32),
                        stem_kernel=1, stem_overrides=dict(freeze=True, n_iter=10))


@register_model
def resnext29_32x4d_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNeXt-29 32x4d (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('resnext29_32x4d_cifar_deconv', pretrained,
                   **dict(dict(_RESNEXT29_32X4D, deconv=True, block_fc=512), **kwargs))


@register_model
def resnext29_32x4d_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNeXt-29 32x4d (CIFAR) with batch norm: the paper's baseline."""
    return _create('resnext29_32x4d_cifar', pretrained, **dict(dict(_RESNEXT29_32X4D, deconv=False, block_fc=0), **kwargs))
