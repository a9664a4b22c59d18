"""Helpers shared by the weights tests (hub, conversion, deployment): non-trivial statistics,
state comparison, a script loader. Importable with ``tests/`` on the path, as pytest sets it."""
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from deconv_zoo.layers import ChannelDeconv, Delinear, FastDeconv

REPO_ROOT = Path(__file__).resolve().parent.parent
# Cheap whitening for tests that run forwards (blocks of 8 channels: 72 features for 3x3 kernels, a
# 64-feature Delinear): the weights code does not depend on the block size, and whitening 576
# features is slow on a CPU.
SMALL = dict(deconv_cfg=dict(block=8), block_fc=64)


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (so tests call its main() in-process)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spd(n: int, batch: Tuple[int, ...] = (), generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random well-conditioned symmetric positive definite matrix (or a batch of them)."""
    a = torch.randn(*batch, n, n, generator=generator)
    return a @ a.transpose(-1, -2) / n + 0.5 * torch.eye(n)


@torch.no_grad()
def randomize_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics in every deconvolution layer, so that loading, folding and
    converting them is actually checked."""
    for m in model.modules():
        if isinstance(m, (FastDeconv, Delinear)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_deconv.copy_(spd(m.running_deconv.shape[-1], m.running_deconv.shape[:-2], generator))
        if isinstance(m, FastDeconv):
            m.counter.fill_(7)
        if isinstance(m, ChannelDeconv):
            m.running_mean1.copy_(0.1 * torch.randn(m.running_mean1.shape, generator=generator))
            m.running_deconv.copy_(spd(m.block, generator=generator))
            m.running_mean2.fill_(0.3)
            m.running_var.fill_(2.0)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.normal_(0, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            m.weight.uniform_(0.5, 1.5, generator=generator)
            m.bias.normal_(0, 0.1, generator=generator)


def assert_state_equal(model: nn.Module, expected: Mapping[str, torch.Tensor],
                       skip: Union[str, Tuple[str, ...]] = '##') -> None:
    """The model's state equals ``expected``, except keys starting with ``skip``."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    assert set(state) == {k for k in expected if not k.startswith(skip)}
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max-abs error relative to the largest expected magnitude."""
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= rel, f'relative error {error:.2e} > {rel:.0e}'
