"""CIFAR MobileNetV2 (Sandler et al. 2018) with network deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/mobilenetv2.py`` (kuangliu's CIFAR
variant: stride-1 stem and second stage, ReLU instead of ReLU6), so their checkpoints load with a
strict ``load_state_dict``. In deconv mode every Conv2d + BatchNorm2d pair is one FastDeconv.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet, stochastic_depth
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs
from .cifar_resnet import projection_shortcut

__all__ = ['MobileNetV2Cifar', 'InvertedResidualNet', 'InvertedResidual']

# (expansion, out_planes, num_blocks, stride) rows.
BlockRows = Sequence[Tuple[int, int, int, int]]


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1); the input is added back on stride-1 blocks,
    through a 1x1 projection when the width changes.

    Args:
        dw_args: per-layer FastDeconv settings of the depthwise conv.
        pw_args: per-layer FastDeconv settings of the projection conv.
        drop_path: stochastic-depth rate of the branch (stride-1 blocks: the others have no shortcut).
    """

    def __init__(
            self,
            in_planes: int,
            out_planes: int,
            expansion: int,
            stride: int,
            dconv: Optional[Dict[str, Any]] = None,
            dw_args: Optional[Dict[str, Any]] = None,
            pw_args: Optional[Dict[str, Any]] = None,
            drop_path: float = 0.0,
    ):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = create_conv(in_planes, planes, 1, dconv=dconv)
        self.bn1 = create_norm(planes, dconv)
        self.conv2 = create_conv(planes, planes, 3, stride=stride, padding=1, groups=planes, dconv=dconv,
                                 **(dw_args or {}))
        self.bn2 = create_norm(planes, dconv)
        self.conv3 = create_conv(planes, out_planes, 1, dconv=dconv, **(pw_args or {}))
        self.bn3 = create_norm(out_planes, dconv)
        self.shortcut = projection_shortcut(in_planes, out_planes, 1, dconv) if stride == 1 else nn.Sequential()
        self.drop_path = stochastic_depth(drop_path if stride == 1 else 0.0)

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return self.drop_path(out) + self.shortcut(x) if self.stride == 1 else out


class InvertedResidualNet(DeconvNet):
    """Base of the CIFAR MobileNetV2 and EfficientNet: a 3x3 stride-1 stem (``conv1``, ``bn1``)
    and one flat ``layers`` Sequential of blocks, as the reference names them. Its feature
    levels are the stem, then the blocks up to each stride-2 block and up to the last one."""

    def _init_body(
            self,
            rows: BlockRows,
            in_chans: int,
            make_block: Callable[[int, int, int, int, float], nn.Module],
            dconv: Optional[Dict[str, Any]],
            drop_path_rate: float = 0.0,
    ) -> None:
        """The stem (deconvolved with ``dconv``) and ``layers``: ``make_block(in_planes, out_planes,
        expansion, stride, drop_path)`` per block of the (expansion, out_planes, num_blocks, stride)
        ``rows``, the stochastic-depth rate rising as in timm's EfficientNet (block i of n: rate * i / n)."""
        self.conv1 = create_conv(in_chans, 32, 3, padding=1, dconv=dconv, freeze=True, n_iter=10)
        self.bn1 = create_norm(32, dconv)
        specs = [(expansion, out, s) for expansion, out, n, stride in rows for s in [stride] + [1] * (n - 1)]
        blocks, in_planes = [], 32
        for index, (expansion, out_planes, stride) in enumerate(specs):
            blocks.append(make_block(in_planes, out_planes, expansion, stride, drop_path_rate * index / len(specs)))
            in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self._level_ends = [i for i, (_, _, stride) in enumerate(specs) if stride == 2 and i > 0] + [len(specs)]
        self.feature_info = [dict(num_chs=32, reduction=1, module='conv1')] + [
            dict(num_chs=specs[end - 1][1], reduction=math.prod(s for _, _, s in specs[:end]),
                 module=f'layers.{end - 1}') for end in self._level_ends]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # One group per block; MobileNetV2's head conv (conv2, bn2) joins the last one, as in timm.
        return dict(stem=r'^(?:conv1|bn1)\.', blocks=[(r'^layers\.(\d+)', None), (r'^(?:conv2|bn2)\.', (99999,))])

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def level_modules(self, index: int) -> List[str]:
        start = self._level_ends[index - 2] if index > 1 else 0
        return [f'layers.{i}' for i in range(start, self._level_ends[index - 1])]

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        # The slices' bound forward, not the slices: fx traces only modules installed in the model.
        return [self._stem] + [self.layers[start:end].forward
                               for start, end in zip([0] + self._level_ends, self._level_ends)]


class MobileNetV2Cifar(InvertedResidualNet):
    """CIFAR MobileNetV2: 3x3 stride-1 stem, 17 inverted residual blocks, 1x1 head conv to 1280.

    Args:
        rows: (expansion, out_planes, num_blocks, stride) per stage.
        num_features: width of the head conv.
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
        drop_path_rate: stochastic depth of the residual branches, rising to it as in timm's EfficientNet.
    """
    final_modules = ('conv2', 'bn2', 'deconv1')

    def __init__(
            self,
            rows: BlockRows = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)),
            num_features: int = 1280,
            num_classes: int = 10,
            in_chans: int = 3,
            deconv: bool = True,
            block_fc: int = 512,
            delinear: bool = True,
            deconv_cfg: Optional[Dict[str, Any]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        dconv = deconv_args(deconv, deconv_cfg)

        def block(in_planes: int, out_planes: int, expansion: int, stride: int, drop_path: float) -> InvertedResidual:
            # The paper's settings: one Newton-Schulz step for the depthwise and projection convs,
            # the projection whitened in blocks as wide as the block's input.
            return InvertedResidual(in_planes, out_planes, expansion, stride, dconv,
                                    dw_args=dict(n_iter=1), pw_args=dict(block=in_planes, n_iter=1), drop_path=drop_path)

        self._init_body(rows, in_chans, block, dconv, drop_path_rate)
        self.conv2 = create_conv(rows[-1][1], num_features, 1, dconv=dconv)
        self.bn2 = create_norm(num_features, dconv)
        head = classifier_args(block_fc, delinear, dconv)
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(num_features, num_classes, global_pool, drop_rate, head)

    def forward_final(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn2(self.conv2(x)))
        return x if self.deconv1 is None else self.deconv1(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileNetV2Cifar:
    return build_zoo_model(MobileNetV2Cifar, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return cifar_cfg(first_conv='conv1', classifier='linear', **kwargs)


default_cfgs = zoo_default_cfgs({
    'mobilenetv2_cifar_deconv.cifar10': _cfg(),
    'mobilenetv2_cifar_deconv.cifar100': cifar100(_cfg()),
    'mobilenetv2_cifar.cifar10': _cfg(),
    'mobilenetv2_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def mobilenetv2_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> MobileNetV2Cifar:
    """MobileNetV2 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('mobilenetv2_cifar_deconv', pretrained, **dict(dict(deconv=True, block_fc=512), **kwargs))


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> MobileNetV2Cifar:
    """MobileNetV2 (CIFAR) with batch norm: the paper's baseline."""
    return _create('mobilenetv2_cifar', pretrained, **dict(dict(deconv=False, block_fc=0), **kwargs))
