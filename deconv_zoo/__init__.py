"""deconv-zoo: network deconvolution (Ye et al., ICLR 2020) as timm models.

``import deconv_zoo`` registers every model with timm (``timm.list_models('*deconv*')``).
"""
from typing import List

import timm

from . import layers, models
from .finetuning import freeze, unfreeze
from .loading import install_timm_checks
from .weights import NoPublishedWeightsError

install_timm_checks()  # timm's hf-hub: config.json fetch and checkpoint_path loader, before any zoo code runs

__all__ = ['list_models', 'freeze', 'unfreeze', 'NoPublishedWeightsError', 'layers', 'models']


def list_models(pattern: str = '') -> List[str]:
    """Names of the models this package registers with timm (optionally filtered by pattern)."""
    return [name for name in timm.list_models(pattern or '*')
            if timm.models.model_entrypoint(name).__module__.startswith(__name__ + '.')]

__version__ = '0.1.0'
