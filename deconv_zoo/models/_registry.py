"""Pretrained-config helpers and the model builder shared by every family file."""
from typing import Any, Dict, Optional, Type

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._builder import resolve_pretrained_cfg

from ..weights import HUB_ORG_ENV, NoPublishedWeightsError, hub_org, hub_repo_id

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


def zoo_default_cfgs(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``generate_default_cfgs`` plus the weight source of each 'arch.tag' (see weights.py)."""
    sourced = {}
    for name, cfg in cfgs.items():
        repo = hub_repo_id(name) if '.' in name else None
        sourced[name] = dict(cfg, hf_hub_id=repo) if repo and 'hf_hub_id' not in cfg else cfg
    return generate_default_cfgs(sourced)


def _has_source(cfg) -> bool:
    return bool(cfg.state_dict or cfg.file or cfg.hf_hub_id or cfg.url)


def build_zoo_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        hub_org: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` with the zoo's weight rules and ``features_only`` defaults.

    ``hub_org`` (or the DECONV_ZOO_HUB_ORG variable) points the tag at ``<org>/<arch>.<tag>``.
    """
    if pretrained:
        kwargs = _resolve_weights(variant, hub_org, kwargs)
    feature_cfg = dict(feature_cls='getter', out_indices=kwargs.pop('default_out_indices'))
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _resolve_weights(variant: str, org: Optional[str], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if org and cfg.source not in ('hf-hub', 'local-dir'):
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        overlay.setdefault('hf_hub_id', hub_repo_id(name, hub_org(org)))
        return dict(kwargs, pretrained_cfg_overlay=overlay)
    if not _has_source(cfg):  # the overlay is already applied to cfg
        raise NoPublishedWeightsError(
            f"No pretrained weights are published for '{name}'. Train your own "
            f"(scripts/train.py --model {variant}) and load them with "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors')) "
            f"or checkpoint_path='checkpoint.pth.tar'; weights you pushed to the Hub load with "
            f"{HUB_ORG_ENV}=<your-org> or hub_org='<your-org>' (repo <your-org>/{name}).")
    return kwargs
