"""CIFAR DPN-92 (Chen et al. 2017, dual path networks) with network deconvolution, and its
batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/dpn.py`` (the kuangliu CIFAR
layout), so their checkpoints load with a strict ``load_state_dict``. In deconv mode every
Conv2d + BatchNorm2d pair is one FastDeconv and the BN is gone.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs

__all__ = ['DPNCifar', 'DualPathBlock']


class DualPathBlock(nn.Module):
    """Bottleneck (1x1, grouped 3x3, 1x1) whose output is split: the first ``out_planes``
    channels are added to the input's (residual path), the ``dense_depth`` others are
    concatenated after the input's remaining channels (dense path)."""

    def __init__(
            self,
            last_planes: int,
            in_planes: int,
            out_planes: int,
            dense_depth: int,
            stride: int,
            first_layer: bool,
            dconv: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.out_planes = out_planes
        self.conv1 = create_conv(last_planes, in_planes, 1, dconv=dconv)
        self.bn1 = create_norm(in_planes, dconv)
        self.conv2 = create_conv(in_planes, in_planes, 3, stride=stride, padding=1, groups=32, dconv=dconv)
        self.bn2 = create_norm(in_planes, dconv)
        self.conv3 = create_conv(in_planes, out_planes + dense_depth, 1, dconv=dconv)
        self.bn3 = create_norm(out_planes + dense_depth, dconv)
        self.shortcut = nn.Sequential()
        if first_layer:
            shortcut = create_conv(last_planes, out_planes + dense_depth, 1, stride=stride, dconv=dconv)
            # The reference's deconv shortcut is the bare FastDeconv (keys shortcut.*).
            self.shortcut = shortcut if dconv is not None else nn.Sequential(shortcut, create_norm(out_planes + dense_depth))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        x = self.shortcut(x)
        d = self.out_planes
        return F.relu(torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1))


class DPNCifar(DeconvNet):
    """CIFAR DPN: 3x3 stride-1 stem, four stages of dual path blocks, global pool, classifier.

    Args:
        in_planes: bottleneck width per stage.
        out_planes: residual-path width per stage.
        num_blocks: blocks per stage.
        dense_depth: channels each block adds to the dense path, per stage.
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
    """
    final_modules = ('deconv1',)

    def __init__(
            self,
            in_planes: Sequence[int] = (96, 192, 384, 768),
            out_planes: Sequence[int] = (256, 512, 1024, 2048),
            num_blocks: Sequence[int] = (3, 4, 20, 3),
            dense_depth: Sequence[int] = (16, 32, 24, 128),
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
        self.conv1 = create_conv(in_chans, 64, 3, padding=1, dconv=dconv, freeze=True, n_iter=10)
        self.bn1 = create_norm(64, dconv)
        self.last_planes = 64
        self.feature_info = [dict(num_chs=64, reduction=1, module='conv1')]
        for i, stride in enumerate((1, 2, 2, 2)):
            layer = self._make_layer(in_planes[i], out_planes[i], num_blocks[i], dense_depth[i], stride, dconv)
            setattr(self, f'layer{i + 1}', layer)
            self.feature_info.append(dict(num_chs=self.last_planes, reduction=2 ** i, module=f'layer{i + 1}'))
        head = classifier_args(block_fc, delinear, dconv)
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(self.last_planes, num_classes, global_pool, drop_rate, head)

    def _make_layer(self, in_planes: int, out_planes: int, num_blocks: int, dense_depth: int, stride: int,
                    dconv: Optional[Dict[str, Any]]) -> nn.Sequential:
        blocks = []
        for i, s in enumerate([stride] + [1] * (num_blocks - 1)):
            blocks.append(DualPathBlock(self.last_planes, in_planes, out_planes, dense_depth, s, i == 0, dconv))
            self.last_planes = out_planes + (i + 2) * dense_depth
        return nn.Sequential(*blocks)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^(?:conv1|bn1)\.', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_final(self, x: Tensor) -> Tensor:
        return x if self.deconv1 is None else self.deconv1(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> DPNCifar:
    return build_zoo_model(DPNCifar, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return cifar_cfg(first_conv='conv1', classifier='linear', **kwargs)


default_cfgs = zoo_default_cfgs({
    'dpn92_cifar_deconv.cifar10': _cfg(),
    'dpn92_cifar_deconv.cifar100': cifar100(_cfg()),
    'dpn92_cifar.cifar10': _cfg(),
    'dpn92_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def dpn92_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> DPNCifar:
    """DPN-92 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('dpn92_cifar_deconv', pretrained, **dict(dict(num_blocks=(3, 4, 20, 3), deconv=True, block_fc=512), **kwargs))


@register_model
def dpn92_cifar(pretrained: bool = False, **kwargs: Any) -> DPNCifar:
    """DPN-92 (CIFAR) with batch norm: the paper's baseline."""
    return _create('dpn92_cifar', pretrained, **dict(dict(num_blocks=(3, 4, 20, 3), deconv=False, block_fc=0), **kwargs))
