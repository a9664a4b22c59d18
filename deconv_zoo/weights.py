"""Where pretrained weights live: the one list of published weights and the organisation override.

A pretrained tag points at the Hugging Face Hub only when its weights are listed here (or when
an organisation override says where a lab pushed its own). Everything else raises a clear error
on ``pretrained=True`` instead of returning random weights.
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ['PublishedWeights', 'PUBLISHED_WEIGHTS', 'HUB_ORG_ENV', 'hub_org', 'hub_repo_id', 'NoPublishedWeightsError']

HUB_ORG_ENV = 'DECONV_ZOO_HUB_ORG'


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: its Hub repo, validation accuracy and file checksum."""
    hf_hub_id: str
    top1: float
    top5: float
    sha256: str


# 'arch.tag' -> published weights. Filled in by scripts/push_to_hub.py's printed entry after
# an upload; empty until the first real weights are pushed.
PUBLISHED_WEIGHTS: Dict[str, PublishedWeights] = {}


class NoPublishedWeightsError(RuntimeError):
    """``pretrained=True`` was asked for a tag that has no weights to load."""


def hub_org(override: Optional[str] = None) -> Optional[str]:
    """The organisation whose Hub repos replace the published ones (argument, then env var)."""
    return override or os.environ.get(HUB_ORG_ENV) or None


def hub_repo_id(name: str, org: Optional[str] = None) -> Optional[str]:
    """Hub repo for 'arch.tag': ``<org>/<arch>.<tag>`` under an override, else the published one."""
    org = hub_org(org)
    if org:
        return f'{org}/{name}'
    published = PUBLISHED_WEIGHTS.get(name)
    return published.hf_hub_id if published else None
