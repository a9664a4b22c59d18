"""Where pretrained weights live: the one list of published weights and the organisation override.

A pretrained tag points at the Hugging Face Hub only when its weights are listed here (or when
an organisation override says where a lab pushed its own). Everything else raises a clear error
on ``pretrained=True`` instead of returning random weights.

Two kinds of weights are listed: ``PUBLISHED_WEIGHTS``, trained with deconvolution and pushed by
``scripts/push_to_hub.py`` (verified by sha256 on load), and ``CONVERTED_BN_WEIGHTS``, timm's
batch-norm weights that ``deconv_zoo.convert`` turns into the deconv model on load (same
eval-mode function; they were not trained with deconvolution).
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional

from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from timm.models import get_pretrained_cfg

__all__ = ['PublishedWeights', 'PUBLISHED_WEIGHTS', 'CONVERTED_BN_WEIGHTS', 'HUB_ORG_ENV', 'hub_org',
           'check_hub_repo_id', 'hub_repo_id', 'published_weights_for_repo', 'NoPublishedWeightsError',
           'WeightsNotCachedError', 'CorruptWeightsError', 'ChecksumMismatchError', 'CheckpointMismatchError']

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

# 'arch.tag' -> timm's pretrained 'bn_arch.tag' whose batch-norm weights are folded into the deconv
# model on load (identity whitening: the converted model computes the BN model's eval function).
# Only architectures whose every BN directly follows a convolution convert exactly (convert.py).
CONVERTED_BN_WEIGHTS: Dict[str, str] = {
    **{f'resnet{depth}_deconv.tv_in1k': f'resnet{depth}.tv_in1k' for depth in (18, 34, 50, 101, 152)},
    **{f'vgg{depth}_deconv.tv_in1k': f'vgg{depth}_bn.tv_in1k' for depth in (11, 13, 16, 19)},
}


class NoPublishedWeightsError(RuntimeError):
    """``pretrained=True`` was asked for a tag that has no weights to load."""


class WeightsNotCachedError(LocalEntryNotFoundError):
    """The Hub cannot be reached (offline) and the weights are not in the local cache."""


class CorruptWeightsError(ValueError):
    """A weights file is missing, truncated or not in the format its name says, or weights hold NaN or inf."""


class ChecksumMismatchError(RuntimeError):
    """A downloaded file is not the one whose sha256 the published list records."""


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the model (another architecture or configuration)."""


def hub_org(override: Optional[str] = None) -> Optional[str]:
    """The organisation whose Hub repos replace the published ones (argument, then env var);
    ``ValueError`` naming the setting when it cannot be a Hub namespace."""
    org = override or os.environ.get(HUB_ORG_ENV) or None
    if org:
        check_hub_repo_id(f'{org}/model', f"hub_org={org!r}" if override else f'{HUB_ORG_ENV}={org!r}')
    return org


def check_hub_repo_id(repo_id: str, setting: str) -> str:
    """``repo_id`` if the Hub accepts it as a model repo's id, else ``ValueError`` naming ``setting``
    (huggingface_hub's HFValidationError names only the id, and comes at the first download)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'{setting} cannot name a Hub repo ({e})') from e
    return repo_id


def hub_repo_id(name: str, org: Optional[str] = None) -> Optional[str]:
    """Hub repo for 'arch.tag': ``<org>/<arch>.<tag>`` under an override, else the published one.

    Converted batch-norm tags always point at timm's repo: an organisation's own weights are
    deconv-trained and go under the zoo's tags, not under a tag that names timm's weights.
    """
    if name in CONVERTED_BN_WEIGHTS:
        return get_pretrained_cfg(CONVERTED_BN_WEIGHTS[name]).hf_hub_id
    org = hub_org(org)
    if org:
        return f'{org}/{name}'
    published = PUBLISHED_WEIGHTS.get(name)
    return published.hf_hub_id if published else None


def published_weights_for_repo(repo_id: str) -> Optional[PublishedWeights]:
    """The published entry whose Hub repo is ``repo_id`` (a revision suffix '@rev' is ignored)."""
    repo_id = repo_id.split('@')[0]
    return next((w for w in PUBLISHED_WEIGHTS.values() if w.hf_hub_id == repo_id), None)
