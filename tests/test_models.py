"""Every registered deconv-zoo model through timm's API (mirrors timm's own model tests)."""
import copy
import importlib.util
import os

import pytest
import timm
import torch

import deconv_zoo
from deconv_zoo.layers import FastDeconv

ALL_MODELS = deconv_zoo.list_models()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parameters the reference registers but never uses (kept so its checkpoints load).
UNUSED_PARAMS = {'preact_resnet18_cifar': ('bn1.',)}


# Deep models whose paper-size whitening (576-wide Newton-Schulz in every layer) would take
# minutes per step on 2 cores: their training test uses 16-channel blocks, same code paths.
CHEAP_WHITENING = dict(deconv_cfg=dict(block=16))
HEAVY = {n for n in ALL_MODELS if n.startswith(('dpn92', 'densenet121')) or not n.endswith(('_cifar', '_cifar_deconv'))}


def _training_batch(name: str) -> int:
    """A small training batch: 2 images, 10 for SENet-18, whose SE gates whiten a pooled 1x1 map
    with every 9th pixel, so one sample per 9 images (too few: a ValueError, as in BatchNorm)."""
    return 10 if name.startswith('senet') else 2


def _input_size(name: str, batch: int = 2):
    """A small input: 32x32 (the CIFAR size; every ImageNet model still has a 1x1 map there)."""
    return batch, 3, 32, 32


def test_models_are_registered():
    names = set(timm.list_models('*deconv*'))
    assert {'resnet18_cifar_deconv'} <= names
    assert all(n.endswith('_deconv') or n.endswith('_cifar') or '_deconv_' in n for n in ALL_MODELS)
    assert not any(n.startswith('test_') for n in ALL_MODELS)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ALL_MODELS])
def test_train_steps_then_eval(name):
    """A few SGD steps in train mode, then eval: finite everywhere; every parameter learns."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **(CHEAP_WHITENING if name in HEAVY else {}))
    # ImageNet-scale nets subsample every 36th pixel of their last stage: at 32x32 and batch 2 that
    # is one sample per 1x1 covariance (too few), so they get more.
    imagenet_scale = timm.models.get_pretrained_cfg(name).input_size[-1] > 32
    batch, size = (8, 96) if imagenet_scale else (_training_batch(name), 32)
    x = torch.randn(batch, 3, size, size)
    target = torch.arange(batch) % 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        out = model(x)
        assert out.shape == (batch, 5)
        loss = torch.nn.functional.cross_entropy(out, target)
        assert torch.isfinite(loss)
        loss.backward()
        unused = UNUSED_PARAMS.get(name, ())
        missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(unused)]
        assert not missing, f'parameters without gradient: {missing[:5]}'
        # Unused ones are frozen: DistributedDataParallel fails on trainable parameters without gradients.
        assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(unused))
        optimizer.step()
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    for module in model.modules():
        if isinstance(module, FastDeconv):
            assert torch.isfinite(module.running_deconv).all() and torch.isfinite(module.running_mean).all()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_timm_model_api(name):
    """num_features / head_hidden_size / reset_classifier / forward_head as timm defines them."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(*_input_size(name))
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model(x).shape == (2, cfg['num_classes'])
        state = model.state_dict()
        assert cfg['classifier'] + '.weight' in state
        assert cfg['first_conv'] + '.weight' in state
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
        assert model.get_classifier() is model.get_submodule(cfg['classifier'])
        assert not model.get_classifier().training  # a new head follows the model's mode
        unpooled = timm.create_model(name, num_classes=0, global_pool='').eval()
        assert unpooled(x).dim() == 4
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'license'):
        assert cfg.get(key), key
    # Paper-trained tags cite the paper; converted batch-norm tags say what they are instead.
    assert cfg.get('paper_ids') or 'converted' in cfg.get('description', ''), cfg


@pytest.mark.parametrize('name', ALL_MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    info = model.feature_info
    x = torch.randn(*_input_size(name))
    with torch.no_grad():
        outs = model(x)
    assert len(outs) >= 3
    for out, chs, red in zip(outs, info.channels(), info.reduction()):
        assert out.shape[1] == chs
        assert out.shape[-1] == -(-x.shape[-1] // red)
    picked = timm.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    with torch.no_grad():
        last_two = picked(x)
    assert [t.shape for t in last_two] == [t.shape for t in outs[-2:]]


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ALL_MODELS])
def test_features_subset_keeps_only_what_it_runs(name):
    """As in timm, the levels after out_indices, the final layers and the head are pruned: every
    parameter left gets a gradient (DistributedDataParallel fails on the others); an early stop
    returns the last level run, not forward_final of it."""
    kwargs = CHEAP_WHITENING if name in HEAVY else {}
    model = timm.create_model(name, features_only=True, out_indices=(0, 1), **kwargs)
    x = torch.randn(_training_batch(name), 3, 16, 16)
    sum(out.sum() for out in model(x)).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert model.model.num_features == model.feature_info.channels()[-1]
    plain = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        final, intermediates = plain.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert final is intermediates[-1]


def test_feature_extractor_takes_grad_checkpointing():
    """timm's list extractor has set_grad_checkpointing, its getter (the zoo's default) had not: an
    AttributeError. Checkpointed levels give the same features and gradients."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_cifar_deconv', features_only=True, out_indices=(1, 2),
                              layers=(1, 1, 1, 1), deconv_cfg=dict(block=16))
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.model.grad_checkpointing
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    grads = []
    for m in (model.double(), checkpointed.double()):
        outs = m(x)
        sum(out.square().sum() for out in outs).backward()
        grads.append([o.detach() for o in outs] + [p.grad for p in m.parameters()])
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_one_channel_input_and_grad_checkpointing(name):
    model = timm.create_model(name, in_chans=1, num_classes=3).eval()
    x = torch.randn(*_input_size(name))[:, :1]
    with torch.no_grad():
        plain = model(x)
        model.set_grad_checkpointing(True)
        checkpointed = model(x)
    assert plain.shape == (2, 3)
    torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize('name', ['resnet18_cifar', 'mobilenetv2_cifar_deconv'])
def test_head_hidden_size_is_the_pooled_width(name):
    """As in timm: 'catavgmax' pooling doubles what pre_logits returns, and head_hidden_size says so."""
    model = timm.create_model(name, global_pool='catavgmax').eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 2 * model.num_features)
        assert model.head_hidden_size == 2 * model.num_features
        model.reset_classifier(3, 'avg')
        assert model.head_hidden_size == model.num_features
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)


def test_reset_classifier_in_eval_keeps_eval_outputs_per_sample():
    """The new Delinear is in eval mode: outputs do not depend on the rest of the batch and
    inference leaves its (fresh) statistics alone."""
    model = timm.create_model('resnet18_cifar_deconv').eval()
    model.reset_classifier(5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:2], model(x[:2]))
    assert torch.equal(model.get_classifier().running_mean, torch.zeros_like(model.get_classifier().running_mean))


def test_features_only_refuses_module_tapping_extractors():
    with pytest.raises(ValueError, match="supports feature_cls='getter'.*not 'hook'"):
        timm.create_model('resnet18_cifar_deconv', features_only=True, feature_cls='hook')


def test_vgg_without_delinear_loads_its_weights_for_a_new_class_count(tmp_path):
    """With ChannelDeconv before each head layer the last one is classifier.9, not the config's .6."""
    from safetensors.torch import save_file
    source = timm.create_model('vgg11_deconv', delinear=False, num_classes=10)
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = timm.create_model('vgg11_deconv', delinear=False, pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert model.get_classifier(name_only=True) == 'classifier.9' and model.num_classes == 5
    assert torch.equal(model.state_dict()['classifier.5.weight'], source.state_dict()['classifier.5.weight'])  # fc7
    unpooled = timm.create_model('vgg11_deconv', delinear=False, pretrained=True, num_classes=0, global_pool='',
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert torch.equal(unpooled.features[0].weight, source.features[0].weight)


def test_wrong_channels_are_named():
    model = timm.create_model('resnet18_cifar_deconv').eval()
    with pytest.raises(ValueError, match=r'expected input \(N, 3, H, W\)'):
        model(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize('family', ['resnet18_cifar', 'vgg11_deconv', 'densenet121_cifar', 'mobilenetv2_cifar'])
def test_deconv_cfg_is_checked(family):
    """A misspelt setting is refused before any layer is built, by the batch-norm twin too (which
    takes deconv_cfg so that one set of arguments builds both twins, and has no layer to apply it to)."""
    deconv_name = family if family.endswith('_deconv') else f'{family}_deconv'
    twins = [dict(name=deconv_name), dict(name=deconv_name, deconv=False)]
    if family != deconv_name:
        twins.append(dict(name=family))
    for twin in twins:
        with pytest.raises(ValueError, match=r"unknown FastDeconv settings \['refresh_evry'\]"):
            timm.create_model(twin.pop('name'), deconv_cfg={'refresh_evry': 4}, **twin)


@pytest.mark.parametrize('name, timm_twin, last_rate', [
    ('resnet18_deconv', 'resnet18', 0.2), ('resnet50_deconv', 'resnet50', 0.2), ('senet18_cifar_deconv', None, 0.2),
    ('resnext29_32x4d_cifar_deconv', None, 0.2),
    # timm's EfficientNet rule, block i of n at rate * i / n, on the stride-1 blocks (the others have no shortcut)
    ('mobilenetv2_cifar_deconv', None, 0.2 * 16 / 17), ('efficientnet_b0_cifar_deconv', None, 0.2 * 14 / 16),
])
def test_drop_path_rate_is_timm_stochastic_depth(name, timm_twin, last_rate):
    """drop_path_rate, which timm's ResNets and EfficientNets take, was a TypeError: now each
    residual branch gets timm's DropPath at timm's rates (0 at the first block, rising towards
    the rate at the last), and the weights' keys stay as they were."""
    from timm.layers import DropPath

    def rates(model):
        return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]

    model = timm.create_model(name, drop_path_rate=0.2)
    assert set(model.state_dict()) == set(timm.create_model(name).state_dict())
    assert rates(model)[-1] == pytest.approx(last_rate) and rates(model) == sorted(rates(model))
    if timm_twin:
        assert rates(model) == rates(timm.create_model(timm_twin, drop_path_rate=0.2))
    assert rates(timm.create_model(name)) == []


def test_drop_path_drops_branches_in_training_only():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_cifar_deconv', layers=(1, 1, 1, 1), deconv_cfg=dict(block=16),
                              drop_path_rate=0.5)
    x = torch.randn(4, 3, 8, 8)
    assert not torch.equal(model(x), model(x))  # the batch statistics are the same: the dropped branches differ
    model.eval()
    assert torch.equal(model(x), model(x))


def test_freeze_keeps_the_frozen_part_and_its_statistics_while_the_rest_trains():
    """deconv_zoo.freeze: timm.utils.freeze's parameters and batch norm, and the deconvolution
    layers' whitening statistics too, which timm's freeze leaves whitening every batch and moving
    (here the stem's freeze schedule, on fresh statistics for its first 101 calls); unfreeze undoes it."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = timm.create_model('efficientnet_b0_cifar_deconv', num_classes=10)
    frozen = ['conv1', 'layers.0']  # a FastDeconv stem and a block of convolutions with batch norm
    x, target = torch.randn(4, 3, 16, 16), torch.arange(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def states():
        return {name: copy.deepcopy(model.get_submodule(name).state_dict()) for name in frozen + ['linear']}

    def train_steps():
        before = states()
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        after = states()
        return {name: any(not torch.equal(value, after[name][key]) for key, value in state.items())
                for name, state in before.items()}

    timm.utils.freeze(model, frozen)
    assert train_steps() == {'conv1': True, 'layers.0': False, 'linear': True}  # the stem's statistics moved
    deconv_zoo.freeze(model, frozen)
    assert isinstance(model.layers[0].bn1, FrozenBatchNorm2d)
    assert train_steps() == {'conv1': False, 'layers.0': False, 'linear': True}
    assert model.conv1.counter.item() == 2  # the freeze schedule waits too
    deconv_zoo.unfreeze(model, frozen)
    assert type(model.layers[0].bn1) is torch.nn.BatchNorm2d
    assert train_steps() == {'conv1': True, 'layers.0': True, 'linear': True}
    # timm's unfreeze unfreezes every batch norm: PreAct-ResNet's unused one stays frozen (DDP).
    preact = timm.create_model('preact_resnet18_cifar')
    deconv_zoo.freeze(preact)
    deconv_zoo.unfreeze(preact)
    assert not preact.bn1.weight.requires_grad and preact.conv1.weight.requires_grad


def test_nan_batch_under_a_frozen_stem_leaves_batch_norm_statistics_finite():
    """EfficientNet's blocks normalise with batch norm: with the stem's whitening frozen, a NaN
    batch reached them unchecked and made about 100 buffers NaN before the head refused it."""
    model = timm.create_model('efficientnet_b0_cifar_deconv', num_classes=10)
    model(torch.randn(2, 3, 16, 16))
    deconv_zoo.freeze(model, ['conv1'])
    x = torch.randn(2, 3, 16, 16)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match=r'FastDeconv \(conv1\): the input is not finite'):
        model(x)
    assert deconv_zoo.loading.non_finite_names(model.state_dict().items()) == []


def test_grad_checkpointing_updates_statistics_once():
    """Checkpointed training recomputes forwards in backward; statistics must move once."""
    torch.manual_seed(0)
    plain = timm.create_model('resnet18_cifar_deconv', num_classes=4)
    ckpt = timm.create_model('resnet18_cifar_deconv', num_classes=4)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model.train()
        model(x).sum().backward()
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_pretrained_without_published_weights_raises():
    with pytest.raises(deconv_zoo.NoPublishedWeightsError, match='No pretrained weights are published'):
        timm.create_model('resnet18_cifar_deconv', pretrained=True)


def _load_hubconf():
    spec = importlib.util.spec_from_file_location('hubconf', os.path.join(REPO_ROOT, 'hubconf.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_lists_every_model():
    hubconf = _load_hubconf()
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_'))
    assert entries == sorted(ALL_MODELS)
    assert hubconf.dependencies == ['torch', 'timm', 'safetensors']
    assert 'resnet18_cifar_deconv' in hubconf.resnet18_cifar_deconv.__doc__


def test_torch_hub_load_local():
    model = torch.hub.load(REPO_ROOT, 'resnet18_cifar_deconv', source='local', num_classes=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(RuntimeError, match='Cannot find callable'):
        torch.hub.load(REPO_ROOT, 'no_such_model', source='local')
