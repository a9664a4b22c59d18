"""Deconv models under torch.compile and on CUDA (issue #2, section 1; issue #5).

CI has no GPU: the CUDA tests skip there and run wherever a device is present. The layers'
CUDA route is also checked against the oracle in test_layers.py::test_layer_matches_oracle.
"""
import copy
from typing import Dict, Optional, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from deconv_zoo.layers import Delinear, FastDeconv, set_finite_checks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
AUTOCAST_CASES = pytest.mark.parametrize('device, dtype', [
    ('cpu', torch.bfloat16),
    pytest.param('cuda', torch.float16, marks=requires_cuda),
    pytest.param('cuda', torch.bfloat16, marks=requires_cuda),
], ids=['cpu-bf16', 'cuda-fp16', 'cuda-bf16'])


def small_deconv_model() -> nn.Module:
    """resnet18_cifar_deconv cut to one block per stage, with whitening blocks of 16 channels."""
    torch.manual_seed(0)
    return timm.create_model('resnet18_cifar_deconv', layers=(1, 1, 1, 1), deconv_cfg={'block': 16}, num_classes=10)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               amp_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one training step (no optimizer: the gradients are compared).
    With ``amp_dtype``, forward and loss run under autocast and the backward pass outside it, as
    PyTorch's AMP recipe (and scripts/train.py) do."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    # A compiled module names its parameters '_orig_mod.<name>'.
    return loss.detach(), {name.removeprefix('_orig_mod.'): p.grad.clone() for name, p in model.named_parameters()}


def assert_close_state(a: nn.Module, b: nn.Module, rtol: float, atol: float) -> None:
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b_state[key], rtol=rtol, atol=atol, msg=lambda m: f'{key}: {m}')


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_compiled_step_matches_eager(eager: nn.Module, x: torch.Tensor, backend: str) -> None:
    """fullgraph=True compiles a whole training step of ``eager``'s copy, statistics and their
    running update included; loss, gradients, running statistics and the eval output equal eager's.

    In float64: a model can have pre-activations within float32 rounding of a ReLU kink (the small
    ResNet has one in layer4 at 2e-8 of the largest), so in float32 a different but equally
    accurate order of operations can flip a unit and move every gradient by 4e-3.
    """
    compiled_model = set_finite_checks(copy.deepcopy(eager), False)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False, backend=backend)
    target = torch.arange(len(x)) % 10
    loss, grads = train_step(eager, x, target)
    loss_c, grads_c = train_step(compiled, x, target)
    torch.testing.assert_close(loss_c, loss, rtol=1e-10, atol=1e-12)
    for name, grad in grads.items():
        assert relative_error(grads_c[name], grad) < 1e-9, name
    assert_close_state(compiled_model, eager, rtol=1e-10, atol=1e-12)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)


def test_whole_model_compiles_without_graph_breaks():
    """Dynamo and AOT autograd capture the whole model's training step (aot_eager: the captured
    graphs run eagerly, so this checks capture and the functionalised buffer updates; inductor's
    code generation for the whole model takes minutes on 2 CPU cores, see the next test)."""
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_compiled_step_matches_eager(small_deconv_model().double(), x, 'aot_eager')


@pytest.mark.slow
def test_inductor_training_step_matches_eager_on_cpu():
    """Inductor's generated code for each kind of zoo layer: a 3x3 FastDeconv stem, a strided 3x3
    and a depthwise FastDeconv, a 1x1 FastDeconv and a Delinear classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(
        FastDeconv(3, 16, 3, padding=1, block=3), nn.ReLU(),
        FastDeconv(16, 16, 3, stride=2, padding=1, block=8), nn.ReLU(),
        FastDeconv(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        FastDeconv(16, 32, 1, block=16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), Delinear(32, 10, block=16),
    ).double()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_compiled_step_matches_eager(model, x, 'inductor')


@AUTOCAST_CASES
def test_autocast_training_keeps_statistics_in_float32(device, dtype):
    """Under autocast the convolutions run in half precision while statistics and Newton-Schulz
    stay float32: buffers are float32 and close to a float32 run, outputs and gradients finite.
    On CUDA every whitening takes the matrix iteration; on CPU the small ones do."""
    reference = small_deconv_model().to(device)
    amp = copy.deepcopy(reference)
    x = torch.randn(16, 3, 16, 16, device=device, generator=torch.Generator(device).manual_seed(1))
    target = torch.arange(16, device=device) % 10
    for _ in range(3):
        loss, _ = train_step(reference, x, target)
        loss_amp, grads_amp = train_step(amp, x, target, amp_dtype=dtype)
        assert torch.isfinite(loss_amp) and all(torch.isfinite(g).all() for g in grads_amp.values())
        torch.testing.assert_close(loss_amp, loss, rtol=5e-2, atol=5e-2)
    reference_state = reference.state_dict()
    for key, value in amp.state_dict().items():
        assert value.dtype == reference_state[key].dtype, key
        if key.endswith(('running_mean', 'running_deconv')):
            torch.testing.assert_close(value, reference_state[key], rtol=5e-2, atol=5e-2, msg=lambda m: f'{key}: {m}')
    amp.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        assert torch.isfinite(amp(x)).all()


@AUTOCAST_CASES
def test_backward_inside_autocast(device, dtype):
    """loss.backward() inside the autocast region (not the AMP recipe, but common) raised a dtype
    error in the Newton-Schulz backward: the statistics' own backward passes now run with autocast
    off, as their forward did. PyTorch's built-in backward formulas of the float32 fold still run
    under autocast there, so the gradients match the recipe's to half-precision rounding only."""
    model = small_deconv_model().to(device)
    x = torch.randn(16, 3, 16, 16, device=device, generator=torch.Generator(device).manual_seed(1))
    target = torch.arange(16, device=device) % 10
    _, grads = train_step(copy.deepcopy(model), x, target, amp_dtype=dtype)
    with torch.autocast(device, dtype=dtype):
        F.cross_entropy(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and relative_error(p.grad, grads[name]) < 5e-2, name


@requires_cuda
def test_cuda_graphs_training_step_matches_eager():
    """torch.compile(mode='reduce-overhead') replays a CUDA graph of the training step; with the
    finite checks off nothing syncs, and repeated steps track eager's loss and statistics.

    In float64, which no TF32 kernel touches: in float32 cuDNN may pick TF32 convolutions, and
    differently for the compiled graph (inductor may change their memory layout) than for eager.
    """
    eager = small_deconv_model().cuda().double()
    graphed_model = set_finite_checks(copy.deepcopy(eager), False)
    graphed = torch.compile(graphed_model, mode='reduce-overhead', fullgraph=True, dynamic=False)
    x = torch.randn(16, 3, 16, 16, device='cuda', dtype=torch.float64,
                    generator=torch.Generator('cuda').manual_seed(1))
    target = torch.arange(16, device='cuda') % 10
    for _ in range(3):  # eager warm-up, capture, replay
        loss, _ = train_step(eager, x, target)
        loss_g, _ = train_step(graphed, x, target)
        torch.testing.assert_close(loss_g, loss, rtol=1e-7, atol=1e-9)
    assert_close_state(graphed_model, eager, rtol=1e-7, atol=1e-9)
