#!/usr/bin/env python3
"""Validate a model: top-1, top-5, loss and images/s, printed as a table and written as JSON.

    python scripts/validate.py --model resnet18_cifar_deconv --checkpoint output/train/run/model_best.pth.tar
    python scripts/validate.py --model resnet50_deconv --pretrained --dataset folder --data-dir /imagenet
    python scripts/validate.py --model resnet18_cifar_deconv --checkpoint model.safetensors \\
        --dataset torch/cifar10 --data-dir ~/data --results-file results.json

The weights come from the published tag (--pretrained), a training checkpoint or a safetensors
file (--checkpoint). Images are prepared with timm's eval transform from the model's pretrained
config, except that a training checkpoint's recorded input size, mean, std, interpolation and
crop fraction are used where the command line does not set them (a model trained at 16x16 is
validated at 16x16), as are its class count, input channels and --model-kwargs for building the
model; unreadable or corrupt images are skipped, counted and named in the log.
The JSON (read by the publishing script) holds model, tag, dataset, split, num_images,
num_skipped, top1, top5, loss, img_per_sec, checkpoint and its sha256.
"""
import argparse
import json
import logging
import os
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional

import torch
from timm.utils import setup_default_logging

import deconv_zoo  # noqa: F401  (registers the zoo's models with timm)
from deconv_zoo.data import (
    DIGITS, SPLITS, ShardSampler, SkipUnreadable, collate_readable, create_data_loader,
    create_image_dataset, dataset_num_classes, fixed_interpolation, resolve_input_config, set_image_transform,
)
from deconv_zoo.evaluation import (
    INTERPOLATIONS, add_model_arguments, check_device, check_input_size, check_model_and_dataset, check_num_classes,
    checkpoint_entries, crop_fraction, evaluate, file_to_write, is_unset, model_from_args, non_negative_int,
    positive_int, run_script, training_arguments,
)
from deconv_zoo.files import atomic_write_text
from deconv_zoo.loading import file_sha256

_logger = logging.getLogger('validate')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)  # --num-classes defaults to the dataset's class count here
    parser.add_argument('--tag', default=None, help='tag reported in the results (default: the model\'s pretrained tag)')
    parser.add_argument('--img-size', type=positive_int, default=None,
                        help='input height = width (default: the training checkpoint\'s, else the model\'s)')
    parser.add_argument('--input-size', type=positive_int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help='full input size')
    parser.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean (default: model)')
    parser.add_argument('--std', type=float, nargs='+', default=None, help='normalisation std (default: model)')
    parser.add_argument('--interpolation', default='', choices=('', *INTERPOLATIONS),
                        help='resize interpolation (default: model)')
    parser.add_argument('--crop-pct', type=crop_fraction, default=None, help='centre-crop fraction (default: model)')
    parser.add_argument('--dataset', default=DIGITS,
                        help='digits (embedded), folder (ImageNet layout in --data-dir) or a timm dataset '
                             'read from a local copy, e.g. torch/cifar10')
    parser.add_argument('--data-dir', default=None, help='dataset root')
    parser.add_argument('--split', default='validation', choices=SPLITS,
                        help='split to evaluate (train or validation; val and test name the validation split)')
    parser.add_argument('--limit', type=positive_int, default=None, help='evaluate only the first N images')
    parser.add_argument('--batch-size', '-b', type=positive_int, default=256, help='batch size')
    parser.add_argument('--workers', type=non_negative_int, default=4, help='loader processes (image datasets only)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'), help='AMP dtype')
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    parser.add_argument('--results-file', default='', type=file_to_write, help='write the results as JSON here')
    return parser


def format_table(results: Dict[str, Any]) -> str:
    """The results as a two-column text table."""
    rows = [(key, f'{value:.4f}' if isinstance(value, float) else str(value)) for key, value in results.items()]
    width = max(len(key) for key, _ in rows)
    return '\n'.join(f'{key:<{width}}  {value}' for key, value in rows)


def use_training_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """Fill the model and data-config arguments not given from those the training checkpoint
    records (--img-size and --input-size count as one: either given, neither is taken; a
    non-empty --model-kwargs replaces the recorded ones whole); returns those taken."""
    recorded = training_arguments(args.checkpoint) if args.checkpoint else {}
    if args.img_size is not None or args.input_size is not None:
        recorded.pop('img_size', None)
        input_size = recorded.pop('input_size', None)
        if input_size and args.input_size is None:  # --img-size changes the size, not the channels
            recorded.setdefault('in_chans', input_size[0])
    taken = {key: value for key, value in recorded.items() if is_unset(getattr(args, key))}
    if taken:
        vars(args).update(taken)
        _logger.info('as recorded in the training checkpoint: '
                     + ', '.join(f'{key} {value}' for key, value in taken.items()))
    return taken


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Validate; returns (and optionally writes) the results dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_and_dataset(parser, args)
    check_device(parser, args.device)
    setup_default_logging()
    device = torch.device(args.device)

    # An image folder is labelled as the model was trained (timm numbers each folder's classes on its own).
    class_names = checkpoint_entries(args.checkpoint).get('class_names') if args.checkpoint else None
    dataset = create_image_dataset(args.dataset, args.data_dir, args.split, limit=args.limit, class_names=class_names)
    recorded = use_training_arguments(args)  # before the model: how it was built may be recorded
    check_num_classes(args.num_classes, dataset,
                      'num_classes (recorded in the checkpoint)' if 'num_classes' in recorded else '--num-classes')
    model = model_from_args(args, num_classes=dataset_num_classes(dataset))
    input_config = resolve_input_config(model, vars(args))
    check_input_size(model, input_config['input_size'])
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    set_image_transform(dataset, input_config, is_training=False)
    readable = SkipUnreadable(dataset)
    workers = 0 if args.dataset == DIGITS else args.workers
    loader = create_data_loader(readable, args.batch_size, ShardSampler(readable), workers,
                                pin_memory=device.type == 'cuda', collate_fn=collate_readable)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    metrics = evaluate(model, loader, device, amp_autocast, args.channels_last)

    architecture = args.model.split('.', 1)[0]
    results = dict(
        model=architecture,
        tag=args.tag or model.pretrained_cfg.get('tag'),
        dataset=args.dataset,
        split=args.split,
        num_images=metrics['num_images'],
        num_skipped=len(dataset) - metrics['num_images'],
        top1=round(metrics['top1'], 4),
        top5=round(metrics['top5'], 4),
        loss=round(metrics['loss'], 6),
        img_per_sec=round(metrics['img_per_sec'], 2),
        checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
        sha256=file_sha256(args.checkpoint) if args.checkpoint else None,
        pretrained=args.pretrained,
        use_ema=args.use_ema,
        input_size=list(input_config['input_size']),
        mean=list(input_config['mean']),
        std=list(input_config['std']),
        crop_pct=input_config['crop_pct'],
        interpolation=fixed_interpolation(input_config['interpolation']),  # the one evaluated with
        param_count=sum(p.numel() for p in model.parameters()),
        batch_size=args.batch_size,
        device=str(device),
    )
    if results['num_skipped']:
        _logger.warning(f'{results["num_skipped"]} unreadable image(s) skipped (named above)')
    print(format_table(results))
    if args.results_file:
        atomic_write_text(args.results_file, json.dumps(results, indent=2))
        _logger.info(f'results written to {args.results_file}')
    return results


if __name__ == '__main__':
    run_script(main, 'validate')
