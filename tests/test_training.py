"""Training, validation and visualisation scripts, and the machinery behind them (issue #4).

The learning, kill/resume and multi-process tests run real training on CPU, so they use a small
deconvolution network: resnet18_cifar_deconv with one block per stage and 16-channel whitening
blocks, at the digits' native 8x8 resolution.
"""
import contextlib
import csv
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from timm.scheduler import create_scheduler_v2

from deconv_zoo.data import DatasetError, DatasetNotFoundError, DigitsDataset, ResumableSampler, create_image_dataset
from deconv_zoo.distributed import SyncDelinear, SyncFastDeconv, convert_sync_deconv
from deconv_zoo.evaluation import BAD_INPUT_ERRORS, ModelArgumentsError
from deconv_zoo.layers import Delinear, FastDeconv
from deconv_zoo.training import BEST, LAST, CheckpointManager, TrainingStopped, TrainPosition, atomic_save
from deconv_zoo.weights import CheckpointMismatchError, CorruptWeightsError

REPO = Path(__file__).resolve().parents[1]
SMALL_DECONV = ['--model', 'resnet18_cifar_deconv', '--model-kwargs', 'layers=(1,1,1,1)', "deconv_cfg={'block': 16}",
                '--img-size', '8', '--no-progress', '--workers', '0']


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f'script_{name}', REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def offline_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.mktemp('cache')
    monkeypatch.setenv('TORCH_HOME', str(cache / 'torch'))
    monkeypatch.setenv('HF_HOME', str(cache / 'hf'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


def summary_rows(run_folder: Path) -> List[Dict[str, str]]:
    with open(run_folder / 'summary.csv') as f:
        return list(csv.DictReader(f))


def state_dicts_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- data

def test_digits_split_is_fixed_stratified_and_resized() -> None:
    train, val = DigitsDataset('train', input_size=(3, 16, 16)), DigitsDataset('validation', input_size=(1, 8, 8))
    assert (len(train), len(val)) == (1437, 360)
    assert torch.equal(DigitsDataset('validation').targets, val.targets)
    assert torch.bincount(val.targets).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    image, label = train[0]
    assert image.shape == (3, 16, 16) and 0 <= image.min() and image.max() <= 1 and 0 <= label < 10
    assert val[0][0].shape == (1, 8, 8)


def test_resumable_sampler_continues_the_epoch_order() -> None:
    data = list(range(50))
    full = ResumableSampler(data, seed=3)
    full.set_epoch(2)
    resumed = ResumableSampler(data, seed=3)
    resumed.set_epoch(2, skip=20)
    assert list(resumed) == list(full)[20:] and len(resumed) == 30
    other_epoch = ResumableSampler(data, seed=3)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != list(full)


# --------------------------------------------------------------------------------------- learning

@pytest.mark.slow
def test_deconv_model_learns_digits(tmp_path: Path) -> None:
    """One epoch (23 steps of 64) on the real digits reaches >= 90% validation accuracy."""
    train = load_script('train')
    result = train.main(SMALL_DECONV + ['--epochs', '1', '--batch-size', '64', '--seed', '0',
                                        '--output', str(tmp_path)])
    assert result['top1'] >= 90.0, result
    assert (Path(result['run_folder']) / 'summary.csv').is_file()


def test_training_options_smoke(tmp_path: Path) -> None:
    """bf16 autocast, channels_last, mixup with label smoothing, EMA, clipping and TensorBoard
    together, on synthetic data (speed only, no claim about learning)."""
    train = load_script('train')
    result = train.main(SMALL_DECONV + [
        '--dataset', 'synthetic', '--synthetic-size', '32', '--batch-size', '16', '--max-steps', '2',
        '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--mixup', '0.2', '--smoothing', '0.1',
        '--model-ema', '--clip-grad', '1', '--log-tensorboard', '--output', str(tmp_path), '--experiment', 'smoke'])
    assert result['global_step'] == 2 and result['num_images'] == 8
    assert any((tmp_path / 'smoke' / 'tensorboard').iterdir())


# ------------------------------------------------------------------------------------ checkpoints

def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / LAST
    atomic_save({'step': 1}, str(path))

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'partial checkpoint bytes')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        atomic_save({'step': 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1}
    assert os.listdir(tmp_path) == [LAST]  # no temporary file left behind


def test_atomic_save_gives_the_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        atomic_save({'step': 1}, str(tmp_path / LAST))
    finally:
        os.umask(previous)
    assert (tmp_path / LAST).stat().st_mode & 0o777 == 0o664  # as open() would create it, not 0600


def _manager(folder: Path, epochs: int = 1, model: Optional[torch.nn.Module] = None, **kwargs) -> CheckpointManager:
    """A checkpoint manager for a tiny model, its SGD and a per-step cosine schedule of ``epochs`` x 2 steps."""
    model = model or torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, min_lr=0.0, warmup_epochs=0,
                                       step_on_epochs=False, updates_per_epoch=2)
    return CheckpointManager(str(folder), model, optimizer, scheduler, args=dict(epochs=epochs), arch='tiny', **kwargs)


def test_resume_continues_on_the_schedule_of_the_current_arguments(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A finished 1-epoch run resumed with 3 epochs continues at the lr of step 2 of 6 (not the 0 its
    checkpointed scheduler ends at); with the same arguments the lr is the checkpointed one, bit for bit."""
    finished = _manager(tmp_path)
    finished.scheduler.step_update(num_updates=2)
    finished.save_epoch(TrainPosition(1, 0, 2), 50.0)
    assert finished.optimizer.param_groups[0]['lr'] == 0.0

    same = _manager(tmp_path)
    same.load(str(tmp_path / LAST))
    assert same.optimizer.param_groups[0]['lr'] == 0.0
    longer = _manager(tmp_path, epochs=3)
    with caplog.at_level(logging.INFO):
        longer.load(str(tmp_path / LAST))
    assert longer.optimizer.param_groups[0]['lr'] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))
    assert 'epochs 1 -> 3' in caplog.text


def test_mid_epoch_resume_refuses_another_data_order(tmp_path: Path) -> None:
    """The resumed epoch skips step_in_epoch batches of the current order: with another batch size
    (or world size, seed) that skipped or repeated samples without a word. At an epoch end the
    arguments may change."""
    written = _manager(tmp_path)
    written.args.update(batch_size=16, world_size=2, seed=0)
    written.save_step(TrainPosition(0, 3, 3))
    resuming = _manager(tmp_path)
    resuming.args.update(batch_size=32, world_size=2, seed=0)
    before = resuming.model.state_dict()
    with pytest.raises(CheckpointMismatchError, match=r'after step 3 of epoch 0; .*\(batch_size 16 -> 32\)'):
        resuming.load(str(tmp_path / LAST))
    assert state_dicts_equal(before, resuming.model.state_dict())
    written.save_epoch(TrainPosition(1, 0, 6), None)
    assert resuming.load(str(tmp_path / LAST)) == TrainPosition(1, 0, 6)


def test_resume_on_another_dataset_root_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    written = _manager(tmp_path)
    written.args.update(data_dir='/data/imagenet')
    written.save_step(TrainPosition(0, 1, 1))
    resuming = _manager(tmp_path)
    resuming.args.update(data_dir='/scratch/imagenet')
    with caplog.at_level(logging.WARNING):
        resuming.load(str(tmp_path / LAST))
    assert 'with another dataset root (data_dir /data/imagenet -> /scratch/imagenet)' in caplog.text


@pytest.mark.parametrize('change', ['opt', 'param groups'])
def test_resume_refuses_the_state_of_another_optimizer(tmp_path: Path, change: str) -> None:
    """Resuming with another --opt loaded SGD's momentum buffers into AdamW, which failed with a KeyError
    at the first step (after args.json was rewritten); other parameter groups (--filter-bias-and-bn) were
    torch's ValueError after the weights were restored. Now refused before anything is restored."""
    written = _manager(tmp_path)
    written.args.update(opt='momentum')
    written.save_epoch(TrainPosition(1, 0, 2), None)
    resuming = _manager(tmp_path)
    if change == 'opt':
        resuming.args.update(opt='adamw')
        resuming.optimizer = torch.optim.AdamW(resuming.model.parameters(), lr=0.1)
        expected = r'optimizer state does not fit this optimizer \(opt momentum -> adamw\)'
    else:
        resuming.args.update(opt='momentum')
        resuming.optimizer = torch.optim.SGD([{'params': [resuming.model.weight]}, {'params': [resuming.model.bias]}],
                                             lr=0.1, momentum=0.9)
        expected = r'optimizer state does not fit this optimizer \(parameter groups of \[2\] -> \[1, 1\] parameters\)'
    before = resuming.model.state_dict()
    with pytest.raises(CheckpointMismatchError, match=expected) as failed:
        resuming.load(str(tmp_path / LAST))
    assert str(tmp_path / LAST) in str(failed.value) and '--initial-checkpoint' in str(failed.value)
    assert state_dicts_equal(before, resuming.model.state_dict())


def test_resume_takes_the_current_weight_decay_and_momentum(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """torch's Optimizer.load_state_dict restores each group's recorded settings: a resume with
    another --weight-decay or --momentum trained on the old ones while args.json recorded the new."""
    written = _manager(tmp_path)
    written.args.update(weight_decay=0.0, momentum=0.9)
    loss = written.model(torch.ones(1, 2)).sum()
    loss.backward()
    written.optimizer.step()  # a momentum buffer to carry over
    written.save_epoch(TrainPosition(1, 0, 2), None)
    resuming = _manager(tmp_path)
    resuming.args.update(weight_decay=0.01, momentum=0.5)
    resuming.optimizer = torch.optim.SGD(resuming.model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.01)
    with caplog.at_level(logging.INFO):
        resuming.load(str(tmp_path / LAST))
    group = resuming.optimizer.param_groups[0]
    assert (group['momentum'], group['weight_decay']) == (0.5, 0.01)
    buffers = [resuming.optimizer.state[p]['momentum_buffer'] for p in resuming.model.parameters()]
    assert all(torch.equal(b, written.optimizer.state[p]['momentum_buffer'])
               for b, p in zip(buffers, written.model.parameters()))
    assert ('optimizer settings of the current arguments (weight_decay 0.0 -> 0.01, momentum 0.9 -> 0.5)'
            in caplog.text)


def test_resume_keeps_the_plateau_scheduler_counters(tmp_path: Path) -> None:
    """timm's PlateauLRScheduler saves its best metric only: a resume reset the epochs without
    improvement (and the cooldown), so the learning rate dropped later than in the uninterrupted run."""
    def plateau_manager() -> CheckpointManager:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler, _ = create_scheduler_v2(optimizer, sched='plateau', num_epochs=10, patience_epochs=2,
                                           cooldown_epochs=1, warmup_epochs=0)
        return CheckpointManager(str(tmp_path), model, optimizer, scheduler, arch='tiny')

    def run(manager: CheckpointManager, epochs: range, metrics: List[float]) -> List[float]:
        lrs = []
        for epoch in epochs:
            manager.scheduler.step(epoch + 1, metrics[epoch])
            lrs.append(manager.optimizer.param_groups[0]['lr'])
        return lrs

    metrics = [50.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0]
    straight = run(plateau_manager(), range(7), metrics)
    interrupted = plateau_manager()
    run(interrupted, range(2), metrics)  # one epoch without improvement so far
    interrupted.save_epoch(TrainPosition(2, 0, 2), None)
    resumed = plateau_manager()
    resumed.load(str(tmp_path / LAST))
    assert straight[:2] + run(resumed, range(2, 7), metrics) == straight
    assert straight[3] < straight[2]  # the plateau's reduction falls inside the resumed part


def test_resume_on_another_world_size_warns_that_the_data_order_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At an epoch end the world size may change; the warning named only the RNG states, though each
    process then also takes other samples of every epoch."""
    _manager(tmp_path).save_epoch(TrainPosition(1, 0, 2), None)
    with caplog.at_level(logging.WARNING):
        assert _manager(tmp_path).load(str(tmp_path / LAST), rank=0, world_size=2) == TrainPosition(1, 0, 2)
    assert 'written by 1 processes, this run has 2: the per-process data order changes' in caplog.text


def test_checkpoints_refuse_non_finite_buffers(tmp_path: Path) -> None:
    """A non-finite running variance stops the run like a non-finite weight; nothing is written."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[1].running_var[0] = math.inf
    with pytest.raises(TrainingStopped, match='buffer 1.running_var became non-finite') as stopped:
        _manager(tmp_path, model=model).save_step(TrainPosition(0, 1, 1))
    assert '..' not in str(stopped.value) and not (tmp_path / LAST).exists()
    reason = 'FloatingPointError: non-finite statistics; running statistics were left unchanged.'
    assert 'left unchanged. Last good' in str(_manager(tmp_path).stopped(TrainPosition(), reason))


def test_best_is_written_before_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between two writes must not leave a last that claims a best model_best does not hold."""
    written = []
    monkeypatch.setattr('deconv_zoo.training.atomic_save', lambda state, path: written.append(os.path.basename(path)))
    _manager(tmp_path, every_epochs=1).save_epoch(TrainPosition(1, 0, 2), 50.0)
    assert written == [BEST, 'checkpoint-0.pth.tar', LAST]


def test_checkpoint_manager_removes_stale_temporary_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = ['.last.pth.tar.1a2b3c4d.tmp', '.model_best.pth.tar.k_9xq2zz.tmp', '.checkpoint-3.pth.tar.0f0f0f0f.tmp',
             '.args.json.0a1b2c3d.tmp', '.summary.csv.9f8e7d6c.tmp']
    kept = ['.notes.txt.1a2b3c4d.tmp', 'last.pth.tar.tmp', LAST]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b'partial')
    with caplog.at_level(logging.INFO):
        _manager(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert all(name in caplog.text for name in stale)


@pytest.mark.parametrize('problem', ['truncated', 'random bytes', 'other architecture', 'not a training checkpoint'])
def test_failed_resume_names_the_file_and_the_problem(tmp_path: Path, problem: str) -> None:
    good = _manager(tmp_path)
    good.save_step(TrainPosition(0, 1, 1))
    path = tmp_path / LAST
    expected = {'truncated': (CorruptWeightsError, 'truncated or corrupt'),
                'random bytes': (CorruptWeightsError, 'not a weights file'),
                'other architecture': (CheckpointMismatchError, 'checkpoint is for tiny, not other'),
                'not a training checkpoint': (CheckpointMismatchError, 'not a training checkpoint')}[problem]
    if problem == 'truncated':
        path.write_bytes(path.read_bytes()[:200])
    elif problem == 'random bytes':
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif problem == 'not a training checkpoint':
        atomic_save(good.model.state_dict(), str(path))
    resuming = _manager(tmp_path)
    resuming.arch = 'other' if problem == 'other architecture' else 'tiny'
    before = resuming.model.state_dict()
    with pytest.raises(expected[0], match=expected[1]) as failed:
        resuming.load(str(path))
    assert str(path) in str(failed.value)
    assert state_dicts_equal(before, resuming.model.state_dict())


@pytest.mark.slow
def test_non_finite_training_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """A huge learning rate blows the weights up after the first step; the run stops at step 1,
    names the checkpoint written after step 1, and that checkpoint loads."""
    train = load_script('train')
    args = SMALL_DECONV + ['--lr', '1e30', '--clip-grad', '1', '--checkpoint-steps', '1', '--epochs', '1',
                           '--batch-size', '32', '--train-limit', '128', '--val-limit', '32',
                           '--output', str(tmp_path), '--experiment', 'blowup']
    with pytest.raises(TrainingStopped) as stopped:
        train.main(args)
    last = tmp_path / 'blowup' / LAST
    message = str(stopped.value)
    assert 'stopped at step 1' in message and str(last) in message
    assert 'non-finite' in message or 'FloatingPointError' in message
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint['global_step'] == 1 and checkpoint['step_in_epoch'] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values() if v.is_floating_point())


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Kill a run with SIGKILL inside its first epoch, resume with --resume auto: the final
    weights, EMA and optimizer state equal those of an uninterrupted run, bit for bit.

    The uninterrupted and the killed run go side by side, one thread each (the same thread count
    for every run, so that CPU kernels reduce in the same order)."""
    command = [sys.executable, str(REPO / 'scripts' / 'train.py')] + SMALL_DECONV + [
        '--epochs', '2', '--batch-size', '32', '--train-limit', '64', '--val-limit', '16', '--checkpoint-steps', '1',
        '--model-ema', '--model-ema-decay', '0.9', '--seed', '7', '--resume', 'auto', '--output', str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    straight = subprocess.Popen(command + ['--experiment', 'straight'], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = subprocess.Popen(command + ['--experiment', 'killed'], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / 'killed' / LAST
    deadline = time.monotonic() + 120
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    interrupted_at = torch.load(last, weights_only=True)
    assert (interrupted_at['epoch'], interrupted_at['step_in_epoch']) == (0, 1)  # mid-epoch

    subprocess.run(command + ['--experiment', 'killed'], check=True, env=env, capture_output=True)
    assert straight.wait() == 0, straight.stderr.read().decode()[-3000:]
    straight = torch.load(tmp_path / 'straight' / LAST, weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed['global_step'] == straight['global_step'] == 4
    assert state_dicts_equal(straight['state_dict'], resumed['state_dict'])
    assert state_dicts_equal(straight['state_dict_ema'], resumed['state_dict_ema'])
    for a, b in zip(straight['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert torch.equal(a['momentum_buffer'], b['momentum_buffer'])
    # One row per epoch, none repeated; the validation columns match (the resumed epoch's
    # train_loss covers only the steps run after the resume).
    columns = ('epoch', 'eval_top1', 'eval_top5', 'eval_loss')
    killed_rows, straight_rows = summary_rows(tmp_path / 'killed'), summary_rows(tmp_path / 'straight')
    assert [[row[c] for c in columns] for row in killed_rows] == [[row[c] for c in columns] for row in straight_rows]
    assert [row['epoch'] for row in killed_rows] == ['0', '1']


def test_a_run_on_the_refresh_schedule_resumes_exactly(tmp_path: Path) -> None:
    """refresh_every keeps the whitening it reuses in the layer, not in the weights: a run stopped
    after a fresh step resumed with a fresh one where the uninterrupted run reused, and ended elsewhere."""
    train = load_script('train')
    args = ['--model', 'resnet18_cifar_deconv', '--model-kwargs', 'layers=(1,1,1,1)',
            "deconv_cfg={'block': 16, 'refresh_every': 3}", '--img-size', '8', '--no-progress', '--workers', '0',
            '--epochs', '1', '--batch-size', '16', '--train-limit', '64', '--val-limit', '8', '--seed', '3',
            '--output', str(tmp_path)]
    train.main(args + ['--experiment', 'whole'])
    train.main(args + ['--experiment', 'stopped', '--max-steps', '2'])
    stopped = torch.load(tmp_path / 'stopped' / LAST, weights_only=True)
    (schedule,) = stopped['refresh_schedules']  # one process
    assert schedule['layer1.0.conv1']['reuse_count'] == 1  # steps 1 (fresh) and 2 (reused) are done
    train.main(args + ['--experiment', 'stopped', '--resume', 'auto'])
    whole, resumed = (torch.load(tmp_path / name / LAST, weights_only=True) for name in ('whole', 'stopped'))
    assert resumed['global_step'] == whole['global_step'] == 4
    assert state_dicts_equal(whole['state_dict'], resumed['state_dict'])


def test_resume_with_another_model_is_a_one_line_error_that_keeps_args_json(tmp_path: Path) -> None:
    run = tmp_path / 'x'
    run.mkdir()
    atomic_save(dict(arch='resnet18_cifar_deconv', state_dict={}, optimizer={}, epoch=1, step_in_epoch=0,
                     global_step=2, rng=[]), str(run / LAST))
    (run / 'args.json').write_text('{"model": "resnet18_cifar_deconv"}')
    done = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'train.py'), '--model', 'resnet18_cifar', '--img-size', '8',
         '--resume', 'auto', '--output', str(tmp_path), '--experiment', 'x'], capture_output=True, text=True)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
    assert f'{run / LAST}: checkpoint is for resnet18_cifar_deconv, not resnet18_cifar' in done.stderr
    assert (run / 'args.json').read_text() == '{"model": "resnet18_cifar_deconv"}'


@pytest.mark.parametrize('script, argv, message', [
    ('train', ['--model', 'nosuchmodel'], "unknown model 'nosuchmodel'"),
    ('train', ['--dataset', 'nosuchdataset', '--data-dir', '.'], "unknown dataset 'nosuchdataset': use 'digits'"),
    ('train', ['--dataset', 'torch/cifar10'], 'needs --data-dir'),
    ('train', ['--batch-size', '15', '--cutmix', '1'], '--batch-size 15: mixup and cutmix pair the images of a batch'),
    ('train', ['--data-dir', 'imagenet'], "dataset 'digits' is built in and reads no --data-dir (imagenet): for an "
                                          "image folder add --dataset folder"),
    ('train', ['--batch-size', '0'], 'argument --batch-size/-b: must be at least 1, not 0'),
    ('train', ['--batch-size', '-2'], 'must be at least 1, not -2'),
    ('train', ['--model-kwargs', 'layers=(1,1'], "argument --model-kwargs: layers: '(1,1' is not a Python literal"),
    ('train', ['--model-kwargs', 'foo'], "argument --model-kwargs: 'foo' is not key=value"),
    ('train', ['--resume', 'missing.pth.tar'], "--resume: no checkpoint at 'missing.pth.tar'"),
    ('validate', ['--model', 'nosuchmodel'], "unknown model 'nosuchmodel'"),
    ('validate', ['--dataset', 'digitz'], "unknown dataset 'digitz': use 'digits'"),
    ('train', ['--dataset', 'wds/imagenet', '--data-dir', '.'], "'wds/imagenet' is a streaming (iterable) dataset"),
    ('validate', ['--dataset', 'tfds/mnist', '--data-dir', '.'], "'tfds/mnist' is a streaming (iterable) dataset"),
    # Were tracebacks from torch or timm (some after the run folder), or ran without a word: a negative
    # --clip-grad reversed every gradient, a negative --checkpoint-steps wrote a checkpoint every step.
    ('train', ['--lr', '-1'], 'argument --lr: must be at least 0, not -1'),
    ('train', ['--lr', 'nan'], 'argument --lr: must be at least 0, not nan'),
    ('train', ['--weight-decay=-0.001'], 'argument --weight-decay: must be at least 0, not -0.001'),
    ('train', ['--seed', '-1'], 'argument --seed: must be at least 0, not -1'),  # np's SeedSequence refused it later
    ('train', ['--clip-grad', '-1'], 'argument --clip-grad: must be above 0, not -1'),
    ('train', ['--smoothing', '1'], 'argument --smoothing: must be in [0, 1), not 1'),
    ('train', ['--drop', '1.5'], 'argument --drop: must be in [0, 1), not 1.5'),
    ('train', ['--hflip', '2'], 'argument --hflip: must be in [0, 1], not 2'),
    ('train', ['--model-ema-decay', '5'], 'argument --model-ema-decay: must be in [0, 1], not 5'),
    ('train', ['--checkpoint-steps', '-1'], 'argument --checkpoint-steps: must be at least 0, not -1'),
    ('train', ['--workers', '-1'], 'argument --workers: must be at least 0, not -1'),
    ('train', ['--num-classes', '0'], 'argument --num-classes: must be at least 1, not 0'),
    ('train', ['--opt', 'bogus'], '--opt bogus: Optimizer bogus not found in registry'),
    ('train', ['--opt', 'sgd', '--momentum', '0'], '--opt sgd: Nesterov momentum requires a momentum'),
    ('train', ['--sched', 'bogus'], "--sched bogus: Unknown scheduler 'bogus'"),
    ('train', ['--sched', 'plateau'], '--sched plateau steps once per epoch: add --no-sched-on-updates'),
    ('validate', ['--batch-size', '0'], 'argument --batch-size/-b: must be at least 1, not 0'),
    ('validate', ['--limit', '0'], 'argument --limit: must be at least 1, not 0'),
    ('validate', ['--img-size', '0'], 'argument --img-size: must be at least 1, not 0'),
    ('validate', ['--split', 'bogus'], "argument --split: invalid choice: 'bogus'"),
    # Were tracebacks (KeyError, AssertionError, dynamo's InvalidBackend), or a crop that emptied every
    # validation image: reported as unreadable images and a top-1 of 0 from none.
    ('train', ['--crop-pct', '-1'], 'argument --crop-pct: must be in (0, 1], not -1'),
    ('validate', ['--crop-pct', '0'], 'argument --crop-pct: must be in (0, 1], not 0'),
    ('train', ['--interpolation', 'foo'], "argument --interpolation: invalid choice: 'foo'"),
    ('validate', ['--interpolation', 'random'], "argument --interpolation: invalid choice: 'random'"),
    ('train', ['--scale', '0.9', '0.1'], '--scale 0.9 0.1: need 0 < MIN <= MAX <= 1'),
    ('train', ['--ratio', '-1', '1'], '--ratio -1 1: need 0 < MIN <= MAX'),
    ('train', ['--aa', 'garbage'], '--aa garbage: not a timm auto-augment policy (Unknown AA policy garbage)'),
    ('train', ['--remode', 'garbage'], "argument --remode: invalid choice: 'garbage'"),
    ('train', ['--compile', 'nosuchbackend'], '--compile nosuchbackend: not a torch.compile backend here'),
    pytest.param('validate', ['--device', 'cuda'], '--device cuda: this machine has 0 CUDA device(s)',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='has a CUDA device')),
    ('train', ['--device', 'nodevice'], '--device nodevice: '),
])
def test_bad_arguments_are_argparse_errors(script: str, argv: List[str], message: str,
                                           capsys: pytest.CaptureFixture) -> None:
    """Refused while parsing, before anything is loaded or written."""
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize('script, argv, message', [
    ('train', ['--model-kwargs', 'num_classes=12'],
     r'--model-kwargs num_classes=12: the script sets num_classes=10 \(--num-classes\): give it there'),
    ('validate', ['--in-chans', '1', '--model-kwargs', 'in_chans=3'], '--model-kwargs in_chans=3: the script sets'),
    ('train', ['--model-kwargs', "deconv_cfg={'block': 0}"], r'cannot create resnet18_cifar_deconv \(check --model'),
    ('validate', ['--pretrained'], "No pretrained weights are published for 'resnet18_cifar_deconv"),
], ids=['train_clash', 'validate_clash', 'layer_setting', 'no_weights'])
def test_model_errors_are_one_line(tmp_path: Path, script: str, argv: List[str], message: str) -> None:
    """Were tracebacks: Python's "multiple values for keyword argument", a layer's ValueError, the
    weights' NoPublishedWeightsError (a RuntimeError). BAD_INPUT_ERRORS end a script in one line."""
    with pytest.raises(BAD_INPUT_ERRORS, match=message):
        load_script(script).main(['--model', 'resnet18_cifar_deconv', '--img-size', '8', '--output', str(tmp_path)]
                                 + argv if script == 'train' else ['--model', 'resnet18_cifar_deconv'] + argv)
    assert not any(tmp_path.iterdir())


def test_failed_starts_leave_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The run folder was created before the checks that follow the model (here a --resume of another
    model's checkpoint): a failed start left it empty. An --output that cannot hold it is an argparse error."""
    checkpoint = tmp_path / 'other.pth.tar'
    atomic_save(dict(arch='resnet18_cifar_deconv', state_dict={}, optimizer={}, epoch=1, step_in_epoch=0,
                     global_step=2, rng=[]), str(checkpoint))
    train = load_script('train')
    with pytest.raises(CheckpointMismatchError, match='checkpoint is for resnet18_cifar_deconv, not resnet18_cifar'):
        train.main(['--model', 'resnet18_cifar', '--img-size', '8', '--resume', str(checkpoint),
                    '--output', str(tmp_path / 'out'), '--experiment', 'x'])
    assert not (tmp_path / 'out').exists()
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit):
        train.main(['--output', str(tmp_path / 'file' / 'runs')])
    assert f'argument --output: {tmp_path / "file"} is a file, not a folder' in capsys.readouterr().err


def test_dataset_folder_errors_are_one_line(tmp_path: Path) -> None:
    """A root with train/ but no val/ ended train.py in a FileNotFoundError traceback."""
    (tmp_path / 'data' / 'train' / 'cat').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'data' / 'train' / 'cat' / '0.png')
    done = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'train.py'), '--model', 'resnet18_cifar', '--dataset', 'folder',
         '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path / 'output')], capture_output=True, text=True)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
    assert 'has train/ but no validation split' in done.stderr and not (tmp_path / 'output').exists()


def test_sync_bn_on_cpu_processes_is_an_argparse_error(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """torch's SyncBatchNorm raised at the first step of a multi-process CPU run, after the run folder."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit) as exit_info:
        load_script('train').main(['--sync-bn', '--device', 'cpu'])
    assert exit_info.value.code == 2 and '--sync-bn: torch.nn.SyncBatchNorm does not run on CPU' in capsys.readouterr().err


def test_unknown_torchvision_dataset_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset 'torch/nosuch': Unknown torchvision dataset nosuch"):
        create_image_dataset('torch/nosuch', str(tmp_path), 'train')


@pytest.mark.parametrize('argv, message', [
    (['--model', 'resnet18_cifar', '--model-kwargs', 'bogus=1'], "unexpected keyword argument 'bogus'"),
    (['--model', 'vgg16_cifar_deconv', '--img-size', '8'], r'vgg16_cifar_deconv cannot take input \(3, 8, 8\)'),
    # Was an IndexError traceback ("Target 7 is out of bounds") at the first step, after the run folder.
    (['--model', 'resnet18_cifar', '--num-classes', '5'], r'--num-classes 5: the dataset has 10 classes'),
])
def test_arguments_the_model_cannot_take_fail_before_the_run_folder(
        tmp_path: Path, argv: List[str], message: str) -> None:
    with pytest.raises(ModelArgumentsError, match=message):
        load_script('train').main(argv + ['--output', str(tmp_path / 'output')])
    assert not (tmp_path / 'output').exists()


@pytest.mark.parametrize('drop', [['--drop-last'], ['--mixup', '0.2']])
def test_a_batch_larger_than_the_dropped_epoch_is_an_argument_error(
        tmp_path: Path, drop: List[str], capsys: pytest.CaptureFixture) -> None:
    """With the incomplete batch dropped, 32 samples in batches of 64 leave no step: that ended
    in timm's scheduler assertion (or, stepping on epochs, in a run that trained nothing)."""
    with pytest.raises(SystemExit) as exit_info:
        load_script('train').main(SMALL_DECONV + drop + ['--train-limit', '32', '--batch-size', '64',
                                                         '--output', str(tmp_path / 'output')])
    assert exit_info.value.code == 2
    assert 'no training step per epoch: 32 training samples give 32 per process' in capsys.readouterr().err
    assert not (tmp_path / 'output').exists()


def test_a_last_batch_of_one_sample_is_dropped(tmp_path: Path) -> None:
    """9 samples in batches of 4 left a last batch of one, which the Delinear head cannot whiten."""
    result = load_script('train').main(SMALL_DECONV + ['--epochs', '1', '--batch-size', '4', '--train-limit', '9',
                                                       '--val-limit', '8', '--output', str(tmp_path)])
    assert result['global_step'] == 2


def test_batches_too_small_for_a_whitening_are_refused_or_dropped(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SENet-18's SE gates whiten a pooled 1x1 map with every 9th image: a batch of 9 or fewer has
    one sample there, a ValueError at the first step (or, as a last batch, at the end of an epoch)."""
    train = load_script('train')
    senet = ['--model', 'senet18_cifar_deconv', '--model-kwargs', "deconv_cfg={'block': 16}", '--img-size', '8',
             '--no-progress', '--workers', '0', '--epochs', '1', '--val-limit', '8', '--output', str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(senet + ['--batch-size', '8', '--train-limit', '16'])
    assert exit_info.value.code == 2
    assert ('--batch-size 8 is too small for senet18_cifar_deconv at input (3, 8, 8): layer1.0.fc2 needs 10 images '
            'per training batch') in capsys.readouterr().err
    assert train.main(senet + ['--batch-size', '10', '--train-limit', '25'])['global_step'] == 2  # 10, 10, not 5
    # Batch norm on 1x1 maps (the BN twin's last stage at 8x8) needs two images: a batch of one was
    # BatchNorm's ValueError traceback at the first step, after the run folder.
    with pytest.raises(SystemExit) as exit_info:
        train.main(['--model', 'resnet18_cifar', '--img-size', '8', '--batch-size', '1', '--train-limit', '4',
                    '--output', str(tmp_path / 'bn')])
    assert exit_info.value.code == 2
    assert ('--batch-size 1 is too small for resnet18_cifar at input (3, 8, 8): layer4.0.bn1 needs 2 images '
            'per training batch') in capsys.readouterr().err
    assert not (tmp_path / 'bn').exists()


def test_a_restart_after_a_kill_before_the_first_checkpoint_keeps_one_summary_row_per_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """summary.csv gets the epoch's row before its checkpoint: a kill in between, before the first
    checkpoint, left the row behind, and the restart (nothing to resume) appended a second row 0."""
    train = load_script('train')
    args = SMALL_DECONV + ['--epochs', '1', '--batch-size', '32', '--train-limit', '64', '--val-limit', '16',
                           '--resume', 'auto', '--output', str(tmp_path), '--experiment', 'run']

    def killed(state, path):
        raise KeyboardInterrupt  # stands for the SIGKILL: the process ends, no checkpoint lands

    monkeypatch.setattr('deconv_zoo.training.atomic_save', killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.undo()
    assert len(summary_rows(tmp_path / 'run')) == 1 and not (tmp_path / 'run' / LAST).exists()
    train.main(args)
    assert [row['epoch'] for row in summary_rows(tmp_path / 'run')] == ['0']


@pytest.mark.parametrize('sched, options, lrs', [
    ('step', ['--decay-epochs', '1', '--decay-rate', '0.5'], [0.1, 0.05, 0.025]),
    ('multistep', ['--decay-milestones', '2'], [0.1, 0.01, 0.01]),  # timm: from the second epoch on
])
def test_step_schedules_take_their_decay_options(sched: str, options: List[str], lrs: List[float]) -> None:
    """--sched step and multistep decayed at timm's defaults only (epoch 90, or 90/180/270): a
    shorter run never decayed."""
    train = load_script('train')
    args = train.parse_args(['--sched', sched, '--epochs', '3', '--lr', '0.1', '--warmup-epochs', '0',
                             '--no-sched-on-updates'] + options)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler, _ = train.create_scheduler(args, optimizer, updates_per_epoch=1)
    seen = []
    for epoch in range(3):
        scheduler.step(epoch)
        seen.append(optimizer.param_groups[0]['lr'])
    assert seen == pytest.approx(lrs)


def test_resume_with_another_batch_size_places_the_schedule_by_epochs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A finished 1-epoch run (2 steps of 32) resumed for 2 epochs at batch 16 (4 steps each): the new
    schedule was placed at global step 2 of 8 instead of 4, and ended at lr 0.0146, not --min-lr."""
    train = load_script('train')
    args = SMALL_DECONV + ['--train-limit', '64', '--val-limit', '16', '--min-lr', '0', '--resume', 'auto',
                           '--output', str(tmp_path), '--experiment', 'run']
    train.main(args + ['--epochs', '1', '--batch-size', '32'])
    with caplog.at_level(logging.INFO):
        result = train.main(args + ['--epochs', '2', '--batch-size', '16'])
    assert 'schedule rebuilt for the current arguments (epochs 1 -> 2, batch_size 32 -> 16)' in caplog.text
    assert result['global_step'] == 6
    assert [float(row['lr']) for row in summary_rows(tmp_path / 'run')][-1] == 0.0


def test_a_batch_larger_than_the_training_set_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = load_script('train').main(SMALL_DECONV + ['--epochs', '1', '--batch-size', '64', '--train-limit', '12',
                                                           '--val-limit', '8', '--warmup-epochs', '1',
                                                           '--output', str(tmp_path)])
    assert result['global_step'] == 1
    assert ('--batch-size 64 is more than the 12 training samples per process: each epoch is one step of 12'
            in caplog.text)
    assert '--warmup-epochs 1 is not less than --epochs 1: the learning rate never reaches --lr' in caplog.text


@pytest.mark.slow
def test_resuming_a_finished_run_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = load_script('train')
    args = SMALL_DECONV + ['--epochs', '1', '--batch-size', '32', '--train-limit', '64', '--val-limit', '16',
                           '--resume', 'auto', '--output', str(tmp_path), '--experiment', 'done']
    first = train.main(args)
    with caplog.at_level(logging.INFO):
        again = train.main(args)
    assert again['global_step'] == first['global_step'] == 2 and again['best_top1'] == first['best_top1']
    assert f'{tmp_path / "done"} is already complete (--epochs 1, global step 2), nothing to train (best' in caplog.text


# ------------------------------------------------------------------------------------ distributed

def _sync_layers() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList([
        FastDeconv(8, 16, 3, padding=1, block=4),
        FastDeconv(8, 8, 1, stride=2, block=8),  # 1x1: pixel sampling across the process boundary
        FastDeconv(8, 8, 3, padding=1, groups=2),
        Delinear(32, 5, block=8),
    ]).double()


def _run_layers(layers: torch.nn.ModuleList, x: torch.Tensor) -> List[torch.Tensor]:
    outputs = [layer(x) for layer in layers[:3]]
    return outputs + [layers[3](x[:, :, :2, :2].reshape(len(x), -1))]


def _sync_worker(rank: int, world_size: int, store: str, sizes: List[int], result_file: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world_size)
    torch.manual_seed(1)
    batch = torch.randn(sum(sizes), 8, 7, 7, dtype=torch.float64)
    start = sum(sizes[:rank])
    part = batch[start:start + sizes[rank]].clone().requires_grad_()
    layers = convert_sync_deconv(_sync_layers())
    outputs = _run_layers(layers, part)
    sum(out.square().sum() for out in outputs).backward()
    grads = [p.grad.clone() for p in layers.parameters()]
    for grad in grads:  # what DistributedDataParallel does (up to its 1/world_size)
        dist.all_reduce(grad)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, dict(outputs=[o.detach() for o in outputs], input_grad=part.grad))
    if rank == 0:
        torch.save(dict(parts=gathered, grads=grads, buffers=dict(layers.named_buffers()),
                        classes=[type(layer) for layer in layers]), result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_deconv_equals_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    sizes = [2, 3]  # unequal shares; 2*7*7 pixels is not a multiple of the 1x1 layer's sampling step
    result_file = str(tmp_path / 'result.pt')
    mp.spawn(_sync_worker, args=(2, str(tmp_path / 'store'), sizes, result_file), nprocs=2)
    result = torch.load(result_file, weights_only=False)
    assert result['classes'][:2] == [SyncFastDeconv, SyncFastDeconv] and result['classes'][3] is SyncDelinear

    torch.manual_seed(1)
    batch = torch.randn(sum(sizes), 8, 7, 7, dtype=torch.float64, requires_grad=True)
    reference = _sync_layers()
    outputs = _run_layers(reference, batch)
    sum(out.square().sum() for out in outputs).backward()
    for i, output in enumerate(outputs):
        synced = torch.cat([part['outputs'][i] for part in result['parts']])
        torch.testing.assert_close(synced, output.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([part['input_grad'] for part in result['parts']]), batch.grad,
                               rtol=1e-9, atol=1e-9)
    for synced, param in zip(result['grads'], reference.parameters()):
        torch.testing.assert_close(synced, param.grad, rtol=1e-9, atol=1e-9)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(result['buffers'][name], buffer, rtol=1e-12, atol=1e-12)


def _refresh_layer() -> FastDeconv:
    torch.manual_seed(0)
    return FastDeconv(16, 8, 3, padding=1, block=16, refresh_every=2)  # 144 features: on the refresh schedule


def _sync_cases_worker(rank: int, world_size: int, store: str, result_file: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world_size)
    torch.manual_seed(1)
    batches = torch.randn(3, 4, 16, 9, 9) + 1
    part = batches[:, 2 * rank:2 * rank + 2]
    refresh = convert_sync_deconv(torch.nn.ModuleList([_refresh_layer()]))[0]
    outputs = [refresh(batch).detach() for batch in part]  # fresh, reused, fresh whitening
    half = convert_sync_deconv(torch.nn.ModuleList([_refresh_layer()]))[0].batch_statistics(part[0].bfloat16())
    gathered = [None] * world_size
    dist.all_gather_object(gathered, dict(outputs=outputs, running_mean=refresh.running_mean, half=half))
    if rank == 0:
        torch.save(gathered, result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_deconv_global_statistics_under_refresh_every_and_half_precision(tmp_path: Path) -> None:
    """refresh_every's reused whitening comes with the global batch's mean (it took this
    process' own), and half-precision input gets float32 statistics, as in one process (they
    were computed in bfloat16)."""
    result_file = str(tmp_path / 'result.pt')
    mp.spawn(_sync_cases_worker, args=(2, str(tmp_path / 'store'), result_file), nprocs=2)
    parts = torch.load(result_file, weights_only=False)

    torch.manual_seed(1)
    batches = torch.randn(3, 4, 16, 9, 9) + 1
    reference = _refresh_layer()
    for i, batch in enumerate(batches):
        torch.testing.assert_close(torch.cat([part['outputs'][i] for part in parts]), reference(batch).detach())
    for part in parts:
        torch.testing.assert_close(part['running_mean'], reference.running_mean)
    half = _refresh_layer().batch_statistics(batches[0].bfloat16())
    for synced, single in zip(parts[0]['half'], half):
        assert synced.dtype == single.dtype == torch.float32
        torch.testing.assert_close(synced, single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_validates_the_model_it_saves(tmp_path: Path) -> None:
    """--sync-deconv on a model with batch norm (efficientnet_b0_cifar_deconv keeps it in its blocks):
    the per-process BN statistics were not averaged, so each process validated its shard with
    other statistics than those of the checkpoint. The summary's validation loss is the saved model's:
    here its EMA's, which each process had updated from its own statistics (the score mixed two EMAs)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
               '--master_port', str(_free_port()), str(REPO / 'scripts' / 'train.py'), '--model', 'resnet18_cifar',
               '--model-kwargs', 'layers=(1,1,1,1)', '--img-size', '8', '--no-progress', '--sync-deconv',
               '--epochs', '1', '--batch-size', '16', '--train-limit', '64', '--val-limit', '32',
               '--model-ema', '--model-ema-decay', '0.5', '--output', str(tmp_path), '--experiment', 'ddp']
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    validated = load_script('validate').main([
        '--model', 'resnet18_cifar', '--model-kwargs', 'layers=(1,1,1,1)', '--checkpoint', str(tmp_path / 'ddp' / LAST),
        '--limit', '32', '--workers', '0', '--use-ema'])
    assert float(summary_rows(tmp_path / 'ddp')[0]['eval_loss']) == pytest.approx(validated['loss'], rel=1e-5)


@pytest.mark.slow
def test_torchrun_run_stopped_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    """A two-process run (synced deconvolutions beside per-process batch norm: EfficientNet-B0 keeps
    BN in its blocks) stopped by --max-steps mid-epoch and resumed ends with the uninterrupted run's
    weights and buffers. The stop used to average the per-process batch-norm statistics into its
    checkpoint, where the uninterrupted run carries rank 0's on (DDP broadcasts them every step)."""
    def train(experiment: str, *extra: str) -> str:
        command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                   '127.0.0.1', '--master_port', str(_free_port()), str(REPO / 'scripts' / 'train.py'), '--model',
                   'efficientnet_b0_cifar_deconv', '--img-size', '8', '--no-progress', '--workers', '0',
                   '--sync-deconv', '--epochs', '1', '--batch-size', '8', '--train-limit', '48', '--val-limit', '16',
                   '--output', str(tmp_path), '--experiment', experiment, *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr + done.stdout

    train('whole')
    assert 'val_top1' in train('stopped', '--max-steps', '1')
    stopped = torch.load(tmp_path / 'stopped' / LAST, weights_only=True)
    assert stopped['global_step'] == 1 and stopped['args']['world_size'] == 2
    assert len(stopped['rng']) == 2  # both processes' RNG states, for an exact resume
    train('stopped', '--resume', 'auto')
    whole, resumed = (torch.load(tmp_path / name / LAST, weights_only=True) for name in ('whole', 'stopped'))
    assert resumed['global_step'] == whole['global_step'] == 3
    for key, value in whole['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key


# ------------------------------------------------------------------------------ validate, filters

def _image_folder(root: Path, splits: Sequence[str] = ('val',)) -> None:
    """Per split, three random images of each of two classes and one corrupt file (the last one)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for label in ('cat', 'dog'):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / f'{i}.png')
        (root / split / 'dog' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really an image')


def test_validate_writes_results_and_skips_corrupt_images(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    _image_folder(tmp_path)
    weights = tmp_path / 'model.safetensors'
    save_file(timm.create_model('resnet18_cifar', num_classes=2).state_dict(), str(weights))
    results_file = tmp_path / 'results.json'
    load_script('validate').main([
        '--model', 'resnet18_cifar', '--checkpoint', str(weights), '--dataset', 'folder', '--data-dir', str(tmp_path),
        '--img-size', '8', '--workers', '0', '--batch-size', '4', '--results-file', str(results_file)])
    results = json.loads(results_file.read_text())
    assert results['model'] == 'resnet18_cifar' and results['tag'] == 'cifar10'
    assert (results['dataset'], results['split']) == ('folder', 'validation')
    assert (results['num_images'], results['num_skipped']) == (6, 1)
    assert 0 <= results['top1'] <= results['top5'] == 100.0  # 2 classes: the top-5 always hits
    assert results['loss'] > 0 and results['img_per_sec'] > 0
    assert results['checkpoint'] == str(weights)
    assert results['sha256'] == __import__('hashlib').sha256(weights.read_bytes()).hexdigest()


def test_train_names_unreadable_images_and_validates_without_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train.py's validation counted the image after a corrupt one twice (timm's replacement), unlike
    validate.py, and neither split named the file; training keeps the replacement, now named."""
    _image_folder(tmp_path, splits=('train', 'val'))
    with caplog.at_level(logging.WARNING):
        result = load_script('train').main([
            '--model', 'resnet18_cifar', '--model-kwargs', 'layers=(1,1,1,1)', '--dataset', 'folder', '--data-dir',
            str(tmp_path), '--img-size', '16', '--workers', '0', '--batch-size', '4', '--epochs', '1',
            '--no-progress', '--output', str(tmp_path / 'out')])
    assert result['num_images'] == 6
    assert os.path.basename(result['run_folder']) == f'resnet18_cifar-{tmp_path.name}'  # was -folder for any folder
    checkpoint = os.path.join(result['run_folder'], LAST)
    assert torch.load(checkpoint, weights_only=True)['class_names'] == ['cat', 'dog']
    # A validation-only folder without 'cat': labelled as trained (timm numbered 'dog' 0), so the
    # recorded two-class model fits it without --num-classes.
    shutil.rmtree(tmp_path / 'val' / 'cat')
    shutil.rmtree(tmp_path / 'train')
    validated = load_script('validate').main([
        '--model', 'resnet18_cifar', '--checkpoint', checkpoint, '--dataset', 'folder', '--data-dir', str(tmp_path),
        '--workers', '0'])
    assert validated['num_images'] == 3
    assert 'unreadable image dog/corrupt.png: Failed to load 1 consecutive samples; using the next image' in caplog.text
    assert 'skipping unreadable image dog/corrupt.png' in caplog.text
    assert 'validation: 1 unreadable image(s) skipped' in caplog.text


def test_evaluate_refuses_a_loader_without_a_readable_image() -> None:
    """train.py's validation (a crop that emptied every image, all skipped as unreadable) logged
    val_top1 0.00 over no image and kept it as the best checkpoint's metric."""
    from torch.utils.data import DataLoader

    from deconv_zoo.data import collate_readable
    from deconv_zoo.evaluation import evaluate

    loader = DataLoader([None, None, None], batch_size=2, collate_fn=collate_readable)
    with pytest.raises(DatasetError, match=r'no image to evaluate: the 3 image\(s\) are unreadable'):
        evaluate(torch.nn.Linear(2, 2), loader, torch.device('cpu'))


def test_validate_refuses_a_dataset_with_no_readable_image(tmp_path: Path) -> None:
    """Reported top-1 0.0 over 0 images, exit status 0, and wrote that to --results-file (which the
    publishing script reads); an empty folder was timm's RuntimeError traceback."""
    for split in ('val', 'empty/val'):
        (tmp_path / split / 'cat').mkdir(parents=True)
    (tmp_path / 'val' / 'cat' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really an image')
    validate = load_script('validate')
    argv = ['--model', 'resnet18_cifar', '--img-size', '8', '--workers', '0', '--dataset', 'folder',
            '--results-file', str(tmp_path / 'results.json')]
    unreadable = r'no image to evaluate: the 1 image\(s\) are unreadable'
    with pytest.raises(DatasetError, match=unreadable):
        validate.main(argv + ['--data-dir', str(tmp_path)])
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'folder': Found 0 images in subfolders of"):
        validate.main(argv + ['--data-dir', str(tmp_path / 'empty')])
    assert not (tmp_path / 'results.json').exists()


def test_validate_refuses_fewer_classes_than_the_dataset(tmp_path: Path) -> None:
    """--num-classes 5 on the 10 digit classes was cross_entropy's IndexError traceback."""
    with pytest.raises(ModelArgumentsError, match='--num-classes 5: the dataset has 10 classes'):
        load_script('validate').main(['--model', 'resnet18_cifar', '--num-classes', '5', '--img-size', '8',
                                      '--limit', '8', '--results-file', str(tmp_path / 'results.json')])
    assert not (tmp_path / 'results.json').exists()


def test_validate_refuses_a_results_file_without_a_folder(tmp_path: Path, capsys) -> None:
    """Checked when the arguments are parsed: the write failed only after the whole validation."""
    with pytest.raises(SystemExit):
        load_script('validate').main(['--model', 'resnet18_cifar', '--img-size', '8', '--limit', '8',
                                      '--results-file', str(tmp_path / 'no' / 'results.json')])
    assert 'argument --results-file: no folder for' in capsys.readouterr().err


def test_validate_digits_with_a_training_checkpoint(tmp_path: Path) -> None:
    import timm

    model = timm.create_model('resnet18_cifar')
    checkpoint = tmp_path / 'ckpt.pth.tar'
    atomic_save(dict(state_dict=model.state_dict(), state_dict_ema=model.state_dict(), epoch=0), str(checkpoint))
    results = load_script('validate').main([
        '--model', 'resnet18_cifar', '--checkpoint', str(checkpoint), '--use-ema', '--img-size', '8',
        '--limit', '40', '--tag', 'digits'])
    assert (results['dataset'], results['tag'], results['num_images'], results['num_skipped']) == ('digits', 'digits', 40, 0)


def test_validate_names_the_keys_of_a_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    """Weights built with other --model-kwargs were torch's load_state_dict RuntimeError, a traceback."""
    import timm

    checkpoint = tmp_path / 'ckpt.pth.tar'
    atomic_save(dict(state_dict=timm.create_model('resnet18_cifar').state_dict(), epoch=0), str(checkpoint))
    with pytest.raises(CheckpointMismatchError, match=r'does not fit resnet18_cifar as built[^\n]*\n  unexpected \(\d+\): layer1\.1\.conv1\.weight'):
        load_script('validate').main(['--model', 'resnet18_cifar', '--model-kwargs', 'layers=(1,1,1,1)',
                                      '--checkpoint', str(checkpoint), '--img-size', '8', '--limit', '8'])
    # The authors' checkpoint layout: told how to convert it.
    torch.save(dict(net=timm.create_model('resnet18_cifar').state_dict(), acc=90.0, epoch=1), str(checkpoint))
    with pytest.raises(CheckpointMismatchError, match=r'(?s)unexpected \(3\): net, acc, epoch.*scripts/convert_refer'):
        load_script('validate').main(['--model', 'resnet18_cifar', '--checkpoint', str(checkpoint), '--img-size', '8',
                                      '--limit', '8'])
    # A checkpoint of another architecture: its recorded one, not some 180 keys.
    atomic_save(dict(state_dict=timm.create_model('resnet18_cifar').state_dict(), epoch=0, arch='resnet18_cifar'),
                str(checkpoint))
    with pytest.raises(CheckpointMismatchError, match='training checkpoint of resnet18_cifar, not vgg16_cifar: give '
                                                      '--model resnet18_cifar'):
        load_script('validate').main(['--model', 'vgg16_cifar', '--checkpoint', str(checkpoint), '--img-size', '8',
                                      '--limit', '8'])


def test_validate_takes_the_input_size_a_training_checkpoint_records(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """And how the model was built: its class count and --model-kwargs (validate.py built the
    default model, which the checkpoint did not fit, unless they were given again)."""
    import timm

    model = timm.create_model('resnet18_cifar', num_classes=12, layers=(1, 1, 1, 1))
    checkpoint = tmp_path / 'ckpt.pth.tar'
    atomic_save(dict(state_dict=model.state_dict(), epoch=0, args=dict(
        img_size=8, input_size=None, num_classes=12, model_kwargs={'layers': (1, 1, 1, 1)}, interpolation='random')),
        str(checkpoint))
    validate = load_script('validate')
    argv = ['--model', 'resnet18_cifar', '--checkpoint', str(checkpoint), '--limit', '8']
    with caplog.at_level(logging.INFO):
        results = validate.main(argv)
    assert results['input_size'] == [3, 8, 8]
    assert results['interpolation'] == 'bilinear'  # evaluated with (training's 'random' is its crop's)
    assert results['param_count'] == sum(p.numel() for p in model.parameters())
    assert ("as recorded in the training checkpoint: num_classes 12, model_kwargs {'layers': (1, 1, 1, 1)}, img_size 8"
            in caplog.text)
    assert validate.main(argv + ['--img-size', '16'])['input_size'] == [3, 16, 16]  # the command line wins
    with pytest.raises(CheckpointMismatchError):  # a --model-kwargs given replaces the recorded ones
        validate.main(argv + ['--model-kwargs', 'drop_rate=0.1'])
    few = tmp_path / 'few.pth.tar'
    atomic_save(dict(state_dict=model.state_dict(), epoch=0, args=dict(num_classes=5)), str(few))
    with pytest.raises(ModelArgumentsError, match=r'^num_classes \(recorded in the checkpoint\) 5: the dataset has 10'):
        validate.main(['--model', 'resnet18_cifar', '--checkpoint', str(few), '--limit', '8'])


def test_input_size_channels_build_the_model_in_train_and_validate(tmp_path: Path) -> None:
    """--input-size C H W sets the model's input channels, as its help says (and timm's train.py does):
    train.py built a 3-channel model for --input-size 1 8 8 and silently fed it 3-channel digits;
    validate.py takes the channels a training checkpoint records."""
    import timm
    from safetensors.torch import save_file

    result = load_script('train').main(SMALL_DECONV + [
        '--input-size', '1', '8', '8', '--epochs', '1', '--batch-size', '16', '--train-limit', '32',
        '--val-limit', '16', '--output', str(tmp_path), '--experiment', 'grey'])
    checkpoint = torch.load(Path(result['run_folder']) / LAST, weights_only=True)
    assert checkpoint['state_dict']['conv1.weight'].shape[1] == 1
    validated = load_script('validate').main([  # the channels and model kwargs recorded
        '--model', 'resnet18_cifar_deconv', '--checkpoint', str(Path(result['run_folder']) / LAST), '--limit', '16',
        '--workers', '0'])
    assert validated['input_size'] == [1, 8, 8]
    resized = load_script('validate').main([  # the recorded channels stay (a 3-channel model did not fit)
        '--model', 'resnet18_cifar_deconv', '--checkpoint', str(Path(result['run_folder']) / LAST), '--limit', '16',
        '--workers', '0', '--img-size', '16'])
    assert resized['input_size'] == [1, 16, 16]
    with pytest.raises(CheckpointMismatchError, match='holds no EMA weights'):  # the raw weights were scored
        load_script('validate').main(['--model', 'resnet18_cifar_deconv', '--checkpoint',
                                      str(Path(result['run_folder']) / LAST), '--limit', '16', '--use-ema'])
    safetensors = tmp_path / 'grey.safetensors'
    save_file(timm.create_model('resnet18_cifar', in_chans=1).state_dict(), str(safetensors))
    assert load_script('validate').main(['--model', 'resnet18_cifar', '--checkpoint', str(safetensors),
                                         '--input-size', '1', '8', '8', '--limit', '8'])['input_size'] == [1, 8, 8]


def test_model_table_rows_and_a_filter_matching_nothing(capsys: pytest.CaptureFixture) -> None:
    """A pattern without wildcards (--filter resnet18) matched no zoo model: a silent empty table."""
    model_table = load_script('model_table')
    model_table.main(['--filter', 'pnasnet_a_cifar'])
    row = capsys.readouterr().out.splitlines()[2]
    assert row == '| `pnasnet_a_cifar` | PNASNet-A | CIFAR-10 | 0.13 | 0.028 | 32x32 | 81.22 |'  # as in the README
    with pytest.raises(SystemExit):
        model_table.main(['--filter', 'resnet18'])
    captured = capsys.readouterr()
    assert "--filter 'resnet18' matches no deconv-zoo model" in captured.err and not captured.out


SMALL_FILTERS = ['--model-kwargs', 'layers=(1,1,1,1)', '--zoom', '2']


@pytest.mark.parametrize('argv, message', [
    (['--model', 'resnet18_cifar_deconv', '--layer', 'layer9'], "ResNetCifar has no layer 'layer9'"),
    (['--model', 'resnet18_cifar_deconv', '--layer', 'linear'], "layer 'linear' is a Delinear, not a convolution"),
    (['--model', 'resnet18_cifar', '--kind', 'deconv'], '--kind deconv needs a FastDeconv layer, got Conv2d'),
    (['--max-filters', '0'], '--zoom and --max-filters must be at least 1'),
    (['--output', 'no/such/folder/filters.png'], "--output: no folder for 'no/such/folder/filters.png'"),
])
def test_visualize_filters_bad_arguments_are_argparse_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture, argv: List[str], message: str) -> None:
    """Were tracebacks (AttributeError, IndexError, ValueError, ZeroDivisionError, FileNotFoundError)."""
    with pytest.raises(SystemExit):
        load_script('visualize_filters').main(SMALL_FILTERS + ['--output', str(tmp_path / 'f.png')] + argv)
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'f.png').exists()


def test_deconv_kernels_of_a_depthwise_layer_are_its_groups_whitening_rows() -> None:
    """A grouped FastDeconv whitens each group (one block) with its own matrix: its rows are kernels
    of the group's channels, but --kind deconv refused every grouped layer."""
    layer = FastDeconv(4, 4, 3, padding=1, groups=4)
    layer.running_deconv.copy_(torch.randn(layer.running_deconv.shape, generator=torch.Generator().manual_seed(0)))
    kernels = load_script('visualize_filters').layer_filters(layer, 'deconv')
    assert kernels.shape == (4 * 9, 1, 3, 3)
    assert torch.equal(kernels[9 * 2 + 5], layer.running_deconv[2, 5].view(1, 3, 3))


def test_visualize_filters_writes_the_png_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image was written straight to --output: a failure mid-write left a partial file over the
    previous one, and a name without .png was refused by PIL after the model was built."""
    script = load_script('visualize_filters')
    output = tmp_path / 'filters'
    script.main(SMALL_FILTERS + ['--output', str(output)])
    with Image.open(output) as image:
        assert image.format == 'PNG'
    previous = output.read_bytes()

    def failing_save(image: torch.Tensor, fp, format: Optional[str] = None) -> None:
        with (open(fp, 'wb') if isinstance(fp, str) else contextlib.nullcontext(fp)) as f:
            f.write(b'partial')
        raise OSError('No space left on device')

    monkeypatch.setattr(script, 'save_image', failing_save)
    with pytest.raises(OSError, match='No space left'):
        script.main(SMALL_FILTERS + ['--output', str(output)])
    assert output.read_bytes() == previous and sorted(tmp_path.iterdir()) == [output]


@pytest.mark.parametrize('kind', ['effective', 'deconv'])
def test_visualize_filters_writes_a_png(tmp_path: Path, kind: str) -> None:
    output = tmp_path / f'{kind}.png'
    load_script('visualize_filters').main(['--model', 'resnet18_cifar_deconv', '--kind', kind, '--zoom', '4',
                                           '--output', str(output)])
    with Image.open(output) as image:
        assert image.format == 'PNG' and image.mode == 'RGB' and min(image.size) > 12
