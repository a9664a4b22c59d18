#!/usr/bin/env python
"""Training-step time, eval time and peak memory of a deconvolution model against its BN twin.

All models are built in one process and timed interleaved (the order alternates every repeat),
so that load from other processes hits them alike; ratios are medians of the per-repeat ratios,
of wall-clock time and of process CPU time (steadier where other processes share the cores).
Beside the zoo's layers, a "literal" copy of the deconv model runs the paper's algorithm as its
authors implemented it: statistics from ``tests/oracle.py`` (explicit im2col, centred copy,
explicit covariance, every Newton-Schulz product, autograd backward), their weight folding,
and no eval cache (their layer refolds on every call).

    python scripts/benchmark.py --threads 2 --batch-size 64 --output benchmark.json
    python scripts/benchmark.py --pair densenet121_cifar_deconv:densenet121_cifar --batch-size 32
    python scripts/benchmark.py --device cuda --dtype bf16 --batch-size 128 --profile
    python scripts/benchmark.py --suite cpu --threads 2 --freeze-iter 100  # issue #5's CPU rows

Peak memory is the high-water mark of tensor memory allocated during one training step (from
zeroed gradients to the optimizer step) above what existed before it (parameters, buffers,
optimizer state): ``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocation
events on CPU (same definition; the CPU allocator keeps no peak statistic).

``--profile`` prints where a training step of the deconv and the literal model spends its time:
the layers' ``deconv::*`` profiler scopes (patches, covariance, newton_schulz, fold) forward,
their autograd nodes backward (matched to the scope that created them), convolutions, and the
rest of the network. The zoo's covariance backward rebuilds the patch matrix and scatters its
gradient itself, so its "patches backward" is part of "covariance backward".

``--count-ops`` counts the ATen operators one eager training step dispatches (views apart): on a
GPU each is roughly a kernel launch, the cost that small whitening matrices cannot hide.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import deconv_zoo  # noqa: F401  (registers the zoo's models with timm)
from deconv_zoo.data import resolve_input_config
from deconv_zoo.evaluation import (
    ModelArgumentsError, check_model_name, create_model_with_weights, file_to_write, json_object, non_negative_int,
    positive_int, run_script,
)
from deconv_zoo.files import atomic_write_text
from deconv_zoo.layers import Delinear, FastDeconv, set_finite_checks
from deconv_zoo.layers._stats import FoldCache, statistics_dtype

AMP_DTYPES = {'float32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
SCOPES = ('patches', 'covariance', 'newton_schulz', 'fold')


def load_oracle() -> Optional[Any]:
    """tests/oracle.py, the literal implementation the layer tests compare against (None if the
    repository's tests are not present, e.g. in an installed package)."""
    tests = Path(__file__).resolve().parent.parent / 'tests'
    if not (tests / 'oracle.py').exists():
        return None
    sys.path.insert(0, str(tests))
    import oracle

    # Profiler labels only (for --profile); the oracle's functions run unchanged. Its patch
    # extraction, block slicing and centring count as 'patches'.
    def scoped(function: Callable, scope: str) -> Callable:
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with record_function(f'deconv::{scope}'):
                return function(*args, **kwargs)
        return labelled

    oracle._covariance = scoped(oracle._covariance, 'covariance')
    oracle.oracle_newton_schulz = scoped(oracle.oracle_newton_schulz, 'newton_schulz')
    oracle.oracle_fast_deconv_statistics = scoped(oracle.oracle_fast_deconv_statistics, 'patches')
    oracle.oracle_delinear_statistics = scoped(oracle.oracle_delinear_statistics, 'patches')
    return oracle


class _NoFoldCache(FoldCache):
    """The authors' layers refold the running statistics on every eval call."""

    def put(self, value: Tuple[torch.Tensor, torch.Tensor], *sources: Optional[torch.Tensor]) -> None:
        pass


def literal_layer_classes(oracle: Any) -> Dict[type, type]:
    """FastDeconv / Delinear subclasses whose batch statistics are the oracle's."""

    class LiteralFastDeconv(FastDeconv):
        check_finite = False  # the authors' layer has no such check

        def batch_statistics(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return oracle.oracle_fast_deconv_statistics(
                x.to(statistics_dtype(x)), kernel_size=self.kernel_size[0], stride=self.stride[0],
                padding=self.padding[0], dilation=self.dilation[0], groups=self.groups, block=self.block, eps=self.eps,
                n_iter=self.n_iter, sampling_stride=self.sampling_stride[0] // self.stride[0])

    class LiteralDelinear(Delinear):
        check_finite = False

        def batch_statistics(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return oracle.oracle_delinear_statistics(x, block=self.block, eps=self.eps, n_iter=self.n_iter)

    return {FastDeconv: LiteralFastDeconv, Delinear: LiteralDelinear}


def literal_copy(model: nn.Module, oracle: Any) -> Optional[nn.Module]:
    """A copy of ``model`` (same weights and state) whose deconv layers run the literal algorithm;
    None if it has no deconv layers."""
    classes = literal_layer_classes(oracle)
    literal = copy.deepcopy(model)
    swapped = 0
    for module in literal.modules():
        if type(module) in classes:
            module.__class__ = classes[type(module)]
            module._fold_cache = _NoFoldCache()
            swapped += 1
    return literal if swapped else None


def frozen_copy(model: nn.Module, freeze_iter: int) -> nn.Module:
    """A copy of ``model`` whose FastDeconv layers follow the reference's freeze schedule (fresh
    statistics on ``freeze_iter + 1`` of every ``10 * freeze_iter`` training steps), placed at
    at a frozen step before every training call so that every timed step is a frozen one (left to
    run, the schedule turns to fresh steps again after ``9 * freeze_iter - 1`` of them)."""
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if isinstance(module, FastDeconv):
            module.freeze, module.freeze_iter = True, freeze_iter
            module.register_forward_pre_hook(_at_a_frozen_step)
    return frozen


def _at_a_frozen_step(module: FastDeconv, _: Any) -> None:
    if module.training:
        module.counter.fill_(module.freeze_iter + 1)


def reusing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose FastDeconv layers reuse their statistics on every training step
    after the first (a warm-up step), so that every timed step is a reusing step of the
    ``refresh_every`` approximation; its schedule's mean cost combines them with fresh steps."""
    reusing = copy.deepcopy(model)
    for module in reusing.modules():
        if isinstance(module, FastDeconv):
            module.refresh_every = 2 ** 62  # never due again within a benchmark
    return reusing


def schedule_ratio(fresh: List[float], other: List[float], bn: List[float], fresh_share: float) -> float:
    """Mean step time over a whole schedule cycle relative to BN, from the medians of its fresh
    steps and of its other (frozen or reusing) steps."""
    mean = fresh_share * statistics.median(fresh) + (1 - fresh_share) * statistics.median(other)
    return mean / statistics.median(bn)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# GradScaler halves its scale (2 ** 16 at first) at each overflow: far more than enough halvings.
_MAX_SCALE_SEARCH_STEPS = 40


class Runner:
    """One model with its optimizer, input batch and training / eval step."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, device: torch.device):
        self.name = name
        self.device = device
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format)
        self.module = self.model  # uncompiled, for state sizes
        self.compiled = args.compile
        if args.compile:
            # Static shapes, as scripts/train.py compiles: with dynamic ones inductor fails on the
            # strided im2col of the statistics.
            self.model = torch.compile(self.model, mode=args.compile_mode, dynamic=False)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3)
        generator = torch.Generator().manual_seed(0)
        num_classes = getattr(self.module, 'num_classes', 1000) or 1000
        in_chans = resolve_input_config(self.module)['input_size'][0]  # e.g. a model built with in_chans=1
        self.x = torch.randn(args.batch_size, in_chans, args.img_size, args.img_size, generator=generator).to(
            device=device, memory_format=memory_format)
        self.y = torch.randint(0, num_classes, (args.batch_size,), generator=generator).to(device)
        amp_dtype = AMP_DTYPES[args.dtype]
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def begin_step(self) -> None:
        if self.compiled:
            # For CUDA graph trees (mode='reduce-overhead'), whose steps of the models timed in turn
            # would otherwise be told apart by heuristics: no output of an earlier step is read again.
            torch.compiler.cudagraph_mark_step_begin()

    def warm_up(self, step: str, calls: int) -> None:
        """``calls`` untimed calls of ``step``; in float16, training steps until one is a full step:
        GradScaler skips the optimizer step while it lowers its initial scale, on each model at
        other steps, and a timed step without the update would not be a training step."""
        for _ in range(calls):
            getattr(self, step)()
        if self.scaler is not None and step == 'train_step':
            for _ in range(_MAX_SCALE_SEARCH_STEPS):
                scale = self.scaler.get_scale()
                self.train_step()
                if self.scaler.get_scale() >= scale:  # not lowered: the step was taken
                    break

    def train_step(self) -> None:
        self.begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.model(self.x), self.y)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def eval_step(self) -> None:
        self.begin_step()
        with torch.no_grad(), self.autocast():
            self.model(self.x)

    def timed(self, step: Callable[[], None]) -> Tuple[float, float]:
        """Wall-clock and process CPU milliseconds of one call."""
        sync(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync(self.device)
        return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3

    def state_mb(self) -> float:
        """Parameters, buffers and optimizer state (what exists between steps)."""
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20

    def peak_step_mb(self) -> float:
        """High-water mark of tensor memory allocated during one training step above its start."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == 'cuda':
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            self.train_step()
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - start) / 2 ** 20
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.train_step()
        # Allocation events carry +bytes, frees -bytes; blocks that existed before profiling
        # are not reported, so the running sum is the growth over the step's start.
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
        level = peak = 0
        for _, nbytes in events:
            level += nbytes
            peak = max(peak, level)
        return peak / 2 ** 20


def interleaved(runners: Dict[str, Runner], step: str, warmup: int,
                repeats: int) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Wall and CPU milliseconds of ``repeats`` calls of each runner's step, in alternating order."""
    for runner in runners.values():
        runner.warm_up(step, warmup)
    wall: Dict[str, List[float]] = {role: [] for role in runners}
    cpu: Dict[str, List[float]] = {role: [] for role in runners}
    order = list(runners)
    for r in range(repeats):
        for role in (order if r % 2 == 0 else order[::-1]):
            wall_ms, cpu_ms = runners[role].timed(getattr(runners[role], step))
            wall[role].append(wall_ms)
            cpu[role].append(cpu_ms)
    return wall, cpu


def summary(samples: List[float]) -> Dict[str, Any]:
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return dict(median=statistics.median(samples), min=min(samples), max=max(samples),
                q1=quartiles[0], q3=quartiles[2], samples=samples)


def paired_ratio(numerator: List[float], denominator: List[float]) -> Dict[str, float]:
    """Median (and range) of the per-repeat ratios: robust to load that drifts between repeats."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))


BACKWARD_NODE = 'autograd::engine::evaluate_function: '


def event_scope(event: Any) -> Optional[str]:
    """The innermost ``deconv::<scope>`` profiler range enclosing an event, if any."""
    while event is not None:
        if event.name.startswith('deconv::'):
            return event.name[len('deconv::'):]
        event = event.cpu_parent
    return None


def in_backward(event: Any) -> bool:
    """Whether an event ran inside an autograd backward node (e.g. a patch matrix rebuilt there)."""
    while event is not None:
        if event.name.startswith(BACKWARD_NODE):
            return True
        event = event.cpu_parent
    return False


def profile_step(runner: Runner) -> Tuple[float, Dict[str, float]]:
    """Milliseconds of one training step, by part: '<scope> forward/backward', convolutions, rest.

    Backward work is attributed through autograd sequence numbers: a backward node belongs to
    the scope of the forward op that created it. Only host-side events are read: on CUDA the
    profiler also lists every kernel and, as a device-side annotation, every ``deconv::*`` range
    a second time (with no parent, so backward ranges would pass for forward ones), while each
    host op already carries the device time of the kernels it launched.
    """
    use_cuda = runner.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    runner.optimizer.zero_grad(set_to_none=True)
    sync(runner.device)
    with profile(activities=activities) as prof:
        wall, _ = runner.timed(runner.train_step)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]

    def ms(event: Any) -> float:
        return (event.device_time_total if use_cuda else event.cpu_time_total) / 1e3

    created_in: Dict[Tuple[int, int], str] = {}
    parts: Dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith('autograd::') or in_backward(e):
            continue
        scope = event_scope(e)
        if e.sequence_nr >= 0:
            created_in.setdefault((e.thread, e.sequence_nr), scope or e.name)
        if e.name.startswith('deconv::'):
            parts[f'{scope} forward'] += ms(e)
            outer = event_scope(e.cpu_parent)
            if outer is not None:  # nested scopes: count the time once, in the inner one
                parts[f'{outer} forward'] -= ms(e)
        elif e.name == 'aten::convolution' and scope is None:
            parts['convolution forward'] += ms(e)
    for e in events:
        if not e.name.startswith(BACKWARD_NODE):
            continue
        origin = created_in.get((e.fwd_thread, e.sequence_nr), '')
        if origin in SCOPES:
            parts[f'{origin} backward'] += ms(e)
        elif e.name == BACKWARD_NODE + 'ConvolutionBackward0':
            parts['convolution backward'] += ms(e)
    parts['rest (network, loss, optimizer)'] = wall - sum(parts.values())
    return wall, dict(parts)


def count_deconv_macs(model: nn.Module, batch_size: int, input_size: Tuple[int, int, int]) -> Dict[str, float]:
    """Multiply-adds (GMAC) of one training batch's convolutions and of the work every FastDeconv
    adds to them, counted from the layer shapes: the covariance product over the sampled patches
    (full product; the layer computes part of it forward and one product of that size backward),
    the fold of the whitening into the weight (forward; backward is twice that) and the nf^3 of one
    whitening-matrix product, summed over layers."""
    totals = dict(conv=0.0, covariance=0.0, fold=0.0, whitening_product=0.0)

    def count(layer: FastDeconv, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        _, channels, height, width = inputs[0].shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.sampling_stride, layer.padding, layer.dilation
        if (kh, kw) == (1, 1):
            samples = -(-batch_size * height * width // (sh * sw))
        else:
            rows = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            cols = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            samples = batch_size * rows * cols
        nf = layer.num_features
        matrices = layer.groups if layer.groups > 1 else 1
        samples_per_matrix = samples if layer.groups > 1 else samples * channels // layer.block
        totals['conv'] += batch_size * output.shape[2] * output.shape[3] * layer.weight.numel()
        totals['covariance'] += matrices * samples_per_matrix * nf * nf
        totals['fold'] += layer.weight.numel() * nf
        totals['whitening_product'] += matrices * nf ** 3

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, FastDeconv)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_size), device=next(model.parameters()).device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return {name: value / 1e9 for name, value in totals.items()}


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched while active: views (no data touched) apart from
    the rest, which on a GPU is roughly one kernel launch each."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict(operators=0, views=0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if func.namespace == 'aten':
            self.counts['views' if func.is_view else 'operators'] += 1
        return func(*args, **(kwargs or {}))


def count_step_operators(runner: 'Runner') -> Dict[str, int]:
    """ATen operators of one eager training step of ``runner``'s model (uncompiled, so that each
    one is dispatched from Python: what a GPU step launches when it is not captured). Runs after
    the timed steps, so lazily created state (optimizer buffers) already exists."""
    compiled, runner.model = runner.model, runner.module
    try:
        with OperatorCount() as counter:
            runner.train_step()
    finally:
        runner.model = compiled
    return counter.counts


def print_macs(macs: Dict[str, float]) -> None:
    print(f"\nmultiply-adds of one training batch (GMAC, from the FastDeconv layer shapes): convolutions "
          f"{macs['conv']:.2f} forward (a BN step is about 3x that); covariance {macs['covariance']:.2f} (full "
          f"product); fold {macs['fold']:.2f} forward; one whitening-matrix product {macs['whitening_product']:.2f}")


def print_profile(profiles: Dict[str, Tuple[float, Dict[str, float]]]) -> None:
    rows = [f'{scope} {phase}' for scope in SCOPES for phase in ('forward', 'backward')]
    rows += ['convolution forward', 'convolution backward', 'rest (network, loss, optimizer)']
    roles = list(profiles)
    print('\nwhere a training step spends its time (ms, share of the step), one profiled step each')
    print(f"{'part':34s}" + ''.join(f'{role:>22s}' for role in roles))
    for row in rows:
        cells = []
        for role in roles:
            wall, parts = profiles[role]
            value = parts.get(row, 0.0)
            cells.append(f'{value:11.1f} {100 * value / wall:7.1f}%  ')
        print(f'{row:34s}' + ''.join(f'{c:>22s}' for c in cells))
    print(f"{'step (profiled, wall)':34s}" + ''.join(f'{profiles[role][0]:11.1f}{"":11s}' for role in roles))


def compile_counters() -> Dict[str, int]:
    """Graph breaks, and compiled graphs that mode='reduce-overhead' ran without CUDA graphs (e.g.
    for a mutated input), so far in this process: inductor logs those skips only with
    ``TORCH_LOGS=perf_hints``, and without them a CUDA-graph row would time something else."""
    from torch._dynamo.utils import counters
    return dict(graph_breaks=sum(counters['graph_break'].values()),
                cudagraph_skips=counters['inductor']['cudagraph_skips'])


def machine(device: torch.device) -> Dict[str, Any]:
    info = dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), cpu=platform.processor())
    with contextlib.suppress(OSError):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                info['cpu'] = line.split(':', 1)[1].strip()
                break
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pair', default='resnet18_cifar_deconv:resnet18_cifar',
                        help='deconv_model:bn_model (any two timm or zoo model names)')
    parser.add_argument('--suite', choices=sorted(SUITES), default=None,
                        help="run the rows of issue #5's target table (their pair, batch, size, device and "
                             "dtype override the options) and print the table")
    parser.add_argument('--deconv-kwargs', type=json_object, default={},
                        help='JSON keyword arguments for the deconv model, e.g. \'{"deconv_cfg": {"n_iter": 3}}\'')
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    parser.add_argument('--batch-size', type=positive_int, default=64)
    parser.add_argument('--img-size', type=positive_int, default=32)
    parser.add_argument('--dtype', choices=sorted(AMP_DTYPES), default='float32',
                        help='float32, or automatic mixed precision in bf16 / fp16 (statistics stay float32)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model (implies --no-finite-check)')
    parser.add_argument('--compile-mode', default=None, help='torch.compile mode, e.g. reduce-overhead (CUDA graphs)')
    parser.add_argument('--no-finite-check', action='store_true',
                        help="turn off the layers' non-finite check (a host sync on GPUs)")
    parser.add_argument('--threads', type=positive_int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--warmup', type=non_negative_int, default=2, help='untimed steps per model and phase')
    parser.add_argument('--repeats', type=positive_int, default=5, help='timed steps per model and phase')
    parser.add_argument('--no-literal', action='store_true', help='skip the literal (authors\') algorithm')
    parser.add_argument('--freeze-iter', type=non_negative_int, default=0,
                        help='also time a frozen step of the reference\'s freeze schedule (an approximation: '
                             'statistics refreshed on freeze_iter + 1 of every 10 * freeze_iter steps) and '
                             'report the schedule\'s mean cost')
    parser.add_argument('--refresh-every', type=positive_int, default=1,
                        help='also time a step that reuses the statistics under FastDeconv(refresh_every=K) (an '
                             'approximation: statistics recomputed every K training steps) and report the '
                             'schedule\'s mean cost')
    parser.add_argument('--profile', action='store_true', help='print where a deconv training step spends time')
    parser.add_argument('--count-macs', action='store_true',
                        help="print the multiply-adds of the convolutions and of the deconvolution's extra work")
    parser.add_argument('--count-ops', action='store_true',
                        help='print the ATen operators (not views) and views one eager training step dispatches')
    parser.add_argument('--output', default=None, type=file_to_write, help='write the results as JSON here')
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return args


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse errors for what would otherwise fail in the middle of a run (a traceback) or,
    for --output, after all of it."""
    if not args.suite:  # a suite's cases name their own pairs
        names = args.pair.split(':')
        if len(names) != 2 or not all(names):
            parser.error(f'--pair {args.pair!r}: expected deconv_model:bn_model')
        try:
            for name in names:
                check_model_name(name)
        except ValueError as error:  # ModelArgumentsError
            parser.error(f'--pair: {error}')
    cases = [settings for settings, _ in SUITES[args.suite]] if args.suite else [{}]
    for device in {settings.get('device', args.device) for settings in cases}:
        try:
            device = torch.device(device)
        except RuntimeError as error:  # "Expected one of cpu, cuda, ... device type at start of device string"
            parser.error(f'--device {device!r}: {error}')
        if device.type == 'cuda' and not torch.cuda.is_available():
            option = f'--suite {args.suite}' if args.suite else f'--device {device}'
            parser.error(f'{option}: CUDA is not available')
    if args.compile_mode and not args.compile:
        parser.error('--compile-mode needs --compile')
    if args.deconv_kwargs.get('num_classes') == 0:  # the step's cross-entropy needs logits
        parser.error('--deconv-kwargs num_classes=0: a headless model has no training step to time here')


def build_runners(args: argparse.Namespace, device: torch.device) -> Dict[str, Runner]:
    deconv_name, bn_name = args.pair.split(':')
    torch.manual_seed(0)
    deconv_model = create_model_with_weights(deconv_name, **args.deconv_kwargs)  # bad kwargs: ModelArgumentsError
    schedules = args.freeze_iter or args.refresh_every > 1
    if schedules and not any(isinstance(m, FastDeconv) for m in deconv_model.modules()):
        raise ModelArgumentsError(f'--freeze-iter / --refresh-every time schedules of FastDeconv layers, and '
                                  f'{deconv_name} (the first model of --pair) has none')
    models = {'deconv': (deconv_name, deconv_model), 'bn': (bn_name, timm.create_model(bn_name))}
    oracle = None if args.no_literal else load_oracle()
    literal = literal_copy(deconv_model, oracle) if oracle is not None else None
    if literal is not None:
        models['literal'] = (f'{deconv_name} (literal)', literal)
    if args.freeze_iter:
        models['frozen'] = (f'{deconv_name} (frozen step)', frozen_copy(deconv_model, args.freeze_iter))
    if args.refresh_every > 1:
        models['reusing'] = (f'{deconv_name} (reusing step)', reusing_copy(deconv_model))
    if args.no_finite_check or args.compile:
        for _, model in models.values():
            set_finite_checks(model, False)
    return {role: Runner(name, model, args, device) for role, (name, model) in models.items()}


def run_case(args: argparse.Namespace) -> Dict[str, Any]:
    """Time, measure and (with --profile) profile one model pair; print its table; return its report."""
    device = torch.device(args.device)
    runners = build_runners(args, device)

    for runner in runners.values():
        runner.model.train()
    train, train_cpu = interleaved(runners, 'train_step', args.warmup, args.repeats)
    for runner in runners.values():
        runner.model.eval()
    evaluation, evaluation_cpu = interleaved(runners, 'eval_step', args.warmup, args.repeats)
    for runner in runners.values():
        runner.model.train()

    results: Dict[str, Any] = {}
    for role, runner in runners.items():
        results[role] = dict(model=runner.name, train_ms=summary(train[role]), eval_ms=summary(evaluation[role]),
                             train_cpu_ms=summary(train_cpu[role]), eval_cpu_ms=summary(evaluation_cpu[role]),
                             peak_step_mb=runner.peak_step_mb(), state_mb=runner.state_mb())
    # The CPU-time ratios are the steadier estimate on a machine shared with other processes: time
    # spent waiting for a core does not count (time spinning in a thread barrier still does).
    ratios = {}
    for role in runners:
        if role != 'bn':
            ratios[f'{role}/bn'] = dict(train=paired_ratio(train[role], train['bn']),
                                        eval=paired_ratio(evaluation[role], evaluation['bn']),
                                        train_cpu=paired_ratio(train_cpu[role], train_cpu['bn']),
                                        eval_cpu=paired_ratio(evaluation_cpu[role], evaluation_cpu['bn']),
                                        memory=results[role]['peak_step_mb'] / results['bn']['peak_step_mb'])
    schedules = {}  # name: (role of its non-fresh steps, share of fresh steps)
    if 'frozen' in runners:
        schedules['freeze_schedule/bn'] = ('frozen', (args.freeze_iter + 1) / (10 * args.freeze_iter))
    if 'reusing' in runners:
        schedules['refresh_schedule/bn'] = ('reusing', 1 / args.refresh_every)
    for name, (role, fresh_share) in schedules.items():
        ratios[name] = dict(
            train=schedule_ratio(train['deconv'], train[role], train['bn'], fresh_share),
            train_cpu=schedule_ratio(train_cpu['deconv'], train_cpu[role], train_cpu['bn'], fresh_share))
    report = dict(config=vars(args), machine=machine(device), results=results, ratios=ratios)

    print(f"{'role':8s} {'model':36s} {'train ms (median, min-max)':>30s} {'eval ms (median, min-max)':>30s}"
          f" {'step peak MB':>13s} {'state MB':>9s}")
    for role, r in results.items():
        t, e = r['train_ms'], r['eval_ms']
        print(f"{role:8s} {r['model']:36s} {t['median']:12.1f} ({t['min']:7.1f}-{t['max']:7.1f})"
              f" {e['median']:12.1f} ({e['min']:7.1f}-{e['max']:7.1f}) {r['peak_step_mb']:13.1f} {r['state_mb']:9.1f}")
    for name, ratio in ratios.items():
        if name.endswith('_schedule/bn'):
            print(f"{name:12s} train {ratio['train']:.2f} (mean over a cycle)  "
                  f"| CPU time: train {ratio['train_cpu']:.2f}")
            continue
        t, e, tc, ec = ratio['train'], ratio['eval'], ratio['train_cpu'], ratio['eval_cpu']
        print(f"{name:12s} train {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})  "
              f"eval {e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f})  step peak memory {ratio['memory']:.2f}  "
              f"| CPU time: train {tc['median']:.2f} ({tc['min']:.2f}-{tc['max']:.2f})  "
              f"eval {ec['median']:.2f} ({ec['min']:.2f}-{ec['max']:.2f})")
    print(f"[{args.pair}, {device}, batch {args.batch_size}, {args.img_size}px, {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeats} interleaved repeats]")

    if args.compile:
        report['compile'] = compile_counters()
        print(f"torch.compile so far in this process: {report['compile']['graph_breaks']} graph breaks, "
              f"{report['compile']['cudagraph_skips']} compiled graphs run without CUDA graphs")
    if args.count_macs:
        deconv = runners['deconv']
        report['macs'] = count_deconv_macs(deconv.module, args.batch_size, tuple(deconv.x.shape[1:]))
        print_macs(report['macs'])
    if args.count_ops:
        report['operators'] = {role: count_step_operators(runner) for role, runner in runners.items()}
        print('\nATen operators of one eager training step (views apart; on a GPU about one kernel launch each): '
              + ', '.join(f"{role} {c['operators']} (+{c['views']} views)" for role, c in report['operators'].items()))
    if args.profile:
        profiles = {role: profile_step(runners[role]) for role in ('deconv', 'literal') if role in runners}
        print_profile(profiles)
        report['profile'] = {role: dict(step_ms=wall, parts=parts) for role, (wall, parts) in profiles.items()}
    return report


# The rows of issue #5's target table: the case's settings and its targets (train, eval, memory).
SUITES: Dict[str, List[Tuple[Dict[str, Any], Tuple[float, float, float]]]] = {
    'cpu': [
        (dict(pair='resnet18_cifar_deconv:resnet18_cifar', batch_size=64), (1.5, 1.05, 1.3)),
        (dict(pair='densenet121_cifar_deconv:densenet121_cifar', batch_size=32), (1.6, 1.05, 1.3)),
        (dict(pair='mobilenetv2_cifar_deconv:mobilenetv2_cifar', batch_size=32), (1.6, 1.05, 1.3)),
    ],
    'cuda': [
        (dict(pair='resnet18_cifar_deconv:resnet18_cifar', batch_size=128, device='cuda', dtype='bf16'),
         (1.3, 1.05, 1.3)),
        (dict(pair='resnet18_deconv:resnet18', batch_size=128, img_size=224, device='cuda', dtype='bf16'),
         (1.15, 1.05, 1.2)),
    ],
}


def print_suite_table(cases: List[Tuple[Dict[str, Any], Tuple[float, float, float]]],
                      reports: List[Dict[str, Any]]) -> None:
    """The target table as markdown: measured ratios (deconv/BN), the literal algorithm's, targets."""
    print('\n| case | train deconv/BN (CPU time) | eval | peak memory | literal: train (CPU time) '
          '| freeze schedule: train (CPU time) | refresh schedule: train (CPU time) | targets | met |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for (settings, targets), report in zip(cases, reports):
        config, ratios = report['config'], report['ratios']
        ratio = ratios['deconv/bn']
        literal = ratios.get('literal/bn')
        measured = (ratio['train']['median'], ratio['eval']['median'], ratio['memory'])
        met = ', '.join(f'{name} {"yes" if value <= target else "no"}'
                        for name, value, target in zip(('train', 'eval', 'memory'), measured, targets))
        if 'refresh_schedule/bn' in ratios:
            met += f", refresh schedule train {'yes' if ratios['refresh_schedule/bn']['train'] <= targets[0] else 'no'}"
        case = (f"`{config['pair']}` {config['device']} {config['batch_size']}x{config['img_size']}px "
                f"{config['dtype']}, {report['machine']['threads']} threads")
        literal_cell = f"{literal['train']['median']:.2f} ({literal['train_cpu']['median']:.2f})" if literal else '-'
        schedule_cells = ' | '.join(
            f"{ratios[name]['train']:.2f} ({ratios[name]['train_cpu']:.2f})" if name in ratios else '-'
            for name in ('freeze_schedule/bn', 'refresh_schedule/bn'))
        print(f"| {case} | {measured[0]:.2f} ({ratio['train_cpu']['median']:.2f}) | {measured[1]:.2f} "
              f"| {measured[2]:.2f} | {literal_cell} | {schedule_cells} "
              f"| {targets[0]} / {targets[1]} / {targets[2]} | {met} |")


def write_report(path: Optional[str], report: Dict[str, Any]) -> None:
    if path:
        atomic_write_text(path, json.dumps(report, indent=2))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.suite:
        report = run_case(args)
        write_report(args.output, report)
        return report
    cases = SUITES[args.suite]
    report = dict(suite=args.suite, cases=[])
    for settings, _ in cases:
        print(f"\n== {settings['pair']} ==")
        report['cases'].append(run_case(argparse.Namespace(**dict(vars(args), **settings))))
        # After every case: a later case that fails or runs out of time keeps the earlier ones.
        write_report(args.output, report)
    print_suite_table(cases, report['cases'])
    return report


if __name__ == '__main__':
    run_script(main, 'benchmark')
