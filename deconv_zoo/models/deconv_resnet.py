"""ImageNet ResNets (He et al. 2016) with network deconvolution.

Module, parameter and buffer names follow torchvision's ResNet, as the authors'
``models/resnet_imagenet.py`` does, so their checkpoints load with a strict ``load_state_dict``.
In deconv mode every convolution is a FastDeconv and the block norms are gone; the downsample
path keeps its BatchNorm (a structural quirk of the reference, kept for its checkpoints).
``deconv=False`` builds the plain network, key- and shape-identical to torchvision's and timm's
``resnet18`` ... ``resnet152`` (those are the batch-norm baselines; no twin is registered here).
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import torch
import torch.nn as nn
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, create_norm, deconv_args
from ._base import DeconvNet, stage_drop_path_rates, stochastic_depth
from ._registry import build_zoo_model, imagenet_cfg, zoo_default_cfgs

__all__ = ['ResNet']

DeconvArgs = Optional[Dict[str, Any]]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
            self,
            in_planes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            groups: int = 1,
            base_width: int = 64,
            dconv: DeconvArgs = None,
            drop_path: float = 0.0,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError('BasicBlock only supports groups=1 and base_width=64')
        self.conv1 = create_conv(in_planes, planes, 3, stride=stride, padding=1, dconv=dconv)
        self.bn1 = create_norm(planes, dconv)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = create_conv(planes, planes, 3, padding=1, dconv=dconv)
        self.bn2 = create_norm(planes, dconv)
        self.downsample = downsample
        self.drop_path = stochastic_depth(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""
    expansion = 4

    def __init__(
            self,
            in_planes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            groups: int = 1,
            base_width: int = 64,
            dconv: DeconvArgs = None,
            drop_path: float = 0.0,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = create_conv(in_planes, width, 1, dconv=dconv)
        self.bn1 = create_norm(width, dconv)
        self.conv2 = create_conv(width, width, 3, stride=stride, padding=1, groups=groups, dconv=dconv)
        self.bn2 = create_norm(width, dconv)
        self.conv3 = create_conv(width, planes * self.expansion, 1, dconv=dconv)
        self.bn3 = create_norm(planes * self.expansion, dconv)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = stochastic_depth(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)


def _make_layer(
        block: Type[nn.Module],
        in_planes: int,
        planes: int,
        num_blocks: int,
        stride: int,
        dconv: DeconvArgs,
        drop_path_rates: Sequence[float],
        **block_args: Any,
) -> nn.Sequential:
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        # The BatchNorm stays in deconv mode too: the reference's structure, kept for its checkpoints.
        downsample = nn.Sequential(
            create_conv(in_planes, out_planes, 1, stride=stride, dconv=dconv), nn.BatchNorm2d(out_planes))
    blocks = [block(in_planes, planes, stride, downsample, dconv=dconv, drop_path=drop_path_rates[0], **block_args)]
    blocks += [block(out_planes, planes, dconv=dconv, drop_path=drop_path_rates[i], **block_args)
               for i in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class ResNet(DeconvNet):
    """ImageNet ResNet: 7x7 stride-2 stem, max pool, four stages, global pool, ``fc``.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50 and deeper).
        layers: blocks per stage.
        groups, width_per_group: bottleneck grouping and width (ResNeXt / wide ResNets).
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d, torchvision's network (False).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear);
            default: 64 with ``deconv`` (the paper's ImageNet setting), else 0.
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
        drop_path_rate: stochastic depth of the residual branches, rising to this at the last block (timm's).

    Initialisation as in the reference: every convolution weight, FastDeconv included,
    kaiming-normal (fan_out, relu); FastDeconv biases, BatchNorm and the classifier keep their
    PyTorch defaults.
    """
    classifier_name = 'fc'
    features_by_module = True
    final_modules = ('deconv1',)

    def __init__(
            self,
            block: Type[nn.Module] = BasicBlock,
            layers: Sequence[int] = (2, 2, 2, 2),
            num_classes: int = 1000,
            in_chans: int = 3,
            groups: int = 1,
            width_per_group: int = 64,
            deconv: bool = True,
            block_fc: Optional[int] = None,
            delinear: bool = True,
            deconv_cfg: Optional[Dict[str, Any]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        dconv = deconv_args(deconv, deconv_cfg)
        head = classifier_args((64 if deconv else 0) if block_fc is None else block_fc, delinear, dconv)
        self.conv1 = create_conv(in_chans, 64, 7, stride=2, padding=3, dconv=dconv,
                                 freeze=True, n_iter=15, sampling_stride=3)
        self.bn1 = create_norm(64, dconv)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='relu')]
        in_planes = 64
        drop_path_rates = stage_drop_path_rates(drop_path_rate, layers)
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = _make_layer(block, in_planes, planes, num_blocks, 1 if i == 0 else 2, dconv, drop_path_rates[i],
                                groups=groups, base_width=width_per_group)
            setattr(self, f'layer{i + 1}', stage)
            in_planes = planes * block.expansion
            self.feature_info.append(dict(num_chs=in_planes, reduction=2 ** (i + 2), module=f'layer{i + 1}'))
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(in_planes, num_classes, global_pool, drop_rate, head)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # FastDeconv included, as in the reference
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|^bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def _stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _pool_layer1(self, x: Tensor) -> Tensor:
        return self.layer1(self.maxpool(x))

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        return [self._stem, self._pool_layer1, self.layer2, self.layer3, self.layer4]

    def forward_final(self, x: Tensor) -> Tensor:
        return x if self.deconv1 is None else self.deconv1(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    return build_zoo_model(ResNet, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return imagenet_cfg(first_conv='conv1', classifier='fc', **kwargs)


default_cfgs = zoo_default_cfgs({
    'resnet18_deconv.in1k': _cfg(),
    'resnet34_deconv.in1k': _cfg(),
    'resnet50_deconv.in1k': _cfg(),
    'resnet101_deconv.in1k': _cfg(),
    'resnet152_deconv.in1k': _cfg(),
})


@register_model
def resnet18_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with network deconvolution and a Delinear classifier (the reference's resnet18d)."""
    return _create('resnet18_deconv', pretrained, **dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs))


@register_model
def resnet34_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 with network deconvolution and a Delinear classifier (the reference's resnet34d)."""
    return _create('resnet34_deconv', pretrained, **dict(dict(block=BasicBlock, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def resnet50_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 with network deconvolution and a Delinear classifier (the reference's resnet50d)."""
    return _create('resnet50_deconv', pretrained, **dict(dict(block=Bottleneck, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def resnet101_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101 with network deconvolution and a Delinear classifier (the reference's resnet101d)."""
    return _create('resnet101_deconv', pretrained, **dict(dict(block=Bottleneck, layers=(3, 4, 23, 3)), **kwargs))


@register_model
def resnet152_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 with network deconvolution and a Delinear classifier (the reference's resnet152d)."""
    return _create('resnet152_deconv', pretrained, **dict(dict(block=Bottleneck, layers=(3, 8, 36, 3)), **kwargs))
