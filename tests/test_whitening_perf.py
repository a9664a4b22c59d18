"""The fast evaluations in whitening.py compute exactly what the plain formulations compute (issue #5).

newton_schulz_eigh (one eigendecomposition) against newton_schulz_iteration (the paper's matrix
iteration, with a written-out backward that test_layers.py checks against autograd's),
PatchMoments (one-product backward, patches rebuilt or kept) against the autograd covariance:
values and gradients in float64, plus gradcheck; frozen steps that skip the statistics against
the selection they replace.
"""
import copy
from contextlib import contextmanager

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from deconv_zoo.layers import FastDeconv, whitening
from deconv_zoo.layers.whitening import (
    PatchMoments, isqrt_newton_schulz, newton_schulz_eigh, newton_schulz_iteration, newton_schulz_polynomial,
)


def assert_rel(actual, expected, tol):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f'relative error {err / scale:.3g} exceeds {tol:g}'


def covariance(*batch, d, samples=None, seed=0, eps=1e-5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, samples or 2 * d, d, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.2, 3.0, d, dtype=torch.float64) + 0.5  # unequal scales, non-zero mean
    xc = x - x.mean(dim=-2, keepdim=True)
    return xc.transpose(-1, -2) @ xc / x.shape[-2] + eps * torch.eye(d, dtype=torch.float64)


def value_and_grad(fn, cov, upstream):
    a = cov.clone().requires_grad_()
    out = fn(a)
    (out * upstream).sum().backward()
    return out.detach(), a.grad


CASES = {
    'd5': ((), 5, None),
    'd20': ((), 20, None),
    'batched': ((3,), 7, None),
    'rank_deficient': ((), 12, 4),  # many eigenvalues equal to eps: divided differences on ties
}


@pytest.mark.parametrize('n_iter', [1, 2, 5, 9])
@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
def test_eigh_newton_schulz_equals_iteration(case, n_iter):
    batch, d, samples = case
    cov = covariance(*batch, d=d, samples=samples) * 30.0
    upstream = torch.randn(cov.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, expected_grad = value_and_grad(lambda a: newton_schulz_iteration(a, n_iter), cov, upstream)
    actual, actual_grad = value_and_grad(lambda a: newton_schulz_eigh(a, n_iter), cov, upstream)
    assert_rel(actual, expected, 1e-12)
    assert_rel(actual_grad, expected_grad, 1e-10)  # non-symmetric upstream: the full gradient


@pytest.mark.parametrize('batch', [(), (2,)], ids=['single', 'batched'])
def test_eigh_newton_schulz_gradcheck(batch):
    cov = covariance(*batch, d=6, eps=1e-2)

    def symmetric_input(b):  # eigh reads one triangle; gradcheck perturbs entries one at a time
        return newton_schulz_eigh((b + b.transpose(-1, -2)) / 2, 5)

    assert gradcheck(symmetric_input, (cov.clone().requires_grad_(),))


@pytest.mark.parametrize('n_iter', [1, 2, 5])
@pytest.mark.parametrize('batch', [(), (2,)], ids=['single', 'batched'])
def test_iteration_backward_gradcheck(batch, n_iter):
    """The iteration's written-out reverse sweep, and its second derivatives (create_graph)."""
    cov = covariance(*batch, d=6, eps=1e-2).requires_grad_()
    assert gradcheck(lambda a: newton_schulz_iteration(a, n_iter), (cov,))
    assert gradgradcheck(lambda a: newton_schulz_iteration(a, n_iter), (cov,))


def test_eigh_newton_schulz_refuses_second_derivatives():
    """Its saved eigenvectors would be constants to a second differentiation: it raises instead."""
    cov = covariance(d=6, eps=1e-2).requires_grad_()
    with pytest.raises(RuntimeError, match='no second derivatives'):
        torch.autograd.grad(newton_schulz_eigh(cov, 5).sum(), cov, create_graph=True)


def test_dispatch_uses_eigh_from_threshold_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(whitening, 'newton_schulz_eigh', lambda a, n: calls.append(a.shape[-1]) or a)
    isqrt_newton_schulz(covariance(d=whitening.EIGH_MIN_SIZE - 1), 5)
    isqrt_newton_schulz(covariance(d=whitening.EIGH_MIN_SIZE), 5)
    assert calls == [whitening.EIGH_MIN_SIZE]


def test_float32_eigh_is_as_accurate_as_float32_iteration():
    """nf = 288 (a 3x3 conv with block 32): the float32 eigen route is as accurate as the
    float32 iteration, both against the float64 iteration."""
    cov = covariance(d=288, samples=1000)
    upstream = torch.randn(cov.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected, expected_grad = value_and_grad(lambda a: newton_schulz_iteration(a, 5), cov, upstream)
    for fn in (newton_schulz_eigh, newton_schulz_iteration):
        actual, grad = value_and_grad(lambda a: fn(a, 5), cov.float(), upstream.float())
        assert_rel(actual.double(), expected, 2e-5)
        assert_rel(grad.double(), expected_grad, 2e-5)


def test_polynomial_divided_differences():
    mu = torch.tensor([1e-6, 0.3, 0.3, 0.5, 0.8], dtype=torch.float64)
    mu = mu / mu.norm()  # diag(mu) has unit Frobenius norm: the iteration applies p to it unscaled
    p, divided = newton_schulz_polynomial(mu, 5)
    assert_rel(p, newton_schulz_iteration(torch.diag(mu), 5).diagonal(), 1e-13)

    def scalar_iteration(m):  # Y = m, Z = 1 on scalars, as in Alg. 1
        y, z = m, torch.ones_like(m)
        for _ in range(5):
            t = 0.5 * (3.0 - z * y)
            y, z = y * t, t * z
        return z

    derivative = torch.autograd.functional.jacobian(scalar_iteration, mu).diagonal()
    assert_rel(divided.diagonal(), derivative, 1e-12)
    assert_rel(divided[1, 3], (p[1] - p[3]) / (mu[1] - mu[3]), 1e-12)
    assert_rel(divided, divided.t(), 1e-13)


def centred_moments(samples):
    """The plain formulation: mean and centred covariance, differentiated by autograd."""
    mean = samples.mean(dim=-1)
    centred = samples - mean[..., None]
    return mean, centred @ centred.transpose(-1, -2) / samples.shape[-1]


def assert_moments_match(fast, plain, x0, seed):
    """Mean, covariance and the input gradient under random upstreams agree (float64)."""
    results = []
    for fn in (plain, fast):
        x = x0.clone().requires_grad_()
        mean, cov = fn(x)
        g = torch.Generator().manual_seed(seed)
        upstream_mean = torch.randn(mean.shape, generator=g, dtype=torch.float64)
        upstream_cov = torch.randn(cov.shape, generator=g, dtype=torch.float64)
        ((mean * upstream_mean).sum() + (cov * upstream_cov).sum()).backward()
        results.append((mean, cov, x.grad))
    for actual, expected in zip(results[1], results[0]):
        assert_rel(actual.detach(), expected.detach(), 1e-12)


@pytest.mark.parametrize('shape', [(4, 12), (2, 3, 10)], ids=['pooled', 'grouped'])
def test_patch_moments_equal_autograd_covariance(shape):
    samples = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.7
    assert gradcheck(lambda x: PatchMoments.apply(x, None, shape), (samples.clone().requires_grad_(),))
    assert_moments_match(lambda x: PatchMoments.apply(x, None, shape), centred_moments, samples, seed=4)


GEOMETRIES = {
    'k3_s3': ((3, 3), (1, 1), (1, 1), (3, 3)),
    'k3_s3_unpadded': ((3, 3), (1, 1), (0, 0), (3, 3)),  # pixels past the last window on both axes
    'k2_s2': ((2, 2), (1, 1), (0, 0), (2, 2)),
    'k3_s6_dilation2': ((3, 3), (2, 2), (2, 2), (6, 6)),
    'k7_s2': ((7, 7), (1, 1), (3, 3), (2, 2)),
    'k1_s3': ((1, 1), (1, 1), (0, 0), (3, 3)),
}


@contextmanager
def nan_filled_empty():
    """torch.empty returns NaN-filled memory inside (deterministic mode's fill)."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all()
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize('geometry', GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_patches_adjoint_is_the_transpose_of_sampling(geometry):
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64, requires_grad=True)
    patches = whitening.sample_patches(x, *geometry)
    grad = torch.randn(patches.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    patches.backward(grad)
    # Deterministic mode fills uninitialised memory with NaN, so a pixel that the adjoint leaves
    # unwritten cannot pass for zero.
    with nan_filled_empty():
        adjoint = whitening.patches_adjoint(grad, x.shape, *geometry)
    assert_rel(adjoint, x.grad, 1e-14)


@pytest.mark.parametrize('rebuild', [True, False], ids=['rebuilt', 'kept'])
@pytest.mark.parametrize('groups', [1, 3])
@pytest.mark.parametrize('geometry', [GEOMETRIES['k3_s3'], GEOMETRIES['k2_s2'], GEOMETRIES['k1_s3']],
                         ids=['k3_s3', 'k2_s2', 'k1_s3'])
def test_conv_patch_moments_equal_autograd_over_sampled_patches(geometry, groups, rebuild, monkeypatch):
    """Both backward routes (patch matrix rebuilt from x, or kept from the forward pass) give the
    gradient that autograd takes through sample_patches and the plain covariance."""
    monkeypatch.setattr(whitening, 'REBUILD_MIN_FEATURES', 1 if rebuild else 10 ** 6)
    x0 = torch.randn(2, 6, 11, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.4
    nf = 6 // groups * geometry[0][0] * geometry[0][1] if groups > 1 else 2 * geometry[0][0] * geometry[0][1]
    shape = (nf, -1) if groups == 1 else (groups, nf, -1)

    assert_moments_match(lambda x: PatchMoments.apply(x, geometry, shape),
                         lambda x: centred_moments(whitening.sample_patches(x, *geometry).reshape(shape)), x0, seed=8)


def test_symmetric_gram_equals_full_product():
    x = torch.randn(2, 50, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for block_rows in (7, 16, 50):  # 4, 3 and 1 row blocks
        assert_rel(whitening.symmetric_gram(x, block_rows), x @ x.transpose(1, 2), 1e-14)


def test_frozen_steps_skip_the_statistics_with_the_same_result(monkeypatch):
    """freeze=True on CPU: frozen steps compute no batch statistics; outputs, gradients and
    buffers equal (to rounding) those of the sync-free selection used on GPUs and under compile."""
    torch.manual_seed(0)
    skipping = FastDeconv(4, 3, 3, padding=1, block=2, freeze=True, freeze_iter=2).double()
    selecting = copy.deepcopy(skipping)
    computed = []
    batch_statistics = FastDeconv.batch_statistics
    monkeypatch.setattr(FastDeconv, 'batch_statistics', lambda self, x: computed.append(self) or batch_statistics(self, x))
    for call in range(8):  # fresh statistics on calls 1..3 of every 20
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(call), dtype=torch.float64)
        results = []
        for layer, compiling in ((skipping, False), (selecting, True)):
            monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: compiling)
            xg = x.clone().requires_grad_()
            out = layer(xg)
            out.square().sum().backward()
            results.append([out, xg.grad, layer.weight.grad, layer.bias.grad] + list(layer.buffers()))
            layer.zero_grad()
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: False)
        for actual, expected in zip(*results):
            assert_rel(actual.detach(), expected.detach(), 1e-12)  # matmul picks its kernel by requires_grad
    assert [layer is skipping for layer in computed] == [True, False] * 3 + [False] * 5


def test_eigh_route_restores_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        newton_schulz_eigh(covariance(d=6), 5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
