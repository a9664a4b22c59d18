"""CIFAR EfficientNet-B0 (Tan & Le 2019) with network deconvolution, and its batch-norm twin.

Module, parameter and buffer names follow the authors' ``models/efficientnet.py`` (kuangliu's
CIFAR variant: stride-1 stem, ReLU, no head conv), so their checkpoints load with a strict
``load_state_dict``. That code builds the 16 blocks without deconvolution in every mode, so its
deconv model differs from the BN one only in the stem (a FastDeconv) and the classifier; kept
here for its checkpoints. A variant deconvolving the blocks too is not offered: at 32x32 the last
stages run on 2x2 and 1x1 maps, where FastDeconv's sampled covariances have far fewer samples than
dimensions, and training such a model diverged (gradients ~1e9 at batch 2, non-finite eval).
"""
from typing import Any, Dict, Optional

import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, deconv_args
from ._registry import build_zoo_model, cifar100, cifar_cfg, zoo_default_cfgs
from .cifar_mobilenetv2 import BlockRows, InvertedResidual, InvertedResidualNet

__all__ = ['EfficientNetCifar', 'InvertedResidualSE']


class InvertedResidualSE(InvertedResidual):
    """A batch-norm inverted residual with squeeze-excitation (``fc1``, ``fc2``) on the branch
    output. As in the reference, a stride-2 block adds the branch output itself (out * w + out).
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, drop_path: float = 0.0):
        super().__init__(in_planes, out_planes, expansion, stride, drop_path=drop_path)
        self.fc1 = nn.Conv2d(out_planes, out_planes // 16, 1)
        self.fc2 = nn.Conv2d(out_planes // 16, out_planes, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        shortcut = self.shortcut(x) if self.stride == 1 else out
        w = F.relu(self.fc1(out.mean((2, 3), keepdim=True)))
        return self.drop_path(out * self.fc2(w).sigmoid()) + shortcut  # no drop path on stride 2


class EfficientNetCifar(InvertedResidualNet):
    """CIFAR EfficientNet: 3x3 stride-1 stem, 16 inverted residual blocks with squeeze-excitation,
    global pool (a 1x1 map at 32x32), classifier.

    Args:
        rows: (expansion, out_planes, num_blocks, stride) per stage.
        deconv: a FastDeconv stem (True; the blocks keep batch norm) or Conv2d + BatchNorm2d.
        block_fc: decorrelate the classifier input in blocks of this size (0: plain Linear).
        delinear: use Delinear for that (True) or a ChannelDeconv before pooling (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
        drop_path_rate: stochastic depth of the residual branches, rising to it as in timm's EfficientNet.
    """
    final_modules = ('deconv1',)

    def __init__(
            self,
            rows: BlockRows = ((1, 16, 1, 2), (6, 24, 2, 1), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1),
                               (6, 192, 4, 2), (6, 320, 1, 2)),
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
        self._init_body(rows, in_chans, InvertedResidualSE, dconv, drop_path_rate)
        head = classifier_args(block_fc, delinear, dconv)
        self.deconv1 = create_channel_deconv(**head)
        self._init_head(rows[-1][1], num_classes, global_pool, drop_rate, head)

    def forward_final(self, x: Tensor) -> Tensor:
        return x if self.deconv1 is None else self.deconv1(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientNetCifar:
    return build_zoo_model(EfficientNetCifar, variant, pretrained, default_out_indices=(1, 2, 3, 4, 5), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # Five stride-2 stages leave a 1x1 map at 32x32.
    return dict(cifar_cfg(first_conv='conv1', classifier='linear', **kwargs), pool_size=(1, 1))


default_cfgs = zoo_default_cfgs({
    'efficientnet_b0_cifar_deconv.cifar10': _cfg(),
    'efficientnet_b0_cifar_deconv.cifar100': cifar100(_cfg()),
    'efficientnet_b0_cifar.cifar10': _cfg(),
    'efficientnet_b0_cifar.cifar100': cifar100(_cfg()),
})


@register_model
def efficientnet_b0_cifar_deconv(pretrained: bool = False, **kwargs: Any) -> EfficientNetCifar:
    """EfficientNet-B0 (CIFAR) as the paper ran it: deconvolved stem and Delinear classifier,
    batch-norm blocks (paper Table 1)."""
    return _create('efficientnet_b0_cifar_deconv', pretrained, **dict(dict(deconv=True, block_fc=512), **kwargs))


@register_model
def efficientnet_b0_cifar(pretrained: bool = False, **kwargs: Any) -> EfficientNetCifar:
    """EfficientNet-B0 (CIFAR) with batch norm: the paper's baseline."""
    return _create('efficientnet_b0_cifar', pretrained, **dict(dict(deconv=False, block_fc=0), **kwargs))
