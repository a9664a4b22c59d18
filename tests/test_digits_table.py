"""scripts/digits_table.py's table (issue #4; the --deconv-cfg column for approximations, issue #5).
The training runs themselves are covered by test_training.py; here only the table is built."""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / 'scripts' / 'digits_table.py'


def load_script():
    spec = importlib.util.spec_from_file_location('digits_table', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs(*top1s):
    """One seed's runs: top-1 of the 1- and 5-epoch schedules."""
    return {epochs: [dict(top1=top1, seconds=10.0 * epochs)] for epochs, top1 in zip((1, 5), top1s)}


def test_table_has_a_column_per_model_and_epoch_budget():
    table = load_script().markdown_table(
        {'resnet18': dict(deconv=runs(73.1, 98.9), bn=runs(10.0, None))}, [1, 5],
        argparse.Namespace(img_size=16, seeds=[0], deconv_cfg=None)).splitlines()
    assert table[0] == '| architecture | deconv 1 ep | BN 1 ep | deconv 5 ep | BN 5 ep | time deconv / BN (5 ep) |'
    assert table[2] == '| `resnet18_cifar` | 73.10 | 10.00 | 98.90 | failed | 50 s / 50 s |'


def test_deconv_cfg_adds_the_variant_beside_the_paper_layer():
    table = load_script().markdown_table(
        {'resnet18': dict(deconv=runs(73.1, 98.9), variant=runs(60.0, 99.4), bn=runs(10.0, 76.4))}, [1, 5],
        argparse.Namespace(img_size=16, seeds=[0], deconv_cfg={'refresh_every': 4})).splitlines()
    assert table[0].startswith('| architecture | deconv 1 ep | deconv (refresh_every=4) 1 ep | BN 1 ep | deconv 5 ep |')
    assert table[2] == '| `resnet18_cifar` | 73.10 | 60.00 | 10.00 | 98.90 | 99.40 | 76.40 | 50 s / 50 s / 50 s |'


def test_several_seeds_give_mean_and_range():
    seeds = [dict(top1=top1, seconds=seconds) for top1, seconds in ((99.44, 170.0), (98.61, 180.0), (99.17, 175.0))]
    table = load_script().markdown_table(
        {'resnet18': dict(deconv={5: seeds}, bn={5: seeds[:2] + [dict(top1=None, seconds=60.0)]})}, [5],
        argparse.Namespace(img_size=16, seeds=[0, 1, 2], deconv_cfg=None)).splitlines()
    assert table[2] == '| `resnet18_cifar` | 99.07 (98.61–99.44) | failed | 175 s / 137 s |'
    assert table[-1].endswith('mean (min–max) over seeds 0, 1, 2; each column is a complete run of that many epochs.')


def test_results_are_read_from_the_folder_the_run_reports():
    module = load_script()
    log = 'resnet18_cifar_deconv: 11.17M parameters\nrun folder: out/resnet18-e5-1\nvalidation top-1 99.44%\n'
    assert module.run_folder(log, 'out/resnet18-e5') == 'out/resnet18-e5-1'  # the name already held a run
    assert module.run_folder('no such line', 'out/resnet18-e5') == 'out/resnet18-e5'


def test_models_option_trains_and_tabulates_only_those(monkeypatch, tmp_path):
    module = load_script()
    trained = []

    def fake_run(model, epochs, seed, args, deconv_cfg=None):
        trained.append((model, deconv_cfg))
        return dict(top1=90.0, seconds=1.0)

    monkeypatch.setattr(module, 'train_run', fake_run)
    table = module.main(['--archs', 'resnet18', '--epochs', '5', '--output', str(tmp_path),
                         '--deconv-cfg', '{"refresh_every": 4}', '--models', 'variant']).splitlines()
    assert trained == [('resnet18_cifar_deconv', {'refresh_every': 4})]
    assert table[0] == '| architecture | deconv (refresh_every=4) 5 ep | time deconv (refresh_every=4) (5 ep) |'
    assert table[2] == '| `resnet18_cifar` | 90.00 | 1 s |'


@pytest.mark.parametrize('argv, message', [
    (['--deconv-cfg', '[4]'], 'expected a JSON object such as {"refresh_every": 4}'),
    (['--markdown-file', 'no/such/folder/table.md'], "--markdown-file: no folder for 'no/such/folder/table.md'"),
    # These failed in train.py, one run at a time, or (repeats) trained a whole run again.
    (['--archs', 'resnet19'], "--archs: unknown model 'resnet19_cifar_deconv'"),
    (['--deconv-cfg', '{"bogus": 1}'], "--deconv-cfg: deconv_cfg: unknown FastDeconv settings ['bogus']"),
    (['--epochs', '0'], 'argument --epochs: must be at least 1, not 0'),
    (['--epochs', '5', '5'], '--epochs 5 5: each value once'),
])
def test_bad_arguments_fail_before_any_run(monkeypatch, tmp_path, capsys, argv, message):
    """A list as --deconv-cfg was an AttributeError in the first variant run; a markdown file in a
    missing folder a FileNotFoundError after every run had trained."""
    module = load_script()
    trained = []

    def fake_run(model, epochs, seed, args, deconv_cfg=None):
        trained.append(model)
        return dict(top1=90.0, seconds=1.0)

    monkeypatch.setattr(module, 'train_run', fake_run)
    with pytest.raises(SystemExit):
        module.main(['--archs', 'resnet18', '--epochs', '1', '--output', str(tmp_path)] + argv)
    assert message in capsys.readouterr().err and not trained


def test_results_file_is_written_whole_or_not_at_all(monkeypatch, tmp_path):
    """results.json was dumped straight into the file: a value json cannot write left it truncated."""
    module = load_script()
    (tmp_path / 'results.json').write_text('{"previous": 1}')
    monkeypatch.setattr(module, 'train_run', lambda *args, **kwargs: dict(top1=np.float32(90.0), seconds=1.0))
    with pytest.raises(TypeError, match='float32 is not JSON serializable'):
        module.main(['--archs', 'resnet18', '--epochs', '1', '--output', str(tmp_path)])
    assert json.loads((tmp_path / 'results.json').read_text()) == {'previous': 1}
    assert sorted(path.name for path in tmp_path.iterdir()) == ['results.json']
