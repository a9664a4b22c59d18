#!/usr/bin/env python3
"""Draw a model's first-layer filters into a PNG grid.

    python scripts/visualize_filters.py --model resnet18_cifar_deconv \\
        --checkpoint output/train/resnet18_cifar_deconv-digits/model_best.pth.tar --output filters.png
    python scripts/visualize_filters.py --kind deconv ...   # the whitening kernels themselves

For a FastDeconv layer, ``--kind effective`` (default) shows the filters it applies to raw input
in eval mode, the convolution weight folded with the running whitening matrix (W D); ``--kind
deconv`` shows the rows of the whitening matrix D as kernels, the deconvolution kernels the paper
shows as centre-surround. A plain convolution shows its weight. Each filter is scaled
symmetrically (grey = 0); 3-channel filters are drawn in colour, others as the channel mean.
"""
import argparse
import io
import logging
import math
from typing import List, Optional

import torch.nn as nn
import torch.nn.functional as F
from timm.utils import setup_default_logging
from torch import Tensor
from torchvision.utils import make_grid, save_image

import deconv_zoo  # noqa: F401  (registers the zoo's models with timm)
from deconv_zoo.deploy import folded_weight_and_bias
from deconv_zoo.evaluation import add_model_arguments, file_to_write, model_from_args, run_script
from deconv_zoo.files import atomic_write
from deconv_zoo.layers import FastDeconv

_logger = logging.getLogger('visualize_filters')


def first_layer(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """The named layer, else the pretrained config's first_conv, else the first convolution.

    Raises ValueError for a name the model does not have or that is not a convolution."""
    name = name or model.pretrained_cfg.get('first_conv')
    if not name:
        return next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f'{type(model).__name__} has no layer {name!r} (model.named_modules() lists them)') from None
    if not isinstance(layer, nn.Conv2d):  # FastDeconv included
        raise ValueError(f'layer {name!r} is a {type(layer).__name__}, not a convolution')
    return layer


def layer_filters(layer: nn.Module, kind: str = 'effective') -> Tensor:
    """Filters of a convolution as (count, channels, kh, kw).

    ``effective``: the eval-mode weight (folded W D for a FastDeconv). ``deconv``: the rows of a
    FastDeconv's whitening matrix, each a (block, kh, kw) kernel (group by group for a grouped or
    depthwise layer, which whitens each group as one block); an ungrouped layer needs its channels
    to form one block (a stem), since otherwise its one matrix acts on interleaved channel blocks.
    """
    if kind == 'effective':
        return folded_weight_and_bias(layer)[0] if isinstance(layer, FastDeconv) else layer.weight.detach()
    if not isinstance(layer, FastDeconv):
        raise ValueError(f'--kind deconv needs a FastDeconv layer, got {type(layer).__name__}')
    if layer.groups == 1 and layer.block != layer.in_channels:
        raise ValueError('--kind deconv needs a layer whose input channels form one whitening block '
                         f'(block {layer.block}, {layer.in_channels} channels, groups {layer.groups})')
    return layer.running_deconv.detach().reshape(-1, layer.block, *layer.kernel_size)


def filter_grid(filters: Tensor, zoom: int = 8, max_filters: int = 64) -> Tensor:
    """An RGB or grey image grid of the filters, each scaled to [0, 1] around grey = 0."""
    filters = filters[:max_filters].float()
    if filters.shape[1] != 3:
        filters = filters.mean(dim=1, keepdim=True)
    peak = filters.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    images = filters / (2 * peak) + 0.5
    images = F.interpolate(images, scale_factor=zoom, mode='nearest')
    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0)


def write_png(image: Tensor, path: str) -> None:
    """Write ``image`` as a PNG at ``path`` (whatever its extension), whole or not at all."""
    png = io.BytesIO()
    save_image(image, png, format='PNG')  # encoded before the file is touched
    atomic_write(path, lambda f: f.write(png.getvalue()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument('--layer', default=None, help='module name (default: the model\'s first convolution)')
    parser.add_argument('--kind', default='effective', choices=('effective', 'deconv'),
                        help='effective: folded W D; deconv: rows of the whitening matrix D')
    parser.add_argument('--zoom', type=int, default=8, help='screen pixels per kernel pixel')
    parser.add_argument('--max-filters', type=int, default=64, help='draw at most this many filters')
    parser.add_argument('--output', default='filters.png', type=file_to_write, help='PNG file to write')
    return parser


def main(argv: Optional[List[str]] = None) -> str:
    """Write the PNG; returns its path."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.zoom < 1 or args.max_filters < 1:
        parser.error(f'--zoom and --max-filters must be at least 1, not {args.zoom} and {args.max_filters}')
    setup_default_logging()
    model = model_from_args(args).eval()
    try:
        layer = first_layer(model, args.layer)
        filters = layer_filters(layer, args.kind)
    except ValueError as error:
        parser.error(str(error))
    write_png(filter_grid(filters, args.zoom, args.max_filters), args.output)
    _logger.info(f'{min(len(filters), args.max_filters)} of {len(filters)} {args.kind} filters '
                 f'{tuple(filters.shape[1:])} of {type(layer).__name__} written to {args.output}')
    return args.output


if __name__ == '__main__':
    run_script(main, 'visualize_filters', also=(OSError,))  # OSError: writing the output
