"""ImageNet VGG (Simonyan & Zisserman 2015) with network deconvolution.

Module, parameter and buffer names follow torchvision's VGG, as the authors'
``models/vgg_imagenet.py`` does (``features.<i>``, ``classifier.0/3/6``), so their checkpoints
load with a strict ``load_state_dict``. In deconv mode every convolution is a FastDeconv and the
three classifier layers are Delinear. ``deconv=False`` builds torchvision's VGG without batch norm,
as the reference does; timm's ``vgg11_bn`` ... are the batch-norm baselines.

timm API mapping: ``forward_features`` gives the last max pool's map (512 channels), the head
is the reference's 7x7 average pool, flatten and three-layer MLP; ``pre_logits`` is the 4096-wide
output of the second hidden layer and ``reset_classifier`` replaces only the last layer
(``global_pool=''`` has no head at all: no MLP).
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import register_model
from torch import Tensor

from ..layers import classifier_args, create_channel_deconv, create_classifier, create_conv, deconv_args
from ._base import DeconvNet
from ._levels import SequentialLevels
from ._registry import build_zoo_model, imagenet_cfg, zoo_default_cfgs

__all__ = ['VGG']

# torchvision's configurations A, B, D, E: output channels of each 3x3 convolution, 'M' = 2x2 max pool.
CFGS: Dict[str, List[Union[int, str]]] = {
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'vgg19': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M'],
}
HEAD_HIDDEN = 4096
POOL_SIZE = 7


def _mlp_head(in_features: int, num_classes: int, drop_rate: float, head: Dict[str, Any]) -> nn.Sequential:
    """fc6 (ReLU, Dropout), fc7 (ReLU, Dropout), fc8; each preceded by a ChannelDeconv when the
    head decorrelates without Delinear (the reference's layout, so fc8 is then index 9)."""
    widths = (in_features, HEAD_HIDDEN, HEAD_HIDDEN, num_classes)
    layers: List[nn.Module] = []
    for i in range(3):
        channel_deconv = create_channel_deconv(**head)
        if channel_deconv is not None:
            layers.append(channel_deconv)
        layers.append(create_classifier(widths[i], widths[i + 1], **head))
        if i < 2:
            layers += [nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
    return nn.Sequential(*layers)


def _check_pool(global_pool: str, num_classes: int) -> None:
    if global_pool not in ('avg', ''):
        raise ValueError(f"VGG: global_pool must be 'avg' (the reference's 7x7 average pool) or '', got {global_pool!r}")
    if not global_pool and num_classes > 0:
        raise ValueError("VGG: global_pool='' removes the whole head (pooling and MLP); it needs num_classes=0")


class VGG(SequentialLevels, DeconvNet):
    """VGG: 3x3 convolutions with ReLU and 2x2 max pools, 7x7 average pool, three-layer MLP.

    Args:
        cfg: channels of each convolution, 'M' for a max pool (see ``CFGS``).
        deconv: FastDeconv layers (True) or Conv2d with bias and no norm, torchvision's VGG (False).
        block_fc: decorrelate the MLP inputs in blocks of this size (0: plain Linear);
            default: 64 with ``deconv`` (the paper's ImageNet setting), else 0.
        delinear: use Delinear for that (True) or a ChannelDeconv before each layer (False).
        deconv_cfg: FastDeconv settings overriding the paper's (block, n_iter, eps, ...).
        global_pool: 'avg' (the head above) or '' (no head at all; ``num_classes=0`` only).
        drop_rate: dropout after the two hidden MLP layers (the reference's 0.5).
        init_weights: the reference's init: convolutions (FastDeconv included) kaiming-normal
            fan_out with zero bias, Linear N(0, 0.01) with zero bias, Delinear PyTorch default.
            The authors' vgg11d run skipped it by accident (``vgg11d('VGG11d', ...)`` bound the
            string to ``pretrained``); ``init_weights=False`` reproduces that run.
    """
    classifier_name = 'classifier'
    features_by_module = True

    def __init__(
            self,
            cfg: Sequence[Union[int, str]] = CFGS['vgg16'],
            num_classes: int = 1000,
            in_chans: int = 3,
            deconv: bool = True,
            block_fc: Optional[int] = None,
            delinear: bool = True,
            deconv_cfg: Optional[Dict[str, Any]] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.5,
            init_weights: bool = True,
    ):
        super().__init__()
        _check_pool(global_pool, num_classes)
        dconv = deconv_args(deconv, deconv_cfg)
        layers: List[nn.Module] = []
        self.feature_info = []
        self._level_ends = []
        chs, reduction = in_chans, 1
        for v in cfg:
            if v == 'M':
                # A feature level ends before each pool (timm's VGG taps), the last one after it.
                self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f'features.{len(layers) - 1}'))
                self._level_ends.append(len(layers))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
            else:
                stem = {} if layers else dict(freeze=True, n_iter=15, sampling_stride=3)
                layers += [create_conv(chs, v, 3, padding=1, bias=True, dconv=dconv, **stem), nn.ReLU(inplace=True)]
                chs = v
        self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f'features.{len(layers) - 1}'))
        self._level_ends.append(len(layers))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(POOL_SIZE)

        self.num_classes = num_classes
        self.num_features = chs
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self._classifier_args = classifier_args((64 if deconv else 0) if block_fc is None else block_fc, delinear, dconv)
        self._init_mlp()
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # FastDeconv included, as in the reference
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif type(m) is nn.Linear:  # exact type: Delinear (a subclass) keeps its default init
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _init_mlp(self) -> None:
        # global_pool='' runs no head: an MLP there would hold parameters that never get gradients.
        self.head_hidden_size = HEAD_HIDDEN if self.global_pool else self.num_features
        self.classifier = _mlp_head(self.num_features * POOL_SIZE ** 2, self.num_classes, self.drop_rate,
                                    self._classifier_args) if self.global_pool else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^features\.0', blocks=r'^features\.(\d+)')

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        if not self.global_pool:  # no MLP: pretrained loading then drops all of the checkpoint's head
            return 'classifier' if name_only else self.classifier
        last = len(self.classifier) - 1
        return f'classifier.{last}' if name_only else self.classifier[last]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New last MLP layer (``num_classes=0``: none, the output is the 4096-wide pre-logits); a new
        ``global_pool`` builds or removes the whole MLP."""
        global_pool = self.global_pool if global_pool is None else global_pool
        _check_pool(global_pool, num_classes)
        new_mlp = global_pool != self.global_pool
        self.num_classes, self.global_pool = num_classes, global_pool
        if new_mlp:
            self._init_mlp()
            self.classifier.train(self.training)  # the model's mode
        elif global_pool:
            self.classifier[-1] = create_classifier(
                self.head_hidden_size, num_classes, **self._classifier_args).train(self.training)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if not self.global_pool:
            return x
        x = torch.flatten(self.avgpool(x), 1)
        *hidden, last = self.classifier  # the registered layers (torch.fx rejects a sliced Sequential)
        for layer in hidden:
            x = layer(x)
        return x if pre_logits else last(x)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    return build_zoo_model(VGG, variant, pretrained, default_out_indices=(0, 1, 2, 3, 4, 5),
                           flatten_sequential=True, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return imagenet_cfg(first_conv='features.0', classifier='classifier.6', **kwargs)


default_cfgs = zoo_default_cfgs({
    'vgg11_deconv.in1k': _cfg(),
    'vgg13_deconv.in1k': _cfg(),
    'vgg16_deconv.in1k': _cfg(),
    'vgg19_deconv.in1k': _cfg(),
})


@register_model
def vgg11_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-11 (config A) with network deconvolution and Delinear MLP (the reference's vgg11d)."""
    return _create('vgg11_deconv', pretrained, **dict(dict(cfg=CFGS['vgg11']), **kwargs))


@register_model
def vgg13_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-13 (config B) with network deconvolution and Delinear MLP (built by the vgg11d/vgg16d rules)."""
    return _create('vgg13_deconv', pretrained, **dict(dict(cfg=CFGS['vgg13']), **kwargs))


@register_model
def vgg16_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-16 (config D) with network deconvolution and Delinear MLP (the reference's vgg16d)."""
    return _create('vgg16_deconv', pretrained, **dict(dict(cfg=CFGS['vgg16']), **kwargs))


@register_model
def vgg19_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-19 (config E) with network deconvolution and Delinear MLP (built by the vgg11d/vgg16d rules)."""
    return _create('vgg19_deconv', pretrained, **dict(dict(cfg=CFGS['vgg19']), **kwargs))
