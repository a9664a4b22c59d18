"""Feature levels that are consecutive runs of a model's ``features`` Sequential (VGG, DenseNet)."""
from functools import partial
from typing import Callable, List

import torch.nn as nn
from torch import Tensor

__all__ = ['SequentialLevels']


class SequentialLevels:
    """``DeconvNet.feature_levels`` for a model whose level i is ``features[ends[i-1]:ends[i]]``.

    The host sets ``features`` (an ``nn.Sequential``) and ``_level_ends`` (increasing indices).
    """
    features: nn.Sequential
    _level_ends: List[int]

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        starts = [0] + self._level_ends[:-1]
        return [partial(self._run_features, start, end) for start, end in zip(starts, self._level_ends)]

    def level_modules(self, index: int) -> List[str]:
        start = self._level_ends[index - 1] if index else 0
        return [f'features.{name}' for name in list(self.features._modules)[start:self._level_ends[index]]]

    def _run_features(self, start: int, end: int, x: Tensor) -> Tensor:
        # Layer by layer: a sliced Sequential is not a registered submodule, which torch.fx rejects.
        for layer in self.features[start:end]:
            x = layer(x)
        return x
