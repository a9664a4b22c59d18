"""CIFAR PNASNet-A (Liu et al. 2018, progressive neural architecture search) with network
deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/pnasnet.py`` (the kuangliu CIFAR
layout: cell A, 44 planes), so their checkpoints load with a strict ``load_state_dict``. In
deconv mode every Conv2d + BatchNorm2d pair is one FastDeconv and the BN is gone.
"""
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs

__all__ = ['PNASNetCifar', 'CellA', 'SepConv']


class SepConv(nn.Module):
    """The reference's 'separable' convolution: a single k x k conv with groups=in_planes (no
    pointwise conv; in a stride-2 cell it doubles the width, two outputs per group), then BN."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int,
                 dconv: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.conv1 = create_conv(in_planes, out_planes, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                                 groups=in_planes, dconv=dconv)
        self.bn1 = create_norm(out_planes, dconv)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x))


class CellA(nn.Module):
    """relu(7x7 SepConv(x) + max_pool(x)); a stride-2 cell widens the pooled path with a 1x1 conv."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dconv: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.stride = stride
        self.sep_conv1 = SepConv(in_planes, out_planes, 7, stride, dconv)
        if stride == 2:
            self.conv1 = create_conv(in_planes, out_planes, 1, dconv=dconv)
            self.bn1 = create_norm(out_planes, dconv)

    def forward(self, x: Tensor) -> Tensor:
        y1 = self.sep_conv1(x)
        y2 = F.max_pool2d(x, kernel_size=3, stride=self.stride, padding=1)
        if self.stride == 2:
            y2 = self.bn1(self.conv1(y2))
        return F.relu(y1 + y2)


class PNASNetCifar(DeconvNet):
    """CIFAR PNASNet: 3x3 stride-1 stem, then ``num_cells`` cells, a stride-2 cell (``layer2``, not
    a Sequential), ``num_cells`` cells, a stride-2 cell (``layer4``), ``num_cells`` cells;
    widths ``num_planes`` x 1, 2, 4; global pool, classifier.

    Args:
        num_cells: cells per stage.
        num_planes: width of the stem and the first stage.
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
    """
    final_modules = ('deconv1',)

    def __init__(
            self,
            num_cells: int = 6,
            num_planes: int = 44,
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
        self.conv1 = create_conv(in_chans, num_planes, 3, padding=1, dconv=dconv, freeze=True, n_iter=10)
        self.bn1 = create_norm(num_planes, dconv)
        self.layer1 = nn.Sequential(*[CellA(num_planes, num_planes, dconv=dconv) for _ in range(num_cells)])
        self.layer2 = CellA(num_planes, num_planes * 2, stride=2, dconv=dconv)
        self.layer3 = nn.Sequential(*[CellA(num_planes * 2, num_planes * 2, dconv=dconv) for _ in range(num_cells)])
        self.layer4 = CellA(num_planes * 2, num_planes * 4, stride=2, dconv=dconv)
        self.layer5 = nn.Sequential(*[CellA(num_planes * 4, num_planes * 4, dconv=dconv) for _ in range(num_cells)])
        # Each stride-2 cell doubles the width, so a stage's width multiplier is also its reduction.
        self.feature_info = [dict(num_chs=num_planes, reduction=1, module='conv1')] + [
            dict(num_chs=num_planes * width, reduction=width, module=f'layer{i + 1}')
            for i, width in enumerate((1, 2, 2, 4, 4))]
        head = classifier_args(block_fc, delinear, dconv)
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(num_planes * 4, num_classes, global_pool, drop_rate, head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # layer2 and layer4 are single cells: one group each.
        cells = [(r'^layer(\d+)\.', None)] if coarse else [(r'^layer(\d+)\.(\d+)\.', None), (r'^layer(\d+)\.', None)]
        return dict(stem=r'^(?:conv1|bn1)\.', blocks=cells)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4, self.layer5]

    def forward_final(self, x: Tensor) -> Tensor:
        return x if self.deconv1 is None else self.deconv1(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> PNASNetCifar:
    return build_zoo_model(PNASNetCifar, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4, 5), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # Two stride-2 cells leave an 8x8 map at 32x32.
    return dict(cifar_cfg(first_conv='conv1', classifier='linear', **kwargs), pool_size=(8, 8))


default_cfgs = zoo_default_cfgs({
    'pnasnet_a_cifar_deconv.cifar10': _cfg(),
    'pnasnet_a_cifar_deconv.cifar100': cifar100(_cfg()),
    'pnasnet_a_cifar.cifar10': _cfg(),
    'pnasnet_a_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def pnasnet_a_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> PNASNetCifar:
    """PNASNet-A (CIFAR; the paper's 'PNASNet-18') with network deconvolution and a Delinear
    classifier (paper Table 1)."""
    return _create('pnasnet_a_cifar_deconv', pretrained,
                   **dict(dict(num_cells=6, num_planes=44, deconv=True, block_fc=512), **kwargs))


@register_model
def pnasnet_a_cifar(pretrained: bool = False, **kwargs: Any) -> PNASNetCifar:
    """PNASNet-A (CIFAR) with batch norm: the paper's baseline."""
    return _create('pnasnet_a_cifar', pretrained, **dict(dict(num_cells=6, num_planes=44, deconv=False, block_fc=0), **kwargs))
