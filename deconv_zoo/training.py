"""Training machinery shared by the scripts: paper recipes, checkpoints, RNG state, the epoch loop.

Checkpoints are written atomically (temporary file in the same folder, fsync, ``os.replace``)
and hold everything needed to continue a run exactly: model, optimizer, scheduler, AMP scaler,
EMA, position (epoch, step within the epoch, global step), arguments, the RNG states of every
process and, with ``refresh_every``, every process' schedule of reused whitenings. With a data
order fixed by (seed, epoch) (``data.ResumableSampler``) a resumed run reproduces the
uninterrupted one bit for bit on CPU. The learning-rate schedule is the one the
resuming run's arguments build, moved to the checkpoint's position (as in timm's train.py): a
resume with a larger ``--epochs`` continues on the longer schedule.

timm's ``CheckpointSaver`` is not used: it unlinks ``last`` before renaming the new file over it
(a crash in between leaves none) and stores neither the scheduler, the step nor the RNG states.
"""
import contextlib
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.scheduler import PlateauLRScheduler
from timm.utils import AverageMeter, ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader

from .files import atomic_write
from .layers import FastDeconv
from .loading import compare_state_dict, load_torch_checkpoint, non_finite_names
from .weights import CheckpointMismatchError

__all__ = [
    'RECIPES', 'TrainingStopped', 'TrainPosition', 'atomic_save', 'capture_rng_state', 'restore_rng_state',
    'CheckpointManager', 'resolve_resume', 'Trainer', 'LAST', 'BEST',
]

_logger = logging.getLogger(__name__)

LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
CHECKPOINT_VERSION = 1
# What atomic_save leaves behind when killed mid-write, for the names CheckpointManager writes (the
# random part matches the tempfile.mkstemp names of earlier versions too).
_STALE_TEMPORARY = re.compile(r'\.((last|model_best|checkpoint-\d+)\.pth\.tar|args\.json|summary\.csv)\.[^.]+\.tmp')
# Arguments that define the learning-rate schedule (logged when a resume changes them).
_SCHEDULE_ARGS = ('sched', 'epochs', 'sched_on_updates', 'lr', 'min_lr', 'warmup_epochs', 'warmup_lr', 'decay_epochs',
                  'decay_milestones', 'decay_rate')
# Arguments that decide which samples an epoch's steps take: a mid-epoch resume skips the steps done
# as step_in_epoch batches of the current order, which is only right when these are unchanged.
_STEPS_PER_EPOCH_ARGS = ('batch_size', 'world_size', 'dataset', 'train_limit')
_DATA_ORDER_ARGS = _STEPS_PER_EPOCH_ARGS + ('seed',)
# torch's Optimizer.load_state_dict takes another optimizer's state without a word (AdamW then fails
# at its first step on SGD's momentum buffers): the optimizer must be the recorded one.
_OPTIMIZER_ARGS = ('opt',)
# Optimizer settings a resume takes from its own arguments; the learning rate of each parameter
# group is the scheduler's (a plateau schedule keeps it in the optimizer state), its parameters the model's.
_OPTIMIZER_SETTING_ARGS = ('weight_decay', 'momentum')
_SCHEDULED_GROUP_KEYS = ('params', 'lr', 'initial_lr')
# What timm's PlateauLRScheduler.state_dict leaves out (it keeps the best metric and the epoch): without
# them a resume restarts the patience and cooldown counts.
_PLATEAU_COUNTERS = ('num_bad_epochs', 'cooldown_counter')

# The paper's run settings (reference-architectures.md, section 3). Weight decay applies to every
# parameter there, biases included, hence filter_bias_and_bn=False. 'digits' is the CIFAR recipe
# shortened for the embedded 1,437-image training split: 2 epochs of 23 steps of 64 (resnet18_cifar_deconv
# reaches ~99% at 32x32 in about 2 minutes on 2 CPU cores) and no flips (digits are not symmetric).
RECIPES: Dict[str, Dict[str, Any]] = {
    'cifar': dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-3, filter_bias_and_bn=False, batch_size=128,
                  epochs=20, sched='cosine', sched_on_updates=True, min_lr=0.0, warmup_epochs=0,
                  crop_padding=4, hflip=0.5, color_jitter=0.0),
    'imagenet': dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False, batch_size=256,
                     epochs=90, sched='cosine', sched_on_updates=True, min_lr=0.0, warmup_epochs=0,
                     crop_padding=0, hflip=0.5, color_jitter=0.0),
    'digits': dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-3, filter_bias_and_bn=False, batch_size=64,
                   epochs=2, sched='cosine', sched_on_updates=True, min_lr=0.0, warmup_epochs=0,
                   crop_padding=0, hflip=0.0, color_jitter=0.0),
}


class TrainingStopped(RuntimeError):
    """Training cannot continue (non-finite loss, statistics, parameters or buffers); checkpoints are intact."""


@dataclass
class TrainPosition:
    """Where a run stands: ``step_in_epoch`` optimizer steps of epoch ``epoch`` are done
    (an epoch boundary is ``(epoch + 1, 0)``); ``global_step`` counts every step so far."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def updates(self, steps_per_epoch: int) -> int:
        """A per-step learning-rate schedule's position at ``steps_per_epoch`` steps per epoch
        (timm's ``num_updates``): ``global_step`` until a resume changes the epoch's length (batch
        size, process count, --train-limit), after which the new schedule is placed by epochs."""
        return self.epoch * steps_per_epoch + self.step_in_epoch


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: a crash keeps the old one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def capture_rng_state() -> Dict[str, Any]:
    """This process' python, numpy, torch and CUDA RNG states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached_gauss=float(cached_gauss)),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate(_as_tuples(state['python']))
    np_state = state['numpy']
    np.random.set_state((np_state['kind'], np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; a checkpoint round trip may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def refresh_states(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """The ``refresh_every`` schedule state of every FastDeconv on it, by module name."""
    return {name: state for name, module in model.named_modules()
            if isinstance(module, FastDeconv) and (state := module.refresh_state()) is not None}


def load_refresh_states(model: nn.Module, states: Dict[str, Dict[str, Any]]) -> None:
    """Continue the schedules ``refresh_states`` recorded."""
    for name, state in states.items():
        model.get_submodule(name).load_refresh_state(state)


def _gather_from_processes(obj: Any, distributed: bool) -> List[Any]:
    if not distributed:
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """Checkpoint to resume from: ``''`` none, ``'auto'`` the run folder's last checkpoint if
    there is one, else the given path (which must exist)."""
    if not resume:
        return None
    if resume == 'auto':
        path = os.path.join(output_dir, LAST)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume: no checkpoint at {resume!r}')
    return resume


def _changed_args(recorded: Dict[str, Any], current: Dict[str, Any], keys: Tuple[str, ...]) -> List[str]:
    """'key old -> new' for each of ``keys`` that both argument dicts hold, with different values."""
    return [f'{key} {recorded[key]} -> {current[key]}' for key in keys
            if key in recorded and key in current and recorded[key] != current[key]]


def _first_non_finite(model: nn.Module) -> Optional[str]:
    """The first parameter or floating-point buffer (running statistics) holding inf or nan, by name."""
    for kind, named_tensors in (('parameter', model.named_parameters()), ('buffer', model.named_buffers())):
        names = non_finite_names(named_tensors)
        if names:
            return f'{kind} {names[0]}'
    return None


class CheckpointManager:
    """Writes and reads the run's checkpoints: ``last`` (every epoch and every N steps), ``best``
    (highest validation top-1) and ``checkpoint-<epoch>`` every ``every_epochs`` epochs.

    Every process calls ``save_*`` (the RNG states are gathered); only the primary one writes.
    A state with non-finite parameters or buffers is refused, so the last written checkpoint is
    always a good one. The primary process removes the temporary files a killed save left behind.
    ``steps_per_epoch``: this run's, which places a resumed per-step schedule (``TrainPosition.updates``);
    None places it at the checkpoint's global step. ``class_names``: an image folder's classes in label
    order, recorded for validate.py to label other folders alike.
    """

    def __init__(
            self,
            output_dir: str,
            model: nn.Module,
            optimizer: torch.optim.Optimizer,
            scheduler: Optional[Any] = None,
            loss_scaler: Optional[Any] = None,
            model_ema: Optional[ModelEmaV3] = None,
            args: Optional[Dict[str, Any]] = None,
            arch: str = '',
            every_epochs: int = 0,
            distributed: bool = False,
            is_primary: bool = True,
            steps_per_epoch: Optional[int] = None,
            class_names: Optional[List[str]] = None,
    ):
        self.output_dir = output_dir
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_scaler = loss_scaler
        self.model_ema = model_ema
        self.args = dict(args or {})
        self.arch = arch
        self.every_epochs = every_epochs
        self.distributed = distributed
        self.is_primary = is_primary
        self.steps_per_epoch = steps_per_epoch
        self.class_names = class_names
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.last_saved: Optional[str] = None
        if is_primary:
            self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        if not os.path.isdir(self.output_dir):
            return
        for name in sorted(os.listdir(self.output_dir)):
            if _STALE_TEMPORARY.fullmatch(name):
                os.unlink(os.path.join(self.output_dir, name))
                _logger.info('removed %s, the partial file of a save that was interrupted',
                             os.path.join(self.output_dir, name))

    @property
    def last_path(self) -> str:
        return os.path.join(self.output_dir, LAST)

    def _state(self, position: TrainPosition, metric: Optional[float], rng: List[Dict[str, Any]]) -> Dict[str, Any]:
        state = dict(
            arch=self.arch,
            state_dict=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            epoch=position.epoch,
            step_in_epoch=position.step_in_epoch,
            global_step=position.global_step,
            metric=metric,
            best_metric=self.best_metric,
            best_epoch=self.best_epoch,
            args=self.args,
            rng=rng,
            version=CHECKPOINT_VERSION,
        )
        if self.class_names is not None:
            state['class_names'] = self.class_names
        if self.model_ema is not None:
            state['state_dict_ema'] = self.model_ema.module.state_dict()
        if self.scheduler is not None:
            state['scheduler'] = self.scheduler.state_dict()
            if isinstance(self.scheduler, PlateauLRScheduler):
                state['scheduler'].update({key: getattr(self.scheduler.lr_scheduler, key) for key in _PLATEAU_COUNTERS})
        if self.loss_scaler is not None:
            state[self.loss_scaler.state_dict_key] = self.loss_scaler.state_dict()
        return state

    def stopped(self, position: TrainPosition, reason: str) -> TrainingStopped:
        """The error that ends a run at ``position``, naming the last good checkpoint."""
        last = self.last_saved or 'none written yet'
        return TrainingStopped(
            f'training stopped at step {position.global_step} (epoch {position.epoch}, batch '
            f'{position.step_in_epoch}): {reason.rstrip(".")}. Last good checkpoint: {last} '
            f'(saved checkpoints are untouched).')

    def _write(self, position: TrainPosition, metric: Optional[float], other_names: Tuple[str, ...] = ()) -> None:
        """Write the state as ``other_names`` and then ``last``, or stop when any process' state is not finite."""
        # Gathered together, so that every process stops at once (buffers may differ between them).
        gathered = _gather_from_processes(
            dict(rng=capture_rng_state(), non_finite=_first_non_finite(self.model),
                 refresh=refresh_states(self.model)), self.distributed)
        non_finite = next((g['non_finite'] for g in gathered if g['non_finite']), None)
        if non_finite:
            raise self.stopped(position, f'{non_finite} became non-finite; no checkpoint written')
        if self.is_primary:
            state = self._state(position, metric, [g['rng'] for g in gathered])
            if any(g['refresh'] for g in gathered):  # per process: their batches, so their reused whitenings, differ
                state['refresh_schedules'] = [g['refresh'] for g in gathered]
            # last goes last: it records best_metric, which model_best must already hold.
            for name in (*other_names, LAST):
                atomic_save(state, os.path.join(self.output_dir, name))
        self.last_saved = self.last_path

    def save_step(self, position: TrainPosition) -> None:
        """Mid-epoch checkpoint (``last`` only)."""
        self._write(position, None)

    def save_epoch(self, position: TrainPosition, metric: Optional[float]) -> None:
        """End-of-epoch checkpoint: ``last``, plus ``best`` and ``checkpoint-<epoch>`` when due.
        ``position.epoch`` is the next epoch; the finished one is ``position.epoch - 1``."""
        finished = position.epoch - 1
        other_names = []
        if metric is not None and (self.best_metric is None or metric > self.best_metric):
            self.best_metric, self.best_epoch = metric, finished
            other_names.append(BEST)
        if self.every_epochs and (finished + 1) % self.every_epochs == 0:
            other_names.append(f'checkpoint-{finished}.pth.tar')
        self._write(position, metric, tuple(other_names))

    def load(self, path: str, rank: int = 0, world_size: int = 1) -> TrainPosition:
        """Restore every component from ``path``; returns the position to continue from.

        The RNG state of this process is restored too, so call this right before the loop (after
        anything else that draws random numbers, like model or EMA creation). A file that is not
        readable raises ``CorruptWeightsError``, one that does not fit the model
        ``CheckpointMismatchError``; both name the file, and nothing is restored.
        """
        checkpoint = load_torch_checkpoint(path)
        self._check_fits(path, checkpoint)
        position = TrainPosition(checkpoint['epoch'], checkpoint['step_in_epoch'], checkpoint['global_step'])
        self.model.load_state_dict(checkpoint['state_dict'])
        self._load_optimizer(checkpoint)
        if self.model_ema is not None:
            self.model_ema.module.load_state_dict(checkpoint.get('state_dict_ema', checkpoint['state_dict']))
        if self.scheduler is not None:
            self._move_scheduler(checkpoint, position)
        if self.loss_scaler is not None and self.loss_scaler.state_dict_key in checkpoint:
            self.loss_scaler.load_state_dict(checkpoint[self.loss_scaler.state_dict_key])
        self.best_metric, self.best_epoch = checkpoint['best_metric'], checkpoint['best_epoch']
        rng = checkpoint['rng']
        if len(rng) == world_size:
            restore_rng_state(rng[rank])
            load_refresh_states(self.model, checkpoint.get('refresh_schedules', [{}] * world_size)[rank])
        else:
            _logger.warning('checkpoint was written by %d processes, this run has %d: the per-process data order '
                            'changes (each epoch is now split over %d processes) and the RNG states are not restored, '
                            'so the continuation will not be bitwise identical', len(rng), world_size, world_size)
        self.last_saved = path
        return position

    def _check_fits(self, path: str, checkpoint: Any) -> None:
        required = ('state_dict', 'optimizer', 'epoch', 'step_in_epoch', 'global_step', 'rng')
        missing = [key for key in required if key not in checkpoint] if isinstance(checkpoint, dict) else required
        if missing:
            raise CheckpointMismatchError(f'{path} is not a training checkpoint of this script '
                                          f'(no {", ".join(missing)})')
        if self.arch and checkpoint.get('arch') and checkpoint['arch'] != self.arch:
            raise CheckpointMismatchError(f'{path}: checkpoint is for {checkpoint["arch"]}, not {self.arch}')
        changed = _changed_args(checkpoint.get('args') or {}, self.args, _DATA_ORDER_ARGS)
        if checkpoint['step_in_epoch'] and changed:
            raise CheckpointMismatchError(
                f'{path} was written after step {checkpoint["step_in_epoch"]} of epoch {checkpoint["epoch"]}; '
                f'resuming it with other data-order arguments ({", ".join(changed)}) would skip or repeat samples '
                f'of that epoch: resume with the recorded values, or from a checkpoint written at an epoch end')
        mismatch = compare_state_dict(checkpoint['state_dict'], self.model.state_dict())
        if mismatch:
            raise CheckpointMismatchError(
                f'{path} does not fit the model {self.arch} (other model arguments?):\n{mismatch.describe()}')
        moved = _changed_args(checkpoint.get('args') or {}, self.args, ('data_dir',))
        if moved:  # a copy moved to faster storage, or other images: only the user knows
            _logger.warning('resuming %s with another dataset root (%s): the run continues on its images',
                            path, moved[0])
        changed = _changed_args(checkpoint.get('args') or {}, self.args, _OPTIMIZER_ARGS)
        saved_groups = [len(group['params']) for group in checkpoint['optimizer'].get('param_groups', [])]
        groups = [len(group['params']) for group in self.optimizer.param_groups]
        if saved_groups != groups:  # another --filter-bias-and-bn, or parameters frozen otherwise
            changed.append(f'parameter groups of {saved_groups} -> {groups} parameters')
        if changed:
            raise CheckpointMismatchError(
                f'{path}: its optimizer state does not fit this optimizer ({", ".join(changed)}): resume with the '
                f'recorded optimizer arguments, or start from its weights alone with --initial-checkpoint')

    def _load_optimizer(self, checkpoint: Dict[str, Any]) -> None:
        """The checkpoint's optimizer state (momentum buffers, step counts) under the current
        arguments' settings: ``load_state_dict`` also restores each group's recorded weight decay and
        momentum, which a resume with other values then ignored while its args.json recorded them.
        The learning rate is the scheduler's (set by ``_move_scheduler``)."""
        settings = [{key: value for key, value in group.items() if key not in _SCHEDULED_GROUP_KEYS}
                    for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        for group, current in zip(self.optimizer.param_groups, settings):
            group.update(current)
        changed = _changed_args(checkpoint.get('args') or {}, self.args, _OPTIMIZER_SETTING_ARGS)
        if changed:
            _logger.info('optimizer settings of the current arguments (%s) replace the recorded ones',
                         ', '.join(changed))

    def _move_scheduler(self, checkpoint: Dict[str, Any], position: TrainPosition) -> None:
        if isinstance(self.scheduler, PlateauLRScheduler):
            # Its state is the metric history; the restored optimizer holds the learning rate it set.
            if 'scheduler' in checkpoint:
                saved = checkpoint['scheduler']
                self.scheduler.load_state_dict(saved)
                for key in _PLATEAU_COUNTERS:
                    if key in saved:  # checkpoints of earlier versions lack them
                        setattr(self.scheduler.lr_scheduler, key, saved[key])
            return
        # timm's other schedulers are functions of the epoch or update count, and their state_dict
        # is their configuration: loading it would replace the schedule of the current arguments.
        updates = position.global_step if self.steps_per_epoch is None else position.updates(self.steps_per_epoch)
        self.scheduler.step(position.epoch)
        self.scheduler.step_update(updates)
        changed = _changed_args(checkpoint.get('args') or {}, self.args, _SCHEDULE_ARGS + _STEPS_PER_EPOCH_ARGS)
        if changed:
            _logger.info('learning-rate schedule rebuilt for the current arguments (%s), continuing at '
                         'update %d of epoch %d', ', '.join(changed), updates, position.epoch)


class Trainer:
    """One training epoch at a time: forward, loss, non-finite check, backward (scaled when an
    AMP scaler is given), clipping, optimizer and per-step scheduler updates, EMA, progress bar
    and step checkpoints.

    ``model`` is what runs (possibly DDP-wrapped or compiled); the checkpoint manager holds the
    unwrapped model. ``max_steps`` ends training early after that many optimizer steps in total.
    """

    def __init__(
            self,
            model: nn.Module,
            optimizer: torch.optim.Optimizer,
            loss_fn: nn.Module,
            device: torch.device,
            checkpoints: CheckpointManager,
            scheduler: Optional[Any] = None,
            loss_scaler: Optional[Any] = None,
            amp_autocast: Callable[[], ContextManager] = contextlib.nullcontext,
            model_ema: Optional[ModelEmaV3] = None,
            mixup_fn: Optional[Callable] = None,
            clip_grad: Optional[float] = None,
            clip_mode: str = 'norm',
            channels_last: bool = False,
            checkpoint_steps: int = 0,
            max_steps: Optional[int] = None,
            distributed: bool = False,
            show_progress: bool = True,
    ):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = device
        self.checkpoints = checkpoints
        self.scheduler = scheduler
        self.loss_scaler = loss_scaler
        self.amp_autocast = amp_autocast
        self.model_ema = model_ema
        self.mixup_fn = mixup_fn
        self.clip_grad = clip_grad
        self.clip_mode = clip_mode
        self.channels_last = channels_last
        self.checkpoint_steps = checkpoint_steps
        self.max_steps = max_steps
        self.distributed = distributed
        self.show_progress = show_progress

    def reached_max_steps(self, position: TrainPosition) -> bool:
        return self.max_steps is not None and position.global_step >= self.max_steps

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[Optional[torch.Tensor], str]:
        """Loss of one batch, or (None, reason) when it is not finite on any process."""
        reason = ''
        try:
            with self.amp_autocast():
                loss = self.loss_fn(self.model(inputs), targets)
            finite = torch.isfinite(loss.detach()).float()
            if not finite:
                reason = f'non-finite loss ({loss.item()})'
        except FloatingPointError as error:  # a deconvolution layer saw non-finite statistics
            loss, finite, reason = None, torch.zeros((), device=self.device), f'FloatingPointError: {error}'
        if self.distributed:
            # Every process must stop at the same step, or the others wait in the next all-reduce.
            finite = finite.reshape(1).to(self.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            reason = reason or 'non-finite loss or statistics on another process'
        return (loss, '') if bool(finite) else (None, reason)

    def _backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_scaler is not None:
            self.loss_scaler(loss, self.optimizer, clip_grad=self.clip_grad, clip_mode=self.clip_mode,
                             parameters=self.model.parameters())
            return
        loss.backward()
        if self.clip_grad is not None:
            dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode=self.clip_mode)
        self.optimizer.step()

    def train_epoch(self, loader: DataLoader, position: TrainPosition, steps_per_epoch: int) -> Dict[str, float]:
        """Run the rest of epoch ``position.epoch`` (``position`` is advanced in place).

        Returns the epoch's mean training loss (over the steps run now, all processes).
        """
        from tqdm import tqdm

        self.model.train()
        loss_meter = AverageMeter()
        images = 0
        start = time.perf_counter()
        progress = tqdm(total=steps_per_epoch, initial=position.step_in_epoch, desc=f'epoch {position.epoch}',
                        disable=not self.show_progress, dynamic_ncols=True, leave=False,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        with progress:
            for inputs, targets in loader:
                inputs = inputs.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                if self.mixup_fn is not None:
                    inputs, targets = self.mixup_fn(inputs, targets)
                if self.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                loss, reason = self._forward(inputs, targets)
                if loss is None:
                    raise self.checkpoints.stopped(position, reason)
                self._backward_step(loss)
                position.step_in_epoch += 1
                position.global_step += 1
                if self.scheduler is not None:
                    self.scheduler.step_update(num_updates=position.updates(steps_per_epoch))
                if self.model_ema is not None:
                    self.model_ema.update(self.checkpoints.model, step=position.global_step)
                loss_meter.update(loss.item(), inputs.shape[0])
                images += inputs.shape[0]
                lr = self.optimizer.param_groups[0]['lr']
                rate = images / max(time.perf_counter() - start, 1e-9)
                progress.set_postfix(loss=f'{loss_meter.val:.4f}', lr=f'{lr:.3g}', img_s=f'{rate:.0f}', refresh=False)
                progress.update()
                if self.reached_max_steps(position):
                    break
                if self.checkpoint_steps and position.global_step % self.checkpoint_steps == 0 \
                        and position.step_in_epoch < steps_per_epoch:
                    self.checkpoints.save_step(position)
        return dict(loss=self._mean_over_processes(loss_meter))

    def _mean_over_processes(self, meter: AverageMeter) -> float:
        if not self.distributed:
            return meter.avg
        sums = torch.tensor([meter.sum, meter.count], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item() if sums[1] > 0 else math.nan
