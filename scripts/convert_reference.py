#!/usr/bin/env python3
"""Convert a checkpoint into a zoo weights file.

    # a checkpoint of the authors' scripts (main.py: {'net': ...}; main_imagenet.py: {'state_dict': ...})
    python scripts/convert_reference.py ckpt.t7 --model resnet18_cifar_deconv --output resnet18.safetensors
    # batch-norm weights (zoo BN twin or timm model) folded into the deconv twin, same eval function
    python scripts/convert_reference.py resnet18_bn.pth --from-bn resnet18 --model resnet18_deconv \\
        --output r18.safetensors

The weights file loads with
``timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=...))``; publish it
with scripts/push_to_hub.py --weights after validating it with scripts/validate.py.
"""
import argparse
import sys
from typing import List, Optional

import torch
from safetensors.torch import save as safetensors_bytes

import deconv_zoo  # noqa: F401  (registers the models)
from deconv_zoo.convert import bn_to_deconv, convert_reference_checkpoint, reference_state_dict
from deconv_zoo.evaluation import BAD_INPUT_ERRORS, ParseLiteralKwargs, file_to_write
from deconv_zoo.files import atomic_write


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('checkpoint', help='checkpoint file (.pth, .pth.tar, .t7 or .safetensors)')
    parser.add_argument('--model', required=True, help='zoo architecture, e.g. resnet18_cifar_deconv')
    parser.add_argument('--from-bn', metavar='BN_ARCH',
                        help='the checkpoint holds this batch-norm architecture (e.g. resnet18_cifar, resnet18, '
                             'vgg16_bn): fold it into --model')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseLiteralKwargs,
                        help='model arguments the checkpoint was trained with, e.g. block_fc=0')
    parser.add_argument('--output', required=True, type=file_to_write, help='weights file to write (.safetensors or .pth)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_bn:
        model = bn_to_deconv(reference_state_dict(args.checkpoint), args.model, bn_arch=args.from_bn,
                             **args.model_kwargs)
        print(f'{args.from_bn} folded into {args.model}: every BatchNorm merged into its convolution, '
              f'identity whitening, same eval-mode function.')
    else:
        model, report = convert_reference_checkpoint(args.checkpoint, args.model, **args.model_kwargs)
        print(f'{args.model}: {report.describe()}')
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if args.output.endswith('.safetensors'):
        atomic_write(args.output, lambda f: f.write(safetensors_bytes(state_dict)))
    else:
        atomic_write(args.output, lambda f: torch.save(state_dict, f))
    print(f'Wrote {args.output}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except BAD_INPUT_ERRORS as e:  # the input's fault: its message, no traceback
        sys.exit(f'{type(e).__name__}: {e}')
