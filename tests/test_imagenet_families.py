"""ImageNet families (ResNet, VGG, DenseNet): structure against the reference, per-layer settings,
torchvision compatibility of the plain networks, initialisation and family-specific head logic.

The generic forward / train / features tests for every model live in test_models.py. Structure
checks build on the meta device (no memory, no init cost); forwards are eval-mode and small.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.layers import create_feature_extractor
from timm.models import group_parameters

from deconv_zoo.layers import ChannelDeconv, Delinear, FastDeconv
from deconv_zoo.models.deconv_vgg import VGG

# reference-architectures.md §2.1: (deconv entries, deconv params, deconv buffer elements,
# FastDeconv layers, BN entries, BN params). The zoo adds one scalar `counter` buffer per FastDeconv.
REFERENCE = {
    'vgg11_deconv': (44, 132_863_336, 2_339_700, 8, 22, 132_863_336),
    'vgg16_deconv': (64, 138_357_544, 4_001_460, 13, 32, 138_357_544),
    'resnet18_deconv': (99, 11_686_504, 5_357_823, 20, 122, 11_689_512),
    'resnet34_deconv': (163, 21_790_952, 10_675_455, 36, 218, 21_797_672),
    'resnet50_deconv': (236, 25_538_152, 5_500_992, 53, 320, 25_557_032),
    'resnet101_deconv': (440, 44_504_168, 11_292_416, 104, 626, 44_549_160),
    'resnet152_deconv': (644, 60_124_776, 17_083_840, 155, 932, 60_192_808),
    'densenet121_deconv': (484, 7_905_448, 19_466_076, 120, 727, 7_978_856),
}
TORCHVISION_TWIN = {
    'vgg11_deconv': 'vgg11', 'vgg13_deconv': 'vgg13', 'vgg16_deconv': 'vgg16', 'vgg19_deconv': 'vgg19',
    'resnet18_deconv': 'resnet18', 'resnet34_deconv': 'resnet34', 'resnet50_deconv': 'resnet50',
    'resnet101_deconv': 'resnet101', 'resnet152_deconv': 'resnet152', 'densenet121_deconv': 'densenet121',
}


def _meta(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _fast_deconvs(model):
    return [m for m in model.modules() if isinstance(m, FastDeconv)]


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_counts_match_reference(name):
    entries, params, buffers, num_deconv, bn_entries, bn_params = REFERENCE[name]
    model = _meta(name)
    assert len(_fast_deconvs(model)) == num_deconv
    assert len(model.state_dict()) == entries + num_deconv
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(b.numel() for b in model.buffers()) == buffers + num_deconv
    plain = _meta(name, deconv=False)
    assert len(plain.state_dict()) == bn_entries
    assert sum(p.numel() for p in plain.parameters()) == bn_params


@pytest.mark.parametrize('name', sorted(TORCHVISION_TWIN))
def test_plain_network_is_torchvision(name):
    """deconv=False is key-, order- and shape-identical to torchvision (and timm's ResNets)."""
    plain = _meta(name, deconv=False)
    with torch.device('meta'):
        reference = getattr(torchvision.models, TORCHVISION_TWIN[name])(weights=None)
    assert _shapes(plain) == _shapes(reference)
    if name.startswith('resnet'):
        assert _shapes(plain) == _shapes(_meta(TORCHVISION_TWIN[name]))


@pytest.mark.parametrize('name', ['vgg13_deconv', 'vgg19_deconv'])
def test_vgg_configs_outside_the_reference(name):
    """Same rules as vgg11d/vgg16d: one FastDeconv per conv, three Delinear, same parameters as plain."""
    model, plain = _meta(name), _meta(name, deconv=False)
    convs = len(_fast_deconvs(model))
    assert convs == {'vgg13_deconv': 10, 'vgg19_deconv': 16}[name]
    assert len(model.state_dict()) == 5 * convs + 3 * 4
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


def _assert_stem(layer, sampling_stride):
    assert isinstance(layer, FastDeconv)
    assert (layer.freeze, layer.n_iter, layer.block, layer.num_features) == (True, 15, 3, layer.kernel_size[0] ** 2 * 3)
    assert layer.sampling_stride == (sampling_stride, sampling_stride)


def _assert_delinear_head(layer, in_features):
    assert isinstance(layer, Delinear) and layer.in_features == in_features and layer.block == 64


@pytest.mark.parametrize('name', ['resnet18_deconv', 'resnet50_deconv'])
def test_resnet_layer_settings(name):
    model = _meta(name)
    _assert_stem(model.conv1, 6)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    first = model.layer2[0]
    strided = first.conv2 if name == 'resnet50_deconv' else first.conv1
    assert strided.stride == (2, 2) and strided.sampling_stride == (6, 6)
    assert (strided.n_iter, strided.freeze, strided.block) == (5, False, 64)
    # The reference keeps BatchNorm after the downsampling FastDeconv (and nowhere else).
    assert isinstance(first.downsample[0], FastDeconv) and first.downsample[0].sampling_stride == (6, 6)
    assert isinstance(first.downsample[1], nn.BatchNorm2d)
    norms = {k.rsplit('.', 2)[0] for k in model.state_dict() if k.endswith('running_var')}
    assert norms == {f'layer{i}.0.downsample' for i in (2, 3, 4)} | ({'layer1.0.downsample'} if '50' in name else set())
    _assert_delinear_head(model.fc, model.num_features)
    assert model.deconv1 is None


def test_densenet_layer_settings():
    model = _meta('densenet121_deconv')
    conv0 = model.features.conv0
    _assert_stem(conv0, 6)
    assert not any('norm' in k for k in model.state_dict())
    layer = model.features.denseblock1.denselayer2  # 96 input channels: the gcd rule gives block 32
    assert (layer.conv1.block, layer.conv2.block, layer.conv2.num_features) == (32, 64, 576)
    assert all(m.n_iter == 5 and not m.freeze for m in _fast_deconvs(model) if m is not conv0)
    _assert_delinear_head(model.classifier, 1024)


@pytest.mark.parametrize('name, conv_indices', [
    ('vgg11_deconv', [0, 3, 6, 8, 11, 13, 16, 18]),
    ('vgg16_deconv', [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
])
def test_vgg_layer_settings(name, conv_indices):
    model = _meta(name)
    assert [i for i, m in enumerate(model.features) if isinstance(m, FastDeconv)] == conv_indices
    _assert_stem(model.features[0], 3)
    assert all(m.n_iter == 5 and not m.freeze and m.sampling_stride == (3, 3) for m in _fast_deconvs(model)[1:])
    assert [i for i, m in enumerate(model.classifier) if isinstance(m, Delinear)] == [0, 3, 6]
    _assert_delinear_head(model.classifier[0], 25088)


def test_deconv_cfg_reaches_every_layer_the_stem_too():
    model = _meta('resnet18_deconv', deconv_cfg=dict(n_iter=3, block=32))
    assert model.conv1.n_iter == 3 and model.conv1.freeze and model.conv1.block == 3  # 3 input channels
    assert all(m.n_iter == 3 and m.block == 32 for m in _fast_deconvs(model)[1:])
    assert model.fc.n_iter == 3 and model.fc.block == 64  # the classifier follows block_fc


@pytest.mark.parametrize('name, head_key', [
    ('resnet18_deconv', 'deconv1'), ('densenet121_deconv', 'features.norm5'), ('vgg11_deconv', 'classifier.0'),
])
def test_channel_deconv_head_variant(name, head_key):
    """delinear=False: the reference's ChannelDeconv variant with plain Linear classifiers."""
    model = _meta(name, delinear=False)
    assert isinstance(model.get_submodule(head_key), ChannelDeconv)
    assert not any(isinstance(m, Delinear) for m in model.modules())
    assert isinstance(model.get_classifier(), nn.Linear)


@pytest.mark.parametrize('name, reductions, stem', [
    ('resnet50_deconv', [2, 4, 8, 16, 32], ['conv1.weight', 'bn1.weight', 'bn1.bias']),
    ('densenet121_deconv', [2, 4, 8, 16, 32], ['features.conv0.weight', 'features.norm0.weight', 'features.norm0.bias']),
    ('vgg11_deconv', [1, 2, 4, 8, 16, 32], ['features.0.weight', 'features.0.bias']),
])
def test_feature_levels_and_parameter_groups(name, reductions, stem):
    model = _meta(name, deconv=False)
    assert [info['reduction'] for info in model.feature_info] == reductions
    assert [info['module'] for info in model.feature_info] == [info['module'] for info in _meta(name).feature_info]
    for coarse in (False, True):
        groups = list(group_parameters(model, model.group_matcher(coarse=coarse)).values())
        assert groups[0] == stem
        assert all(n.startswith((model.classifier_name, 'features.norm5')) for n in groups[-1])


@pytest.mark.parametrize('name', ['resnet18_deconv', 'vgg11_deconv', 'densenet121_deconv'])
def test_fx_feature_extraction_traces(name):
    """torch.fx (timm's feature_cls='fx') only accepts calls of registered submodules."""
    with torch.device('meta'):
        model = timm.create_model(name, features_only=True, feature_cls='fx')
    assert model.feature_info.module_name() == [info['module'] for info in _meta(name).feature_info]


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook', 'fx'])
@pytest.mark.parametrize('name, kwargs', [
    ('resnet18_deconv', dict(layers=(1, 1, 1, 1))), ('densenet121_deconv', dict(block_config=(1, 1, 1, 1))),
    ('vgg11_deconv', dict(num_classes=0, global_pool='')),  # no 120M-parameter MLP to build
])
def test_module_tapping_extractors_return_the_levels(name, kwargs, feature_cls):
    """timm's extractors that tap feature_info's modules (VGG and DenseNet tap children of
    ``features``, which 'list' and 'dict' only find in a flattened Sequential, as timm's own do)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    torch.manual_seed(0)  # the same weights
    extractor = timm.create_model(name, features_only=True, feature_cls=feature_cls, **kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        levels = model.forward_intermediates(x, intermediates_only=True)
        out = extractor(x)
    out = list(out.values()) if isinstance(out, dict) else out
    assert len(out) == len(levels)
    for got, expected in zip(out, levels):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_vgg_fx_matches_eager():
    torch.manual_seed(0)
    model = VGG(cfg=[64, 'M', 128, 'M'], num_classes=10).eval()
    traced = create_feature_extractor(model, return_nodes={'features.4': 'level1', 'classifier.6': 'logits'})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = traced(x)
        torch.testing.assert_close(out['level1'], model.forward_intermediates(x, indices=[1])[1][0], rtol=0, atol=0)
        torch.testing.assert_close(out['logits'], model(x), rtol=0, atol=0)


def test_densenet_intermediates_are_not_overwritten():
    """Without norms the next level's ReLU must not act in place on a returned feature map."""
    torch.manual_seed(0)
    model = timm.create_model('densenet121_deconv').eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        for i, level in enumerate(maps):
            alone, = model.forward_intermediates(x, indices=[i], intermediates_only=True)
            torch.testing.assert_close(level, alone, rtol=0, atol=0)
        assert (maps[-1] < 0).any()  # dense blocks hand out raw conv outputs; the ReLU comes after
        torch.testing.assert_close(final, maps[-1].relu(), rtol=0, atol=0)


def _std_close(t, expected):
    assert abs(t.std().item() / expected - 1) < 0.1


def test_resnet_init():
    model = timm.create_model('resnet18_deconv')
    conv = model.layer4[0].conv2
    _std_close(conv.weight, math.sqrt(2 / (512 * 9)))  # kaiming normal, fan_out
    bound = 1 / math.sqrt(512 * 9)  # FastDeconv bias keeps nn.Conv2d's uniform default
    assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > bound / 2
    _std_close(model.conv1.weight, math.sqrt(2 / (64 * 49)))
    assert model.fc.bias.abs().max() > 0


def test_densenet_init():
    model = timm.create_model('densenet121_deconv')
    conv = model.features.denseblock2.denselayer1.conv2  # FastDeconv: PyTorch default init
    assert conv.weight.abs().max() <= 1 / math.sqrt(128 * 9) and conv.bias.abs().max() > 0
    assert model.classifier.bias.abs().max() > 0
    plain = timm.create_model('densenet121_deconv', deconv=False)
    _std_close(plain.features.denseblock2.denselayer1.conv2.weight, math.sqrt(2 / (128 * 9)))  # fan_in
    assert torch.count_nonzero(plain.classifier.bias) == 0


def test_vgg_init():
    torch.manual_seed(0)
    model = VGG(cfg=[64, 'M'], num_classes=10)
    _std_close(model.features[0].weight, math.sqrt(2 / (64 * 9)))
    assert torch.count_nonzero(model.features[0].bias) == 0
    assert model.classifier[0].bias.abs().max() > 0  # Delinear keeps its default init
    plain = VGG(cfg=[64, 'M'], num_classes=10, deconv=False)
    _std_close(plain.classifier[3].weight, 0.01)
    assert torch.count_nonzero(plain.classifier[3].bias) == 0
    reference_vgg11d_run = VGG(cfg=[64, 'M'], num_classes=10, init_weights=False)
    assert reference_vgg11d_run.features[0].bias.abs().max() > 0


def test_vgg_head_mapping():
    """num_features 512, pre-logits 4096 after fc7, reset_classifier replaces fc8 only."""
    torch.manual_seed(0)
    model = VGG(cfg=[64, 'M', 128, 'M'], num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape == (2, 128, 4, 4) and pre_logits.shape == (2, 4096)
        assert model.get_classifier(name_only=True) == 'classifier.6'
        fc7 = model.classifier[3]
        model.reset_classifier(0)
        assert model.classifier[3] is fc7
        torch.testing.assert_close(model(x), pre_logits)
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), features)
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match='needs num_classes=0'):
        model.reset_classifier(5, '')
    with pytest.raises(ValueError, match="must be 'avg'"):
        VGG(cfg=[64, 'M'], global_pool='max')
    channel_deconv = VGG(cfg=[64, 'M'], num_classes=10, delinear=False)
    assert channel_deconv.get_classifier(name_only=True) == 'classifier.9'
    assert [type(m).__name__ for m in channel_deconv.classifier][::4] == ['ChannelDeconv'] * 3


def test_vgg_without_pooling_has_no_mlp():
    """global_pool='' runs no head, so it holds none (its 120M parameters would get no gradients);
    pooling again builds a fresh MLP."""
    model = VGG(cfg=[64, 'M'], num_classes=0, global_pool='')
    assert [n for n, _ in model.named_parameters()] == ['features.0.weight', 'features.0.bias']
    assert model.head_hidden_size == model.num_features == 64
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 64, 4, 4)
    assert model.get_classifier(name_only=True) == 'classifier'
    model.reset_classifier(5, 'avg')
    assert model.head_hidden_size == 4096 and model(x).shape == (2, 5)
    assert model.get_classifier(name_only=True) == 'classifier.6'
