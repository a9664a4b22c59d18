"""Loading a model for evaluation, and classification metrics over a loader (top-1, top-5, loss,
throughput; one process or many)."""
import argparse
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models import load_checkpoint
from timm.utils import ParseKwargs, accuracy
from torch.utils.data import DataLoader

from .loading import verify_weights_file

__all__ = ['create_model_with_weights', 'add_model_arguments', 'model_from_args', 'evaluate']


def create_model_with_weights(
        model_name: str, pretrained: bool = False, checkpoint: str = '', use_ema: bool = False, **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` plus weights from a training checkpoint or a safetensors file.

    ``use_ema`` takes a training checkpoint's EMA weights. The file is checked first, so a
    missing or truncated one fails with a clear error.
    """
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint:
        verify_weights_file(checkpoint)
        load_checkpoint(model, checkpoint, use_ema=use_ema)
    return model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``model_from_args``."""
    parser.add_argument('--model', default='resnet18_cifar_deconv', help='timm or deconv-zoo model name (name.tag allowed)')
    parser.add_argument('--pretrained', action='store_true', help='load the published weights of the tag')
    parser.add_argument('--checkpoint', default='', help='training checkpoint (.pth.tar) or .safetensors weights')
    parser.add_argument('--use-ema', action='store_true', help='take the EMA weights of a training checkpoint')
    parser.add_argument('--num-classes', type=int, default=None, help='classes of the weights')
    parser.add_argument('--in-chans', type=int, default=None, help='input channels (default: the model\'s)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='extra create_model arguments (Python literals)')


def model_from_args(args: argparse.Namespace, num_classes: Optional[int] = None) -> nn.Module:
    """The model the ``add_model_arguments`` options describe; ``num_classes`` is the default
    when --num-classes is not given (else the model's own)."""
    return create_model_with_weights(args.model, args.pretrained, args.checkpoint, args.use_ema,
                                     num_classes=args.num_classes or num_classes, in_chans=args.in_chans,
                                     **args.model_kwargs)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        amp_autocast: Callable[[], ContextManager] = nullcontext,
        channels_last: bool = False,
        distributed: bool = False,
) -> Dict[str, float]:
    """Evaluate ``model`` in eval mode on every batch of ``loader``.

    Returns top1/top5 (percent), loss (mean cross-entropy), num_images and img_per_sec (the
    whole loop, data loading included). Batches that are None (every image unreadable, see
    ``data.collate_readable``) are skipped. With ``distributed`` the sums are reduced over the
    processes, so each image counts once when the loader shards without padding.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, images
    start = time.perf_counter()
    for batch in loader:
        if batch is None:
            continue
        inputs, targets = batch
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            logits = model(inputs)
        logits = logits.float()
        count = targets.numel()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))  # percent of the batch
        totals += torch.stack([
            F.cross_entropy(logits, targets, reduction='sum').double(),
            top1.double() * count / 100,
            top5.double() * count / 100,
            torch.tensor(float(count), dtype=torch.float64, device=device),
        ])
    if distributed:
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    loss_sum, top1, top5, count = totals.tolist()
    top1, top5 = round(top1), round(top5)  # undo the percent round trip: whole images
    count_or_one = max(count, 1.0)
    return dict(
        top1=100.0 * top1 / count_or_one,
        top5=100.0 * top5 / count_or_one,
        loss=loss_sum / count_or_one,
        num_images=int(count),
        img_per_sec=count / elapsed if elapsed > 0 else 0.0,
    )
