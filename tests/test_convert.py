"""Bringing in existing weights: the authors' checkpoints, batch-norm models, calibration."""
import copy
import os

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from deconv_zoo.convert import bn_to_deconv, calibrate_whitening, checkpoint_geometry, convert_reference_checkpoint, \
    deconv_state_dict_from_bn
from deconv_zoo.evaluation import ModelArgumentsError
from deconv_zoo.weights import CheckpointMismatchError, CorruptWeightsError
from weight_helpers import SMALL, assert_close, assert_state_equal, load_script, randomize_batchnorm, \
    randomize_statistics


@pytest.fixture(scope='module')
def zoo_model():
    model = timm.create_model('resnet18_cifar_deconv', **SMALL).eval()
    randomize_statistics(model, torch.Generator().manual_seed(0))
    return model


def reference_style(model: torch.nn.Module) -> dict:
    """What the authors' main.py saves: DataParallel keys, no step counters, under 'net'."""
    state = {f'module.{k}': v.clone() for k, v in model.state_dict().items() if not k.endswith('.counter')}
    return dict(net=state, acc=93.2, epoch=19)


def test_reference_checkpoint_converts_with_every_key_accounted_for(zoo_model, tmp_path):
    path = tmp_path / 'ckpt.t7'
    torch.save(reference_style(zoo_model), path)
    model, report = convert_reference_checkpoint(str(path), 'resnet18_cifar_deconv', **SMALL)
    expected = {k: (torch.zeros_like(v) if k.endswith('.counter') else v) for k, v in zoo_model.state_dict().items()}
    assert_state_equal(model, expected)
    assert report.filled == sorted(k for k in expected if k.endswith('.counter'))
    assert len(report.loaded) == len(expected) - len(report.filled)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(image), zoo_model(image))


@pytest.mark.parametrize('wrap', [lambda s: s, lambda s: dict(state_dict=s, epoch=3), lambda s: dict(model=s)])
def test_reference_wrappers(zoo_model, wrap):
    state = reference_style(zoo_model)['net']
    model, _ = convert_reference_checkpoint(wrap(state), 'resnet18_cifar_deconv', **SMALL)
    assert torch.equal(model.linear.running_deconv, zoo_model.linear.running_deconv)


def test_imagenet_vgg_checkpoint_with_data_parallel_features():
    """main_imagenet.py wraps only VGG's ``features`` in DataParallel: keys ``features.module.0.weight``."""
    vgg = timm.create_model('vgg16_cifar_deconv', **SMALL).eval()
    randomize_statistics(vgg, torch.Generator().manual_seed(6))
    state = {k.replace('features.', 'features.module.'): v for k, v in vgg.state_dict().items()
             if not k.endswith('.counter')}
    model, _ = convert_reference_checkpoint(dict(state_dict=state, arch='vgg16d'), 'vgg16_cifar_deconv', **SMALL)
    assert_state_equal(model, {k: (torch.zeros_like(v) if k.endswith('.counter') else v)
                               for k, v in vgg.state_dict().items()})


@pytest.mark.parametrize('arch, kwargs', [
    ('vgg11_deconv', {}), ('vgg11_deconv', dict(delinear=False)), ('vgg11_deconv', dict(block_fc=0)),
    ('vgg11_deconv', dict(deconv=False)), ('vgg16_cifar_deconv', dict(delinear=False)),
])
def test_geometry_is_read_for_every_vgg_head(arch, kwargs):
    """The ImageNet VGG's ChannelDeconv head (delinear=False) numbers its last layer classifier.9, not
    the pretrained cfg's classifier.6, so its class count was not read (and defaulted to 1000)."""
    with torch.device('meta'):
        state_dict = timm.create_model(arch, num_classes=7, in_chans=1, **kwargs).state_dict()
    assert checkpoint_geometry(state_dict, arch) == dict(num_classes=7, in_chans=1)


def test_reference_checkpoint_mismatch_lists_keys(zoo_model):
    state = reference_style(zoo_model)['net']
    state['module.extra.weight'] = torch.zeros(1)
    del state['module.layer1.0.conv1.running_deconv']
    with pytest.raises(CheckpointMismatchError, match=r'(?s)missing \(1\): layer1\.0\.conv1\.running_deconv.*'
                                                      r'unexpected \(1\): extra\.weight'):
        convert_reference_checkpoint(state, 'resnet18_cifar_deconv', **SMALL)
    with pytest.raises(CheckpointMismatchError, match='shape mismatch.*layer1.0.conv1.running_deconv'):
        convert_reference_checkpoint(reference_style(zoo_model), 'resnet18_cifar_deconv')  # default block 64


def test_convert_reference_script(zoo_model, tmp_path, capsys):
    path = tmp_path / 'ckpt.pth'
    torch.save(reference_style(zoo_model), path)
    load_script('convert_reference').main([str(path), '--model', 'resnet18_cifar_deconv', '--model-kwargs',
                                           "deconv_cfg={'block': 8}", 'block_fc=64',
                                           '--output', str(tmp_path / 'out.safetensors')])
    assert 'filled in by the model: conv1.counter' in capsys.readouterr().out
    saved = load_file(str(tmp_path / 'out.safetensors'))
    assert torch.equal(saved['layer4.1.conv2.running_deconv'], zoo_model.layer4[1].conv2.running_deconv)


@pytest.mark.parametrize('output', ['out.safetensors', 'out.pth'])
def test_convert_reference_script_keeps_the_old_output_when_writing_fails(zoo_model, tmp_path, monkeypatch, output):
    """The weights were written straight into --output: a failure left a cut file in place of the old one."""
    path = tmp_path / 'ckpt.pth'
    torch.save(reference_style(zoo_model), path)
    (tmp_path / output).write_bytes(b'previous weights')
    script = load_script('convert_reference')

    def fail_midway(*args, **kwargs):
        if len(args) > 1:  # torch.save(obj, file): part of the bytes, then the failure
            args[1].write(b'cut')
        raise OSError('disk full')

    monkeypatch.setattr(script, 'safetensors_bytes', fail_midway)
    monkeypatch.setattr(script.torch, 'save', fail_midway)
    with pytest.raises(OSError, match='disk full'):
        script.main([str(path), '--model', 'resnet18_cifar_deconv', '--model-kwargs', "deconv_cfg={'block': 8}",
                     'block_fc=64', '--output', str(tmp_path / output)])
    assert (tmp_path / output).read_bytes() == b'previous weights'
    assert sorted(os.listdir(tmp_path)) == sorted(['ckpt.pth', output])  # no temporary file left


@pytest.mark.parametrize('argv, message', [
    (['--model', 'resnet18_cifar_deconvv'], "Unknown model 'resnet18_cifar_deconvv'"),
    (['--model', 'resnet18_cifar_deconv', '--model-kwargs', 'bogus=1'], "unexpected keyword argument 'bogus'"),
    (['--model', 'resnet18_cifar_deconv', '--from-bn', 'resnet18_cifarr'], "Unknown batch-norm model 'resnet18_cifarr'"),
])
def test_convert_reference_script_bad_model_arguments(zoo_model, tmp_path, argv, message):
    """Errors the script reports in one line (BAD_INPUT_ERRORS), before writing anything."""
    path = tmp_path / 'ckpt.pth'
    torch.save(reference_style(zoo_model), path)
    with pytest.raises(ModelArgumentsError, match=message):
        load_script('convert_reference').main([str(path), *argv, '--output', str(tmp_path / 'out.safetensors')])
    assert not (tmp_path / 'out.safetensors').exists()


def test_convert_reference_script_refuses_an_output_without_a_folder(tmp_path, capsys):
    """Checked when the arguments are parsed: the write failed only after the conversion."""
    with pytest.raises(SystemExit):
        load_script('convert_reference').main([str(tmp_path / 'ckpt.pth'), '--model', 'resnet18_cifar_deconv',
                                               '--output', str(tmp_path / 'no' / 'out.safetensors')])
    assert "argument --output: no folder for" in capsys.readouterr().err


def test_non_finite_weights_are_not_converted(zoo_model, tmp_path):
    """A diverged run's NaN converted into a weights file without a word (the model answered NaN)."""
    checkpoint = reference_style(zoo_model)
    checkpoint['net']['module.layer1.0.conv1.weight'] = checkpoint['net']['module.layer1.0.conv1.weight'].clone()
    checkpoint['net']['module.layer1.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    path = tmp_path / 'ckpt.pth'
    torch.save(checkpoint, path)
    with pytest.raises(CorruptWeightsError, match=rf'{path} hold NaN or inf values in 1 tensors: layer1\.0\.conv1\.weight'):
        convert_reference_checkpoint(str(path), 'resnet18_cifar_deconv', deconv_cfg={'block': 8}, block_fc=64)
    bn_state = timm.create_model('resnet18_cifar').state_dict()
    bn_state['bn1.running_var'][0] = float('inf')
    with pytest.raises(CorruptWeightsError, match=r'resnet18_cifar weights hold NaN or inf values in 1 tensors: bn1\.running_var'):
        bn_to_deconv(bn_state, 'resnet18_cifar_deconv', **SMALL)


@pytest.fixture(scope='module')
def bn_model():
    model = timm.create_model('resnet18_cifar').eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(2))
    return model


def test_bn_model_converts_to_the_same_function(bn_model):
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = bn_to_deconv(bn_model, 'resnet18_cifar_deconv', **SMALL)
    with torch.no_grad():
        expected = bn_model(image)
        assert_close(model(image), expected, rel=1e-4)
    from_state_dict = bn_to_deconv(bn_model.state_dict(), 'resnet18_cifar_deconv', **SMALL)  # twin inferred
    assert_state_equal(from_state_dict, model.state_dict())


@pytest.mark.parametrize('block_fc', [64, 0])
def test_zoo_model_built_with_batch_norm_keeps_its_whitened_head(block_fc):
    """deconv=False keeps the Delinear classifier: its running statistics were left over (an error
    naming the very buffers the deconv model has), now its eval function is folded into the head."""
    generator = torch.Generator().manual_seed(6)
    bn_model = timm.create_model('resnet18_cifar_deconv', deconv=False, **SMALL)
    bn_model.train()(torch.randn(8, 3, 32, 32, generator=generator))  # head statistics away from identity
    bn_model.eval()
    model = bn_to_deconv(bn_model, 'resnet18_cifar_deconv', **dict(SMALL, block_fc=block_fc))
    image = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        assert_close(model(image), bn_model(image), rel=1e-4)


def test_calibration_keeps_the_function_and_matches_train_mode(bn_model):
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    identity = bn_to_deconv(bn_model, 'resnet18_cifar_deconv', **SMALL)
    calibrated = bn_to_deconv(bn_model, 'resnet18_cifar_deconv', calibrate_loader=[(b, None) for b in batches],
                              **SMALL)
    assert not torch.equal(calibrated.conv1.running_deconv, identity.conv1.running_deconv)
    with torch.no_grad():
        expected = bn_model(batches[0])
        assert_close(calibrated(batches[0]), expected, rel=1e-4)
        # Train mode whitens with batch statistics: close to eval only once the weights expect whitening.
        errors = [(copy.deepcopy(m).train()(batches[0]) - expected).abs().max() for m in (identity, calibrated)]
    assert errors[1] < 0.5 * errors[0]


def test_module_without_timm_config_converts_by_bn_arch():
    """torchvision's resnet18 has timm resnet18's keys but no pretrained_cfg: bn_arch names it."""
    generator = torch.Generator().manual_seed(5)
    torchvision_model = torchvision.models.resnet18(num_classes=10).eval()
    randomize_batchnorm(torchvision_model, generator)
    model = bn_to_deconv(torchvision_model, 'resnet18_deconv', bn_arch='resnet18', **SMALL)
    image = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        assert_close(model(image), torchvision_model(image), rel=1e-4)
    with pytest.raises(ModelArgumentsError, match='Name the batch-norm architecture'):
        bn_to_deconv(torchvision_model, 'resnet18')  # not a *_deconv name: no default twin


@pytest.mark.parametrize('kwargs, key', [(dict(num_classes=5), 'linear.weight'), (dict(in_chans=1), 'conv1.weight')])
def test_bn_weights_that_do_not_fit_the_built_model_are_listed(bn_model, kwargs, key):
    with pytest.raises(CheckpointMismatchError, match=f'(?s)resnet18_cifar weights do not fit.*{key}'):
        bn_to_deconv(bn_model, 'resnet18_cifar_deconv', **SMALL, **kwargs)


def test_calibration_refuses_layers_without_bias():
    model = timm.create_model('resnet18_cifar_deconv', deconv_cfg=dict(block=8, bias=False), block_fc=64).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r'calibrate_whitening: conv1, layer1\.0\.conv1, .* have no bias'):
        calibrate_whitening(model, [torch.randn(2, 3, 32, 32)])
    assert_state_equal(model, state)


@pytest.mark.parametrize('batch, error, message', [
    (torch.full((2, 3, 32, 32), float('nan')), FloatingPointError, r'batch 1 gives conv1 non-finite whitening'),
    (torch.randn(2, 1, 32, 32), ValueError, r'expected input \(N, 3, H, W\), got shape \(2, 1, 32, 32\)'),
])
def test_calibration_refuses_bad_batches_and_leaves_the_model_as_it_was(bn_model, batch, error, message):
    model = bn_to_deconv(bn_model, 'resnet18_cifar_deconv', **SMALL)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        calibrate_whitening(model, [torch.randn(2, 3, 32, 32), batch])
    assert_state_equal(model, state)


def test_pre_activation_networks_are_refused():
    bn = timm.create_model('preact_resnet18_cifar')
    with pytest.raises(CheckpointMismatchError, match=r'cannot be converted exactly: 9 BatchNorms.*layer1\.0\.bn1'):
        bn_to_deconv(bn, 'preact_resnet18_cifar_deconv', **SMALL)


@pytest.mark.parametrize('bn_arch, arch', [
    ('resnet18_cifar', 'preact_resnet18_cifar_deconv'),  # as many layers, another function: converted before
    ('resnet18', 'resnet18_cifar_deconv'),  # timm's ImageNet ResNet: shapes differ
    ('resnet18_cifar', 'resnet18_deconv'),
])
def test_models_that_are_not_twins_are_refused(bn_arch, arch):
    with torch.device('meta'):
        bn = timm.create_model(bn_arch)
    with pytest.raises(CheckpointMismatchError, match=f'{bn_arch} is not the batch-norm twin of {arch}'):
        bn_to_deconv(bn, arch)


def test_unknown_deconv_model_is_named():
    with pytest.raises(ValueError, match="Unknown model 'resnet18_cifar_deconvv'"):
        bn_to_deconv({}, 'resnet18_cifar_deconvv')


EXACT = [('resnet18_cifar', 'resnet18_cifar_deconv'), ('vgg16_cifar', 'vgg16_cifar_deconv'),
         ('resnext29_32x4d_cifar', 'resnext29_32x4d_cifar_deconv'), ('mobilenetv2_cifar', 'mobilenetv2_cifar_deconv'),
         ('dpn92_cifar', 'dpn92_cifar_deconv'), ('pnasnet_a_cifar', 'pnasnet_a_cifar_deconv'),
         ('efficientnet_b0_cifar', 'efficientnet_b0_cifar_deconv'),  # its blocks keep Conv2d + BN in both
         ('resnet50', 'resnet50_deconv'),  # timm's; the downsample BatchNorm is kept
         ('vgg11_bn', 'vgg11_deconv')]  # timm's 7x7 convolution head becomes the twin's Linear
REFUSED = [('preact_resnet18_cifar', 'preact_resnet18_cifar_deconv'), ('senet18_cifar', 'senet18_cifar_deconv'),
           ('densenet121_cifar', 'densenet121_cifar_deconv'), ('densenet121', 'densenet121_deconv')]


def registered(pairs):
    """The pairs as parameters, skipped while a family is not in the checkout yet."""
    return [pytest.param(bn_arch, arch, marks=pytest.mark.skipif(
        not (timm.is_model(bn_arch) and timm.is_model(arch)), reason=f'{arch} is not registered yet'))
        for bn_arch, arch in pairs]


@pytest.mark.parametrize('bn_arch, arch', registered(EXACT + REFUSED))
def test_which_architectures_convert(bn_arch, arch):
    """On the meta device (structure only; the function is checked above for ResNet-18 and in
    test_hub for timm's resnet18): exact twins give a state dict that fits, pre-activation ones
    are refused."""
    with torch.device('meta'):
        bn_state = timm.create_model(bn_arch).state_dict()
        deconv = timm.create_model(arch)
    if (bn_arch, arch) in REFUSED:
        with pytest.raises(CheckpointMismatchError, match='cannot be converted exactly'):
            deconv_state_dict_from_bn(bn_state, bn_arch, deconv)
        return
    state = deconv_state_dict_from_bn(bn_state, bn_arch, deconv)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in deconv.state_dict().items()}


def test_a_checkpoint_without_a_state_dict_is_named(tmp_path):
    """A torch file holding a list (or a bare tensor) was an AttributeError traceback."""
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointMismatchError, match='No state dict found in the checkpoint: it holds a list'):
        convert_reference_checkpoint(str(path), 'resnet18_cifar_deconv')
