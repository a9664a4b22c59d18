"""Pretrained-config helpers and the model builder shared by every family file."""
import functools
from typing import Any, Dict, Optional, Type

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg
from timm.models._features import FeatureGetterNet

from ..layers import name_layers
from ..loading import filter_pretrained_state_dict, resolve_pretrained_source
from ..weights import CONVERTED_BN_WEIGHTS, hub_repo_id

__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR100_MEAN', 'CIFAR100_STD', 'cifar_cfg', 'cifar100', 'imagenet_cfg',
           'zoo_default_cfgs', 'build_zoo_model']

# Normalisation constants of the reference training scripts.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2009, 0.1984, 0.2023)
_PAPER = dict(paper_ids='arXiv:1905.11926', paper_name='Network Deconvolution', license='mit',
              origin_url='https://github.com/yechengxi/deconvolution')


def cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    """A CIFAR-10 config (32x32, 10 classes); CIFAR-100 tags override num_classes/mean/std."""
    return dict(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
                interpolation='bilinear', mean=CIFAR10_MEAN, std=CIFAR10_STD, **_PAPER, **kwargs)


def cifar100(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The CIFAR-100 variant of a CIFAR-10 config."""
    return dict(cfg, num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD)


def imagenet_cfg(**kwargs: Any) -> Dict[str, Any]:
    """An ImageNet-1k config (224x224, reference train/val transforms)."""
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                **_PAPER, **kwargs)


# What a converted batch-norm tag takes from timm's source cfg: how its weights were trained and
# must be evaluated, and under which licence they are published.
_BN_SOURCE_FIELDS = ('input_size', 'test_input_size', 'interpolation', 'crop_pct', 'test_crop_pct', 'crop_mode',
                     'mean', 'std', 'num_classes', 'license', 'origin_url')


def _converted_bn_cfg(cfg: Dict[str, Any], bn_source: str) -> Dict[str, Any]:
    bn_cfg = get_pretrained_cfg(bn_source)
    return dict(
        cfg, **{k: getattr(bn_cfg, k) for k in _BN_SOURCE_FIELDS}, hf_hub_id=bn_cfg.hf_hub_id,
        description=(f"timm's batch-norm weights {bn_source} (hf.co/{bn_cfg.hf_hub_id}), converted on load: every "
                     f"BatchNorm folded into its convolution, deconvolution statistics set to identity, so the "
                     f"eval-mode function equals the BN model's. Not trained with deconvolution."))


def zoo_default_cfgs(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``generate_default_cfgs`` plus the weight source of each 'arch.tag' (see weights.py).

    Every converted batch-norm tag of weights.CONVERTED_BN_WEIGHTS whose architecture is in
    ``cfgs`` is added after the family's own tags, based on the architecture's first cfg.
    """
    sourced, first_cfgs = {}, {}
    for name, cfg in cfgs.items():
        repo = hub_repo_id(name) if '.' in name else None
        sourced[name] = dict(cfg, hf_hub_id=repo) if repo and 'hf_hub_id' not in cfg else cfg
        first_cfgs.setdefault(name.split('.')[0], cfg)
    for name, bn_source in CONVERTED_BN_WEIGHTS.items():
        arch = name.split('.')[0]
        if arch in first_cfgs:
            sourced[name] = _converted_bn_cfg(cfgs.get(name, first_cfgs[arch]), bn_source)
    return generate_default_cfgs(sourced)


class CheckpointingFeatureGetter(FeatureGetterNet):
    """timm's 'getter' feature extractor (the zoo's default), with the wrapped model's
    ``set_grad_checkpointing``, which timm's 'list' extractor has and its getter lacks."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_zoo_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        hub_org: Optional[str] = None,
        flatten_sequential: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` with the zoo's weight rules and ``features_only`` defaults.

    ``hub_org`` (or the DECONV_ZOO_HUB_ORG variable) points the tag at ``<org>/<arch>.<tag>``.
    Weights are verified before loading and adapted by ``loading.filter_pretrained_state_dict``.
    ``flatten_sequential``: feature_info's modules are children of a top-level Sequential
    (``features.3``), which timm's 'list' and 'dict' extractors only find when it is flattened.
    """
    if pretrained:
        kwargs = resolve_pretrained_source(variant, hub_org, kwargs)
    # timm's hook, fx, list and dict extractors tap feature_info's modules by name: only right where
    # those modules output the levels (features_by_module), else other tensors come back.
    feature_cls = kwargs.pop('feature_cls', 'getter')
    if feature_cls != 'getter' and not getattr(model_cls, 'features_by_module', False):
        raise ValueError(f"{variant}: features_only supports feature_cls='getter' (the default), not {feature_cls!r}")
    if feature_cls == 'getter':
        feature_cls = CheckpointingFeatureGetter
    feature_cfg = dict(feature_cls=feature_cls, out_indices=kwargs.pop('default_out_indices'),
                       flatten_sequential=flatten_sequential)
    # timm loads a feature extractor's weights as headless whatever the model's num_classes.
    filter_fn = functools.partial(filter_pretrained_state_dict, features_only=bool(kwargs.get('features_only')))
    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                 pretrained_filter_fn=filter_fn, **kwargs)
    return name_layers(model)  # error messages then say which layer refused a batch
