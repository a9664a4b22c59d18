"""Publishing zoo weights to the Hugging Face Hub with timm's own conventions.

``save_hub_folder`` writes what a Hub repo holds: ``model.safetensors`` and ``config.json`` (timm's
``save_for_hf``) and a model card ``README.md`` (timm's ``generate_readme``, plus the validation
metrics as ``model-index`` metadata). ``push_hub_folder`` uploads that same folder, so what is
tested offline is what gets published. The returned ``PublishedWeights`` (sha256 of the
safetensors file) is the entry to add to ``deconv_zoo.weights.PUBLISHED_WEIGHTS``.
"""
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

import torch.nn as nn
from huggingface_hub import EvalResult, HfApi, ModelCard
from timm.models import save_for_hf
from timm.models._hub import generate_readme

from .files import atomic_write_text
from .loading import file_sha256
from .weights import PublishedWeights

__all__ = ['PAPER_CITATION', 'RESULT_FIELDS', 'model_card', 'tag_mismatch', 'save_hub_folder', 'push_hub_folder',
           'published_entry_source']

PAPER_CITATION = r"""@inproceedings{ye2020network,
  title     = {Network Deconvolution},
  author    = {Ye, Chengxi and Evanusa, Matthew and He, Hua and Mitrokhin, Anton and Goldstein, Tom and
               Yorke, James A. and Ferm{\"u}ller, Cornelia and Aloimonos, Yiannis},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2020},
  eprint    = {1905.11926},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/1905.11926}
}"""

# The fields of scripts/validate.py's JSON that a model card and the published entry use.
RESULT_FIELDS = ('model', 'tag', 'dataset', 'split', 'num_images', 'top1', 'top5', 'loss')

# Hugging Face dataset ids of the zoo's tags (the model card's ``datasets`` metadata).
TAG_DATASETS = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'in1k': 'imagenet-1k'}


def _validated_dataset(results: Mapping[str, Any]) -> str:
    """The validated dataset's name without timm's prefix ('torch/cifar10' -> 'cifar10')."""
    return str(results['dataset']).rsplit('/', 1)[-1].lower()


def _hub_dataset(results: Mapping[str, Any]) -> str:
    """The dataset id for the card's metadata: the tag's, else the validated dataset's name."""
    return TAG_DATASETS.get(results['tag']) or _validated_dataset(results)


# Datasets recognisable by their name in validate.py's JSON (an image folder could be anything).
NAMED_DATASETS = ('digits', 'cifar10', 'cifar100')


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def tag_mismatch(results: Mapping[str, Any], tag: str, pretrained_cfg: Mapping[str, Any]) -> Optional[str]:
    """Why weights validated as ``results`` say do not belong under ``tag`` (None if they do): a
    named dataset other than the tag's, or an input size or preprocessing (mean, std, crop, interpolation)
    other than the tag's config."""
    validated = _validated_dataset(results)
    if tag in TAG_DATASETS and validated in NAMED_DATASETS and validated != TAG_DATASETS[tag]:
        return f"validated on {results['dataset']}, but tag '{tag}' is for {TAG_DATASETS[tag]}"
    size = results.get('input_size')
    if size is not None and tuple(size) != tuple(pretrained_cfg['input_size']):
        return (f"validated at input size {tuple(size)}, but tag '{tag}' declares "
                f"{tuple(pretrained_cfg['input_size'])}")
    # The preprocessing the top-1 was measured with: the tag's config is what its users get.
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        validated, declared = results.get(key), pretrained_cfg.get(key)
        if validated is None or declared is None:
            continue
        if isinstance(declared, str):
            same = validated == declared
        else:
            validated, declared = _as_tuple(validated), _as_tuple(declared)
            same = len(validated) == len(declared) and all(
                math.isclose(a, b, rel_tol=1e-6) for a, b in zip(validated, declared))
        if not same:
            return f"validated with {key} {results[key]}, but tag '{tag}' declares {pretrained_cfg[key]}"
    return None


def _results_table(results: Mapping[str, Any]) -> str:
    return (
        '| dataset | split | images | top-1 (%) | top-5 (%) | loss |\n'
        '|---|---|---|---|---|---|\n'
        f"| {results['dataset']} | {results['split']} | {results['num_images']} | {results['top1']:.2f} "
        f"| {results['top5']:.2f} | {results['loss']:.4f} |")


def _training_section(train_command: Optional[str], train_args: Optional[Mapping[str, Any]]) -> str:
    parts = ['## Training']
    if train_command:
        parts.append(f'```bash\n{train_command}\n```')
    if train_args:
        parts.append(f'Arguments recorded in the training checkpoint:\n\n```json\n'
                     f'{json.dumps(dict(train_args), indent=1, sort_keys=True, default=str)}\n```')
    if len(parts) == 1:
        parts.append('No training command was recorded with these weights.')
    return '\n\n'.join(parts)


def model_card(model: nn.Module, repo_id: str, results: Mapping[str, Any], train_command: Optional[str] = None,
               train_args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """timm model-card dict (for ``generate_readme``) of a zoo model and its validation results."""
    cfg = model.pretrained_cfg
    name = f"{results['model']}.{results['tag']}"
    origin = cfg.get('description') or (
        'Trained with network deconvolution using deconv-zoo (`scripts/train.py`), validated with '
        '`scripts/validate.py`.')
    description = (
        f'A {results["model"]} image classifier with network deconvolution (Ye et al., ICLR 2020): every '
        f'convolution whitens its input patches (FastDeconv) and the classifier decorrelates its features.\n\n'
        f'{origin}\n\n## Results\n\n{_results_table(results)}\n\n{_training_section(train_command, train_args)}')
    num_params = sum(p.numel() for p in model.parameters())
    # The tag's name alone builds the default architecture: the call names the arguments these weights need.
    tag_args = dict(num_classes=cfg['num_classes'], in_chans=cfg['input_size'][0])
    model_args = ''.join(f', {k}={v!r}' for k, v in getattr(model, '_model_args', {}).items()
                         if k not in tag_args or tag_args[k] != v)
    return dict(
        tags=['image-classification', 'timm', 'deconv-zoo', 'network-deconvolution'],
        license=cfg.get('license') or 'mit',
        description=description,
        details={
            'Model Type': 'Image classification / feature backbone',
            'Model Stats': {'Params (M)': f'{num_params / 1e6:.1f}',
                            'Image size': 'x'.join(str(s) for s in cfg['input_size'][1:])},
            'Dataset': _hub_dataset(results),
            'Papers': {'Network Deconvolution': 'https://arxiv.org/abs/1905.11926'},
            'Original': 'https://github.com/yechengxi/deconvolution',
        },
        usage=(
            '```python\nimport timm\nimport deconv_zoo  # registers the deconv-zoo architectures with timm\n\n'
            f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
            f"# with the weights listed in deconv_zoo.weights:\n"
            f"# timm.create_model('{name}', pretrained=True{model_args})\n\n"
            '# deployment: every deconvolution folded into a plain convolution, same outputs\n'
            'from deconv_zoo.deploy import fold_deconv\ndeployed = fold_deconv(model)\n```'),
        citation=PAPER_CITATION,
    )


def _readme(card: Dict[str, Any], name: str, results: Mapping[str, Any]) -> str:
    """timm's README plus the top-1/top-5 accuracy as Hub ``model-index`` metadata."""
    readme = ModelCard(generate_readme(card, name))
    dataset = dict(task_type='image-classification', dataset_type=_hub_dataset(results),
                   dataset_name=_hub_dataset(results), dataset_split=str(results['split']))
    readme.data.model_name = name
    readme.data.eval_results = [
        EvalResult(metric_type='accuracy', metric_name='top-1 accuracy', metric_value=results['top1'], **dataset),
        EvalResult(metric_type='accuracy', metric_name='top-5 accuracy', metric_value=results['top5'], **dataset),
    ]
    return str(readme)


def save_hub_folder(
        model: nn.Module,
        output_dir: str,
        repo_id: str,
        results: Mapping[str, Any],
        train_command: Optional[str] = None,
        train_args: Optional[Mapping[str, Any]] = None,
) -> PublishedWeights:
    """Write a Hub repo folder (model.safetensors, config.json, README.md) for ``model``.

    ``results`` is scripts/validate.py's JSON for these weights (``RESULT_FIELDS``);
    ``train_command`` / ``train_args`` describe the training run for the model card. Returns the
    entry for ``deconv_zoo.weights.PUBLISHED_WEIGHTS``.
    """
    missing = [k for k in RESULT_FIELDS if k not in results]
    if missing:
        raise ValueError(f'The validation results lack {missing} (expected the JSON of scripts/validate.py).')
    model.eval()
    save_for_hf(model, output_dir, safe_serialization=True)
    name = f"{results['model']}.{results['tag']}"
    readme = _readme(model_card(model, repo_id, results, train_command, train_args), name, results)
    atomic_write_text(os.path.join(output_dir, 'README.md'), readme)
    return PublishedWeights(hf_hub_id=repo_id, top1=float(results['top1']), top5=float(results['top5']),
                            sha256=file_sha256(os.path.join(output_dir, 'model.safetensors')))


def push_hub_folder(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                    commit_message: str = 'Add deconv-zoo weights') -> str:
    """Create the Hub repo if needed and upload ``folder`` (from ``save_hub_folder``); returns the commit URL."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message).commit_url


def published_entry_source(name: str, weights: PublishedWeights) -> str:
    """The ``PUBLISHED_WEIGHTS`` entry for ``name`` ('arch.tag') as Python source to paste."""
    return (f"    '{name}': PublishedWeights(\n"
            f"        hf_hub_id='{weights.hf_hub_id}', top1={weights.top1:.2f}, top5={weights.top5:.2f},\n"
            f"        sha256='{weights.sha256}'),")
