"""Fine-tuning: timm's ``freeze`` / ``unfreeze``, extended to the deconvolution layers' statistics.

``timm.utils.freeze(model, names)`` stops the parameters and turns batch norm into
``FrozenBatchNorm2d``, but knows nothing of deconvolution: the layers it freezes would go on
whitening every training batch with that batch's own statistics and moving their running ones,
so a "frozen" backbone would change its eval-mode function as the head trains.
"""
from typing import Sequence, Union

import timm.utils
import torch.nn as nn

from .layers import freeze_whitening
from .models._base import DeconvNet

__all__ = ['freeze', 'unfreeze']

ModuleNames = Union[str, Sequence[str]]


def freeze(root_module: nn.Module, submodules: ModuleNames = (), include_bn_running_stats: bool = True) -> None:
    """Freeze the parameters of ``submodules`` (names in ``root_module.named_modules()``; none:
    the whole of it), as ``timm.utils.freeze`` does, and with ``include_bn_running_stats`` their
    normalisation statistics: batch norm becomes timm's ``FrozenBatchNorm2d`` and every
    deconvolution layer whitens with its running statistics and keeps them (``freeze_whitening``)."""
    _freeze_or_unfreeze(root_module, submodules, include_bn_running_stats, frozen=True)


def unfreeze(root_module: nn.Module, submodules: ModuleNames = (), include_bn_running_stats: bool = True) -> None:
    """Undo ``freeze`` for ``submodules`` (none: the whole of ``root_module``), as ``timm.utils.unfreeze``."""
    _freeze_or_unfreeze(root_module, submodules, include_bn_running_stats, frozen=False)


def _freeze_or_unfreeze(root_module: nn.Module, submodules: ModuleNames, include_bn_running_stats: bool,
                        frozen: bool) -> None:
    names = [submodules] if isinstance(submodules, str) else list(submodules)
    timm_function = timm.utils.freeze if frozen else timm.utils.unfreeze
    timm_function(root_module, names, include_bn_running_stats=include_bn_running_stats)
    if include_bn_running_stats:
        for name in names or ['']:  # looked up after timm, which may have replaced a batch norm named here
            freeze_whitening(root_module.get_submodule(name), frozen)
    if not frozen:  # timm's unfreeze rebuilds and unfreezes every batch norm, the unused ones too
        for module in root_module.modules():
            if isinstance(module, DeconvNet):
                module.freeze_unused()
