"""The timm model API shared by every deconv-zoo family.

A family model describes itself as a list of feature levels (a stem, then its stages), an
optional step after the last level, and a pooled classifier; this base class derives
``forward_features``, ``forward_head``, ``forward_intermediates``, gradient checkpointing and
classifier resets from that, as timm's own models implement them.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models._features import feature_take_indices
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers import create_classifier

__all__ = ['DeconvNet', 'stochastic_depth', 'stage_drop_path_rates']


def stochastic_depth(rate: float) -> nn.Module:
    """What a residual block applies to its branch: timm's DropPath, or Identity at rate 0."""
    return DropPath(rate) if rate > 0 else nn.Identity()


def stage_drop_path_rates(drop_path_rate: float, layers: Sequence[int]) -> List[List[float]]:
    """The stochastic-depth rate of every block, stage by stage: rising linearly from 0 at the
    first block to ``drop_path_rate`` at the last, as in timm's ResNet."""
    last = max(sum(layers) - 1, 1)
    rates = iter([drop_path_rate * block / last for block in range(sum(layers))])
    return [[next(rates) for _ in range(num_blocks)] for num_blocks in layers]


class DeconvNet(nn.Module):
    """Base of the zoo's classification networks.

    Subclasses call ``_init_head`` at the end of ``__init__`` and implement ``feature_levels``
    (one callable per entry of ``feature_info``) and ``group_matcher``; they may override
    ``forward_final`` (naming its submodules in ``final_modules``) and ``level_modules``.
    ``global_pool=''`` keeps the map unpooled (4-D), as in timm.
    """
    classifier_name: str = 'linear'
    # True where every feature_info 'module' outputs its level exactly, so that timm's module-tapping
    # feature extractors (feature_cls 'hook', 'fx', ...) work; the CIFAR stems end in a functional ReLU.
    features_by_module: bool = False
    # Submodules that forward_final runs, removed by prune_intermediate_layers with the head.
    final_modules: Tuple[str, ...] = ()
    # Submodules the network registers but never runs (kept so the reference's checkpoints load).
    unused_modules: Tuple[str, ...] = ()

    def _init_head(
            self,
            num_features: int,
            num_classes: int,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            classifier_args: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self._classifier_args = dict(classifier_args or {})
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        # The pooled width, which pre_logits returns ('catavgmax' doubles it), as in timm.
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        setattr(self, self.classifier_name, create_classifier(
            self.head_hidden_size, num_classes, **self._classifier_args))

    def freeze_unused(self) -> None:
        """Stop the gradients of ``unused_modules``: DistributedDataParallel fails on trainable
        parameters that get none, and optimizers would decay them."""
        for name in self.unused_modules:
            self.get_submodule(name).requires_grad_(False)

    def feature_levels(self) -> List[Callable[[Tensor], Tensor]]:
        """One callable per feature level, applied in order (level 0 is the stem)."""
        raise NotImplementedError

    def forward_final(self, x: Tensor) -> Tensor:
        """What follows the last level inside ``forward_features`` (final norm, ChannelDeconv)."""
        return x

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return self.classifier_name if name_only else getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier (a fresh Delinear, statistics included, when the model uses one)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        # In the model's mode: a Delinear built in training mode would update its statistics in eval.
        classifier = create_classifier(self.head_hidden_size, num_classes, **self._classifier_args).train(self.training)
        setattr(self, self.classifier_name, classifier)

    def _run_level(self, level: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(level, x, use_reentrant=False)
        return level(x)

    def forward_features(self, x: Tensor) -> Tensor:
        for level in self.feature_levels():
            x = self._run_level(level, x)
        return self.forward_final(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Feature maps of the selected levels (``indices``: which, or how many of the last).
        ``norm`` is accepted for timm's API; these models have no per-level norm to apply."""
        if output_fmt != 'NCHW':
            raise ValueError(f'{type(self).__name__}: only output_fmt="NCHW" is supported, got {output_fmt!r}')
        levels = self.feature_levels()
        take_indices, max_index = feature_take_indices(len(levels), indices)
        # Only intermediates wanted: the later levels cannot contribute, so stop there.
        last = max_index if (stop_early or intermediates_only) else len(levels) - 1
        intermediates = []
        for i, level in enumerate(levels[:last + 1]):
            x = self._run_level(level, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        # forward_final follows the last level only; after an early stop x is the last level run (as in timm).
        return (self.forward_final(x) if last == len(levels) - 1 else x), intermediates

    def level_modules(self, index: int) -> List[str]:
        """Names of the submodules that only feature level ``index`` runs (default: its feature_info module)."""
        return [self.feature_info[index]['module']]

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Remove what the selected levels do not need, as timm's models do: the later levels and, unless
        the features end at the last level and head and norm are kept, what ``forward_final`` runs and the
        head. Emptied, not kept: unused parameters get no gradients, which DistributedDataParallel refuses."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = prune_norm or prune_head or max_index < len(self.feature_info) - 1
        names = [name for i in range(max_index + 1, len(self.feature_info)) for name in self.level_modules(i)]
        if prune_end:
            names += self.final_modules
        for name in names:
            parent, _, attr = name.rpartition('.')
            parent_module = self.get_submodule(parent)
            if getattr(parent_module, attr) is not None:  # an optional ChannelDeconv may be absent
                setattr(parent_module, attr, nn.Sequential())
        if prune_end:
            # The features now end at the last kept level; the head goes with what followed it.
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.reset_classifier(0, '')
        return take_indices
