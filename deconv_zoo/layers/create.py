"""Factories that build a model's layers in deconvolution mode or batch-norm mode.

Model files describe each layer once; these pick FastDeconv / Delinear / ChannelDeconv or the
plain Conv2d / Linear that the batch-norm twin uses, and apply the paper's default settings.
"""
from typing import Any, Dict, Iterable, Optional

import torch.nn as nn

from .channel_deconv import ChannelDeconv
from .delinear import Delinear
from .fast_deconv import FastDeconv

__all__ = ['PAPER_DECONV_ARGS', 'DeconvSettings', 'deconv_args', 'create_conv', 'create_norm', 'create_classifier',
           'classifier_args', 'create_channel_deconv']

# main.py's FastDeconv partial for the paper's runs.
PAPER_DECONV_ARGS: Dict[str, Any] = dict(bias=True, eps=1e-5, n_iter=5, block=64, sampling_stride=3)
# Every FastDeconv setting beyond the convolution's geometry.
DECONV_SETTINGS = frozenset(PAPER_DECONV_ARGS) | {'momentum', 'freeze', 'freeze_iter', 'refresh_every'}


class DeconvSettings(dict):
    """FastDeconv keyword arguments that remember which of them a model's ``deconv_cfg`` gave:
    those apply to every FastDeconv, over a layer's own settings (the reference's stems), but for
    a layer's own block width."""

    def __init__(self, settings: Dict[str, Any], given: Iterable[str] = ()):
        super().__init__(settings)
        self.given = frozenset(given)


def deconv_args(deconv: bool, deconv_cfg: Optional[Dict[str, Any]] = None) -> Optional[DeconvSettings]:
    """FastDeconv keyword arguments for a model built with ``deconv``, or None for a BN model.

    A BN model checks ``deconv_cfg`` too but has no layer to apply it to: one set of keyword
    arguments builds both twins."""
    deconv_cfg = deconv_cfg or {}
    unknown = set(deconv_cfg) - DECONV_SETTINGS
    if unknown:
        raise ValueError(f'deconv_cfg: unknown FastDeconv settings {sorted(unknown)}')
    return DeconvSettings(dict(PAPER_DECONV_ARGS, **deconv_cfg), given=deconv_cfg) if deconv else None


def create_conv(
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        dconv: Optional[Dict[str, Any]] = None,
        dilation: int = 1,
        **overrides: Any,
) -> nn.Module:
    """A FastDeconv with ``dconv`` settings (plus per-layer ``overrides``, except those the
    model's ``deconv_cfg`` gave other than ``block``), else a Conv2d.

    ``bias`` applies to the plain convolution only; a FastDeconv takes its bias from ``dconv``
    (the paper always uses one, since the folded mean shift lands there). ``overrides`` are
    checked in both modes, so that one call builds twins of one geometry or fails in both.
    """
    unknown = set(overrides) - DECONV_SETTINGS
    if unknown:
        raise TypeError(f'create_conv: unknown FastDeconv settings {sorted(unknown)}')
    if dconv is None:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
    # A layer's own block width stays (MobileNet-v2's projections: the block's input width): it
    # shapes the layer's buffers, which checkpoints of models built with a deconv_cfg block hold.
    given = getattr(dconv, 'given', frozenset()) - {'block'}
    layer_settings = {key: value for key, value in overrides.items() if key not in given}
    return FastDeconv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, **dict(dconv, **layer_settings))


def create_norm(channels: int, dconv: Optional[Dict[str, Any]] = None) -> nn.Module:
    """BatchNorm2d for a BN model; Identity (no state_dict entries) where deconvolution replaced it."""
    return nn.BatchNorm2d(channels) if dconv is None else nn.Identity()


def create_classifier(
        in_features: int,
        num_classes: int,
        block_fc: int = 0,
        delinear: bool = True,
        eps: float = 1e-5,
        n_iter: int = 5,
        sampling_stride: int = 3,
) -> nn.Module:
    """The classifier: a Delinear when ``block_fc > 0`` and ``delinear``, else a Linear
    (Identity for ``num_classes == 0``). Takes ``classifier_args(...)``, whose ``sampling_stride``
    is for the head's ChannelDeconv (``create_channel_deconv``); a classifier has none."""
    if num_classes <= 0:
        return nn.Identity()
    if block_fc > 0 and delinear:
        return Delinear(in_features, num_classes, eps=eps, n_iter=n_iter, block=block_fc)
    return nn.Linear(in_features, num_classes)


def classifier_args(block_fc: int, delinear: bool, dconv: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Settings of the decorrelated head; eps, iterations and (ChannelDeconv's) sampling stride
    follow the conv settings, as the reference's command line used one --eps, --deconv-iter and
    --stride for all of them."""
    settings = dconv or PAPER_DECONV_ARGS
    return dict(block_fc=block_fc, delinear=delinear, eps=settings['eps'], n_iter=settings['n_iter'],
                sampling_stride=settings['sampling_stride'])


def create_channel_deconv(block_fc: int = 0, delinear: bool = True, eps: float = 1e-5,
                          n_iter: int = 5, sampling_stride: int = 3) -> Optional[nn.Module]:
    """The reference's pre-pooling ChannelDeconv, used only with ``block_fc > 0`` and no Delinear.
    Takes ``classifier_args(...)``: main.py gave it the same --eps, --deconv-iter and --stride."""
    if block_fc > 0 and not delinear:
        return ChannelDeconv(block_fc, eps=eps, n_iter=n_iter, sampling_stride=sampling_stride)
    return None
