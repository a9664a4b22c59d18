"""The deconvolution layers compute the paper's deconvolution (issue #2, section 1).

FastDeconv, Delinear and ChannelDeconv are compared with ``oracle.py``, a literal and
independent implementation of the reference algorithm, and their runtime behaviour (freeze
schedule, eval cache, autocast, memory formats, bad input, checkpointing) is pinned down.
"""
import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from deconv_zoo.layers import (
    ChannelDeconv, Delinear, FastDeconv, _stats, fast_deconv, freeze_whitening, isqrt_newton_schulz,
    smallest_training_batch,
)
from oracle import OracleChannelDeconv, OracleDelinear, OracleFastDeconv, oracle_newton_schulz


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """The tensors here are tiny: one intra-op thread runs them several times faster than two
    (no OpenMP hand-offs, no spinning threads on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

# Relative error (max norm) allowed against the float64 oracle, by the layer's dtype.
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def assert_rel(actual, expected, tol):
    """max |actual - expected| <= tol * max |expected|."""
    err = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f'relative error {err / scale:.3g} exceeds {tol:g}'


def random_input(shape, seed, dtype=torch.float64):
    """Inputs with a non-zero mean and unequal channel scales, so that centring matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64).reshape(1, -1, *([1] * (len(shape) - 2)))
    return (x * scale + 0.3).to(dtype)


ORACLE_OF = {FastDeconv: OracleFastDeconv, Delinear: OracleDelinear, ChannelDeconv: OracleChannelDeconv}


def fast(shape, in_channels, out_channels, kernel_size, **kwargs):
    """A FastDeconv case: (layer class, constructor arguments, input shape)."""
    kwargs.update(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size)
    return FastDeconv, kwargs, shape


def linear(shape, in_features, out_features, **kwargs):
    return Delinear, dict(in_features=in_features, out_features=out_features, **kwargs), shape


def channel(shape, **kwargs):
    return ChannelDeconv, kwargs, shape


ORACLE_CASES = {
    'fast_k1': fast((3, 8, 9, 7), 8, 6, 1, block=4),
    'fast_k1_stride2': fast((4, 8, 12, 11), 8, 6, 1, stride=2, block=4),
    'fast_k1_groups2': fast((3, 8, 9, 7), 8, 6, 1, groups=2),
    'fast_k3_gcd_block': fast((2, 6, 9, 8), 6, 5, 3, padding=1, block=4),
    'fast_k3_stride2': fast((2, 8, 11, 10), 8, 4, 3, stride=2, padding=1, block=4),
    'fast_k3_dilation2': fast((2, 8, 10, 9), 8, 4, 3, padding=2, dilation=2, block=4),
    'fast_k3_groups4': fast((2, 8, 8, 7), 8, 8, 3, padding=1, groups=4),
    'fast_k3_depthwise_stride2': fast((2, 6, 10, 9), 6, 12, 3, stride=2, padding=1, groups=6),
    'fast_k3_no_bias': fast((2, 8, 7, 7), 8, 4, 3, padding=1, block=2, bias=False),
    'fast_k3_groups2_no_bias': fast((2, 8, 7, 7), 8, 4, 3, padding=1, groups=2, bias=False),
    'fast_k5_block_exceeds_channels': fast((2, 4, 8, 8), 4, 6, 5, padding=2, sampling_stride=1),
    'fast_k7_stem': fast((2, 3, 15, 13), 3, 5, 7, stride=2, padding=3),
    'fast_k3_map1_batch1': fast((1, 4, 1, 1), 4, 3, 3, padding=1, block=2),
    'fast_k3_map2': fast((2, 4, 2, 2), 4, 3, 3, padding=1),
    'delinear': linear((16, 12), 12, 5, block=4),
    'delinear_gcd_block': linear((16, 12), 12, 5, block=8),
    'delinear_block_exceeds_features': linear((20, 6), 6, 3),
    'delinear_no_bias': linear((16, 12), 12, 5, block=3, bias=False),
    'delinear_sequence': linear((3, 5, 8), 8, 4, block=4),
    # Fewer rows than outputs: the training step whitens the input instead of folding the weight.
    'delinear_few_rows': linear((6, 12), 12, 16, block=4),
    'delinear_few_rows_no_bias': linear((2, 3, 8), 8, 9, block=4, bias=False),
    'channel': channel((3, 8, 6, 7), block=4),
    'channel_leftover': channel((3, 10, 6, 6), block=4),
    'channel_map_below_stride': channel((4, 10, 2, 2), block=4),
    'channel_flat_input': channel((16, 10), block=4),
    'channel_c0': channel((3, 3, 6, 6), block=4),
    'channel_stride1': channel((2, 6, 5, 5), block=2, sampling_stride=1),
}


@pytest.mark.filterwarnings('ignore:.*(does not divide|is larger than)')
@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=requires_cuda)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('case', ORACLE_CASES.values(), ids=ORACLE_CASES.keys())
def test_layer_matches_oracle(case, dtype, device, monkeypatch):
    """Two training steps (output, input and parameter gradients, running statistics), then an
    eval step, of the layer in ``dtype`` on ``device`` against the float64 oracle on CPU holding
    the same state. On CUDA the layer takes its GPU route (Newton-Schulz products)."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)  # TF32 convolutions miss 1e-4
    layer_cls, kwargs, shape = case
    torch.manual_seed(0)
    layer = layer_cls(**kwargs).to(dtype)
    oracle = ORACLE_OF[layer_cls](**kwargs).double()
    oracle.load_state_dict(layer.state_dict())
    layer.to(device)
    tol = TOL[dtype]
    for step, training in enumerate((True, True, False)):
        layer.train(training)
        oracle.train(training)
        x = random_input(shape, seed=step)
        x_layer = x.to(device, dtype, copy=True).requires_grad_()
        x_oracle = x.requires_grad_()
        out, expected = layer(x_layer), oracle(x_oracle)
        assert out.dtype == dtype
        assert_rel(out, expected, tol)
        upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)
        (out * upstream.to(device, dtype)).sum().backward()
        (expected * upstream).sum().backward()
        assert_rel(x_layer.grad, x_oracle.grad, tol)
        oracle_params = dict(oracle.named_parameters())
        for name, param in layer.named_parameters():
            assert_rel(param.grad, oracle_params[name].grad, tol)
        layer.zero_grad()
        oracle.zero_grad()
        oracle_state = oracle.state_dict()
        for name, buf in layer.state_dict().items():
            if buf.is_floating_point():
                assert buf.dtype == dtype
                assert_rel(buf, oracle_state[name], tol)


def random_covariance(*batch, d=20, seed=0):
    """A covariance of 2d samples in d dimensions (condition number about 30)."""
    x = torch.randn(*batch, 2 * d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.transpose(-1, -2) @ x / (2 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize('d', [20, 150])  # small and large matrices (evaluated differently on CPU)
@pytest.mark.parametrize('batch', [(), (3,)], ids=['single', 'batched'])
@pytest.mark.parametrize('n_iter', range(1, 16))
def test_newton_schulz_matches_literal_iteration(n_iter, batch, d):
    scale = torch.tensor([1.0, 10.0, 1e3], dtype=torch.float64)[:batch[0], None, None] if batch else 1.0
    cov = random_covariance(*batch, d=d) * scale
    upstream = torch.randn(cov.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for isqrt in (isqrt_newton_schulz, oracle_newton_schulz):
        a = cov.clone().requires_grad_()
        out = isqrt(a, n_iter)
        (out * upstream).sum().backward()  # the paper back-propagates through the iteration
        results.append((out, a.grad))
    (out, grad), (expected_out, expected_grad) = results
    assert_rel(out, expected_out, 1e-12)
    assert_rel(grad, expected_grad, 1e-10)


def test_newton_schulz_is_unconverged_at_five_iterations():
    cov = random_covariance()
    evals, evecs = torch.linalg.eigh(cov)
    exact = evecs @ torch.diag(evals.rsqrt()) @ evecs.t()

    def rel_error(n_iter):
        return ((isqrt_newton_schulz(cov, n_iter) - exact).norm() / exact.norm()).item()

    assert rel_error(5) > 0.05  # the paper's default is a truncated polynomial, not A^(-1/2)
    assert rel_error(15) < 1e-12
    with pytest.raises(ValueError, match='n_iter'):
        isqrt_newton_schulz(cov, 0)


FREEZE_KWARGS = dict(in_channels=4, out_channels=3, kernel_size=3, padding=1, block=2, freeze=True, freeze_iter=3)


def test_freeze_schedule():
    """freeze_iter=3: fresh statistics on training calls 1..4 and 31..34, running ones on 5..30
    and 35 (the counter runs modulo 30)."""
    layer = FastDeconv(**FREEZE_KWARGS).double()
    oracle = OracleFastDeconv(**FREEZE_KWARGS).double()
    oracle.load_state_dict(layer.state_dict())
    layer.train()
    oracle.train()
    updated = []
    for call in range(1, 36):
        before = [layer.running_mean.clone(), layer.running_deconv.clone()]
        x = random_input((2, 4, 6, 6), seed=call)
        assert_rel(layer(x), oracle(x), 1e-8)
        after = [layer.running_mean, layer.running_deconv]
        updated.append([not torch.equal(b, a) for b, a in zip(before, after)])
        assert int(layer.counter) == int(oracle.counter) == call % 30
    assert updated == [[fresh, fresh] for fresh in (call <= 4 or 31 <= call <= 34 for call in range(1, 36))]
    layer.eval()
    layer(random_input((2, 4, 6, 6), seed=0))
    assert int(layer.counter) == 5  # eval calls do not advance the schedule


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=requires_cuda)])
def test_frozen_step_takes_a_batch_too_small_for_statistics(device):
    """A frozen step whitens with the running statistics, so a single sampled patch is enough;
    a fresh one refuses it. Off CPU the layer reads the schedule's choice on the host for such
    batches only (elsewhere it selects on the device, which computed the batch statistics and raised)."""
    layer = FastDeconv(**dict(FREEZE_KWARGS, block=4)).to(device).train()
    single = random_input((1, 4, 3, 3), seed=0, dtype=torch.float32).to(device)  # one sampled patch
    with pytest.raises(ValueError, match='more than one sample'):
        layer(single)  # call 1: fresh
    for seed in range(4):
        layer(random_input((2, 4, 6, 6), seed, torch.float32).to(device))  # calls 1..4: fresh
    running = [layer.running_mean.clone(), layer.running_deconv.clone()]
    layer(single)  # call 5: frozen
    assert torch.equal(layer.running_mean, running[0]) and torch.equal(layer.running_deconv, running[1])
    assert int(layer.counter) == 5


def test_counter_is_saved_and_restored():
    layer = FastDeconv(**FREEZE_KWARGS)
    for seed in range(7):
        layer(random_input((2, 4, 6, 6), seed, torch.float32))
    state = layer.state_dict()
    assert int(state['counter']) == 7
    restored = FastDeconv(**FREEZE_KWARGS)
    restored.load_state_dict(state)
    assert int(restored.counter) == 7
    before = copy.deepcopy(restored.state_dict())
    restored(random_input((2, 4, 6, 6), 7, torch.float32))  # call 8: frozen, as in the original
    for name in ('running_mean', 'running_deconv'):
        assert torch.equal(restored.state_dict()[name], before[name])


def test_reference_checkpoint_without_counter_loads_strictly():
    model = torch.nn.Sequential(FastDeconv(**FREEZE_KWARGS))
    model[0].counter.fill_(5)
    reference_state = {k: v for k, v in model.state_dict().items() if not k.endswith('counter')}
    model.load_state_dict(reference_state)  # strict
    assert int(model[0].counter) == 0
    assert '0.counter' not in reference_state  # the caller's dict is not modified


# Small layers for the behaviour tests, in the ORACLE_CASES format.
SMALL = {
    'fast_deconv': (FastDeconv, FREEZE_KWARGS, (2, 4, 6, 6)),
    'delinear': linear((6, 8), 8, 3, block=4),
    'channel_deconv': channel((3, 10, 6, 6), block=4),
}
FOLDING = ['fast_deconv', 'delinear']


def trained_small(name):
    """A small layer after one training step (non-trivial statistics), and an input for it."""
    layer_cls, kwargs, shape = SMALL[name]
    torch.manual_seed(0)
    layer = layer_cls(**kwargs)
    layer(random_input(shape, 0, torch.float32))
    return layer, random_input(shape, 1, torch.float32)


@pytest.mark.parametrize('name', FOLDING)
def test_training_without_tracking_uses_batch_statistics(name):
    """track_running_stats=False (the reference's attribute, as in BatchNorm): training calls
    still whiten with the batch's statistics, and record nothing (buffers, freeze counter)."""
    layer, x = trained_small(name)
    layer.double()
    layer.track_running_stats = False
    oracle = ORACLE_OF[type(layer)](**SMALL[name][1]).double()
    oracle.load_state_dict(layer.state_dict())
    before = copy.deepcopy(layer.state_dict())
    x = x.double()
    assert_rel(layer(x), oracle(x), 1e-8)  # FastDeconv: counter 1, not frozen: fresh statistics
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def count_folds(monkeypatch, layer):
    calls = []
    original = type(layer)._fold

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(type(layer), '_fold', counting)
    return calls


@pytest.mark.parametrize('name', FOLDING)
def test_eval_folds_once_and_reuses(name, monkeypatch):
    layer, x = trained_small(name)
    layer.eval()
    calls = count_folds(monkeypatch, layer)
    with torch.no_grad():
        cached = [layer(x), layer(x), layer(x)]
    assert len(calls) == 1
    uncached = layer(x)  # weight requires grad and grad mode is on: folded afresh, not cached
    assert len(calls) == 2 and uncached.requires_grad
    for out in cached:
        assert torch.equal(out, uncached)


def _optimizer_step(make_optimizer):
    def step(layer):
        for p in layer.parameters():
            p.grad = torch.full_like(p, 0.1)
        make_optimizer(layer.parameters()).step()
    return step


def _load_perturbed_state(layer):
    layer.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in layer.state_dict().items()})


def _edit(attribute, edit):
    def mutate(layer):
        with torch.no_grad():
            edit(getattr(layer, attribute))
    return mutate


INVALIDATIONS = {
    'sgd_step': _optimizer_step(lambda params: torch.optim.SGD(params, lr=0.5, foreach=False)),
    'sgd_foreach_step': _optimizer_step(lambda params: torch.optim.SGD(params, lr=0.5, foreach=True)),
    'adam_fused_step': _optimizer_step(lambda params: torch.optim.Adam(params, lr=0.5, fused=True)),
    'load_state_dict': _load_perturbed_state,
    'weight_inplace': _edit('weight', lambda t: t.mul_(-2.0)),
    'bias_inplace': _edit('bias', lambda t: t.add_(1.0)),
    'running_mean_inplace': _edit('running_mean', lambda t: t.add_(0.5)),
    'running_deconv_inplace': _edit('running_deconv', lambda t: t.mul_(0.5)),
    'back_to_train': lambda layer: layer.train().eval(),
    # .data aliases have a version counter of their own: documented to need an eval() call.
    'data_edit_then_eval': lambda layer: (layer.weight.data.mul_(-2.0), layer.eval()),
    'replaced_weight': lambda layer: setattr(layer, 'weight', torch.nn.Parameter(layer.weight.detach() * -2.0)),
}


@pytest.mark.parametrize('mutate', INVALIDATIONS.values(), ids=INVALIDATIONS.keys())
@pytest.mark.parametrize('name', FOLDING)
def test_eval_cache_is_invalidated(name, mutate, monkeypatch):
    layer, x = trained_small(name)
    layer.eval()
    calls = count_folds(monkeypatch, layer)
    with torch.no_grad():
        layer(x)
    mutate(layer)
    with torch.no_grad():
        cached = layer(x)
    assert len(calls) == 2
    assert torch.equal(cached, layer(x))  # equal to a fold of the current state


def test_fold_cache_hits_only_its_own_sources():
    """A view shares storage, version counter, dtype and device, so its key is the source's;
    only the tensor it was computed from may hit (freed memory can return at the same address)."""
    cache, source = _stats.FoldCache(), torch.randn(3, 3)
    alias = source.view_as(source)
    cache.put((source, source), source)
    assert _stats.FoldCache.key(alias) == _stats.FoldCache.key(source)
    assert cache.get(source) is not None
    assert cache.get(alias) is None


@pytest.mark.parametrize('name', FOLDING)
def test_copies_of_a_cached_eval_layer_pickle_and_agree(name):
    import pickle
    layer, x = trained_small(name)
    layer.eval()
    with torch.no_grad():
        expected = layer(x)  # fills the cache
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        with torch.no_grad():
            twin.weight.mul_(-1.0)
            assert torch.equal(layer(x), expected)  # the original is unaffected
            assert not torch.equal(twin(x), expected)


def test_eval_model_ensemble_under_vmap():
    """torch.func ensembling (stacked states, functional_call under vmap) in eval mode: tensors
    without storage are folded afresh, never cached."""
    from torch.func import functional_call, stack_module_state, vmap
    members = [trained_small('fast_deconv')[0].eval() for _ in range(3)]
    for i, member in enumerate(members):
        with torch.no_grad():
            member.weight.mul_(i + 1.0)
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to('meta')
    x = random_input((2, 4, 6, 6), 3, torch.float32)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    with torch.no_grad():
        for i, member in enumerate(members):
            assert_rel(out[i], member(x), 1e-6)


SECOND_ORDER = {  # layers whose backward keeps the patch matrix (fewer than 128 features)
    'fast_k3': fast((2, 4, 6, 6), 4, 3, 3, padding=1, block=2),
    'fast_k1': fast((2, 8, 5, 5), 8, 3, 1, block=4),
    'fast_k3_depthwise': fast((2, 4, 6, 6), 4, 4, 3, padding=1, groups=4),
    'fast_k3_rebuilt': fast((2, 16, 6, 6), 16, 3, 3, padding=1, block=16),  # 144 features
    'delinear': linear((6, 8), 8, 3, block=4),
}


@pytest.mark.parametrize('case', SECOND_ORDER.values(), ids=SECOND_ORDER.keys())
def test_second_derivatives_match_oracle(case, monkeypatch):
    """Gradient penalties (create_graph=True) on the input: the kept patch matrix is a constant
    to autograd, so the backward rebuilds it from x there. The iteration route (the eigh route has
    no second derivatives and says so: test_whitening_perf.py)."""
    monkeypatch.setattr('deconv_zoo.layers.whitening.EIGH_MIN_SIZE', 10 ** 6)
    layer_cls, kwargs, shape = case
    torch.manual_seed(0)
    layer = layer_cls(**kwargs).double()
    oracle = ORACLE_OF[layer_cls](**kwargs).double()
    oracle.load_state_dict(layer.state_dict())
    x0, results = random_input(shape, 0), []
    for module in (layer, oracle):
        x = x0.clone().requires_grad_()
        out = module(x)
        grad, = torch.autograd.grad((out * random_input(out.shape, 5)).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad.square().sum(), [x, module.weight]))
    for actual, expected in zip(*results):
        assert_rel(actual, expected, 1e-10)


@pytest.mark.parametrize('case', SMALL.values(), ids=SMALL.keys())
def test_empty_training_batch_gives_empty_output_and_keeps_state(case):
    """As BatchNorm: no statistics from no samples, an empty output, nothing recorded."""
    layer_cls, kwargs, shape = case
    layer = layer_cls(**kwargs)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn((0,) + shape[1:], requires_grad=True)
    out = layer(x)
    assert out.shape[0] == 0 and out.shape[1:] == layer.eval()(random_input(shape, 0, torch.float32)).shape[1:]
    out.sum().backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_channel_deconv_needs_two_values_for_the_leftover_variance():
    with pytest.raises(ValueError, match='beyond the whitened blocks need more than one value per training batch'):
        ChannelDeconv(4)(torch.randn(1, 9))  # two values per whitened feature, one leftover value
    ChannelDeconv(4).eval()(torch.randn(1, 9))  # eval uses the running variance


@pytest.mark.parametrize('make, shape, message', [
    (lambda: Delinear(8, 3, block=8), (1, 8), r'more than one 8-feature chunk per training batch'),
    (lambda: FastDeconv(4, 3, 1, stride=2), (1, 4, 1, 1), r'more than one sample per training batch, got 1 from'),
    # SE gates: a 1x1 FastDeconv on a pooled map takes every 9th image (one of nine here).
    (lambda: FastDeconv(4, 3, 1), (9, 4, 1, 1), r'more than one sample per training batch, got 1 from'),
    (lambda: FastDeconv(4, 3, 3, padding=1, block=4), (1, 4, 2, 2), r'more than one sample per training batch'),
    (lambda: ChannelDeconv(4), (1, 4), r'whitened blocks need more than one value per feature'),
    (lambda: ChannelDeconv(4), (1, 4, 3, 3), r'whitened blocks need more than one value per feature'),  # subsampled
], ids=['delinear', 'fast_deconv', 'fast_deconv_subsampled', 'fast_deconv_k3', 'channel_deconv',
        'channel_deconv_subsampled'])
def test_single_sample_training_batch_raises(make, shape, message):
    """As BatchNorm ('Expected more than 1 value per channel'): one sample has no covariance. Less
    its own mean it is zero, so the output ignored the input, and it added about eps^-1/2 * I to the
    running whitening (Delinear's diagonal went from 1 to 32 in one step). Eval is unaffected."""
    layer = make()
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.isfinite(layer.eval()(torch.randn(shape))).all()


@pytest.mark.parametrize('make, shapes', [
    (lambda: FastDeconv(4, 3, 1, block=2), [(1, 4, 1, 1), (1, 4, 2, 2), (5, 4, 1, 1)]),
    (lambda: FastDeconv(4, 3, 1), [(9, 4, 1, 1), (10, 4, 1, 1), (2, 4, 2, 2), (1, 4, 3, 4)]),
    (lambda: FastDeconv(4, 4, 3, padding=1, groups=2), [(1, 4, 2, 2), (2, 4, 2, 2), (1, 4, 4, 4)]),
    (lambda: FastDeconv(4, 3, 3, dilation=2, padding=1, block=4), [(1, 4, 3, 3), (1, 4, 5, 8), (2, 4, 3, 3)]),
    (lambda: Delinear(8, 3, block=8), [(1, 8), (2, 8), (1, 2, 8)]),
    (lambda: ChannelDeconv(4), [(1, 4), (2, 4), (1, 4, 3, 3), (1, 4, 3, 4), (1, 6, 1, 1), (2, 6, 1, 1)]),
], ids=['fast_k1_blocks', 'fast_k1', 'fast_k3_groups', 'fast_k3_dilated', 'delinear', 'channel_deconv'])
def test_samples_per_whitening_tells_which_batches_train(make, shapes):
    """smallest_training_batch (and so train.py) rests on each layer's count of samples."""
    for shape in shapes:
        layer = make()
        try:
            layer(torch.randn(shape))
            trained = True
        except ValueError:
            trained = False
        assert trained == (layer.samples_per_whitening(torch.Size(shape)) >= 2), shape


def test_smallest_training_batch_counts_batch_norm_values_per_channel():
    """Batch norm needs two values per channel: on a 1x1 map two images (EfficientNet's SE gates, a
    ResNet's last stage at small inputs), which the count missed, so train.py took a batch of one."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.BatchNorm1d(4))
    assert smallest_training_batch(model, (3, 5, 5)) == (2, '3')
    model.train()
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        model(torch.randn(1, 3, 5, 5))
    model(torch.randn(2, 3, 5, 5))
    assert smallest_training_batch(model[:2], (3, 4, 4)) == (1, '')  # a 2x2 map: four values per channel


def test_smallest_training_batch_takes_every_call_of_a_shared_layer():
    """A 1x1 layer used on an 8x8 map and then on the pooled 1x1 map: only the first call's shape
    counted (batch 1, which the second call refuses); a model without parameters raised StopIteration."""
    class Reused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = FastDeconv(4, 4, 1, block=4)

        def forward(self, x):
            return self.proj(torch.nn.functional.adaptive_avg_pool2d(self.proj(x), 1))

    assert smallest_training_batch(Reused(), (4, 8, 8)) == (10, 'proj')
    assert smallest_training_batch(torch.nn.Sequential(ChannelDeconv(4)), (4, 2, 2)) == (1, '')


def test_frozen_channel_deconv_refuses_a_non_finite_batch():
    layer = ChannelDeconv(4)
    layer(torch.randn(8, 4, 3, 3))
    freeze_whitening(layer)
    x = torch.randn(8, 4, 3, 3)
    x[0, 0, 0, 0] = float('inf')
    with pytest.raises(FloatingPointError, match='ChannelDeconv: the input is not finite'):
        layer(x)


def test_layers_take_conv_and_linear_factory_arguments():
    """As drop-ins for nn.Conv2d / nn.Linear: device= and dtype= (torch.nn.utils.skip_init needs them)
    were a TypeError, and so was padding_mode, even 'zeros'."""
    layer = FastDeconv(8, 4, 3, padding=1, block=4, padding_mode='zeros', dtype=torch.float64)
    assert layer.weight.dtype == layer.running_deconv.dtype == torch.float64
    meta = torch.nn.utils.skip_init(Delinear, 8, 4, block=4, device='meta')
    assert meta.weight.is_meta and meta.running_deconv.is_meta
    with pytest.raises(ValueError, match="padding_mode 'reflect' is not supported"):
        FastDeconv(8, 4, 3, padding=1, padding_mode='reflect')


def test_create_conv_builds_twins_of_one_geometry():
    """dilation reached the deconvolution layer only, and a misspelt setting failed in deconv mode only."""
    from deconv_zoo.layers import create_conv, deconv_args

    for dconv in (None, deconv_args(True, dict(block=4))):
        assert create_conv(8, 4, 3, dconv=dconv, dilation=2).dilation == (2, 2)
        with pytest.raises(TypeError, match=r"unknown FastDeconv settings \['n_itr'\]"):
            create_conv(8, 4, 3, dconv=dconv, n_itr=3)


def test_delinear_single_sample_of_several_chunks_trains():
    """One sample cut into several chunks still gives the covariance several samples."""
    layer, oracle = Delinear(8, 3, block=4).double(), OracleDelinear(8, 3, block=4).double()
    oracle.load_state_dict(layer.state_dict())
    x = random_input((1, 8), 0)
    assert_rel(layer(x), oracle(x), 1e-8)


@pytest.mark.parametrize('make', [
    lambda momentum: FastDeconv(4, 3, 3, momentum=momentum),
    lambda momentum: Delinear(8, 3, momentum=momentum),
    lambda momentum: ChannelDeconv(4, momentum=momentum),
], ids=['fast_deconv', 'delinear', 'channel_deconv'])
def test_momentum_none_is_refused_up_front(make):
    """BatchNorm's momentum=None (cumulative average) is not supported: it used to fail only at the
    first running update (the second training call for ChannelDeconv), with lerp_'s TypeError."""
    for momentum in (None, 1.5):
        with pytest.raises(ValueError, match=r'momentum must be a number in \[0, 1\].*not supported'):
            make(momentum)
    make(0)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_input_smaller_than_the_kernel_raises(training):
    layer = FastDeconv(4, 3, 3, dilation=2, padding=1, block=2).train(training)
    with pytest.raises(ValueError, match=r'2x6 pixels \(4x8 padded\) is smaller than the 5x5 window'):
        layer(torch.randn(2, 4, 2, 6))


def test_autocast_keeps_no_float32_copy_of_the_input():
    """Under autocast the statistics are read from the half-precision input itself: the backward
    pass keeps that input (the convolution needs it anyway), not a float32 copy of it."""
    layer = FastDeconv(16, 8, 3, padding=1, block=16)  # 144 features: the patches are rebuilt
    x = random_input((2, 16, 9, 9), 0, torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
    assert not [t for t in saved if t.shape == x.shape and t.dtype != x.dtype]
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('batch, weight_sized', [(4, 0), (64, 1)], ids=['few_rows', 'many_rows'])
def test_delinear_training_step_keeps_no_folded_weight_when_rows_are_few(batch, weight_sized):
    """With fewer input rows than outputs (a big classifier: VGG's 25088 x 4096), the training step
    whitens the input instead of folding the whitening into the weight: the backward pass then
    keeps no weight-sized tensor besides the weight itself. With many rows the fold is cheaper and
    stays, keeping the folded weight once (before: twice, as the bias shift was a product with it)."""
    layer = Delinear(64, 32, block=16)
    x = random_input((batch, 64), 0, torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    weight_storage = layer.weight.untyped_storage().data_ptr()  # the weight itself, or a view of it
    kept = [t for t in saved if t.numel() == layer.weight.numel() and t.untyped_storage().data_ptr() != weight_storage]
    assert len(kept) == weight_sized
    out.square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # the linear map itself runs under autocast, as nn.Linear


@pytest.mark.parametrize('input_dtype', [torch.float32, torch.bfloat16], ids=['f32_input', 'bf16_input'])
@pytest.mark.parametrize('name', SMALL)
def test_autocast_keeps_statistics_in_float32(name, input_dtype):
    """Under bfloat16 autocast the statistics and Newton-Schulz run in float32: the running
    buffers stay float32 and match a float32 run on the same values; outputs are finite."""
    layer_cls, kwargs, shape = SMALL[name]
    reference = layer_cls(**kwargs)
    amp = copy.deepcopy(reference)
    for step, training in enumerate((True, True, False)):
        reference.train(training)
        amp.train(training)
        x = random_input(shape, step, input_dtype)
        expected = reference(x.float())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = amp(x)
        assert torch.isfinite(out).all()
        assert_rel(out.float(), expected, 3e-2)
        reference_state = reference.state_dict()
        for key, buf in amp.state_dict().items():
            assert buf.dtype == reference_state[key].dtype
            assert_rel(buf, reference_state[key], 1e-6)


CHANNELS_LAST = {
    'fast_deconv_k1': ORACLE_CASES['fast_k1'],
    'fast_deconv_k3': ORACLE_CASES['fast_k3_stride2'],
    'channel_deconv': SMALL['channel_deconv'],
}


@pytest.mark.parametrize('case', CHANNELS_LAST.values(), ids=CHANNELS_LAST.keys())
def test_channels_last_matches_contiguous(case):
    layer_cls, kwargs, shape = case
    layer = layer_cls(**kwargs).double()
    twin = copy.deepcopy(layer)
    for step, training in enumerate((True, False)):
        x = random_input(shape, step)
        out = layer.train(training)(x.to(memory_format=torch.channels_last))
        assert_rel(out, twin.train(training)(x), 1e-12)
    for buf, twin_buf in zip(layer.buffers(), twin.buffers()):
        assert_rel(buf, twin_buf, 1e-12)


@pytest.mark.parametrize('layer, shape, message', [
    (FastDeconv(4, 3, 3), (2, 5, 6, 6), r'\(N, 4, H, W\)'),
    (Delinear(8, 3), (2, 7), r'\(\.\.\., 8\)'),
    (ChannelDeconv(4), (2, 8, 6), r'\(N, C\) or \(N, C, H, W\)'),
], ids=['fast_deconv', 'delinear', 'channel_deconv'])
def test_wrong_input_shape_raises(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))


def _poison(channels):
    def poison(x):
        x[0, channels] = float('nan')
        return x
    return poison


NON_FINITE = {
    'fast_deconv': ('fast_deconv', _poison(slice(None))),
    'delinear': ('delinear', _poison(slice(None))),
    'channel_deconv_whitened': ('channel_deconv', _poison(slice(0, 8))),
    'channel_deconv_leftover': ('channel_deconv', _poison(slice(8, 10))),
}


@pytest.mark.parametrize('case', NON_FINITE.values(), ids=NON_FINITE.keys())
def test_non_finite_input_raises_and_keeps_state(case):
    name, poison = case
    layer, x = trained_small(name)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(FloatingPointError, match='running statistics were left unchanged'):
        layer(poison(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('make', [lambda: FastDeconv(10, 4, 3, block=4), lambda: Delinear(10, 3, block=4)],
                         ids=['fast_deconv', 'delinear'])
def test_block_not_dividing_warns_once(make, monkeypatch, capsys):
    monkeypatch.setattr(_stats, '_warned', set())
    with pytest.warns(UserWarning, match='block 4 does not divide 10 .* using block 2'):
        assert make().block == 2  # gcd(4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        make()
    assert capsys.readouterr().out == ''


def test_channel_deconv_eval_before_training():
    """The reference crashed here; now the initial (identity) statistics apply, buffers untouched."""
    layer = ChannelDeconv(4).eval()
    oracle = OracleChannelDeconv(4).eval()
    before = copy.deepcopy(layer.state_dict())
    x = random_input((3, 10, 6, 6), 0, torch.float32)
    assert_rel(layer(x), oracle(x), 1e-6)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_channel_deconv_without_whitened_channels_warns(monkeypatch):
    monkeypatch.setattr(_stats, '_warned', set())
    with pytest.warns(UserWarning, match='block 4 is larger than the 3 channels'):
        ChannelDeconv(4)(torch.randn(2, 3, 5, 5))


# refresh_every (an opt-in approximation): the recompute must repeat its forward's choice of
# fresh or reused statistics.
CHECKPOINTED = dict(SMALL, fast_deconv_refresh=(  # 144 patch features: large enough to follow it
    FastDeconv, dict(in_channels=16, out_channels=3, kernel_size=3, padding=1, block=16, refresh_every=3),
    (2, 16, 6, 6)))


@pytest.mark.parametrize('name', CHECKPOINTED)
def test_checkpoint_tracks_statistics_once(name):
    """Inside torch.utils.checkpoint the forward is recomputed during backward; the running
    statistics and the freeze counter must advance once per step and the gradients must equal
    those of a plain run, including across the freeze schedule's boundaries."""
    layer_cls, kwargs, shape = CHECKPOINTED[name]
    plain = layer_cls(**kwargs).double()
    ckpt = copy.deepcopy(plain)
    for step in range(32):  # FastDeconv, freeze_iter=3: fresh on calls 1..4 and 31..32
        x = random_input(shape, step)
        x_plain, x_ckpt = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_plain = plain(x_plain)
        out_ckpt = checkpoint(ckpt, x_ckpt, use_reentrant=False)
        upstream = random_input(out_plain.shape, 100 + step)
        (out_plain * upstream).sum().backward()
        (out_ckpt * upstream).sum().backward()
        assert_rel(out_ckpt, out_plain, 1e-12)
        assert_rel(x_ckpt.grad, x_plain.grad, 1e-12)
        for p_ckpt, p_plain in zip(ckpt.parameters(), plain.parameters()):
            assert_rel(p_ckpt.grad, p_plain.grad, 1e-12)
        plain_state = plain.state_dict()
        for key, value in ckpt.state_dict().items():
            assert torch.equal(value, plain_state[key]), key


@pytest.mark.parametrize('reentrant', [False, True], ids=['nonreentrant', 'reentrant'])
@pytest.mark.parametrize('name', ['fast_deconv', 'fast_deconv_refresh'])
def test_checkpoint_repeats_each_of_several_calls_per_step(name, reentrant):
    """Two calls of one layer before a backward pass (two views, a shared layer), checkpointed: each
    recompute must repeat its own call's choice of frozen or fresh statistics (refresh_every: fresh
    or reused whitening), also where the two calls chose differently. Recomputes used to repeat the
    latest call's choice: wrong gradients (reentrant) or a CheckpointError (non-reentrant). A second
    backward pass through the same graph (retain_graph) recomputes them again."""
    layer_cls, kwargs, shape = CHECKPOINTED[name]
    plain = layer_cls(**kwargs).double()
    ckpt = copy.deepcopy(plain)
    for layer in (plain, ckpt):  # one call first, so that some steps' two calls choose differently
        layer(random_input(shape, 99))
    for step in range(8):  # freeze_iter=3: calls 1..4 fresh, 5..30 frozen; refresh_every=3
        first, second = random_input(shape, 2 * step), random_input(shape, 2 * step + 1) * 2
        grads = []
        for layer, run in ((plain, lambda x: layer(x)),
                           (ckpt, lambda x: checkpoint(layer, x, use_reentrant=reentrant))):
            views = [first.clone().requires_grad_(), second.clone().requires_grad_()]
            loss = (run(views[0]) * 1.3).sum() + run(views[1]).square().sum()
            loss.backward(retain_graph=True)
            loss.backward()  # doubles every gradient, through a second round of recomputes
            grads.append([v.grad for v in views] + [p.grad.clone() for p in layer.parameters()])
            layer.zero_grad()
        for actual, expected in zip(*reversed(grads)):
            assert_rel(actual, expected, 1e-12)
        plain_state = plain.state_dict()
        for key, value in ckpt.state_dict().items():
            assert torch.equal(value, plain_state[key]), key


def test_checkpoint_recompute_beyond_the_recorded_calls_is_an_error():
    """More checkpointed calls of one scheduled layer before a backward pass than it records: the
    recompute of an early call cannot know its choice, and says so instead of guessing."""
    layer_cls, kwargs, shape = CHECKPOINTED['fast_deconv']
    layer = layer_cls(**kwargs).double()
    views = [random_input(shape, i).requires_grad_() for i in range(fast_deconv.RECORDED_CALLS + 1)]
    loss = sum(checkpoint(layer, x, use_reentrant=False).sum() for x in views)
    with pytest.raises(RuntimeError, match='recompute found no record of the training call it repeats'):
        loss.backward()


EVERY_KIND_OF_LAYER = pytest.mark.parametrize('make_layer, input_shape', [
    (lambda: FastDeconv(8, 4, 3, padding=1, block=4, freeze=True, freeze_iter=1), (4, 8, 6, 6)),
    (lambda: FastDeconv(8, 8, 3, padding=1, groups=2, block=4, refresh_every=2), (4, 8, 6, 6)),
    (lambda: Delinear(8, 3, block=4), (4, 8)),
    (lambda: ChannelDeconv(4), (4, 6, 5, 5)),
], ids=['fast-freeze', 'fast-grouped-refresh', 'delinear', 'channel'])


@EVERY_KIND_OF_LAYER
def test_reset_running_stats_restores_the_initial_statistics(make_layer, input_shape):
    """BatchNorm's reset_running_stats(): the buffers (and schedules) of a fresh layer, and its eval
    output, whatever the training steps before; the eval fold cache sees the reset."""
    torch.manual_seed(0)
    layer = make_layer()
    fresh = copy.deepcopy(layer).eval()
    x = torch.randn(*input_shape) * 3 + 1
    for _ in range(3):
        layer(x)
    layer.eval()
    assert not torch.allclose(layer(x), fresh(x))  # trained statistics, folded and cached
    layer.reset_running_stats()
    for key, value in fresh.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)
    if isinstance(layer, FastDeconv):
        assert layer._reused_deconv is None


@EVERY_KIND_OF_LAYER
def test_frozen_whitening_trains_with_the_running_statistics(make_layer, input_shape):
    """freeze_whitening (timm's FrozenBatchNorm2d for deconvolution): training-mode calls compute
    the eval-mode function, with its gradients, and leave the state as it was; unfrozen, they
    whiten with the batch's statistics and track them again."""
    torch.manual_seed(0)
    layer = make_layer().double()
    x = random_input(input_shape, 0) * 3
    for _ in range(3):
        layer(x)
    reference = copy.deepcopy(layer).eval()
    state = copy.deepcopy(layer.state_dict())
    freeze_whitening(layer)
    x = random_input(input_shape, 1).requires_grad_()
    reference_x = x.detach().clone().requires_grad_()
    upstream = random_input(reference(reference_x).shape, 2)
    (layer(x) * upstream).sum().backward()
    (reference(reference_x) * upstream).sum().backward()
    assert layer.training
    assert_rel(x.grad, reference_x.grad, 1e-12)
    for param, expected in zip(layer.parameters(), reference.parameters()):
        assert_rel(param.grad, expected.grad, 1e-12)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    freeze_whitening(layer, False)
    output = layer(x)
    if not getattr(layer, 'freeze', False):  # the freeze schedule's own frozen steps are eval-like too
        assert not torch.allclose(output, reference(x))
    assert any(not torch.equal(value, state[key]) for key, value in layer.state_dict().items())


@pytest.mark.parametrize('freeze', ['freeze_whitening', 'frozen_step'])
def test_frozen_training_call_refuses_a_non_finite_batch(freeze):
    """A frozen training call takes no statistics, so a NaN batch went through unchecked and the
    batch norm after it (EfficientNet's blocks) recorded NaN; the layer's own state stays."""
    layer = FastDeconv(4, 3, 3, padding=1, block=2, freeze=True, freeze_iter=1)
    for seed in range(3):  # calls 1 and 2 are fresh, then frozen
        layer(random_input((2, 4, 6, 6), seed, torch.float32))
    if freeze == 'freeze_whitening':
        freeze_whitening(layer)
    state = copy.deepcopy(layer.state_dict())
    x = random_input((2, 4, 6, 6), 3, torch.float32)
    x[1, 2, 3, 4] = float('nan')
    with pytest.raises(FloatingPointError, match='input is not finite .* frozen whitening'):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_frozen_steps_hold_no_alias_of_the_running_buffers():
    """Frozen steps whiten with the running statistics: the graph must not hold the buffers
    themselves, which the layer's next training call updates in place. Two calls before one
    backward (a shared encoder on two views, recurrent use) failed with autograd's 'modified by
    an inplace operation' error on CPU."""
    shared = FastDeconv(4, 3, 3, padding=1, block=2, freeze=True, freeze_iter=1).double()
    for seed in range(3):  # calls 1 and 2 are fresh, then frozen
        shared(random_input((2, 4, 6, 6), seed))
    separate = copy.deepcopy(shared)
    x1, x2 = random_input((2, 4, 6, 6), 3), random_input((2, 4, 6, 6), 4)
    (shared(x1).sum() + shared(x2).square().sum()).backward()
    separate(x1).sum().backward()
    separate(x2).square().sum().backward()
    for param, expected in zip(shared.parameters(), separate.parameters()):
        assert_rel(param.grad, expected.grad, 1e-12)


@pytest.mark.parametrize('name', FOLDING)
def test_eval_fold_gives_gradients_to_trainable_parameters(name):
    """Eval-mode fine-tuning with the weight frozen and the bias trained (BitFit, linear probes):
    the cached fold is a constant, so it is used only when no parameter needs a gradient; the
    bias used to get none."""
    layer, x = trained_small(name)
    layer.eval()
    reference = copy.deepcopy(layer)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer(x)  # a cached fold from before must not be used either
    upstream = random_input(reference(x).shape, 5, torch.float32)
    (layer(x) * upstream).sum().backward()
    (reference(x) * upstream).sum().backward()
    assert layer.weight.grad is None
    assert_rel(layer.bias.grad, reference.bias.grad, 1e-6)


@pytest.mark.parametrize('name', FOLDING)
def test_eval_fold_cached_in_inference_mode_serves_autograd(name):
    """A fold cached under torch.inference_mode() (validation) is an inference tensor, which
    autograd refuses to save: a later forward that needs an input gradient (saliency maps,
    adversarial examples, a trainable layer before a frozen one) used to fail."""
    layer, x = trained_small(name)
    layer.eval().requires_grad_(False)
    with torch.inference_mode():
        expected = layer(x)
    x = x.clone().requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert torch.equal(out.detach(), expected) and x.grad is not None
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize('dtype', [torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', SMALL)
def test_non_floating_input_raises(name, training, dtype):
    """Integer images (uint8 straight from a decoder) are refused by name; ChannelDeconv used to
    whiten them and round the result back to integers, FastDeconv and Delinear failed with
    dtype errors from the convolution or matmul."""
    layer_cls, kwargs, shape = SMALL[name]
    layer = layer_cls(**kwargs).train(training)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(TypeError, match=f'{layer_cls.__name__}: expected a floating-point input, got {dtype}'):
        layer(torch.ones(shape, dtype=dtype))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('make, message', [
    (lambda: FastDeconv(4, 3, 3, n_iter=0), 'FastDeconv: n_iter must be an int >= 1, got 0'),
    (lambda: Delinear(8, 3, n_iter=0), 'Delinear: n_iter must be an int >= 1, got 0'),
    (lambda: ChannelDeconv(4, n_iter=0), 'ChannelDeconv: n_iter must be an int >= 1, got 0'),
    (lambda: FastDeconv(4, 3, 3, freeze=True, freeze_iter=0), 'FastDeconv: freeze_iter must be an int >= 1, got 0'),
    (lambda: FastDeconv(4, 3, 3, sampling_stride=0), 'FastDeconv: sampling_stride must be an int >= 1, got 0'),
    (lambda: FastDeconv(4, 3, 3, stride=(1, 0)), 'FastDeconv: stride must be an int >= 1, got 0'),
    (lambda: FastDeconv(4, 3, 3, sampling_stride=(2, 2)),
     r'FastDeconv: sampling_stride must be an int >= 1, got \(2, 2\)'),
    (lambda: FastDeconv(4, 3, 3, eps=-1e-5), r'FastDeconv: eps must be a finite number >= 0, got -1e-05'),
    (lambda: Delinear(8, 3, eps=float('nan')), 'Delinear: eps must be a finite number >= 0, got nan'),
    (lambda: ChannelDeconv(4, eps=None), 'ChannelDeconv: eps must be a finite number >= 0, got None'),
    (lambda: ChannelDeconv(4, sampling_stride=0), 'ChannelDeconv: sampling_stride must be an int >= 1, got 0'),
    (lambda: ChannelDeconv(4, sampling_stride=(3, 3)),
     r'ChannelDeconv: sampling_stride must be an int >= 1, got \(3, 3\)'),
], ids=['fast_n_iter', 'delinear_n_iter', 'channel_n_iter', 'freeze_iter', 'sampling_stride', 'zero_stride',
        'sampling_stride_pair',
        'fast_eps', 'delinear_eps', 'channel_eps', 'channel_sampling_stride', 'channel_sampling_stride_pair'])
def test_invalid_settings_raise_up_front(make, message):
    """Refused when the layer is built, not at the first training call (n_iter), with a
    ZeroDivisionError (freeze_iter=0), an unfold error (sampling_stride=0), or not at all: a pair
    of sampling strides was repeated into a nested tuple (ChannelDeconv failed at its first call with
    one, and silently took 0 as no subsampling), a negative or NaN eps whitened with it."""
    with pytest.raises(ValueError, match=message):
        make()
