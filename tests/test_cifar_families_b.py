"""CIFAR MobileNetV2, DPN-92, PNASNet-A and EfficientNet-B0: sizes, reference layout, per-layer settings.

The counts are reference-architectures.md section 2.1 (the authors' models built with main.py's
paper settings); forward/backward/features of every model are covered by test_models.py.
"""
import functools

import pytest
import timm
import torch
import torch.nn as nn
from timm.models._manipulate import group_parameters

from deconv_zoo.layers import ChannelDeconv, Delinear, FastDeconv
from deconv_zoo.models.cifar_efficientnet import InvertedResidualSE
from deconv_zoo.models.cifar_mobilenetv2 import InvertedResidual

# name: (reference state_dict entries, parameters, buffer elements of the deconv model, FastDeconv layers)
REFERENCE_SIZES = {
    'mobilenetv2_cifar': (344, 2_296_922, None, 0),
    'mobilenetv2_cifar_deconv': (232, 2_279_378, 875_716, 57),
    'dpn92_cifar': (572, 34_236_634, None, 0),
    'dpn92_cifar_deconv': (384, 34_179_970, 12_916_844, 95),
    'pnasnet_a_cifar': (140, 130_646, None, 0),
    'pnasnet_a_cifar_deconv': (96, 128_226, 4_884_960, 23),
    'efficientnet_b0_cifar': (372, 2_912_089, None, 0),
    'efficientnet_b0_cifar_deconv': (372, 2_912_057, 143_254, 1),
}


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    """One shared instance per name, for checks that run no forward."""
    return timm.create_model(name)


def _fast_deconvs(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, FastDeconv)}


@pytest.mark.parametrize('name', sorted(REFERENCE_SIZES))
def test_sizes_match_the_reference(name):
    entries, params, buffers, n_deconv = REFERENCE_SIZES[name]
    model = _model(name)
    state = model.state_dict()
    deconvs = _fast_deconvs(model)
    assert len(deconvs) == n_deconv
    # Each FastDeconv adds its `counter` buffer to the reference's entries.
    assert len(state) == entries + n_deconv
    assert sum(p.numel() for p in model.parameters()) == params
    if buffers is not None:
        assert sum(b.numel() for k, b in model.named_buffers() if not k.endswith('.counter')) == buffers
    if not n_deconv:
        assert isinstance(model.linear, nn.Linear)


@pytest.mark.parametrize('name', ['mobilenetv2_cifar_deconv', 'pnasnet_a_cifar_deconv'])
def test_reference_checkpoint_without_counters_loads_strictly(name):
    state = {k: v for k, v in _model(name).state_dict().items() if not k.endswith('.counter')}
    timm.create_model(name).load_state_dict(state, strict=True)


@pytest.mark.parametrize('name, block', [
    ('mobilenetv2_cifar_deconv', 256), ('dpn92_cifar_deconv', 512), ('pnasnet_a_cifar_deconv', 176),
    ('efficientnet_b0_cifar_deconv', 320),
])
def test_delinear_block(name, block):
    """Delinear(in, block 512) falls back to gcd(512, in), or to in when in < 512."""
    linear = _model(name).linear
    assert isinstance(linear, Delinear) and linear.block == block
    assert linear.running_deconv.shape == (block, block)


@pytest.mark.parametrize('name', ['dpn92_cifar_deconv', 'pnasnet_a_cifar_deconv', 'efficientnet_b0_cifar_deconv',
                                  'mobilenetv2_cifar_deconv'])
def test_stem_settings(name):
    stem = _model(name).conv1
    assert isinstance(stem, FastDeconv)
    assert stem.freeze and stem.n_iter == 10 and stem.block == 3 and stem.num_features == 27


def test_mobilenetv2_layout():
    bn, dc = _model('mobilenetv2_cifar'), _model('mobilenetv2_cifar_deconv')
    with_projection = [i for i, block in enumerate(dc.layers) if len(block.shortcut)]
    assert with_projection == [0, 1, 10, 16]
    assert with_projection == [i for i, block in enumerate(bn.layers) if len(block.shortcut)]
    bn_keys, dc_keys = set(bn.state_dict()), set(dc.state_dict())
    assert {'layers.10.shortcut.0.weight', 'layers.10.shortcut.1.running_var'} <= bn_keys
    assert {'layers.10.shortcut.0.bias', 'layers.10.shortcut.0.running_deconv'} <= dc_keys
    assert not any('.shortcut.1.' in k or '.bn' in k or k.startswith('bn') for k in dc_keys)
    assert (dc.conv2.in_channels, dc.conv2.out_channels, dc.conv2.kernel_size) == (320, 1280, (1, 1))
    assert bn.bn2.num_features == 1280


def test_mobilenetv2_per_layer_settings():
    model = _model('mobilenetv2_cifar_deconv')
    in_planes = 32
    for block in model.layers:
        planes = block.conv1.out_channels
        assert block.conv1.n_iter == 5
        dw = block.conv2
        assert (dw.groups, dw.block, dw.num_features, dw.n_iter) == (planes, 1, 9, 1)
        assert dw.running_deconv.shape == (planes, 9, 9)
        assert (block.conv3.block, block.conv3.n_iter) == (in_planes, 1)
        in_planes = block.conv3.out_channels
    assert model.conv2.n_iter == 5 and model.conv2.block == 64


def test_deconv_cfg_overrides_per_layer_settings_it_names():
    """The reference's per-layer settings are defaults: a deconv_cfg key applies to every layer."""
    model = timm.create_model('mobilenetv2_cifar_deconv', deconv_cfg=dict(n_iter=3))
    assert model.conv1.n_iter == 3 and model.conv1.freeze  # the stem's freeze schedule is not named
    assert model.layers[0].conv1.n_iter == 3 and model.conv2.n_iter == 3
    assert model.layers[0].conv2.n_iter == 3 and model.layers[0].conv3.n_iter == 3
    assert model.layers[0].conv3.block == 32  # the projection's own block (its input width)
    # ... which a deconv_cfg block leaves: it shapes the buffers, so the checkpoints
    narrow = timm.create_model('mobilenetv2_cifar_deconv', deconv_cfg=dict(block=16))
    assert narrow.layers[0].conv3.running_deconv.shape == (32, 32) and narrow.layers[0].conv1.block == 16
    default = timm.create_model('mobilenetv2_cifar_deconv')
    assert default.conv1.n_iter == 10 and default.layers[0].conv2.n_iter == 1 and default.layers[0].conv3.n_iter == 1


def test_inverted_residual_adds_the_input_on_stride_one_only():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    for stride, residual in ((1, x), (2, 0)):
        block = InvertedResidual(8, 8, 2, stride).eval()
        with torch.no_grad():
            torch.testing.assert_close(block(x), block.branch(x) + residual)


def test_efficientnet_stride_two_blocks_add_their_own_output():
    """The reference's quirk: a stride-2 block returns out * w + out (no input path)."""
    torch.manual_seed(0)
    block = InvertedResidualSE(16, 32, 2, 2).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = block.branch(x)
        w = torch.sigmoid(block.fc2(torch.relu(block.fc1(out.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(block(x), out * w + out)


def test_dpn_layout():
    bn, dc = _model('dpn92_cifar'), _model('dpn92_cifar_deconv')
    for i, (width, group_block) in enumerate(zip((96, 192, 384, 768), (3, 6, 12, 24))):
        bn_stage, dc_stage = getattr(bn, f'layer{i + 1}'), getattr(dc, f'layer{i + 1}')
        # Deconv mode: the first block's shortcut is a bare FastDeconv (keys shortcut.*).
        assert isinstance(dc_stage[0].shortcut, FastDeconv)
        bn_shortcut = bn_stage[0].shortcut
        assert [type(m) for m in bn_shortcut] == [nn.Conv2d, nn.BatchNorm2d]
        assert all(isinstance(b.shortcut, nn.Sequential) and not len(b.shortcut) for b in dc_stage[1:])
        conv2 = dc_stage[0].conv2
        assert (conv2.in_channels, conv2.groups, conv2.block) == (width, 32, group_block)
        assert conv2.running_deconv.shape == (32, 9 * group_block, 9 * group_block)
    assert 'layer1.0.shortcut.running_deconv' in dc.state_dict()
    assert 'layer1.0.shortcut.1.running_var' in bn.state_dict()
    # 1x1 convs on widths that 64 does not divide fall back to gcd blocks.
    assert (dc.layer3[2].conv1.in_channels, dc.layer3[2].conv1.block) == (1096, 8)
    assert (dc.layer4[0].conv1.in_channels, dc.layer4[0].conv1.block) == (1528, 8)
    assert [info['num_chs'] for info in dc.feature_info] == [64, 320, 672, 1528, 2560]
    assert dc.linear.in_features == 2560


def test_pnasnet_layout():
    bn, dc = _model('pnasnet_a_cifar'), _model('pnasnet_a_cifar_deconv')
    for model in (bn, dc):
        assert type(model.layer2).__name__ == type(model.layer4).__name__ == 'CellA'
        assert [len(getattr(model, f'layer{i}')) for i in (1, 3, 5)] == [6, 6, 6]
    for name, sep in dc.named_modules():
        if name.endswith('sep_conv1.conv1'):
            c = sep.in_channels
            assert (sep.groups, sep.block, sep.num_features, sep.kernel_size) == (c, 1, 49, (7, 7))
            assert sep.running_deconv.shape == (c, 49, 49) and sep.running_mean.shape == (49 * c,)
    assert dc.layer2.sep_conv1.conv1.weight.shape == (88, 1, 7, 7)
    assert dc.layer4.conv1.block == 8
    assert {'layer2.sep_conv1.bn1.running_var', 'layer4.bn1.weight', 'layer1.0.sep_conv1.conv1.weight'} <= set(
        bn.state_dict())
    assert dc.linear.in_features == 176


@pytest.mark.filterwarnings('ignore:ChannelDeconv. block 512 is larger')
def test_pnasnet_channel_deconv_wider_than_the_features():
    """ChannelDeconv(512) on 176 channels (the reference's c == 0 case) still trains and evaluates."""
    torch.manual_seed(0)
    model = timm.create_model('pnasnet_a_cifar', block_fc=512, delinear=False)
    assert isinstance(model.deconv1, ChannelDeconv) and isinstance(model.linear, nn.Linear)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).sum().backward()
    assert int(model.deconv1.num_batches_tracked) == 1
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_efficientnet_deconv_keeps_batchnorm_blocks():
    """The reference's structural quirk: in deconv mode only the stem and the classifier change."""
    bn, dc = _model('efficientnet_b0_cifar'), _model('efficientnet_b0_cifar_deconv')
    assert list(_fast_deconvs(dc)) == ['conv1']
    block_keys = {k for k in dc.state_dict() if k.startswith('layers.')}
    assert block_keys == {k for k in bn.state_dict() if k.startswith('layers.')}
    assert {'layers.1.shortcut.1.running_var', 'layers.8.shortcut.0.weight', 'layers.0.fc1.bias'} <= block_keys
    assert all(isinstance(block.bn1, nn.BatchNorm2d) for block in dc.layers)
    assert 'bn1.weight' not in dc.state_dict() and 'conv1.running_deconv' in dc.state_dict()


@pytest.mark.parametrize('name, channels, reductions, num_groups', [
    ('mobilenetv2_cifar', [32, 24, 32, 96, 320], [1, 1, 2, 4, 8], 1 + 17 + 1),
    ('efficientnet_b0_cifar', [32, 24, 40, 112, 192, 320], [1, 2, 4, 8, 16, 32], 1 + 16 + 1),
    ('pnasnet_a_cifar', [44, 44, 88, 88, 176, 176], [1, 1, 2, 2, 4, 4], 1 + 6 + 1 + 6 + 1 + 6 + 1),
    ('dpn92_cifar', [64, 320, 672, 1528, 2560], [1, 1, 2, 4, 8], 1 + 30 + 1),
])
def test_feature_levels_and_param_groups(name, channels, reductions, num_groups):
    model = _model(name)
    assert [info['num_chs'] for info in model.feature_info] == channels
    assert [info['reduction'] for info in model.feature_info] == reductions
    for info in model.feature_info:
        model.get_submodule(info['module'])
    # One group for the stem (with its BN), one per block or cell, one for the classifier; in
    # network order, which for these models is the order the parameters are registered in.
    groups = list(group_parameters(model, model.group_matcher()).values())
    assert len(groups) == num_groups
    assert groups[0] == ['conv1.weight', 'bn1.weight', 'bn1.bias']
    assert groups[-1] == ['linear.weight', 'linear.bias']
    assert [p for group in groups for p in group] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize('name', ['mobilenetv2_cifar', 'efficientnet_b0_cifar', 'pnasnet_a_cifar'])
def test_other_input_sizes(name):
    """The reference's fixed pooling kernels are replaced by global pooling."""
    model = timm.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
