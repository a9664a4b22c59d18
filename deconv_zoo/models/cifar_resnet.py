"""CIFAR ResNet-18, PreAct-ResNet-18 and SENet-18 with network deconvolution, and their batch-norm twins.

Module, parameter and buffer names follow the authors' ``models/resnet.py``, ``preact_resnet.py``
and ``senet.py`` (themselves the widely used kuangliu CIFAR layouts), so their checkpoints load
with a strict ``load_state_dict``. In deconv mode every Conv2d + BatchNorm2d pair is one
FastDeconv and the BN is gone.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet, stage_drop_path_rates, stochastic_depth
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs

__all__ = ['ResNetCifar', 'BasicBlock', 'PreActBlock', 'SEPreActBlock', 'projection_shortcut']


def projection_shortcut(in_planes: int, out_planes: int, stride: int, dconv: Optional[Dict[str, Any]]) -> nn.Sequential:
    """The post-activation residual shortcut: empty (identity) unless the shape changes, else a
    strided 1x1 conv followed, in a BN model, by BatchNorm (keys ``shortcut.0``, ``shortcut.1``)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        create_conv(in_planes, out_planes, 1, stride=stride, dconv=dconv),
        *([create_norm(out_planes)] if dconv is None else []))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dconv: Optional[Dict[str, Any]] = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv1 = create_conv(in_planes, planes, 3, stride=stride, padding=1, dconv=dconv)
        self.bn1 = create_norm(planes, dconv)
        self.conv2 = create_conv(planes, planes, 3, padding=1, dconv=dconv)
        self.bn2 = create_norm(planes, dconv)
        self.shortcut = projection_shortcut(in_planes, planes, stride, dconv)
        self.drop_path = stochastic_depth(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.drop_path(out) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): BN-ReLU before each conv, no final ReLU;
    a projection shortcut takes the activated input, the identity the raw one."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dconv: Optional[Dict[str, Any]] = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.bn1 = create_norm(in_planes, dconv)
        self.conv1 = create_conv(in_planes, planes, 3, stride=stride, padding=1, dconv=dconv)
        self.bn2 = create_norm(planes, dconv)
        self.conv2 = create_conv(planes, planes, 3, padding=1, dconv=dconv)
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            conv = create_conv(in_planes, planes, 1, stride=stride, dconv=dconv)
            # The reference wraps only the BN-mode projection in a Sequential: keys shortcut.0.* vs shortcut.*.
            self.shortcut = nn.Sequential(conv) if dconv is None else conv
        self.drop_path = stochastic_depth(drop_path)

    def residual(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.drop_path(self.residual(out)) + shortcut


class SEPreActBlock(PreActBlock):
    """PreActBlock with squeeze-and-excitation on the residual branch (the reference SENet-18 block).
    The SE convs ``fc1``/``fc2`` are 1x1 FastDeconvs in deconv mode, Conv2d with bias otherwise."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dconv: Optional[Dict[str, Any]] = None,
                 drop_path: float = 0.0):
        super().__init__(in_planes, planes, stride, dconv, drop_path)
        self.fc1 = create_conv(planes, planes // 16, 1, bias=True, dconv=dconv)
        self.fc2 = create_conv(planes // 16, planes, 1, bias=True, dconv=dconv)

    def residual(self, x: Tensor) -> Tensor:
        out = super().residual(x)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(out.mean((2, 3), keepdim=True)))))
        return out * w


class ResNetCifar(DeconvNet):
    """CIFAR ResNet: stride-1 stem, stages of ``widths`` (strides 1, 2, 2, ...), global pool, classifier.

    Args:
        block: residual block class, called as ``block(in_planes, planes, stride, dconv=..., drop_path=...,
            **block_args)``.
        layers: blocks per stage.
        widths: ``planes`` of each stage (the stage outputs ``planes * block.expansion`` channels).
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
        stem_kernel: kernel size of the stem conv.
        stem_norm_act: BN (BN twin) and ReLU after the stem conv. Pre-activation nets pass False:
            their first block normalises; the BN twin still registers the reference's unused ``bn1``.
        stem_overrides: FastDeconv settings of the stem only (the reference's per-model freeze/n_iter).
        block_args: extra keyword arguments of ``block``.
        drop_path_rate: stochastic depth of the residual branches, rising to this at the last block (timm's).
    """
    final_modules = ('deconv1',)

    def __init__(
            self,
            block: Type[nn.Module] = BasicBlock,
            layers: Sequence[int] = (2, 2, 2, 2),
            widths: Sequence[int] = (64, 128, 256, 512),
            num_classes: int = 10,
            in_chans: int = 3,
            deconv: bool = True,
            block_fc: int = 512,
            delinear: bool = True,
            deconv_cfg: Optional[Dict[str, Any]] = None,
            stem_kernel: int = 3,
            stem_norm_act: bool = True,
            stem_overrides: Optional[Dict[str, Any]] = None,
            block_args: Optional[Dict[str, Any]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        dconv = deconv_args(deconv, deconv_cfg)
        self.in_planes = 64
        self.stem_norm_act = stem_norm_act
        self.conv1 = create_conv(in_chans, 64, stem_kernel, padding=stem_kernel // 2, dconv=dconv,
                                 **(stem_overrides or {}))
        self.bn1 = create_norm(64, dconv)
        if not stem_norm_act:
            # The reference's unused stem norm, kept so its checkpoints load.
            self.unused_modules = ('bn1',)
            self.freeze_unused()
        self.feature_info = [dict(num_chs=64, reduction=1, module='conv1')]
        drop_path_rates = stage_drop_path_rates(drop_path_rate, layers)
        for i, planes in enumerate(widths):
            stage = self._make_layer(block, planes, 1 if i == 0 else 2, dconv, drop_path_rates[i], block_args or {})
            setattr(self, f'layer{i + 1}', stage)
            self.feature_info.append(dict(num_chs=self.in_planes, reduction=2 ** i, module=f'layer{i + 1}'))
        head = classifier_args(block_fc, delinear, dconv)
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(self.in_planes, num_classes, global_pool, drop_rate, head)

    def _make_layer(self, block: Type[nn.Module], planes: int, stride: int, dconv: Optional[Dict[str, Any]],
                    drop_path_rates: Sequence[float], block_args: Dict[str, Any]) -> nn.Sequential:
        blocks = []
        for i, drop_path in enumerate(drop_path_rates):
            blocks.append(block(self.in_planes, planes, stride if i == 0 else 1, dconv=dconv, drop_path=drop_path,
                                **block_args))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^(?:conv1|bn1)\.', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def _stem(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return F.relu(self.bn1(x)) if self.stem_norm_act else x

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        stages = [getattr(self, info['module']) for info in self.feature_info[1:]]
        return [self._stem, *stages]

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
    'preact_resnet18_cifar_deconv.cifar10': _cfg(),
    'preact_resnet18_cifar_deconv.cifar100': cifar100(_cfg()),
    'preact_resnet18_cifar.cifar10': _cfg(),
    'preact_resnet18_cifar.cifar100': cifar100(_cfg()),
    'senet18_cifar_deconv.cifar10': _cfg(),
    'senet18_cifar_deconv.cifar100': cifar100(_cfg()),
    'senet18_cifar.cifar10': _cfg(),
    'senet18_cifar.cifar100': cifar100(_cfg()),
})

# The reference's per-model stem overrides (ResNet-18 has none).
_PREACT = dict(block=PreActBlock, layers=(2, 2, 2, 2), stem_norm_act=False, stem_overrides=dict(freeze=True, n_iter=10))
_SENET = dict(block=SEPreActBlock, layers=(2, 2, 2, 2), stem_overrides=dict(freeze=True, n_iter=15))


@register_model
def resnet18_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-18 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('resnet18_cifar_deconv', pretrained, **dict(dict(layers=(2, 2, 2, 2), deconv=True, block_fc=512), **kwargs))


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-18 (CIFAR) with batch norm: the paper's baseline."""
    return _create('resnet18_cifar', pretrained, **dict(dict(layers=(2, 2, 2, 2), deconv=False, block_fc=0), **kwargs))


@register_model
def preact_resnet18_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """PreAct-ResNet-18 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('preact_resnet18_cifar_deconv', pretrained, **dict(dict(_PREACT, deconv=True, block_fc=512), **kwargs))


@register_model
def preact_resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """PreAct-ResNet-18 (CIFAR) with batch norm: the paper's baseline (its ``bn1`` is unused, as in the reference)."""
    return _create('preact_resnet18_cifar', pretrained, **dict(dict(_PREACT, deconv=False, block_fc=0), **kwargs))


@register_model
def senet18_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """SENet-18 (CIFAR; pre-activation blocks with SE) with network deconvolution and a Delinear classifier."""
    return _create('senet18_cifar_deconv', pretrained, **dict(dict(_SENET, deconv=True, block_fc=512), **kwargs))


@register_model
def senet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """SENet-18 (CIFAR) with batch norm: the paper's baseline."""
    return _create('senet18_cifar', pretrained, **dict(dict(_SENET, deconv=False, block_fc=0), **kwargs))
