"""CIFAR VGG-16, PreAct-ResNet-18, SENet-18, DenseNet-121 and ResNeXt-29 against the reference facts
(spec reference-architectures.md 2.1, 2.2, 2.4): sizes, state_dict layout, per-layer settings.

The generic forward/backward/features checks over every model live in test_models.py.
"""
import pytest
import timm
import torch

from deconv_zoo.layers import ChannelDeconv, Delinear, FastDeconv

# model: (state_dict entries, parameters, buffer elements) of the reference (spec table 2.1), FastDeconv count.
BN_SIZES = {
    'vgg16_cifar': (93, 14_728_266),
    'preact_resnet18_cifar': (107, 11_171_274),
    'densenet121_cifar': (722, 6_956_298),
    'resnext29_32x4d_cifar': (188, 4_774_218),
    'senet18_cifar': (139, 11_260_354),
}
DECONV_SIZES = {
    'vgg16_cifar_deconv': (56, 14_719_818, 4_251_636, 13),
    'preact_resnet18_cifar_deconv': (84, 11_169_162, 5_593_524, 20),
    'densenet121_cifar_deconv': (484, 6_883_018, 19_703_572, 120),
    'resnext29_32x4d_cifar_deconv': (128, 4_761_610, 2_986_956, 31),
    'senet18_cifar_deconv': (148, 11_258_242, 5_629_644, 36),
}
PAPER = dict(freeze=False, n_iter=5, eps=1e-5, sampling_stride=(3, 3))


def _fast_deconvs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, FastDeconv)}


def _settings(layer: FastDeconv):
    return dict(freeze=layer.freeze, n_iter=layer.n_iter, eps=layer.eps, sampling_stride=layer.sampling_stride)


@pytest.mark.parametrize('name', BN_SIZES)
def test_bn_twin_sizes(name):
    model = timm.create_model(name)
    entries, params = BN_SIZES[name]
    assert len(model.state_dict()) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    assert not _fast_deconvs(model)
    assert isinstance(model.get_classifier(), torch.nn.Linear)


@pytest.mark.parametrize('name', DECONV_SIZES)
def test_deconv_sizes_and_reference_layout_loads(name):
    """Reference sizes plus one saved `counter` per FastDeconv; a reference dict (no counters) loads strictly."""
    model = timm.create_model(name)
    entries, params, buffer_elems, n_deconv = DECONV_SIZES[name]
    state = model.state_dict()
    assert len(_fast_deconvs(model)) == n_deconv
    assert len(state) == entries + n_deconv
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(b.numel() for b in model.buffers()) == buffer_elems + n_deconv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    classifier = model.get_classifier()
    assert isinstance(classifier, Delinear) and classifier.block == 512
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith('.counter')}, strict=True)


def test_preact_resnet18_layout():
    bn, dc = timm.create_model('preact_resnet18_cifar'), timm.create_model('preact_resnet18_cifar_deconv')
    bn_keys, dc_keys = set(bn.state_dict()), set(dc.state_dict())
    # BN twin: the stem's bn1 is registered (never used), block order bn1, conv1, bn2, conv2.
    assert {f'bn1.{s}' for s in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')} <= bn_keys
    assert list(bn.layer1[0].state_dict())[:6] == [
        'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var', 'bn1.num_batches_tracked', 'conv1.weight']
    # Projection shortcuts: Sequential(conv) in the BN twin, a bare FastDeconv in deconv mode; none in layer1.
    assert 'layer2.0.shortcut.0.weight' in bn_keys and not any(k.startswith('layer2.0.shortcut.1') for k in bn_keys)
    for k in ('weight', 'bias', 'running_mean', 'running_deconv'):
        assert f'layer2.0.shortcut.{k}' in dc_keys
    assert not any('layer1.0.shortcut' in k for k in bn_keys | dc_keys)
    assert not any(k.startswith('bn1.') for k in dc_keys)
    # The stem is the bare conv: no norm, no ReLU (the first block pre-activates).
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = bn.eval().forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    torch.testing.assert_close(stem, bn.conv1(x))
    assert (stem < 0).any()


def test_senet18_layout():
    bn, dc = timm.create_model('senet18_cifar'), timm.create_model('senet18_cifar_deconv')
    bn_state, dc_state = bn.state_dict(), dc.state_dict()
    # SE convs: Conv2d with bias (BN twin), 1x1 FastDeconvs (deconv; planes // 16 = 4 inputs to fc2).
    assert bn_state['layer1.0.fc1.weight'].shape == (4, 64, 1, 1) and bn_state['layer1.0.fc1.bias'].shape == (4,)
    assert isinstance(dc.layer1[0].fc1, FastDeconv) and isinstance(dc.layer4[1].fc2, FastDeconv)
    assert dc_state['layer1.0.fc1.running_deconv'].shape == (64, 64)
    assert dc_state['layer1.0.fc2.running_deconv'].shape == (4, 4)
    assert dc_state['layer4.0.fc2.weight'].shape == (512, 32, 1, 1)
    # The stem BN is used here (unlike PreAct); shortcuts are named as in PreAct.
    assert 'bn1.running_var' in bn_state and 'layer3.0.shortcut.0.weight' in bn_state
    assert 'layer3.0.shortcut.running_deconv' in dc_state
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = bn.eval().forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    torch.testing.assert_close(stem, torch.relu(bn.bn1(bn.conv1(x))))


def test_vgg16_feature_indices():
    bn, dc = timm.create_model('vgg16_cifar'), timm.create_model('vgg16_cifar_deconv')
    bn_convs = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    dc_convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert [i for i, m in enumerate(bn.features) if isinstance(m, torch.nn.Conv2d)] == bn_convs
    assert [i for i, m in enumerate(bn.features) if isinstance(m, torch.nn.BatchNorm2d)] == [i + 1 for i in bn_convs]
    assert [i for i, m in enumerate(dc.features) if isinstance(m, FastDeconv)] == dc_convs
    # The BN twin's convs keep their bias, as in the reference.
    assert all(bn.features[i].bias is not None for i in bn_convs)
    assert set(bn.state_dict()) >= {'features.40.weight', 'features.40.bias', 'features.41.running_var',
                                    'classifier.weight', 'classifier.bias'}
    assert {'features.28.running_deconv', 'classifier.running_deconv'} <= set(dc.state_dict())
    assert dc.pretrained_cfg['pool_size'] == (1, 1)
    # Feature levels end at the ReLU before each pool, the last one after the final pool.
    assert [i['module'] for i in dc.feature_info] == [f'features.{i}' for i in (3, 8, 15, 22, 29, 30)]
    assert [i['reduction'] for i in bn.feature_info] == [1, 2, 4, 8, 16, 32]


def test_densenet121_layout():
    bn, dc = timm.create_model('densenet121_cifar'), timm.create_model('densenet121_cifar_deconv')
    bn_keys, dc_state = set(bn.state_dict()), dc.state_dict()
    assert {'bn.weight', 'trans3.bn.running_var', 'dense4.15.bn2.weight', 'linear.weight'} <= bn_keys
    assert not any(k.startswith('bn.') or '.bn' in k for k in dc_state)
    widths = [(dc_state[f'trans{i}.conv.weight'].shape[:2]) for i in (1, 2, 3)]
    assert widths == [(128, 256), (256, 512), (512, 1024)]
    assert dc.linear.in_features == 1024
    # 1x1 convs on 32 mod 64 channels fall back to block 32 (gcd); 3x3 convs whiten 9 x 64 features.
    assert dc.dense1[0].conv1.block == 64 and dc.dense1[1].conv1.block == 32
    assert dc_state['dense2.3.conv2.running_deconv'].shape == (576, 576)
    # New features are concatenated in front of the block input.
    layer = bn.dense1[0].eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 96, 8, 8)
    torch.testing.assert_close(out[:, 32:], x)


def test_resnext29_layout():
    bn, dc = timm.create_model('resnext29_32x4d_cifar'), timm.create_model('resnext29_32x4d_cifar_deconv')
    assert bn.conv1.kernel_size == (1, 1) and dc.conv1.kernel_size == (1, 1)
    assert dc.conv1.block == 3 and dc.conv1.running_deconv.shape == (3, 3)
    for stage, group_width in zip((dc.layer1, dc.layer2, dc.layer3), (128, 256, 512)):
        conv2 = stage[1].conv2
        nf = 9 * group_width // 32
        assert (conv2.groups, conv2.block, conv2.n_iter) == (32, group_width // 32, 3)
        assert conv2.running_deconv.shape == (32, nf, nf)
        assert conv2.running_mean.shape == (9 * group_width,)
        assert stage[-1].conv3.out_channels == 2 * group_width
    state = dc.state_dict()
    # Projections keep the reference's Sequential (shortcut.0), in every stage's first block only.
    assert sorted({k.split('.shortcut')[0] for k in state if '.shortcut.' in k}) == ['layer1.0', 'layer2.0', 'layer3.0']
    assert 'layer2.0.shortcut.0.running_deconv' in state
    assert {'layer2.0.shortcut.0.weight', 'layer2.0.shortcut.1.running_var'} <= set(bn.state_dict())
    assert [i['reduction'] for i in dc.feature_info] == [1, 1, 2, 4]
    assert dc.pretrained_cfg['pool_size'] == (8, 8)


@pytest.mark.parametrize('name, stem, overrides', [
    ('vgg16_cifar_deconv', 'features.0', dict(freeze=True, n_iter=15)),
    ('preact_resnet18_cifar_deconv', 'conv1', dict(freeze=True, n_iter=10)),
    ('senet18_cifar_deconv', 'conv1', dict(freeze=True, n_iter=15)),
    ('resnext29_32x4d_cifar_deconv', 'conv1', dict(freeze=True, n_iter=10)),
    ('densenet121_cifar_deconv', 'conv1', {}),
])
def test_per_layer_settings(name, stem, overrides):
    """Stem overrides of spec table 2.4; every other layer has the paper's settings (ResNeXt conv2: 3 iterations)."""
    layers = _fast_deconvs(timm.create_model(name))
    assert _settings(layers.pop(stem)) == dict(PAPER, **overrides)
    for layer_name, layer in layers.items():
        expected = dict(PAPER, n_iter=3) if layer_name.endswith('conv2') and layer.groups > 1 else PAPER
        stride = layer.stride[0]
        assert _settings(layer) == dict(expected, sampling_stride=(3 * stride, 3 * stride)), layer_name


@pytest.mark.parametrize('name, stem', [
    ('senet18_cifar_deconv', 'conv1'), ('resnext29_32x4d_cifar_deconv', 'conv1'), ('mobilenetv2_cifar_deconv', 'conv1'),
    ('resnet18_deconv', 'conv1'), ('vgg11_deconv', 'features.0'), ('densenet121_deconv', 'features.conv0'),
])
def test_deconv_cfg_applies_to_every_layer_over_its_own_settings(name, stem):
    """deconv_cfg reached every FastDeconv but the stems, whose reference settings won: a fine-tune
    with deconv_cfg={'freeze': False} kept the stem's freeze schedule (not recommended, README)."""
    layers = _fast_deconvs(timm.create_model(name, deconv_cfg=dict(freeze=False, n_iter=3)))
    assert {(layer.freeze, layer.n_iter) for layer in layers.values()} == {(False, 3)}
    assert layers[stem].block == 3 and timm.create_model(name).get_submodule(stem).freeze  # the rest stays


def test_channel_deconv_attribute_names():
    def channel_deconv(name, **kwargs):
        model = timm.create_model(name, block_fc=512, delinear=False, **kwargs)
        found = [n for n, m in model.named_modules() if isinstance(m, ChannelDeconv)]
        assert isinstance(model.get_classifier(), torch.nn.Linear)
        return found

    assert channel_deconv('vgg16_cifar_deconv') == ['channel_deconv']
    assert channel_deconv('densenet121_cifar_deconv') == ['channel_deconv']
    assert channel_deconv('densenet121_cifar') == []  # the reference adds it in deconv mode only
    assert channel_deconv('preact_resnet18_cifar_deconv') == ['deconv1']
    assert channel_deconv('senet18_cifar_deconv') == ['deconv1']
    assert channel_deconv('resnext29_32x4d_cifar_deconv') == ['deconv1']


def test_channel_deconv_follows_the_conv_settings():
    """main.py built ChannelDeconv with FastDeconv's --eps, --deconv-iter and --stride (its sampling stride)."""
    model = timm.create_model('resnet18_cifar_deconv', block_fc=512, delinear=False,
                              deconv_cfg=dict(eps=1e-3, n_iter=7, sampling_stride=2))
    layer = model.deconv1
    assert (layer.block, layer.eps, layer.n_iter, layer.sampling_stride) == (512, 1e-3, 7, 2)
    layer = timm.create_model('vgg16_cifar_deconv', block_fc=512, delinear=False).channel_deconv
    assert (layer.eps, layer.n_iter, layer.sampling_stride) == (1e-5, 5, 3)  # the paper's


def test_vgg_global_pool_accepts_other_sizes():
    model = timm.create_model('vgg16_cifar', num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 1, 1)
