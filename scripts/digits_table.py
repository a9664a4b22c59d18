#!/usr/bin/env python3
"""Deconvolution against its batch-norm twin on the embedded digits: a markdown table.

    python scripts/digits_table.py                      # resnet18, vgg16, preact_resnet18, mobilenetv2
    python scripts/digits_table.py --archs resnet18 senet18 --epochs 1 5 --img-size 32
    python scripts/digits_table.py --archs resnet18 --deconv-cfg '{"refresh_every": 4}'
    python scripts/digits_table.py --archs resnet18 --seeds 0 1 2   # mean (min-max) over seeds
    python scripts/digits_table.py --archs resnet18 --deconv-cfg '{"refresh_every": 4}' --models variant

For every CIFAR architecture it trains ``<arch>_cifar_deconv`` and ``<arch>_cifar`` with
scripts/train.py (digits recipe: SGD momentum 0.9, lr 0.1, weight decay 1e-3, batch 64, cosine
per step, same seed), once per epoch budget (each a complete schedule, as the paper's 1- and
20-epoch runs), and reports the final validation top-1 on the 360 held-out digits. The table is
printed and, with --markdown-file, written; the raw numbers go to <output>/results.json.
``--deconv-cfg`` adds a third model per architecture, the deconv model with those FastDeconv
settings (e.g. an approximation offered for speed), so that its effect on learning is measured
beside the paper's layer and batch norm in the same table. With several ``--seeds`` every run is
repeated per seed (initialisation, data order and augmentation; the held-out split stays fixed)
and each cell gives the mean top-1 and the range over the seeds.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from deconv_zoo import list_models
from deconv_zoo.evaluation import check_model_name, file_to_write, json_object, non_negative_int, positive_int
from deconv_zoo.files import atomic_write_text
from deconv_zoo.layers.create import deconv_args

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
DEFAULT_ARCHS = ('resnet18', 'vgg16', 'preact_resnet18', 'mobilenetv2')


def cfg_label(deconv_cfg: Dict[str, Any]) -> str:
    return ', '.join(f'{key}={value}' for key, value in deconv_cfg.items())


def run_folder(log: str, default: str) -> str:
    """The run folder train.py reports in its log: a fresh one (name-1, ...) when ``default``
    already holds a run, which must not be read in its place."""
    reported = [line.split('run folder: ', 1)[1].strip() for line in log.splitlines() if 'run folder: ' in line]
    return reported[-1] if reported else default


def train_run(model: str, epochs: int, seed: int, args: argparse.Namespace,
              deconv_cfg: Optional[Dict[str, Any]] = None) -> Dict[str, Optional[float]]:
    """Train one model for ``epochs`` epochs with ``seed``; its final validation top-1 and the wall time."""
    experiment = f'{model}-e{epochs}-s{seed}' + (f"-{cfg_label(deconv_cfg).replace(', ', '-')}" if deconv_cfg else '')
    command = [sys.executable, TRAIN_SCRIPT, '--model', model, '--dataset', 'digits', '--recipe', 'digits',
               '--epochs', str(epochs), '--img-size', str(args.img_size), '--seed', str(seed),
               '--output', args.output, '--experiment', experiment, '--no-progress']
    if deconv_cfg:
        command += ['--model-kwargs', f'deconv_cfg={deconv_cfg!r}']
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f'{experiment} failed:\n{done.stderr[-2000:]}', file=sys.stderr)
        return dict(top1=None, seconds=seconds)
    with open(os.path.join(run_folder(done.stdout + done.stderr, os.path.join(args.output, experiment)),
                           'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    top1 = float(rows[-1]['eval_top1'])
    print(f'{experiment}: top-1 {top1:.2f}% in {seconds:.0f} s', file=sys.stderr, flush=True)
    return dict(top1=top1, seconds=seconds)


Runs = List[Dict[str, Optional[float]]]  # one per seed


def top1_cell(runs: Runs) -> str:
    """One seed's top-1, or the mean and range over seeds; 'failed' if any run failed."""
    top1s = [run['top1'] for run in runs]
    if any(top1 is None for top1 in top1s):
        return 'failed'
    if len(top1s) == 1:
        return f'{top1s[0]:.2f}'
    return f'{statistics.mean(top1s):.2f} ({min(top1s):.2f}–{max(top1s):.2f})'


def seeds_label(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return f'seed {seeds[0]}'
    return f"mean (min–max) over seeds {', '.join(map(str, seeds))}"


def markdown_table(results: Dict[str, Dict[str, Dict[int, Runs]]], epochs: List[int],
                   args: argparse.Namespace) -> str:
    """Rows: architectures; columns: deconv and BN top-1 per epoch budget, then mean training times."""
    kinds = {'deconv': 'deconv'}
    if args.deconv_cfg:
        kinds['variant'] = f'deconv ({cfg_label(args.deconv_cfg)})'
    kinds['bn'] = 'BN'
    measured = next(iter(results.values()))
    kinds = {kind: label for kind, label in kinds.items() if kind in measured}  # those --models ran
    header = ['architecture'] + [f'{label} {e} ep' for e in epochs for label in kinds.values()] + \
        [f"time {' / '.join(kinds.values())} ({epochs[-1]} ep)"]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for arch, runs in results.items():
        row = [f'`{arch}_cifar`']
        for e in epochs:
            row += [top1_cell(runs[kind][e]) for kind in kinds]
        last = epochs[-1]
        row.append(' / '.join(f"{statistics.mean(run['seconds'] for run in runs[kind][last]):.0f} s" for kind in kinds))
        lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
    lines.append(f'Validation top-1 (%) on the 360 held-out digits, {args.img_size}x{args.img_size} input, '
                 f'{seeds_label(args.seeds)}; each column is a complete run of that many epochs.')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='+', default=list(DEFAULT_ARCHS),
                        help='CIFAR architectures (the part before _cifar), e.g. resnet18 vgg16')
    parser.add_argument('--epochs', type=positive_int, nargs='+', default=[1, 5], help='epoch budgets, one run each')
    parser.add_argument('--img-size', type=positive_int, default=32, help='input size the digits are resized to')
    parser.add_argument('--seeds', '--seed', type=non_negative_int, nargs='+', default=[0],
                        help='seeds; every run is repeated once per seed')
    parser.add_argument('--output', default='output/digits_table', help='folder of the runs')
    parser.add_argument('--markdown-file', default='', type=file_to_write, help='also write the table here')
    parser.add_argument('--deconv-cfg', type=json_object, default=None,
                        help='JSON FastDeconv settings of a third model per architecture, e.g. \'{"refresh_every": 4}\'')
    parser.add_argument('--models', nargs='+', choices=('deconv', 'variant', 'bn'), default=None,
                        help='train only these of the models (variant: the --deconv-cfg one), e.g. to re-measure '
                             'a changed approximation alone; default: all')
    args = parser.parse_args(argv)
    if args.models and 'variant' in args.models and not args.deconv_cfg:
        parser.error('--models variant needs --deconv-cfg')
    # Each of these was found by train.py only, one failed run at a time, after the other runs had trained.
    for option in ('archs', 'epochs', 'seeds'):
        values = getattr(args, option)
        if len(set(values)) < len(values):  # a repeated value: a whole run again, and a repeated table column
            parser.error(f'--{option} {" ".join(map(str, values))}: each value once')
    try:
        for arch in args.archs:
            for model in (f'{arch}_cifar_deconv', f'{arch}_cifar'):
                check_model_name(model)
    except ValueError as error:  # ModelArgumentsError
        archs = ' '.join(name[:-len('_cifar_deconv')] for name in list_models('*_cifar_deconv'))
        parser.error(f'--archs: {error}; the CIFAR architectures: {archs}')
    try:
        deconv_args(True, args.deconv_cfg)
    except ValueError as error:  # "deconv_cfg: unknown FastDeconv settings [...]"
        parser.error(f'--deconv-cfg: {error}')
    # Checked before the runs: a path that cannot be written would otherwise fail after all of them.
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as error:
        parser.error(f'--output: cannot create {args.output!r}: {error}')

    results: Dict[str, Dict[str, Dict[int, Runs]]] = {}
    for arch in args.archs:
        models = [('deconv', f'{arch}_cifar_deconv', None), ('bn', f'{arch}_cifar', None)]
        if args.deconv_cfg:
            models.insert(1, ('variant', f'{arch}_cifar_deconv', args.deconv_cfg))
        models = [m for m in models if not args.models or m[0] in args.models]
        results[arch] = {kind: {e: [train_run(model, e, seed, args, cfg) for seed in args.seeds] for e in args.epochs}
                         for kind, model, cfg in models}
    atomic_write_text(os.path.join(args.output, 'results.json'), json.dumps(results, indent=2))
    table = markdown_table(results, args.epochs, args)
    print(table)
    if args.markdown_file:
        atomic_write_text(args.markdown_file, table + '\n')
    return table


if __name__ == '__main__':
    main()
