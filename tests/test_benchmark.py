"""scripts/benchmark.py runs end to end and writes its report (issue #5). No timing is asserted."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn as nn

from deconv_zoo.layers import FastDeconv

SCRIPT = Path(__file__).resolve().parent.parent / 'scripts' / 'benchmark.py'
CUDA_CHECKS = SCRIPT.parent / 'cuda_checks.sh'


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location('benchmark', SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_smoke(tmp_path):
    output = tmp_path / 'benchmark.json'
    # Small whitening blocks keep the run short; the code paths are those of the paper settings.
    command = [sys.executable, str(SCRIPT), '--img-size', '16', '--batch-size', '2', '--repeats', '1',
               '--warmup', '0', '--threads', '1', '--profile', '--count-macs', '--count-ops', '--freeze-iter', '10', '--refresh-every', '3', '--output', str(output),
               '--deconv-kwargs', '{"deconv_cfg": {"block": 4}, "block_fc": 32}']
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 'deconv/bn' in run.stdout and 'newton_schulz backward' in run.stdout

    report = json.loads(output.read_text())
    assert set(report['macs']) == {'conv', 'covariance', 'fold', 'whitening_product'}
    assert all(value > 0 for value in report['macs'].values())
    assert set(report['operators']) == {'deconv', 'bn', 'literal', 'frozen', 'reusing'}
    assert report['operators']['deconv']['operators'] > report['operators']['bn']['operators'] > 0
    assert report['config']['batch_size'] == 2 and report['machine']['threads'] == 1
    assert set(report['results']) == {'deconv', 'bn', 'literal', 'frozen', 'reusing'}
    for result in report['results'].values():
        for phase in ('train_ms', 'eval_ms', 'train_cpu_ms', 'eval_cpu_ms'):
            assert len(result[phase]['samples']) == 1 and result[phase]['median'] > 0
        assert result['peak_step_mb'] > 0 and result['state_mb'] > 0
    assert set(report['ratios']) == {'deconv/bn', 'literal/bn', 'frozen/bn', 'freeze_schedule/bn', 'reusing/bn',
                                     'refresh_schedule/bn'}
    for schedule in ('freeze_schedule/bn', 'refresh_schedule/bn'):
        assert report['ratios'].pop(schedule)['train_cpu'] > 0
    for ratio in report['ratios'].values():
        for phase in ('train', 'eval', 'train_cpu', 'eval_cpu'):
            assert ratio[phase]['median'] > 0
        assert ratio['memory'] > 0
    for role in ('deconv', 'literal'):
        parts = report['profile'][role]['parts']
        for scope in ('covariance', 'newton_schulz', 'fold'):
            assert parts[f'{scope} forward'] > 0 and parts[f'{scope} backward'] > 0
        assert parts['convolution forward'] > 0 and parts['convolution backward'] > 0


def test_suite_table_marks_targets(capsys):
    benchmark = load_benchmark()

    def ratio(value):
        return dict(median=value, min=value, max=value)

    report = dict(config=dict(pair='a:b', device='cpu', batch_size=64, img_size=32, dtype='float32'),
                  machine=dict(threads=2),
                  ratios={'deconv/bn': dict(train=ratio(1.4), train_cpu=ratio(1.45), eval=ratio(1.2), memory=0.9)})
    benchmark.print_suite_table([({}, (1.5, 1.05, 1.3))], [report])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith('| `a:b` cpu 64x32px float32, 2 threads | 1.40 (1.45) | 1.20 | 0.90 | - | - | - |')
    assert row.endswith('| train yes, eval no, memory yes |')

    report['ratios']['refresh_schedule/bn'] = dict(train=1.6, train_cpu=1.55)
    benchmark.print_suite_table([({}, (1.5, 1.05, 1.3))], [report])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert '| - | 1.60 (1.55) |' in row and row.endswith('| train yes, eval no, memory yes, refresh schedule train no |')


class DeviceSideEvents:
    """The profiler, with an event it adds on CUDA: a ``record_function`` range listed a second
    time as a device-side annotation, with no parent (and the device time of the range)."""

    def __init__(self, *args, **kwargs):
        self.prof = torch.profiler.profile(*args, **kwargs)

    def __enter__(self):
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        return self.prof.__exit__(*exc)

    def events(self):
        annotation = SimpleNamespace(name='deconv::covariance', device_type=torch.autograd.DeviceType.CUDA,
                                     cpu_parent=None, sequence_nr=-1, thread=0, fwd_thread=0,
                                     cpu_time_total=1e12, device_time_total=1e12)
        return list(self.prof.events()) + [annotation]


def test_profile_reads_host_events_only(monkeypatch):
    """On CUDA the step's parts come from the host ops (which carry their kernels' device time);
    the device-side copies of the scopes would count them twice, backward ones as forward."""
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, 'profile', DeviceSideEvents)
    args = benchmark.parse_args(['--batch-size', '2', '--img-size', '6'])
    torch.manual_seed(0)
    # The convolution in front gives the whitening an input that needs a gradient (a backward).
    model = nn.Sequential(nn.Conv2d(3, 3, 1), FastDeconv(3, 4, 3, padding=1, block=3), nn.Flatten(),
                          nn.Linear(144, 5))
    model.num_classes = 5
    wall, parts = benchmark.profile_step(benchmark.Runner('tiny', model, args, torch.device('cpu')))
    assert 0 < parts['covariance forward'] < wall
    assert parts['covariance backward'] > 0


def test_suite_report_is_written_after_each_case(monkeypatch, tmp_path):
    """A suite case that fails (or a step killed at its time limit) keeps the earlier cases' report."""
    benchmark = load_benchmark()
    cases = [(dict(pair='a:b'), (1.5, 1.05, 1.3)), (dict(pair='c:d'), (1.5, 1.05, 1.3))]
    monkeypatch.setitem(benchmark.SUITES, 'cpu', cases)

    def run_case(args):
        if args.pair == 'c:d':
            raise RuntimeError('second case failed')
        return dict(config=dict(pair=args.pair))

    monkeypatch.setattr(benchmark, 'run_case', run_case)
    output = tmp_path / 'suite.json'
    with pytest.raises(RuntimeError, match='second case failed'):
        benchmark.main(['--suite', 'cpu', '--output', str(output)])
    assert json.loads(output.read_text()) == dict(suite='cpu', cases=[dict(config=dict(pair='a:b'))])


def test_compile_counters_are_readable():
    """The torch.compile counters that --compile reports (private torch API: checked to exist)."""
    counts = load_benchmark().compile_counters()
    assert set(counts) == {'graph_breaks', 'cudagraph_skips'}
    assert all(isinstance(value, int) and value >= 0 for value in counts.values())


# python3 for a dry run of cuda_checks.sh: runs nothing, writes the JSON a benchmark would.
FAKE_PYTHON = """#!/bin/sh
while [ $# -gt 0 ]; do
    if [ "$1" = --output ]; then echo '{}' > "$2"; fi
    shift
done
cat > /dev/null
"""


def test_cuda_checks_dry_run(tmp_path):
    """scripts/cuda_checks.sh with stand-ins for python3 and nvidia-smi: every step runs and passes,
    and what it writes fits what a lent GPU machine sends back (at most 8 files); with too little
    time left, steps are skipped and the run fails."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('python3', FAKE_PYTHON), ('nvidia-smi', '#!/bin/sh\necho NVIDIA H200\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    steps = ('cuda_suite', 'cuda_tests', 'cuda_suite_no_finite_check', 'cifar_cuda_graphs', 'imagenet_compiled')

    def cuda_checks(out, **env):
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
        run = subprocess.run(['bash', str(CUDA_CHECKS), str(out)], capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL, env=env)
        return run.returncode, (out / 'cuda_checks.log').read_text()

    returncode, log = cuda_checks(tmp_path / 'out')
    assert returncode == 0, log
    files = {path.name for path in (tmp_path / 'out').iterdir()}
    assert files == {'cuda_checks.log'} | {f'{step}.json' for step in steps if step != 'cuda_tests'}
    assert len(files) <= 8
    for step in steps:
        assert f'== {step}: exit status 0' in log

    returncode, log = cuda_checks(tmp_path / 'short', CUDA_CHECKS_SECONDS='20')
    assert returncode == 1
    for step in steps:
        assert f'== {step}: skipped' in log


@pytest.mark.parametrize('argv, message', [
    (['--repeats', '0'], 'argument --repeats: must be at least 1, not 0'),  # was statistics.StatisticsError at the end
    (['--batch-size', '0'], 'argument --batch-size: must be at least 1, not 0'),
    (['--refresh-every', '0'], 'argument --refresh-every: must be at least 1, not 0'),  # was ignored
    (['--pair', 'resnet18_cifar_deconv'], "--pair 'resnet18_cifar_deconv': expected deconv_model:bn_model"),
    (['--pair', 'resnet18_cifar_deconv:nosuch'], "--pair: unknown model 'nosuch'"),
    (['--deconv-kwargs', '[1]'], "argument --deconv-kwargs: expected a JSON object"),
    (['--device', 'bogus'], "--device 'bogus': Expected one of cpu"),
    (['--compile-mode', 'max-autotune'], '--compile-mode needs --compile'),  # was ignored
    (['--output', 'no/such/folder/benchmark.json'], "--output: no folder for 'no/such/folder/benchmark.json'"),
    (['--output', '.'], "argument --output: '.' is a folder: name the file to write in it"),  # was after the run
    (['--deconv-kwargs', '{"num_classes": 0}'], '--deconv-kwargs num_classes=0: a headless model'),  # an IndexError
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    """Refused before any model is built: each failed mid-run with a traceback, after the whole run
    (--output), or was accepted and ignored."""
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _runner(benchmark: ModuleType, model: nn.Module, **settings) -> 'benchmark.Runner':
    args = SimpleNamespace(**dict(dict(channels_last=False, compile=False, compile_mode=None, batch_size=2,
                                       img_size=8, dtype='float32'), **settings))
    return benchmark.Runner('model', model, args, torch.device('cpu'))


def test_timed_steps_are_the_steps_they_are_said_to_be():
    """A frozen copy turned to fresh steps after 9 * freeze_iter - 1 calls (its timed samples mixed
    400 and 1200 ms); in float16 GradScaler skipped early optimizer steps, for one model and not the
    other; a model of 1 input channel was fed 3 channels."""
    import timm

    benchmark = load_benchmark()
    torch.manual_seed(0)
    model = timm.create_model('resnet18_cifar_deconv', layers=(1, 1, 1, 1), deconv_cfg=dict(block=4), in_chans=1)
    frozen = _runner(benchmark, benchmark.frozen_copy(model, freeze_iter=1))
    stem = frozen.module.conv1
    running = stem.running_deconv.clone()
    for _ in range(12):
        frozen.train_step()
    assert torch.equal(stem.running_deconv, running)  # every call frozen
    half = _runner(benchmark, timm.create_model('resnet18_cifar', layers=(1, 1, 1, 1)), dtype='fp16')
    half.warm_up('train_step', 0)
    assert half.optimizer.state  # the last warm-up step updated the weights


def test_schedules_of_a_model_without_deconvolution_are_refused():
    """The rows 'frozen step' and 'reusing step' were printed for a BN model (nothing to freeze)."""
    from deconv_zoo.evaluation import ModelArgumentsError

    benchmark = load_benchmark()
    args = benchmark.parse_args(['--pair', 'resnet18_cifar:resnet18_cifar', '--freeze-iter', '2', '--no-literal'])
    with pytest.raises(ModelArgumentsError, match=r'resnet18_cifar \(the first model of --pair\) has none'):
        benchmark.build_runners(args, torch.device('cpu'))
