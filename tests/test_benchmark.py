"""scripts/benchmark.py runs end to end and writes its report (issue #5). No timing is asserted."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / 'scripts' / 'benchmark.py'


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
    spec = importlib.util.spec_from_file_location('benchmark', SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

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
