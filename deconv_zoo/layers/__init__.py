"""Network-deconvolution layers (Ye et al., ICLR 2020)."""
from timm.layers import register_notrace_module

from ._stats import freeze_whitening, name_layers, set_finite_checks, smallest_training_batch
from .channel_deconv import ChannelDeconv
from .create import (
    PAPER_DECONV_ARGS, classifier_args, create_channel_deconv, create_classifier, create_conv, create_norm,
    deconv_args,
)
from .delinear import Delinear
from .fast_deconv import FastDeconv
from .whitening import (
    fold_conv_whitening, fold_linear_whitening, isqrt_newton_schulz, sample_patches, whitening_statistics,
)

# Their forward keeps Python state (mode, freeze schedule, caches): fx must treat them as leaves.
for _layer in (FastDeconv, Delinear, ChannelDeconv):
    register_notrace_module(_layer)

__all__ = [
    'FastDeconv', 'Delinear', 'ChannelDeconv', 'PAPER_DECONV_ARGS', 'deconv_args', 'create_conv', 'create_norm',
    'create_classifier', 'classifier_args', 'create_channel_deconv', 'isqrt_newton_schulz', 'sample_patches',
    'whitening_statistics', 'fold_conv_whitening', 'fold_linear_whitening', 'set_finite_checks',
    'freeze_whitening', 'name_layers', 'smallest_training_batch',
]
