"""How pretrained weights reach a zoo model: fetched, verified, adapted and checked.

``build_zoo_model`` (models/_registry.py) runs ``resolve_pretrained_source`` before timm builds the
model and passes ``filter_pretrained_state_dict`` as timm's ``pretrained_filter_fn``:

1. ``resolve_pretrained_source`` downloads Hub weights itself (offline cache misses get an error
   that names the repo and the fix), checks a listed file's sha256 and that the file is intact,
   and hands timm the verified local file, so timm reads exactly the bytes that were checked.
2. ``filter_pretrained_state_dict`` converts timm batch-norm weights for converted tags, resets a
   classifier whose class count changes (its decorrelation statistics too), adapts the first
   layer's deconvolution statistics to ``in_chans`` (timm adapts only ``.weight``), and rejects a
   checkpoint that does not fit the model, listing the keys, or that holds NaN or inf values.

``install_timm_checks`` (run on import) gives timm's ``checkpoint_path=`` loader the file and
NaN/inf checks for zoo models.
"""
import argparse
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import huggingface_hub.constants
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from timm.models import _factory as timm_factory
from timm.models import get_model_traits, get_pretrained_cfg_value
from timm.models import load_state_dict as timm_load_state_dict
from timm.models._builder import resolve_pretrained_cfg
from timm.models import _hub as timm_hub
from timm.models._hub import download_cached_file, hf_split
from torch import Tensor

from .layers import FastDeconv
from .weights import (
    CONVERTED_BN_WEIGHTS, HUB_ORG_ENV, ChecksumMismatchError, CheckpointMismatchError, CorruptWeightsError,
    NoPublishedWeightsError, WeightsNotCachedError, hub_org, hub_repo_id, published_weights_for_repo,
)

__all__ = ['resolve_pretrained_source', 'fetch_hub_weights', 'verify_weights_file', 'load_torch_checkpoint',
           'file_sha256', 'is_safetensors_path', 'filter_pretrained_state_dict', 'StateDictMismatch',
           'compare_state_dict', 'optional_state_keys', 'non_finite_names', 'refuse_non_finite', 'gray_whitening',
           'install_timm_checks']

_logger = logging.getLogger(__name__)

# timm's fallback order for a Hub repo without an explicit file name.
HUB_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')

# torch.save's legacy (pre-zip) format opens with this pickled magic number (protocol 2; later
# protocols frame it a few bytes further in).
_LEGACY_TORCH_MAGIC = b'\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'


def _tagged_name(architecture: str, tag: Optional[str]) -> str:
    return f'{architecture}.{tag}' if tag else architecture


def resolve_pretrained_source(variant: str, org: Optional[str], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model kwargs whose ``pretrained_cfg_overlay`` points timm at verified weights.

    Follows timm's source order (``state_dict`` > ``file`` > ``hf_hub_id`` > ``url``; an
    ``hf-hub:``/``local-dir:`` model name forces that source). ``org`` (or DECONV_ZOO_HUB_ORG)
    makes the tag resolve to ``<org>/<arch>.<tag>``. A Hub source is downloaded here and replaced
    by the local file; a tag without any source raises ``NoPublishedWeightsError``.
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    name = _tagged_name(variant, cfg.tag)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if hub_org(org) and cfg.source not in ('hf-hub', 'local-dir') and 'hf_hub_id' not in overlay:
        overlay['hf_hub_id'] = hub_repo_id(name, org)
        cfg = dataclasses.replace(cfg, hf_hub_id=overlay['hf_hub_id'])
    if not cfg.classifier:
        # A hand-written config.json may omit it; timm then loads strictly and a new num_classes
        # fails on the classifier keys that filter_pretrained_state_dict leaves out.
        overlay['classifier'] = get_pretrained_cfg_value(variant, 'classifier')

    from_hub = cfg.source == 'hf-hub'
    if cfg.source == 'local-dir':
        path = _local_dir_weights_file(Path(cfg.file))
        if path is not None:  # else timm names the folder without weights
            verify_weights_file(str(path))
    elif not from_hub and cfg.state_dict is not None:
        pass  # an in-memory state dict
    elif not from_hub and cfg.file:
        verify_weights_file(cfg.file)
    elif cfg.hf_hub_id:
        path = fetch_hub_weights(cfg.hf_hub_id, cfg.hf_hub_filename, kwargs.get('cache_dir'))
        verify_weights_file(path, expected_sha256=_listed_sha256(cfg.hf_hub_id), repo_id=cfg.hf_hub_id)
        overlay.update(file=path, source=None)
    elif cfg.url:
        # Downloaded as timm would (into the torch.hub cache), then checked and handed over as a file.
        path = download_cached_file(cfg.url, check_hash=False, cache_dir=kwargs.get('cache_dir'))
        verify_weights_file(path)
        overlay.update(file=path)
    else:
        raise NoPublishedWeightsError(
            f"No pretrained weights are published for '{name}'. Train your own "
            f"(scripts/train.py --model {variant}) and load them with "
            f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors')) "
            f"(with num_classes=N in the overlay for another class count) "
            f"or timm.create_model('{name}', checkpoint_path='checkpoint.pth.tar'); weights you pushed to the Hub "
            f"load with {HUB_ORG_ENV}=<your-org> or hub_org='<your-org>' (repo <your-org>/{name}).")
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _local_dir_weights_file(folder: Path) -> Optional[Path]:
    """The file timm's ``local-dir:`` loader reads from ``folder``: the first of its preferred
    names, else the first file (by name) of the first extension that has one. Other files in the
    folder (a pickled training_args.bin, a backup) are none of the model's business. The order is
    timm's own (private names; a timm without them is left to its own errors)."""
    for name in getattr(timm_hub, '_PREFERRED_FILES', ()):
        if (folder / name).exists():
            return folder / name
    for extension in getattr(timm_hub, '_EXT_PRIORITY', ()):
        files = sorted(folder.glob(f'*{extension}'))
        if files:
            return files[0]
    return None


def _listed_sha256(hf_hub_id: str) -> Optional[str]:
    published = published_weights_for_repo(hf_hub_id)
    return published.sha256 if published else None


def _not_cached_message(hf_hub_id: str, files: List[str], cache_dir: Optional[str] = None) -> str:
    repo_id, _ = hf_split(hf_hub_id)
    cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    return (f"{' or '.join(files)} of Hub repo '{hf_hub_id}' not in the local Hugging Face cache ({cache}) "
            f"and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no network). Fix: run once with network "
            f"access (unset HF_HUB_OFFLINE), or on a connected machine run `hf download {repo_id}` and copy its "
            f"cache here (or point HF_HUB_CACHE at it), or load a local file with "
            f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors').")


def _explain_config_cache_misses(load_config: Callable) -> Callable:
    """Wrap timm's reader of a Hub repo's config.json so that an offline cache miss on an
    ``hf-hub:`` model name names the repo and the fix (huggingface_hub's own message names neither)."""
    @functools.wraps(load_config)
    def load_model_config_from_hf(model_id: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return load_config(model_id, *args, **kwargs)
        except LocalEntryNotFoundError as e:
            raise WeightsNotCachedError(_not_cached_message(model_id, ['config.json'], kwargs.get('cache_dir'))) from e
    load_model_config_from_hf.__wrapped_by_deconv_zoo__ = True
    return load_model_config_from_hf


def _check_zoo_checkpoints(load_checkpoint: Callable) -> Callable:
    """Wrap timm's loader of ``create_model(..., checkpoint_path=...)`` so that a zoo model gets
    the checks of its pretrained weights: a missing or corrupt file raises ``CorruptWeightsError``
    naming it (timm: an empty FileNotFoundError, or pickle internals), NaN or inf values are
    refused (timm loads them), and keys that do not fit raise ``CheckpointMismatchError`` listing
    them with the conversions to try (timm: torch's list of every key). timm's own models keep
    timm's behaviour. Like timm, a training checkpoint's EMA weights are the ones loaded."""
    @functools.wraps(load_checkpoint)
    def checked_load_checkpoint(model: nn.Module, checkpoint_path: str, *args: Any, **kwargs: Any) -> Any:
        if not type(model).__module__.startswith(__package__ + '.'):
            return load_checkpoint(model, checkpoint_path, *args, **kwargs)
        verify_weights_file(checkpoint_path)
        try:
            incompatible = load_checkpoint(model, checkpoint_path, *args, **kwargs)
        except RuntimeError as e:
            if 'Error(s) in loading state_dict' not in str(e):
                raise
            mismatch = compare_state_dict(timm_load_state_dict(checkpoint_path), model.state_dict(),
                                          optional=optional_state_keys(model))
            name = _tagged_name(model.pretrained_cfg['architecture'], model.pretrained_cfg.get('tag'))
            raise _does_not_fit(f'The weights of {checkpoint_path}', name, mismatch) from e
        refuse_non_finite(model.state_dict(), checkpoint_path)
        return incompatible
    checked_load_checkpoint.__wrapped_by_deconv_zoo__ = True
    return checked_load_checkpoint


def install_timm_checks() -> None:
    """Make timm.create_model('hf-hub:...') report offline cache misses clearly, and its
    ``checkpoint_path`` check a zoo model's file as pretrained weights are checked (idempotent)."""
    if not getattr(timm_factory.load_model_config_from_hf, '__wrapped_by_deconv_zoo__', False):
        timm_factory.load_model_config_from_hf = _explain_config_cache_misses(timm_factory.load_model_config_from_hf)
    if not getattr(timm_factory.load_checkpoint, '__wrapped_by_deconv_zoo__', False):
        timm_factory.load_checkpoint = _check_zoo_checkpoints(timm_factory.load_checkpoint)


def fetch_hub_weights(hf_hub_id: str, filename: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """Local path of a Hub repo's weights (``filename``, else model.safetensors, else pytorch_model.bin).

    Raises ``WeightsNotCachedError`` (a ``LocalEntryNotFoundError``) naming the repo and the ways
    to get the file when the Hub cannot be reached and the cache lacks it.
    """
    repo_id, revision = hf_split(hf_hub_id)
    candidates = (filename,) if filename else HUB_WEIGHT_FILES
    not_cached = []
    for candidate in candidates:
        try:
            # Once the Hub proved unreachable, the other names are looked up in the cache only
            # (each online attempt retries for several seconds).
            return hf_hub_download(repo_id, candidate, revision=revision, cache_dir=cache_dir,
                                   local_files_only=bool(not_cached))
        except LocalEntryNotFoundError:  # offline / unreachable, and not cached (subclass: test it first)
            not_cached.append(candidate)
        except EntryNotFoundError:  # the Hub says the repo has no such file: try the next name
            continue
    if not_cached:
        raise WeightsNotCachedError(_not_cached_message(hf_hub_id, not_cached, cache_dir))
    raise CorruptWeightsError(f"Hub repo '{hf_hub_id}' has none of the weight files {list(candidates)}.")


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights_file(path: str, expected_sha256: Optional[str] = None, repo_id: Optional[str] = None) -> None:
    """Check that a weights file exists, is intact, and (if given) has the listed sha256.

    safetensors files are checked through their header (which covers the data size, not the bytes:
    the format has no checksum, the listed sha256 is the only check of published data); zip-format
    torch files through their entries' CRC-32 checksums (one read of the file). Legacy-format torch
    files (the authors' 2019 checkpoints) have no checksum: they are read once in full (a caller
    that loads the file anyway should call ``load_torch_checkpoint`` instead).
    """
    _require_file(path)
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise ChecksumMismatchError(
                f"sha256 of {path} is {actual}, but deconv_zoo.weights.PUBLISHED_WEIGHTS lists {expected_sha256} "
                f"for '{repo_id}': the file is corrupt or not the published version. Delete it from the cache "
                f"(`hf cache delete`) and download again; to load it anyway, pass "
                f"pretrained_cfg_overlay=dict(file='{path}').")
    if is_safetensors_path(path):
        try:
            with safe_open(path, framework='pt'):
                pass
        except SafetensorError as e:
            raise CorruptWeightsError(f'{path} is not a valid safetensors file (truncated or corrupt): {e}') from e
    elif _torch_file_format(path) == 'legacy':
        load_torch_checkpoint(path)


def is_safetensors_path(path: str) -> bool:
    """Whether timm reads ``path`` as safetensors (its test: the name ends with .safetensors)."""
    return str(path).endswith('.safetensors')


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise CorruptWeightsError(f'Pretrained weights file not found: {path}')
    if os.path.getsize(path) == 0:
        raise CorruptWeightsError(f'{path} is empty (0 bytes): an interrupted download or copy?')


def _torch_file_format(path: str, check_data: bool = True) -> str:
    """'zip' or 'legacy' (torch.save's two formats); ``CorruptWeightsError`` for a broken zip
    archive or a file that is neither. ``check_data``: a zip archive's entries are checked against
    their CRC-32 too (one read of the whole file)."""
    with open(path, 'rb') as f:
        head = f.read(32)
    if head.startswith(b'PK\x03\x04'):
        _check_zip_archive(path, check_data)
        return 'zip'
    if _LEGACY_TORCH_MAGIC in head:
        return 'legacy'
    if head[8:9] == b'{':  # safetensors: an 8-byte header length, then the JSON header
        raise CorruptWeightsError(f"{path} holds safetensors data under a torch checkpoint's name: rename it to "
                                  f"{Path(path).stem}.safetensors (timm chooses the reader by the name).")
    raise CorruptWeightsError(f'{path} is not a weights file: neither safetensors nor a torch checkpoint.')


def _check_zip_archive(path: str, check_data: bool) -> None:
    """A zip-format torch file whose archive is broken or (``check_data``) one of whose entries
    fails its CRC-32 (torch.load reads damaged tensor bytes without a word)."""
    if not zipfile.is_zipfile(path):
        raise CorruptWeightsError(f'{path} is a truncated or corrupt torch checkpoint (broken zip archive).')
    if not check_data:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CorruptWeightsError(f'{path} is a truncated or corrupt torch checkpoint ({e}).') from e
    if damaged is not None:
        raise CorruptWeightsError(f'{path} is a corrupt torch checkpoint: its entry {damaged} fails its CRC-32 '
                                  f'check (damaged on disk or in transfer).')


def load_torch_checkpoint(path: str, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file with tensors and plain containers only (timm's training
    arguments too). A missing, truncated or corrupt file raises ``CorruptWeightsError`` naming it;
    the format checks of ``verify_weights_file`` come first, so callers need not repeat them.
    ``mmap``: map a zip-format file's tensors instead of reading them (for callers that only look
    at its other entries; the tensor bytes are then not read, nor checked against their CRC-32:
    ``verify_weights_file`` does that for whoever loads them)."""
    _require_file(path)
    file_format = _torch_file_format(path, check_data=not mmap)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and file_format == 'zip')
    except (EOFError, RuntimeError, pickle.UnpicklingError, UnicodeDecodeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptWeightsError(
            f'{path} could not be read as a torch checkpoint: it is truncated or corrupt, or holds objects other '
            f'than tensors and plain containers (torch.load: {reason}).') from e


def non_finite_names(named_tensors: Iterable[Tuple[str, Tensor]]) -> List[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    return [name for name, tensor in named_tensors
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def refuse_non_finite(state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise ``CorruptWeightsError`` when weights hold NaN or inf: timm and load_state_dict load
    them without a word and the model then answers NaN (e.g. a run that diverged)."""
    non_finite = non_finite_names(state_dict.items())
    if non_finite:
        raise CorruptWeightsError(
            f"Weights from {source} hold NaN or inf values in {len(non_finite)} tensors: {_listed(non_finite)}. "
            f"Were they saved from a run that diverged? Load an earlier checkpoint.")


def _does_not_fit(what: str, name: str, mismatch: 'StateDictMismatch') -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{what} do not fit {name}:\n{mismatch.describe()}\n"
        f"Is this a checkpoint of another architecture or configuration (deconv vs. BN twin, block_fc, "
        f"num_classes)? Batch-norm weights convert with deconv_zoo.convert.bn_to_deconv; the authors' "
        f"checkpoints with deconv_zoo.convert.convert_reference_checkpoint.")


def _listed(keys: List[str], limit: int = 10) -> str:
    """The first ``limit`` of ``keys``, comma-separated, and how many more there are."""
    more = f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return f'{", ".join(keys[:limit])}{more}'


@dataclass
class StateDictMismatch:
    """Keys of a state dict that do not fit a model: absent, extra, or of another shape."""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shapes: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, limit: int = 10) -> str:
        lines = []
        for title, keys in (('missing', self.missing), ('unexpected', self.unexpected),
                            ('shape mismatch', self.shapes)):
            if keys:
                lines.append(f'  {title} ({len(keys)}): {_listed(keys, limit)}')
        return '\n'.join(lines)


def compare_state_dict(
        state_dict: Mapping[str, Tensor],
        expected: Mapping[str, Tensor],
        optional: Set[str] = frozenset(),
        any_shape: Set[str] = frozenset(),
) -> StateDictMismatch:
    """What keeps ``state_dict`` from loading strictly where ``expected`` is the model's state.

    ``optional`` keys may be absent (the model fills them in); ``any_shape`` keys are adapted later.
    """
    return StateDictMismatch(
        missing=[k for k in expected if k not in state_dict and k not in optional],
        unexpected=[k for k in state_dict if k not in expected],
        shapes=[f'{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}' for k, v in state_dict.items()
                if k in expected and k not in any_shape and v.shape != expected[k].shape],
    )


def optional_state_keys(model: nn.Module) -> Set[str]:
    """Keys the zoo's layers fill in when a checkpoint lacks them (FastDeconv's step counter,
    which the reference kept outside the state dict)."""
    return {f'{name}.counter' for name, m in model.named_modules() if isinstance(m, FastDeconv)}


def gray_whitening(mean: Tensor, deconv: Tensor, channels: int) -> Tuple[Tensor, Tensor]:
    """The whitening of a 1-channel layer derived from a ``channels``-channel one (groups=1, one block).

    timm turns the first weight W into sum_c W_c, i.e. the 1-channel model sees a gray image as
    ``channels`` identical channels: patch x = E g with E stacking ``channels`` copies of the
    identity. The matching statistics are the least-squares projections onto that subspace:
    mean_1 = mean over channels of mean, D_1 = E^T D E / channels (the sum of all channel-pair
    blocks of D, divided by ``channels``), still symmetric positive definite. When D maps
    replicated patches to replicated patches (statistics identical across channels, e.g. a model
    trained on gray images copied to RGB) the adapted layer computes exactly the original layer
    on the replicated image; otherwise it is the closest such layer.
    """
    k2 = mean.numel() // channels
    gray_mean = mean.reshape(channels, k2).mean(dim=0)
    gray_deconv = deconv.reshape(channels, k2, channels, k2).sum(dim=(0, 2)) / channels
    return gray_mean, gray_deconv


def _adapt_first_conv_statistics(state_dict: Dict[str, Tensor], model: nn.Module, first_convs: List[str],
                                 source_chans: int) -> None:
    """Resize the first FastDeconv's running statistics from ``source_chans`` to the model's input
    channels (timm adapts only ``.weight``; size-mismatched buffers would fail to load).

    in_chans=1: ``gray_whitening``, consistent with timm's channel sum. Other counts: fresh
    statistics (zero mean, identity whitening); fine-tuning in train mode re-estimates them.
    """
    for conv_name in first_convs:
        conv = model.get_submodule(conv_name)
        mean_key, deconv_key = f'{conv_name}.running_mean', f'{conv_name}.running_deconv'
        if not isinstance(conv, FastDeconv) or mean_key not in state_dict or deconv_key not in state_dict:
            continue
        mean, deconv = state_dict[mean_key], state_dict[deconv_key]
        if mean.shape == conv.running_mean.shape and deconv.shape == conv.running_deconv.shape:
            continue
        single_block = conv.groups == 1 and deconv.dim() == 2 and mean.numel() == deconv.shape[0] == (
            source_chans * conv.kernel_size[0] * conv.kernel_size[1])
        if conv.in_channels == 1 and single_block:
            state_dict[mean_key], state_dict[deconv_key] = gray_whitening(mean, deconv, source_chans)
            _logger.info(f'{conv_name}: whitening statistics projected from {source_chans} channels to 1.')
        else:
            state_dict[mean_key] = torch.zeros_like(conv.running_mean)
            eye = torch.eye(conv.running_deconv.shape[-1], dtype=conv.running_deconv.dtype)
            state_dict[deconv_key] = eye.expand_as(conv.running_deconv).clone()
            # A warning: unlike the weight, which timm adapts, these statistics are not the pretrained ones.
            warnings.warn(f'{conv_name}: fresh whitening statistics (zero mean, identity) for {conv.in_channels} '
                          f'input channels: the checkpoint has {source_chans} and only a 1-channel stem is derived '
                          f'from them; training-mode fine-tuning re-estimates them.', stacklevel=2)


def _as_list(names: Any) -> List[str]:
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def filter_pretrained_state_dict(state_dict: Dict[str, Tensor], model: nn.Module,
                                 features_only: bool = False) -> Dict[str, Tensor]:
    """timm ``pretrained_filter_fn`` of every zoo model (see the module docstring).

    A changed ``num_classes`` drops the whole classifier, decorrelation statistics included: the
    new classifier is exactly what ``reset_classifier`` builds (fresh statistics, re-estimated
    during fine-tuning), not a mix of new weights and old statistics. ``features_only``: the model
    is built for a feature extractor, which timm loads as headless (its classifier is pruned), so
    the checkpoint's classifier is dropped whatever its class count.
    """
    state_dict = dict(state_dict)  # may be the caller's own (pretrained_cfg_overlay=dict(state_dict=...))
    cfg = model.pretrained_cfg
    name = _tagged_name(cfg['architecture'], cfg.get('tag'))
    source = cfg.get('file') or cfg.get('hf_hub_id') or 'the given state_dict'
    # Converted tags turn timm's BN weights into a deconv model's; a model built with deconv=False
    # has the BN layout already, and weights without statistics are then its own.
    converts = name in CONVERTED_BN_WEIGHTS and any(isinstance(m, FastDeconv) for m in model.modules())
    if converts and not any(k.endswith('.running_deconv') for k in state_dict):
        from .convert import deconv_state_dict_from_bn  # convert builds models: import on use
        state_dict = deconv_state_dict_from_bn(state_dict, CONVERTED_BN_WEIGHTS[name].split('.')[0], model,
                                               headless=features_only or model.num_classes == 0)

    expected = model.state_dict()
    optional = optional_state_keys(model)
    if features_only or model.num_classes != cfg.get('num_classes'):
        # The model's own name: the tag's config names the default layout's (VGG's head without
        # Delinear has its last layer at classifier.9, not classifier.6).
        prefix = f'{model.get_classifier(name_only=True)}.'
        classifier = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not features_only and model.num_classes and classifier and all(
                k in expected and v.shape == expected[k].shape for k, v in classifier.items()):
            warnings.warn(
                f"The classifier of the weights from {source} fits num_classes={model.num_classes}, but the "
                f"pretrained config of {name} says {cfg.get('num_classes')} classes, so it was left out and the "
                f"model has a fresh classifier. To load it, pass num_classes={model.num_classes} in "
                f"pretrained_cfg_overlay too.", stacklevel=2)
        state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
        optional |= {k for k in expected if k.startswith(prefix)}

    first_convs = _as_list(get_model_traits(model).get('first_conv', cfg.get('first_conv')))
    source_chans = (cfg.get('input_size') or (3,))[0]
    adapted_weights = set()
    if any(model.get_submodule(c).in_channels != source_chans for c in first_convs):
        _adapt_first_conv_statistics(state_dict, model, first_convs, source_chans)
        adapted_weights = {f'{c}.weight' for c in first_convs}  # timm adapts these after this filter

    mismatch = compare_state_dict(state_dict, expected, optional=optional, any_shape=adapted_weights)
    if mismatch:
        raise _does_not_fit(f'Pretrained weights from {source}', name, mismatch)
    refuse_non_finite(state_dict, source)
    return state_dict
