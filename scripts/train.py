#!/usr/bin/env python3
"""Train any timm model (the zoo's deconvolution models or timm's own BN baselines).

    python scripts/train.py                                    # resnet18_cifar_deconv on the embedded digits
    python scripts/train.py --model resnet18_cifar --epochs 5  # its batch-norm twin
    python scripts/train.py --dataset torch/cifar10 --data-dir ~/data --recipe cifar
    torchrun --nproc_per_node 8 scripts/train.py --model resnet50_deconv --dataset folder \\
        --data-dir /imagenet --batch-size 32 --sync-deconv --amp    # paper ImageNet recipe, 8 x 32 = 256

A recipe (the paper's CIFAR or ImageNet settings, or the short digits run) sets the defaults of
the optimisation and augmentation flags; any flag given on the command line wins. The run
folder gets summary.csv, args.json, optional TensorBoard logs and the checkpoints last.pth.tar,
model_best.pth.tar and checkpoint-<epoch>.pth.tar. ``--resume auto`` continues a killed run
exactly where its last checkpoint left it; the learning-rate schedule is the one the given
arguments define, so a resume with a larger --epochs continues a finished run on the longer
schedule (as timm's train.py does). Bad arguments and checkpoints that do not fit end the script
with a one-line error before any of the run's files are written. Unreadable images are named in
the log: training takes the next image in place of one (as timm does), validation skips them (as
scripts/validate.py does).
"""
import argparse
import json
import logging
import math
import os
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import create_classification_loss
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (ModelEmaV3, NativeScaler, init_distributed_device, random_seed,
                        setup_default_logging, update_summary)

import deconv_zoo  # noqa: F401  (registers the zoo's models with timm)
from deconv_zoo.data import (
    DIGITS, FOLDER_NAMES, SYNTHETIC, PerSampleSeed, ResumableSampler, ShardSampler, SkipUnreadable, collate_readable,
    create_data_loader, create_image_dataset, dataset_class_names, dataset_num_classes, resolve_input_config,
    set_image_transform, splits_share_images,
)
from deconv_zoo.distributed import average_buffers, convert_sync_deconv
from deconv_zoo.evaluation import (
    INTERPOLATIONS, ParseLiteralKwargs, check_device, check_input_size, check_model_and_dataset, check_num_classes,
    create_model_with_weights, crop_fraction, evaluate, folder_to_write, input_channels, non_negative_float,
    non_negative_int, positive_float, positive_int, probability, proper_fraction, run_script, with_model_kwargs,
)
from deconv_zoo.files import atomic_write_text
from deconv_zoo.training import LAST, RECIPES, CheckpointManager, Trainer, TrainingStopped, TrainPosition, resolve_resume

_logger = logging.getLogger('train')


def default_recipe(dataset: str) -> str:
    """The recipe a dataset implies: digits/synthetic -> digits, CIFAR -> cifar, else imagenet."""
    if dataset in (DIGITS, SYNTHETIC):
        return 'digits'
    return 'cifar' if 'cifar' in dataset else 'imagenet'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_note = ' [recipe: %(default)s]'

    group = parser.add_argument_group('recipe')
    group.add_argument('--recipe', choices=sorted(RECIPES), default=None,
                       help='paper settings to start from: cifar (Table 1), imagenet (Table 2) or digits '
                            '(short CIFAR recipe); default: from --dataset (digits/synthetic: digits, '
                            'torch/cifar*: cifar, folders: imagenet)')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='resnet18_cifar_deconv', help='any timm or deconv-zoo model name')
    group.add_argument('--pretrained', action='store_true', help='start from the published weights')
    group.add_argument('--initial-checkpoint', default='', help='weights to start from (not a resume)')
    group.add_argument('--num-classes', type=positive_int, default=None, help='default: the dataset\'s class count')
    group.add_argument('--in-chans', type=positive_int, default=None, help='input channels (default: the model\'s)')
    group.add_argument('--img-size', type=positive_int, default=None,
                       help='input height = width (default: the model\'s)')
    group.add_argument('--input-size', type=positive_int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help='full input size, overrides --img-size and --in-chans')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseLiteralKwargs,
                       help='extra create_model arguments (Python literals), e.g. deconv_cfg="{\'block\': 16}"')
    group.add_argument('--drop', type=proper_fraction, default=None, help='classifier dropout rate')
    group.add_argument('--drop-path', type=proper_fraction, default=None, help='stochastic depth rate (timm models)')

    group = parser.add_argument_group('data')
    group.add_argument('--dataset', default=DIGITS,
                       help='digits (embedded), synthetic (smoke tests), folder (ImageNet layout in --data-dir) '
                            'or a timm dataset read from a local copy, e.g. torch/cifar10')
    group.add_argument('--data-dir', default=None, help='dataset root (folders, CIFAR copies)')
    group.add_argument('--train-limit', type=positive_int, default=None, help='use only the first N training samples')
    group.add_argument('--val-limit', type=positive_int, default=None, help='use only the first N validation samples')
    group.add_argument('--synthetic-size', type=positive_int, default=512, help='synthetic training samples')
    group.add_argument('--workers', type=non_negative_int, default=4, help='loader processes (image datasets only)')
    group.add_argument('--pin-mem', action='store_true', help='pin loader memory (GPU)')
    group.add_argument('--mean', type=float, nargs='+', default=None, help='normalisation mean (default: model)')
    group.add_argument('--std', type=float, nargs='+', default=None, help='normalisation std (default: model)')
    group.add_argument('--interpolation', default='', choices=('', *INTERPOLATIONS, 'random'),
                       help='resize interpolation (default: model; random: one per training image, bilinear in eval)')
    group.add_argument('--crop-pct', type=crop_fraction, default=None,
                       help='eval centre-crop fraction (default: model)')
    group.add_argument('--batch-size', '-b', type=positive_int, help='batch size per process' + recipe_note)
    group.add_argument('--validation-batch-size', type=positive_int, default=None, help='default: --batch-size')
    group.add_argument('--drop-last', action='store_true',
                       help='drop the last incomplete training batch (always with mixup/cutmix)')

    group = parser.add_argument_group('augmentation')
    group.add_argument('--crop-padding', type=int,
                       help='>0: random crop of the image padded by N pixels (the CIFAR recipe), else '
                            'timm\'s random-resized crop' + recipe_note)
    group.add_argument('--hflip', type=probability, help='horizontal flip probability' + recipe_note)
    group.add_argument('--scale', type=float, nargs=2, default=None, help='random-resized-crop area range')
    group.add_argument('--ratio', type=float, nargs=2, default=None, help='random-resized-crop aspect range')
    group.add_argument('--color-jitter', type=non_negative_float, help='colour jitter strength' + recipe_note)
    group.add_argument('--aa', default=None, help='timm auto-augment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=probability, default=0.0, help='random erasing probability')
    group.add_argument('--remode', default='pixel', choices=('pixel', 'rand', 'const'), help='random erasing mode')
    group.add_argument('--recount', type=positive_int, default=1, help='random erasing count')
    group.add_argument('--mixup', type=non_negative_float, default=0.0, help='mixup alpha (>0 enables)')
    group.add_argument('--cutmix', type=non_negative_float, default=0.0, help='cutmix alpha (>0 enables)')
    group.add_argument('--mixup-prob', type=probability, default=1.0, help='probability of mixup/cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=probability, default=0.5, help='cutmix instead of mixup when both')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='mixup granularity')
    group.add_argument('--smoothing', type=proper_fraction, default=0.0, help='label smoothing')

    group = parser.add_argument_group('optimisation')
    group.add_argument('--opt', help='timm optimizer name (momentum = classical SGD)' + recipe_note)
    group.add_argument('--lr', type=non_negative_float, help='learning rate' + recipe_note)
    group.add_argument('--momentum', type=non_negative_float, help='optimizer momentum' + recipe_note)
    group.add_argument('--weight-decay', type=non_negative_float, help='weight decay' + recipe_note)
    group.add_argument('--filter-bias-and-bn', action=argparse.BooleanOptionalAction,
                       help='exempt biases and norm weights from weight decay (the paper does not)' + recipe_note)
    group.add_argument('--clip-grad', type=positive_float, default=None, help='gradient clipping threshold')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'), help='gradient clipping mode')
    group.add_argument('--sched', help='timm scheduler name' + recipe_note)
    group.add_argument('--epochs', type=positive_int, help='training epochs' + recipe_note)
    group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction,
                       help='update the learning rate every step (the paper) instead of every epoch' + recipe_note)
    group.add_argument('--min-lr', type=non_negative_float, help='final learning rate' + recipe_note)
    group.add_argument('--warmup-epochs', type=non_negative_int, help='linear warm-up epochs' + recipe_note)
    group.add_argument('--warmup-lr', type=non_negative_float, default=1e-5, help='warm-up start learning rate')
    group.add_argument('--decay-epochs', type=positive_float, default=90, help='--sched step: epochs between decays')
    group.add_argument('--decay-milestones', type=positive_int, nargs='+', default=[90, 180, 270],
                       help='--sched multistep: the epochs that start with a decay, counted from 1 (timm)')
    group.add_argument('--decay-rate', type=positive_float, default=0.1,
                       help='--sched step / multistep: the factor of each decay')
    group.add_argument('--max-steps', type=positive_int, default=None,
                       help='stop after this many optimizer steps in total (smoke tests)')

    group = parser.add_argument_group('precision and speed')
    group.add_argument('--amp', action='store_true', help='automatic mixed precision (statistics stay float32)')
    group.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'), help='AMP dtype')
    group.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    group.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                       help='torch.compile the model (default backend: inductor)')
    group.add_argument('--model-ema', action='store_true',
                       help='keep an EMA of the weights (timm ModelEmaV3); validation and best use it')
    group.add_argument('--model-ema-decay', type=probability, default=0.9998, help='EMA decay')
    group.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warm-up')
    group.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on the CPU')

    group = parser.add_argument_group('distributed (launch with torchrun)')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device')
    group.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    group.add_argument('--dist-url', default='env://', help='process group init URL')
    group.add_argument('--sync-deconv', action='store_true',
                       help='deconvolution statistics over the global batch (convert_sync_deconv)')
    group.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm for BN models')

    group = parser.add_argument_group('output and checkpoints')
    group.add_argument('--output', default='output/train', type=folder_to_write,
                       help='parent folder of the run folders')
    group.add_argument('--experiment', default='',
                       help='run folder name (default: <model>-<dataset>; for --dataset folder, the folder\'s name)')
    group.add_argument('--resume', default='',
                       help='checkpoint to continue from, or "auto": the run folder\'s last.pth.tar if present')
    group.add_argument('--checkpoint-every', type=non_negative_int, default=0,
                       help='also keep checkpoint-<epoch> every N epochs')
    group.add_argument('--checkpoint-steps', type=non_negative_int, default=0,
                       help='also write last.pth.tar every N steps within an epoch (preemptible jobs)')
    group.add_argument('--seed', type=non_negative_int, default=0, help='random seed (data order, initialisation)')
    group.add_argument('--log-tensorboard', action='store_true', help='TensorBoard logs in <run>/tensorboard')
    group.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse in two passes: the recipe (explicit, or implied by --dataset) supplies the defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--recipe', default=None)
    pre.add_argument('--dataset', default=DIGITS)
    known, _ = pre.parse_known_args(argv)
    recipe = known.recipe or default_recipe(known.dataset)
    parser = build_parser()
    if recipe not in RECIPES:
        parser.error(f'--recipe: choose from {sorted(RECIPES)}')
    parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args(argv)
    args.recipe = recipe
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the arguments alone decide, checked before anything is loaded or written."""
    check_model_and_dataset(parser, args)
    check_device(parser, args.device)
    _check_augmentation(parser, args)
    if args.compile and args.compile not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(f'--compile {args.compile}: not a torch.compile backend here '
                     f'(torch._dynamo.list_backends(): {", ".join(torch._dynamo.list_backends())})')
    if args.resume and args.resume != 'auto' and not os.path.isfile(args.resume):
        parser.error(f'--resume: no checkpoint at {args.resume!r}')
    if args.sync_bn and int(os.environ.get('WORLD_SIZE', 1)) > 1 and torch.device(args.device).type == 'cpu':
        # torch's SyncBatchNorm raises at the first step on CPU, after the run folder is written.
        parser.error('--sync-bn: torch.nn.SyncBatchNorm does not run on CPU; leave it out (batch-norm statistics '
                     'are averaged over the processes at each epoch end)')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:  # timm asserts it at the first step
        parser.error(f'--batch-size {args.batch_size}: mixup and cutmix pair the images of a batch, so it must be even')
    if args.sched == 'plateau' and args.sched_on_updates:  # timm asserts it when the scheduler is built
        parser.error('--sched plateau steps once per epoch: add --no-sched-on-updates')
    # timm checks the optimizer's and scheduler's names and values only when it builds them, after the
    # datasets and the model: build both for a stand-in model now.
    try:
        optimizer = create_optimizer(args, nn.Linear(1, 1))
    except ValueError as error:
        parser.error(f'--opt {args.opt}: {error}')
    try:
        create_scheduler(args, optimizer, updates_per_epoch=1)
    except ValueError as error:
        parser.error(f'--sched {args.sched}: {error}')


def _check_augmentation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The random-resized-crop ranges and timm's augmentation options, which timm checks only when
    it builds or first applies the transform (after the run folder is written)."""
    for option, bounds, high in (('scale', args.scale, 1.0), ('ratio', args.ratio, math.inf)):
        if bounds and not (0 < bounds[0] <= bounds[1] <= high):
            allowed = '0 < MIN <= MAX <= 1' if high == 1 else '0 < MIN <= MAX'
            parser.error(f'--{option} {bounds[0]:g} {bounds[1]:g}: need {allowed}')
    if args.aa:
        from timm.data import create_transform

        try:
            create_transform(32, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as error:
            parser.error(f'--aa {args.aa}: not a timm auto-augment policy ({error or type(error).__name__})')


def create_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the arguments describe, for ``model``."""
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, filter_bias_and_bn=args.filter_bias_and_bn)


def create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer,
                     updates_per_epoch: int) -> Tuple[Any, int]:
    """The learning-rate scheduler the arguments describe and the number of epochs it runs."""
    return create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch,
        decay_epochs=args.decay_epochs, decay_milestones=args.decay_milestones, decay_rate=args.decay_rate)


def _dataset_name(args: argparse.Namespace) -> str:
    """The dataset part of the default run folder's name: an image folder's own name, so that two
    folder datasets do not share one run folder (and --resume auto another dataset's checkpoint)."""
    if args.dataset in FOLDER_NAMES and args.data_dir:
        return os.path.basename(os.path.abspath(args.data_dir)) or 'folder'
    return os.path.basename(args.dataset.rstrip('/')) or 'folder'


def _run_folder(args: argparse.Namespace, primary: bool) -> str:
    """The run folder, decided on rank 0 and shared: the resumed checkpoint's folder for
    --resume PATH, <output>/<experiment> for --resume auto, else a fresh one (suffix -1, -2, ...
    when that name already holds a checkpoint, as timm's ``get_outdir`` numbers them). Not created
    here: a start that fails leaves no empty folder."""
    folder = None
    if primary:
        name = args.experiment or f'{args.model}-{_dataset_name(args)}'
        if args.resume and args.resume != 'auto' and not args.experiment:
            folder = os.path.dirname(os.path.abspath(args.resume))
        else:
            folder = os.path.join(args.output, name)
            if not args.resume and os.path.isfile(os.path.join(folder, LAST)):
                count = 1
                while os.path.exists(f'{folder}-{count}'):
                    count += 1
                folder = f'{folder}-{count}'
    if args.distributed:
        shared = [folder]
        dist.broadcast_object_list(shared, src=0)
        folder = shared[0]
    return folder


def _prune_summary(path: str, next_epoch: int) -> None:
    """Drop summary rows of the epochs this run will (re)do: written before a kill, after the last
    checkpoint (or before the first)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = lines[:1] + [line for line in lines[1:] if int(float(line.split(',', 1)[0])) < next_epoch]
    atomic_write_text(path, ''.join(kept))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns the final validation metrics with best_top1, best_epoch and the run folder."""
    args = parse_args(argv)
    setup_default_logging()
    device = init_distributed_device(args)
    primary = args.rank == 0
    random_seed(args.seed, args.rank)
    try:
        return _train(args, device, primary)
    finally:
        if args.distributed:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, primary: bool) -> Dict[str, Any]:
    train_set = create_image_dataset(args.dataset, args.data_dir, 'train', limit=args.train_limit,
                                     num_classes=args.num_classes, synthetic_size=args.synthetic_size, seed=args.seed)
    val_set = create_image_dataset(args.dataset, args.data_dir, 'validation', limit=args.val_limit,
                                   num_classes=args.num_classes, synthetic_size=args.synthetic_size, seed=args.seed)
    if primary and args.warmup_epochs and args.warmup_epochs >= args.epochs:
        _logger.warning(f'--warmup-epochs {args.warmup_epochs} is not less than --epochs {args.epochs}: the learning '
                        f'rate never reaches --lr {args.lr}')
    if primary and splits_share_images(args.dataset, args.data_dir):
        _logger.warning(f'{args.data_dir} has no train/ and val/ folders: both splits are its images, so the '
                        f'validation scores the training images (hold some out in val/ for a real one)')
    check_num_classes(args.num_classes, train_set)
    num_classes = args.num_classes or dataset_num_classes(train_set)
    options = dict(num_classes=num_classes, in_chans=input_channels(args), drop_rate=args.drop,
                   drop_path_rate=args.drop_path)
    model = create_model_with_weights(args.model, pretrained=args.pretrained, checkpoint=args.initial_checkpoint,
                                      **with_model_kwargs(options, args.model_kwargs))
    input_config = resolve_input_config(model, vars(args))
    aug = dict(hflip=args.hflip, scale=args.scale, ratio=args.ratio, color_jitter=args.color_jitter,
               auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
               crop_padding=args.crop_padding)
    set_image_transform(train_set, input_config, is_training=True, **aug)
    set_image_transform(val_set, input_config, is_training=False)
    if primary:
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
                     f'{num_classes} classes, input {input_config["input_size"]}, recipe {args.recipe}, '
                     f'{args.world_size} process(es) x batch {args.batch_size} on {device}')

    if args.sync_deconv:
        convert_sync_deconv(model)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    in_memory = args.dataset in (DIGITS, SYNTHETIC)
    workers = 0 if in_memory else args.workers
    mixup_active = args.mixup > 0 or args.cutmix > 0
    drop_last = args.drop_last or mixup_active  # timm's Mixup needs even batches
    # Unreadable images are named in the log. Training takes the next image in place of one (timm's
    # behaviour, a function of the index, so batches keep their size and a resume stays exact);
    # validation skips it, as validate.py does, so that no image counts twice.
    train_set = PerSampleSeed(SkipUnreadable(train_set, substitute=True), args.seed)
    sampler = ResumableSampler(train_set, args.world_size, args.rank, shuffle=True, seed=args.seed,
                               drop_last=drop_last)
    # One blank image tells whether the model takes the input size, and how many images a training
    # batch needs: a whitening needs two samples and batch norm two values per channel (fewer raise),
    # too many for a batch of one image in Delinear, ChannelDeconv or batch norm on 1x1 maps, and more
    # where layers subsample small maps (SENet-18's SE gates: 10; synced layers, converted above, count
    # every process' batch). A last batch short of that is dropped, as timm's loaders drop every incomplete one.
    min_batch, needing = check_input_size(model, input_config['input_size'])
    if args.batch_size < min_batch:
        build_parser().error(
            f'--batch-size {args.batch_size} is too small for {args.model} at input {input_config["input_size"]}: '
            f'{needing} needs {min_batch} images per training batch (per process) for two samples in its statistics')
    drop_last_batch = drop_last or 0 < len(sampler) % args.batch_size < max(min_batch, 2)
    train_loader = create_data_loader(train_set, args.batch_size, sampler, workers, args.pin_mem,
                                      drop_last=drop_last_batch)
    val_set = SkipUnreadable(val_set)
    val_loader = create_data_loader(val_set, args.validation_batch_size or args.batch_size,
                                    ShardSampler(val_set, args.world_size, args.rank), workers, args.pin_mem,
                                    collate_fn=collate_readable)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:  # only drop_last leaves none; the scheduler and the epoch loop need steps
        build_parser().error(
            f'no training step per epoch: {len(train_set)} training samples give {len(sampler)} per process '
            f'({args.world_size} process(es)), fewer than one batch of {args.batch_size}, and the incomplete batch '
            f'is dropped (--drop-last, mixup/cutmix, or one smaller than the {max(min_batch, 2)} images a batch needs); '
            f'lower --batch-size')
    if primary and args.batch_size > len(sampler):  # the recipe's learning rate is meant for full batches
        _logger.warning(f'--batch-size {args.batch_size} is more than the {len(sampler)} training samples per '
                        f'process: each epoch is one step of {len(sampler)}')

    optimizer = create_optimizer(args, model)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    # bfloat16 has float32's range: only float16 needs loss scaling.
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)
    scheduler, num_epochs = create_scheduler(args, optimizer, steps_per_epoch)

    run_folder = _run_folder(args, primary)
    summary_csv = os.path.join(run_folder, 'summary.csv')
    checkpoints = CheckpointManager(
        run_folder, model, optimizer, scheduler, loss_scaler, model_ema, args=vars(args), arch=args.model,
        every_epochs=args.checkpoint_every, distributed=args.distributed, is_primary=primary,
        steps_per_epoch=steps_per_epoch, class_names=dataset_class_names(train_set))
    criterion = create_classification_loss(smoothing=args.smoothing, soft_targets=mixup_active)
    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                         num_classes=num_classes)

    train_model = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None)
    if args.compile:
        # Static shapes: the deconvolution layers branch on shapes, so a dynamic graph would recompile
        # for every new batch size anyway.
        train_model = torch.compile(train_model, backend=args.compile, dynamic=False)
    trainer = Trainer(
        train_model, optimizer, criterion.to(device), device, checkpoints, scheduler=scheduler,
        loss_scaler=loss_scaler, amp_autocast=amp_autocast, model_ema=model_ema, mixup_fn=mixup_fn,
        clip_grad=args.clip_grad, clip_mode=args.clip_mode, channels_last=args.channels_last,
        checkpoint_steps=args.checkpoint_steps, max_steps=args.max_steps, distributed=args.distributed,
        show_progress=primary and not args.no_progress)

    position = TrainPosition()
    resume_path = resolve_resume(args.resume, run_folder)
    if resume_path:
        # Last: restores the RNG states, after everything above has drawn its random numbers.
        position = checkpoints.load(resume_path, args.rank, args.world_size)
        if primary:
            _logger.info(f'resumed from {resume_path}: epoch {position.epoch}, step {position.step_in_epoch} '
                         f'of {steps_per_epoch}, global step {position.global_step}')
    elif primary:
        _logger.info(f'run folder: {run_folder}')
    if primary:  # also without a checkpoint: a kill before the first one can leave a row of epoch 0
        _prune_summary(summary_csv, position.epoch)

    tensorboard = None
    if primary:  # after the resume: a checkpoint that fails to load leaves the run's record as it was
        try:
            os.makedirs(run_folder, exist_ok=True)
        except OSError as error:
            build_parser().error(f'--output {args.output}: cannot create the run folder {run_folder} ({error})')
        atomic_write_text(os.path.join(run_folder, 'args.json'), json.dumps(vars(args), indent=2, default=str))
        if args.log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tensorboard = SummaryWriter(os.path.join(run_folder, 'tensorboard'))
    if primary and (position.epoch >= num_epochs or trainer.reached_max_steps(position)):
        limit = f'--epochs {num_epochs}' if position.epoch >= num_epochs else f'--max-steps {args.max_steps}'
        _logger.info(f'{run_folder} is already complete ({limit}, global step {position.global_step}), '
                     f'nothing to train{_best_note(checkpoints)}')

    eval_metrics: Dict[str, float] = {}
    for epoch in range(position.epoch, num_epochs):
        if trainer.reached_max_steps(position):
            break
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=position.step_in_epoch * args.batch_size)
        train_metrics = trainer.train_epoch(train_loader, position, steps_per_epoch)
        epoch_done = position.step_in_epoch >= steps_per_epoch
        if args.distributed:
            # Per-process running statistics (batch norm beside synced deconvolutions too) -> one set
            # for eval and checkpoints; averaging the synced ones, equal on every process, keeps them equal.
            # A run stopped mid-epoch (--max-steps) takes rank 0's instead, as DDP's next forward would
            # have: its checkpoint then resumes exactly as the run would have gone on.
            average_buffers(model, average=epoch_done)
            if model_ema is not None:  # each process's EMA followed its own statistics
                average_buffers(model_ema.module, average=epoch_done)
        eval_metrics = evaluate(model, val_loader, device, amp_autocast, args.channels_last, args.distributed)
        if model_ema is not None:
            eval_metrics = evaluate(model_ema.module, val_loader, device, amp_autocast, args.channels_last,
                                    args.distributed)
        skipped = len(val_set) - eval_metrics['num_images']
        if primary and skipped:
            _logger.warning(f'validation: {skipped} unreadable image(s) skipped (named above)')
        lr = optimizer.param_groups[0]['lr']
        if primary:
            # Throughput is left out (it depends on the interruption). After a mid-epoch resume the
            # epoch's train_loss covers only the steps run since; the validation columns are those
            # of the uninterrupted run.
            eval_summary = {key: eval_metrics[key] for key in ('top1', 'top5', 'loss')}
            update_summary(epoch, train_metrics, eval_summary, summary_csv, lr=lr,
                           write_header=not os.path.isfile(summary_csv))
            if tensorboard is not None:
                for key, value in {**{f'train/{k}': v for k, v in train_metrics.items()},
                                   **{f'val/{k}': v for k, v in eval_metrics.items()}, 'lr': lr}.items():
                    tensorboard.add_scalar(key, value, epoch)
        if epoch_done:
            position = TrainPosition(epoch + 1, 0, position.global_step)
            scheduler.step(epoch + 1, eval_metrics['top1'])  # before saving: the checkpoint holds the stepped state
            checkpoints.save_epoch(position, eval_metrics['top1'])
        else:  # stopped by --max-steps mid-epoch
            checkpoints.save_step(position)
        if primary:
            _logger.info(
                f'epoch {epoch + 1}/{num_epochs}  step {position.global_step}  train_loss {train_metrics["loss"]:.4f}  '
                f'val_top1 {eval_metrics["top1"]:.2f}  val_top5 {eval_metrics["top5"]:.2f}  '
                f'val_loss {eval_metrics["loss"]:.4f}  lr {lr:.4g}')
    if tensorboard is not None:
        tensorboard.close()
    result = dict(eval_metrics, best_top1=checkpoints.best_metric, best_epoch=checkpoints.best_epoch,
                  run_folder=run_folder, global_step=position.global_step)
    if primary and eval_metrics:
        _logger.info(f'validation top-1 {eval_metrics["top1"]:.2f}%{_best_note(checkpoints)}; '
                     f'checkpoints in {run_folder}')
    return result


def _best_note(checkpoints: CheckpointManager) -> str:
    if checkpoints.best_metric is None:
        return ''
    return f' (best {checkpoints.best_metric:.2f}% after epoch {checkpoints.best_epoch + 1})'


if __name__ == '__main__':
    run_script(main, 'train', also=(TrainingStopped,))
