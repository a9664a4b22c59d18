"""Loading a model for evaluation, and classification metrics over a loader (top-1, top-5, loss,
throughput; one process or many)."""
import argparse
import ast
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models import load_state_dict, parse_model_name
from timm.utils import accuracy
from torch.utils.data import DataLoader, Dataset

from .data import DatasetError, DatasetNotFoundError, check_dataset, dataset_num_classes
from .layers import smallest_training_batch
from .loading import (
    compare_state_dict, is_safetensors_path, load_torch_checkpoint, optional_state_keys, refuse_non_finite,
    verify_weights_file,
)
from .weights import (
    ChecksumMismatchError, CheckpointMismatchError, CorruptWeightsError, NoPublishedWeightsError, WeightsNotCachedError,
)

__all__ = ['ModelArgumentsError', 'BAD_INPUT_ERRORS', 'run_script', 'number_in', 'positive_int', 'non_negative_int',
           'non_negative_float', 'positive_float', 'probability', 'proper_fraction', 'crop_fraction', 'INTERPOLATIONS',
           'file_to_write', 'folder_to_write', 'json_object', 'ParseLiteralKwargs',
           'create_model_with_weights', 'check_model_name', 'check_model_and_dataset', 'check_device',
           'check_num_classes', 'check_input_size', 'training_arguments', 'is_unset', 'add_model_arguments',
           'input_channels', 'checkpoint_entries', 'with_model_kwargs', 'model_from_args', 'evaluate']

# The arguments of a training run (scripts/train.py and timm's train.py record them alike) that
# evaluating its checkpoint needs: what the model was built with, and the data config.
_RECORDED_ARGS = ('num_classes', 'in_chans', 'model_kwargs', 'img_size', 'input_size', 'mean', 'std',
                  'interpolation', 'crop_pct')
_UNSET = (None, '', {})  # an argument not given (the command line's defaults)


class ModelArgumentsError(ValueError):
    """The model cannot be built, or cannot take the input, with the arguments given."""


# What the scripts report as a one-line error instead of a traceback: the input, not the code, is wrong.
BAD_INPUT_ERRORS = (ModelArgumentsError, CorruptWeightsError, CheckpointMismatchError, ChecksumMismatchError,
                    NoPublishedWeightsError, WeightsNotCachedError, DatasetError, DatasetNotFoundError)

# The model arguments the scripts set from options of their own.
_OPTION_OF_MODEL_ARGUMENT = {'num_classes': '--num-classes', 'in_chans': '--in-chans or --input-size',
                             'drop_rate': '--drop', 'drop_path_rate': '--drop-path'}


def run_script(main: Callable[[], Any], logger_name: str, also: Tuple[type, ...] = ()) -> None:
    """Run a script's ``main``: the input's errors (``BAD_INPUT_ERRORS`` and ``also``) end it with
    their message as one log line and exit status 1, not a traceback."""
    try:
        main()
    except (*BAD_INPUT_ERRORS, *also) as error:
        logging.getLogger(logger_name).error(str(error))
        sys.exit(1)


def number_in(convert: Callable[[str], Any], low: float, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """argparse type: a finite number read by ``convert`` from ``low`` to ``high`` (each end
    included unless open). torch and timm check few of these values, some only at the first step."""
    if high == math.inf:
        allowed = f'{"above" if low_open else "at least"} {low:g}'
    else:
        allowed = f'in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'

    def parse(text: str) -> Any:
        value = convert(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):  # nan fails the comparisons too
            raise argparse.ArgumentTypeError(f'must be {allowed}, not {text}')
        return value

    parse.__name__ = convert.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
non_negative_float = number_in(float, 0)
positive_float = number_in(float, 0, low_open=True)
probability = number_in(float, 0, 1)
proper_fraction = number_in(float, 0, 1, high_open=True)  # rates where 1 leaves nothing: dropout, smoothing
crop_fraction = number_in(float, 0, 1, low_open=True)  # --crop-pct: the share of the resized image kept
# The resize modes of timm's transforms (its train transform also takes 'random', one drawn per image).
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')


def file_to_write(path: str) -> str:
    """argparse type: a file the script will write, in a folder that exists (checked at parse time:
    otherwise the write fails after all the work). An empty string (no file) passes."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise argparse.ArgumentTypeError(f'no folder for {path!r}')
    if path and os.path.isdir(path):
        raise argparse.ArgumentTypeError(f'{path!r} is a folder: name the file to write in it')
    return path


def folder_to_write(path: str) -> str:
    """argparse type: a folder the script will create or fill; none of it or the folders above it
    may be a file (checked at parse time: otherwise ``os.makedirs`` fails after all the work)."""
    blocking = next((p for p in _ancestors(path) if os.path.exists(p) and not os.path.isdir(p)), None)
    if blocking:
        raise argparse.ArgumentTypeError(f'{blocking} is a file, not a folder')
    return path


def _ancestors(path: str) -> List[str]:
    """``path`` and the folders above it, nearest first."""
    path = os.path.abspath(path)
    chain = [path]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain


def json_object(text: str) -> Dict[str, Any]:
    """argparse type: a JSON object (keyword arguments or settings by name); a list or number would
    fail later as ``**kwargs`` or at the first ``.items()``."""
    value = json.loads(text)  # a JSONDecodeError is a ValueError: argparse's "invalid json_object value"
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as {{"refresh_every": 4}}, not {text!r}')
    return value


class ParseLiteralKwargs(argparse.Action):
    """timm's ``ParseKwargs`` (``key=value``, the value a Python literal, else a string such as
    ``act_layer=gelu``), except that a pair without ``=`` or a value that opens like a literal
    (bracket, quote) but does not parse is an argparse error naming it, not a string."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: List[str],
                 option_string: Optional[str] = None) -> None:
        kwargs = {}
        for item in values:
            if not item:
                continue
            key, sep, value = item.partition('=')
            if not sep or not key.isidentifier():
                raise argparse.ArgumentError(self, f'{item!r} is not key=value')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError) as error:
                if value[:1] in ('(', '[', '{', "'", '"'):
                    raise argparse.ArgumentError(self, f'{key}: {value!r} is not a Python literal ({error})') from None
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def create_model_with_weights(
        model_name: str, pretrained: bool = False, checkpoint: str = '', use_ema: bool = False, **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` plus weights from a training checkpoint or a safetensors file.

    ``use_ema`` takes a training checkpoint's EMA weights. The file is checked first, so a
    missing or truncated one fails with a clear error; weights that do not fit the model raise
    ``CheckpointMismatchError`` listing the keys, an argument the model does not take
    ``ModelArgumentsError``.
    """
    check_model_name(model_name)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except BAD_INPUT_ERRORS:  # the weights' errors (CorruptWeightsError is a ValueError too)
        raise
    except (TypeError, ValueError) as error:  # "unexpected keyword argument 'x'", a setting out of range
        raise ModelArgumentsError(f'cannot create {model_name} (check --model-kwargs): {error}') from None
    if checkpoint:
        verify_weights_file(checkpoint)
        if use_ema and not _holds_ema_weights(checkpoint):  # timm's loader would take the raw weights
            raise CheckpointMismatchError(f'{checkpoint} holds no EMA weights (state_dict_ema or model_ema): '
                                          f'leave out --use-ema')
        state_dict = load_state_dict(checkpoint, use_ema=use_ema)
        mismatch = compare_state_dict(state_dict, model.state_dict(), optional=optional_state_keys(model))
        if mismatch:
            trained = checkpoint_entries(checkpoint).get('arch')
            if trained and trained != model_name.split('.')[0]:
                raise CheckpointMismatchError(f'{checkpoint} is a training checkpoint of {trained}, not {model_name}: '
                                              f'give --model {trained}')
            from .convert import REFERENCE_CHECKPOINT_KEYS  # convert builds models with this module: import on use

            wrapped = any(key in mismatch.unexpected for key in REFERENCE_CHECKPOINT_KEYS)
            hint = ("\nAn authors' checkpoint (its model under 'net')? Convert it first: scripts/convert_reference.py "
                    f"{checkpoint} --model {model_name} --output model.safetensors") if wrapped else ''
            raise CheckpointMismatchError(
                f'{checkpoint} does not fit {model_name} as built (num_classes, in_chans and --model-kwargs must be '
                f'those it was trained with):\n{mismatch.describe()}{hint}')
        refuse_non_finite(state_dict, checkpoint)
        model.load_state_dict(state_dict)
    return model


def checkpoint_entries(checkpoint: str) -> Mapping[str, Any]:
    """The top-level entries of a training checkpoint ('arch', 'args', 'class_names', ...), its
    tensors mapped, not read (the weights are loaded with the model); {} for a safetensors file
    or a checkpoint that is not a dict."""
    if is_safetensors_path(checkpoint):
        return {}
    state = load_torch_checkpoint(checkpoint, mmap=True)
    return state if isinstance(state, dict) else {}


def _holds_ema_weights(checkpoint: str) -> bool:
    entries = checkpoint_entries(checkpoint)
    return any(entries.get(key) is not None for key in ('state_dict_ema', 'model_ema'))


def check_model_name(model_name: str) -> None:
    """Raise ``ModelArgumentsError`` for a name timm does not know (``hf-hub:`` / ``local-dir:``
    names are resolved by timm itself)."""
    source, name = parse_model_name(model_name)
    if source is None and not timm.is_model(name):
        raise ModelArgumentsError(f'unknown model {model_name!r} (timm.list_models() lists the names)')


def check_model_and_dataset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--model``, ``--dataset`` and ``--data-dir`` checked while parsing: an argparse error if
    either name is unknown or the dataset needs a folder that is not given."""
    try:
        check_model_name(args.model)
        check_dataset(args.dataset, args.data_dir)
    except ValueError as error:  # ModelArgumentsError, DatasetError
        parser.error(str(error))


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """``--device`` checked while parsing: torch's own errors (a CUDA device on a machine without
    one: an AssertionError) came at the model's ``.to()``, after the datasets were read."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        parser.error(f'--device {device}: {error}')
    if parsed.type == 'cuda' and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        parser.error(f'--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); '
                     f'use --device cpu')


def check_num_classes(num_classes: Optional[int], dataset: Dataset, source: str = '--num-classes') -> None:
    """Raise ``ModelArgumentsError`` when a model of ``num_classes`` outputs cannot score the
    labels of ``dataset`` (the loss of the first batch would end in an IndexError); ``source``
    says in the message where the class count came from."""
    dataset_classes = dataset_num_classes(dataset)
    if num_classes and dataset_classes and num_classes < dataset_classes:
        raise ModelArgumentsError(f'{source} {num_classes}: the dataset has {dataset_classes} classes '
                                  f'(labels up to {dataset_classes - 1})')


def check_input_size(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, str]:
    """Run ``model`` on one blank image of ``input_size``, so that an input it cannot take
    (smaller than its poolings need, not its patch grid) raises ``ModelArgumentsError`` now rather
    than in the middle of the first step. Eval mode: no statistics are updated. Returns what the
    same forward tells of training batches: ``smallest_training_batch``'s (images, layer)."""
    try:
        return smallest_training_batch(model, input_size)
    except (RuntimeError, AssertionError) as error:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        raise ModelArgumentsError(
            f'{name} cannot take input {tuple(input_size)} (see --img-size/--input-size): {error}') from None


def training_arguments(checkpoint: str) -> Dict[str, Any]:
    """The class count, input channels, model kwargs, input size, normalisation, interpolation and
    crop arguments that the run which wrote a training checkpoint was given (those it set); {} for
    a safetensors file or a checkpoint that records no arguments."""
    args = checkpoint_entries(checkpoint).get('args')
    if isinstance(args, argparse.Namespace):  # timm's train.py
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return {key: args[key] for key in _RECORDED_ARGS if not is_unset(args.get(key))}


def is_unset(value: Any) -> bool:
    """Whether a command-line value is its default of "not given" (None, '', or no kwargs)."""
    return value in _UNSET


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``model_from_args``."""
    parser.add_argument('--model', default='resnet18_cifar_deconv', help='timm or deconv-zoo model name (name.tag allowed)')
    parser.add_argument('--pretrained', action='store_true', help='load the published weights of the tag')
    parser.add_argument('--checkpoint', default='', help='training checkpoint (.pth.tar) or .safetensors weights')
    parser.add_argument('--use-ema', action='store_true', help='take the EMA weights of a training checkpoint')
    parser.add_argument('--num-classes', type=positive_int, default=None, help='classes of the weights')
    parser.add_argument('--in-chans', type=positive_int, default=None, help='input channels (default: the model\'s)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseLiteralKwargs,
                        help='extra create_model arguments (Python literals)')


def input_channels(args: argparse.Namespace) -> Optional[int]:
    """The input channels the arguments ask for (None: the model's): --input-size's C overrides
    --in-chans, as in timm's train.py."""
    return args.input_size[0] if getattr(args, 'input_size', None) else args.in_chans


def with_model_kwargs(options: Dict[str, Any], model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The model arguments of a script's own ``options`` (those set) and of --model-kwargs; one
    given both ways is a ``ModelArgumentsError`` (Python's "got multiple values" TypeError was a
    traceback, at the call)."""
    clash = [key for key in model_kwargs if options.get(key) is not None]
    if clash:
        raise ModelArgumentsError('; '.join(
            f'--model-kwargs {key}={model_kwargs[key]!r}: the script sets {key}={options[key]!r} '
            f'({_OPTION_OF_MODEL_ARGUMENT.get(key, "its own option")}): give it there' for key in clash))
    return {**{key: value for key, value in options.items() if value is not None}, **model_kwargs}


def model_from_args(args: argparse.Namespace, num_classes: Optional[int] = None) -> nn.Module:
    """The model the ``add_model_arguments`` options describe; ``num_classes`` is the default
    when --num-classes is not given (else the model's own)."""
    options = dict(num_classes=args.num_classes or num_classes, in_chans=input_channels(args))
    return create_model_with_weights(args.model, args.pretrained, args.checkpoint, args.use_ema,
                                     **with_model_kwargs(options, args.model_kwargs))


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
    ``data.collate_readable``) are skipped; a ``DatasetError`` when no image is left (a top-1 of 0
    over no image would look like a result). With ``distributed`` the sums are reduced over the
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
    if not count:
        raise DatasetError(f'no image to evaluate: the {len(loader.dataset)} image(s) are unreadable (named above)')
    top1, top5 = round(top1), round(top5)  # undo the percent round trip: whole images
    return dict(
        top1=100.0 * top1 / count,
        top5=100.0 * top5 / count,
        loss=loss_sum / count,
        num_images=int(count),
        img_per_sec=count / elapsed if elapsed > 0 else 0.0,
    )
