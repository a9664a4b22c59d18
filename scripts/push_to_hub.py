#!/usr/bin/env python3
"""Publish deconv-zoo weights: a Hub repo folder (model.safetensors, config.json, model card).

    # write the folder (no network), check it, then push it
    python scripts/push_to_hub.py --checkpoint output/train/.../model_best.pth.tar \\
        --results output/validate.json --org my-lab --output-dir hub/resnet18_cifar_deconv.cifar10
    python scripts/push_to_hub.py --checkpoint ... --results ... --org my-lab

Input: a training checkpoint of scripts/train.py (its 'args' name the model) or a plain weights
file, plus the JSON that scripts/validate.py wrote for those weights: the file must be the one it
validated (sha256), and its EMA weights are published when it validated those (use_ema). The
repo is ``<org>/<model>.<tag>`` unless ``--repo-id`` says otherwise. Without ``--output-dir`` the
folder is written to a temporary directory and uploaded (needs ``hf auth login`` or HF_TOKEN).
The script prints the PUBLISHED_WEIGHTS entry to add to deconv_zoo/weights.py once the upload
is done.
"""
import argparse
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn
from huggingface_hub.errors import OfflineModeIsEnabled
from timm.models import get_arch_pretrained_cfgs

import deconv_zoo  # noqa: F401  (registers the models)
from deconv_zoo.convert import convert_reference_checkpoint, read_checkpoint
from deconv_zoo.evaluation import BAD_INPUT_ERRORS, ParseLiteralKwargs, check_model_name, folder_to_write
from deconv_zoo.hub import RESULT_FIELDS, published_entry_source, push_hub_folder, save_hub_folder, tag_mismatch
from deconv_zoo.loading import file_sha256
from deconv_zoo.weights import CONVERTED_BN_WEIGHTS, HUB_ORG_ENV, check_hub_repo_id


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.RawTextHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='training checkpoint of scripts/train.py (.pth.tar)')
    source.add_argument('--weights', help='plain state dict (.safetensors or .pth); needs --model')
    parser.add_argument('--results', required=True, help='JSON written by scripts/validate.py for these weights')
    parser.add_argument('--model', help='architecture (default: the results / checkpoint)')
    parser.add_argument('--tag', help="pretrained tag, e.g. cifar10 (default: the results' tag)")
    parser.add_argument('--ema', action='store_true',
                        help="publish the checkpoint's EMA weights (default: as the results' use_ema says)")
    parser.add_argument('--model-kwargs', nargs='*', default=None, action=ParseLiteralKwargs,
                        help="model arguments the weights were trained with, as for train.py (default: the "
                             "checkpoint's)")
    parser.add_argument('--train-command', help='the exact training command, for the model card (the checkpoint '
                                                'records only its arguments)')
    parser.add_argument('--repo-id', type=_repo_id, help='Hub repo (default: <org>/<model>.<tag>)')
    parser.add_argument('--org', default=os.environ.get(HUB_ORG_ENV), type=_org,
                        help=f'Hub organisation (default: ${HUB_ORG_ENV})')
    parser.add_argument('--output-dir', type=folder_to_write, help='write the repo folder here and do not upload')
    parser.add_argument('--private', action='store_true', help='create the Hub repo as private')
    parser.add_argument('--token', help='Hub token (default: the logged-in one)')
    return parser.parse_args(argv)


def _repo_id(text: str, checked: Optional[str] = None) -> str:
    """argparse type: a Hub repo id (``checked``: the id that stands for ``text``)."""
    try:
        check_hub_repo_id(checked or text, repr(text))
    except ValueError as e:  # argparse reports an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _org(text: str) -> str:
    """argparse type: a Hub organisation or user name."""
    return _repo_id(text, checked=f'{text}/model')


def read_results(path: str) -> Dict[str, Any]:
    """The JSON that scripts/validate.py --results-file wrote, with the fields the card and the
    published entry need (SystemExit naming the problem otherwise)."""
    try:
        with open(path, encoding='utf-8') as f:
            results = json.load(f)
    except OSError as error:
        raise SystemExit(f'--results {path}: {error.strerror or error}') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f'--results {path} is not JSON ({error}): give the file scripts/validate.py '
                         f'--results-file wrote.') from None
    if not isinstance(results, dict):
        raise SystemExit(f'--results {path} holds a JSON {type(results).__name__}, not the object scripts/validate.py '
                         f'writes.')
    missing = [field for field in RESULT_FIELDS if field not in ('model', 'tag') and field not in results]
    if missing:
        raise SystemExit(f'--results {path} lacks {", ".join(missing)}: give the file scripts/validate.py '
                         f'--results-file wrote.')
    return results


def build_model(args: argparse.Namespace, results: Dict[str, Any]) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """The model holding the weights to publish, its 'arch.tag' name and its training arguments."""
    path = args.checkpoint or args.weights
    checkpoint = read_checkpoint(path)
    if results.get('sha256') and results['sha256'] != file_sha256(path):
        raise SystemExit(f'{args.results} was written for another file (sha256 {results["sha256"]}), not {path}.')
    # scripts/train.py records its arguments as a dict, timm's train.py as a Namespace.
    recorded = checkpoint.get('args')
    train_args = vars(recorded) if isinstance(recorded, argparse.Namespace) else dict(recorded or {})
    arch = args.model or results.get('model') or train_args.get('model')
    tag = args.tag or results.get('tag')
    if not arch or not tag:
        raise SystemExit('Name the architecture and tag (--model, --tag) or use the results of scripts/validate.py.')
    check_model_name(arch)
    tags = [n.split('.', 1)[1] for n in get_arch_pretrained_cfgs(arch)]
    if tag not in tags:  # timm's create_model raised it as a traceback
        raise SystemExit(f"{arch} has no pretrained tag '{tag}'; its tags: {', '.join(tags) or 'none'}. A tag names "
                         f"the training dataset, and with it the class count and data config that users get.")
    bn_source = CONVERTED_BN_WEIGHTS.get(f'{arch}.{tag}')
    if bn_source:
        # That name always loads timm's weights (weights.hub_repo_id): weights pushed under it would be
        # unreachable by it, and their card would describe timm's weights.
        own_tags = [t for t in tags if f'{arch}.{t}' not in CONVERTED_BN_WEIGHTS]
        raise SystemExit(f"tag '{tag}' of {arch} loads timm's batch-norm weights {bn_source}, converted on load, "
                         f"under any organisation: publish deconv-trained weights under {' or '.join(own_tags)} "
                         f"(--tag {own_tags[0]}).")
    if train_args.get('model', arch) != arch:
        raise SystemExit(f"The checkpoint was trained as {train_args['model']}, not {arch}.")
    model_kwargs = args.model_kwargs if args.model_kwargs is not None else dict(train_args.get('model_kwargs') or {})
    use_ema = bool(results.get('use_ema', args.ema))  # publish exactly the weights that were validated
    if args.ema and not use_ema:
        raise SystemExit(f'--ema, but {args.results} was measured on the non-EMA weights.')
    if use_ema and 'state_dict_ema' not in checkpoint:
        raise SystemExit(f'{path} holds no EMA weights (state_dict_ema).')
    model, report = convert_reference_checkpoint(checkpoint['state_dict_ema'] if use_ema else checkpoint,
                                                 f'{arch}.{tag}', **model_kwargs)
    cfg = model.pretrained_cfg
    if model.num_classes != cfg['num_classes']:
        raise SystemExit(f"The weights have {model.num_classes} classes; tag '{tag}' of {arch} declares "
                         f"{cfg['num_classes']}: publish them under a tag of the right dataset.")
    mismatch = tag_mismatch(results, tag, cfg)
    if mismatch:
        raise SystemExit(f'{mismatch}: users of {arch}.{tag} would get a data config that does not fit the weights.')
    print(f'{arch}.{tag}: {report.describe()}')
    return model, f'{arch}.{tag}', train_args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    results = read_results(args.results)
    if not args.repo_id and not args.org:
        raise SystemExit(f'Give --repo-id or --org (or set {HUB_ORG_ENV}).')
    model, name, train_args = build_model(args, results)
    results = dict(results, model=name.split('.')[0], tag=name.split('.', 1)[1])
    repo_id = args.repo_id or f'{args.org}/{name}'
    if args.output_dir:
        weights = save_hub_folder(model, args.output_dir, repo_id, results, args.train_command, train_args)
        print(f'Wrote {args.output_dir} for {repo_id}; upload it by running this command without --output-dir.')
    else:
        with tempfile.TemporaryDirectory() as folder:
            weights = save_hub_folder(model, folder, repo_id, results, args.train_command, train_args)
            print(f'Uploaded: {push_hub_folder(folder, repo_id, token=args.token, private=args.private)}')
    print('Entry for PUBLISHED_WEIGHTS in deconv_zoo/weights.py:')
    print(published_entry_source(name, weights))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except BAD_INPUT_ERRORS as e:  # the input's fault: its message, no traceback
        sys.exit(f'{type(e).__name__}: {e}')
    except OfflineModeIsEnabled as e:
        sys.exit(f'Not uploaded: the Hub is switched off here ({e}). Write the folder with --output-dir, '
                 f'or unset HF_HUB_OFFLINE on a machine with network access.')
