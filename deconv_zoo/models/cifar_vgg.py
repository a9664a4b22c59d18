"""CIFAR VGG-16 (Simonyan & Zisserman 2015) with network deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/vgg.py``: one ``features``
Sequential with the same indices in each mode (conv, BN, ReLU in the BN twin; FastDeconv, ReLU
in deconv mode), so their checkpoints load with a strict ``load_state_dict``.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_conv, deconv_args
from ._base import DeconvNet
from ._levels import SequentialLevels
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs

__all__ = ['VGGCifar', 'vgg_features']

# Output channels of each 3x3 conv, 'M' a 2x2 max pool (the reference's cfg 'VGG16').
VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


def vgg_features(
        cfg: Sequence[Union[int, str]],
        in_chans: int,
        dconv: Optional[Dict[str, Any]],
        batch_norm: bool,
        first_overrides: Dict[str, Any],
) -> Tuple[nn.Sequential, List[Dict[str, Any]], List[int]]:
    """VGG's ``features``: per width a 3x3 conv with bias (+ BatchNorm2d if ``batch_norm``) and an
    in-place ReLU, per 'M' a 2x2 max pool; ``first_overrides`` are the first conv's FastDeconv settings.

    Also returns ``feature_info`` and the level ends for ``SequentialLevels``: a level ends before
    each pool (timm's VGG taps), the last one after it.
    """
    layers: List[nn.Module] = []
    feature_info, level_ends = [], []
    chs, reduction = in_chans, 1
    for v in cfg:
        if v == 'M':
            feature_info.append(dict(num_chs=chs, reduction=reduction, module=f'features.{len(layers) - 1}'))
            level_ends.append(len(layers))
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            reduction *= 2
            continue
        layers.append(create_conv(chs, v, 3, padding=1, bias=True, dconv=dconv, **({} if layers else first_overrides)))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        chs = v
    feature_info.append(dict(num_chs=chs, reduction=reduction, module=f'features.{len(layers) - 1}'))
    level_ends.append(len(layers))
    return nn.Sequential(*layers), feature_info, level_ends


class VGGCifar(SequentialLevels, DeconvNet):
    """CIFAR VGG: 3x3 convs and max pools, then global pool and one classifier layer.

    The feature levels are the conv blocks between pools (reductions 1 to 16), then the last pool:
    a 1x1 map at 32x32 input, where the reference flattened, so global pooling is the same.

    Args:
        cfg: conv widths and 'M' (max pool) entries.
        deconv: FastDeconv layers (True) or Conv2d + BatchNorm2d (the BN twin).
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
    """
    classifier_name = 'classifier'
    final_modules = ('channel_deconv',)

    def __init__(
            self,
            cfg: Sequence[Union[int, str]] = VGG16,
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
        head = classifier_args(block_fc, delinear, dconv)
        self.channel_deconv = create_channel_deconv(**head)
        # The reference gives the first layer more iterations and a frozen (periodically refreshed) whitening.
        self.features, self.feature_info, self._level_ends = vgg_features(
            cfg, in_chans, dconv, batch_norm=dconv is None, first_overrides=dict(freeze=True, n_iter=15))
        self._init_head(self.feature_info[-1]['num_chs'], num_classes, global_pool, drop_rate, head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^features\.0\.', blocks=r'^features\.(\d+)')

    def forward_final(self, x: Tensor) -> Tensor:
        return x if self.channel_deconv is None else self.channel_deconv(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    return build_zoo_model(VGGCifar, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4, 5), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(cifar_cfg(first_conv='features.0', classifier='classifier', **kwargs), pool_size=(1, 1))


default_cfgs = zoo_default_cfgs({
    'vgg16_cifar_deconv.cifar10': _cfg(),
    'vgg16_cifar_deconv.cifar100': cifar100(_cfg()),
    'vgg16_cifar.cifar10': _cfg(),
    'vgg16_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def vgg16_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    """VGG-16 (CIFAR) with network deconvolution and a Delinear classifier (paper Table 1)."""
    return _create('vgg16_cifar_deconv', pretrained, **dict(dict(cfg=VGG16, deconv=True, block_fc=512), **kwargs))


@register_model
def vgg16_cifar(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    """VGG-16 (CIFAR) with batch norm: the paper's baseline."""
    return _create('vgg16_cifar', pretrained, **dict(dict(cfg=VGG16, deconv=False, block_fc=0), **kwargs))
