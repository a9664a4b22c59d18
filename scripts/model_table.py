#!/usr/bin/env python
"""Print the README's model table: every registered model with its paper name, parameters,
GMACs at its default input size (eval mode, whitening folded) and the paper's top-1.

    python scripts/model_table.py > table.md
"""
import argparse
from typing import Dict, List, Optional, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import deconv_zoo

# Paper name and reported top-1 (%): CIFAR-10 after 100 epochs (Table 1), ImageNet (Table 2).
# BN twins carry the paper's BN baseline; None where the paper reports no number.
PAPER: Dict[str, Tuple[str, Optional[float]]] = {
    'vgg16_cifar_deconv': ('VGG-16', 94.56), 'vgg16_cifar': ('VGG-16', 93.58),
    'resnet18_cifar_deconv': ('ResNet-18', 95.40), 'resnet18_cifar': ('ResNet-18', 94.87),
    'preact_resnet18_cifar_deconv': ('PreAct-ResNet-18', 95.44), 'preact_resnet18_cifar': ('PreAct-ResNet-18', 94.37),
    'densenet121_cifar_deconv': ('DenseNet-121', 95.88), 'densenet121_cifar': ('DenseNet-121', 94.71),
    'resnext29_32x4d_cifar_deconv': ('ResNeXt-29', 95.80), 'resnext29_32x4d_cifar': ('ResNeXt-29', 95.15),
    'mobilenetv2_cifar_deconv': ('MobileNetV2', 94.35), 'mobilenetv2_cifar': ('MobileNetV2', 90.51),
    'dpn92_cifar_deconv': ('DPN-92', 95.82), 'dpn92_cifar': ('DPN-92', 95.14),
    'pnasnet_a_cifar_deconv': ('PNASNet-A', 84.45), 'pnasnet_a_cifar': ('PNASNet-A', 81.22),
    'senet18_cifar_deconv': ('SENet-18', 95.38), 'senet18_cifar': ('SENet-18', 94.57),
    'efficientnet_b0_cifar_deconv': ('EfficientNet-B0', 88.42), 'efficientnet_b0_cifar': ('EfficientNet-B0', 86.07),
    'vgg11_deconv': ('VGG-11', 71.95), 'vgg13_deconv': ('VGG-13', None), 'vgg16_deconv': ('VGG-16', None),
    'vgg19_deconv': ('VGG-19', None), 'resnet18_deconv': ('ResNet-18', 71.24), 'resnet34_deconv': ('ResNet-34', None),
    'resnet50_deconv': ('ResNet-50', None), 'resnet101_deconv': ('ResNet-101', None),
    'resnet152_deconv': ('ResNet-152', None), 'densenet121_deconv': ('DenseNet-121', 75.73),
}


def count_gmacs(model: torch.nn.Module, input_size: Tuple[int, ...]) -> float:
    """Multiply-accumulates of one eval forward (the whitening is folded once, then cached)."""
    x = torch.randn(1, *input_size)
    with torch.no_grad():
        model(x)  # fold and cache the whitening, as in deployment
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 2 / 1e9


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--filter', default='', help='only models matching this pattern')
    args = parser.parse_args(argv)
    names = deconv_zoo.list_models(args.filter)
    if not names:
        parser.error(f'--filter {args.filter!r} matches no deconv-zoo model (a timm wildcard pattern, '
                     f'e.g. "resnet18*"; the names: deconv_zoo.list_models())')
    print('| model | paper name | dataset | params (M) | GMACs | input | paper top-1 |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name in names:
        model = timm.create_model(name).eval()
        cfg = model.pretrained_cfg
        params = sum(p.numel() for p in model.parameters()) / 1e6
        paper_name, top1 = PAPER.get(name, ('', None))
        dataset = 'CIFAR-10' if cfg['num_classes'] == 10 else 'ImageNet-1k'
        size = 'x'.join(str(s) for s in cfg['input_size'][1:])
        print(f"| `{name}` | {paper_name} | {dataset} | {params:.2f} | {count_gmacs(model, cfg['input_size']):.3f} "
              f"| {size} | {'' if top1 is None else f'{top1:.2f}'} |")


if __name__ == '__main__':
    main()
