"""Publishing and loading through the Hugging Face Hub, all offline.

A resnet18_cifar_deconv with non-trivial statistics is published with scripts/push_to_hub.py
into a folder; each test puts that folder into a hand-built Hugging Face cache (HF_HUB_OFFLINE=1)
or loads its files directly, and checks that every loaded tensor equals the saved one.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Mapping

import huggingface_hub.constants
import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors.torch import load_file, save_file

import deconv_zoo
from deconv_zoo import weights
from deconv_zoo.evaluation import create_model_with_weights
from deconv_zoo.loading import gray_whitening
from deconv_zoo.weights import (
    ChecksumMismatchError, CheckpointMismatchError, CorruptWeightsError, NoPublishedWeightsError, PublishedWeights,
    WeightsNotCachedError,
)
from weight_helpers import (
    REPO_ROOT, SMALL, assert_close, assert_state_equal, load_script, randomize_batchnorm, randomize_statistics, spd,
)

ARCH, TAG, ORG = 'resnet18_cifar_deconv', 'cifar10', 'dzlab'
NAME = f'{ARCH}.{TAG}'
REPO_ID = f'{ORG}/{NAME}'


def add_to_hf_cache(cache: Path, repo_id: str, files: Dict[str, Path], revision: str = 'rev0') -> None:
    """A repo snapshot in Hugging Face's cache layout (refs/main holds the revision, no newline)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / 'snapshots' / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(revision)


def assert_state_equal_to_file(path: Path, expected: Mapping[str, torch.Tensor]) -> None:
    saved = load_file(str(path))
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty, private Hugging Face cache; offline; no organisation override."""
    cache = tmp_path / 'hf_hub'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv(weights.HUB_ORG_ENV, raising=False)
    return cache


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """scripts/push_to_hub.py run on a training checkpoint: the repo folder, saved state, output."""
    root = tmp_path_factory.mktemp('published')
    generator = torch.Generator().manual_seed(0)
    model = timm.create_model(ARCH)
    randomize_statistics(model, generator)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    command = 'python scripts/train.py --model resnet18_cifar_deconv --dataset torch/cifar10 --epochs 20'
    checkpoint = root / 'model_best.pth.tar'
    train_args = dict(model=ARCH, model_kwargs={}, lr=0.1, epochs=20)  # as scripts/train.py records them
    torch.save(dict(state_dict=state, state_dict_ema=ema, args=train_args, epoch=19), checkpoint)
    results = dict(model=ARCH, tag=TAG, dataset='torch/cifar10', split='test', num_images=10000, top1=95.12,
                   top5=99.81, loss=0.2034, img_per_sec=1234.5, checkpoint=str(checkpoint),
                   sha256=deconv_zoo.loading.file_sha256(str(checkpoint)), use_ema=False, input_size=[3, 32, 32])
    results_path = root / 'validate.json'
    results_path.write_text(json.dumps(results))
    folder = root / 'repo'
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        load_script('push_to_hub').main(['--checkpoint', str(checkpoint), '--results', str(results_path),
                                         '--org', ORG, '--output-dir', str(folder), '--train-command', command])
    return dict(folder=folder, state=state, output=output.getvalue(), checkpoint=checkpoint,
                results_path=results_path)


@pytest.fixture
def cached_repo(hf_cache, published) -> Path:
    add_to_hf_cache(hf_cache, REPO_ID, {n: published['folder'] / n for n in ('model.safetensors', 'config.json')})
    return hf_cache


def test_push_writes_a_timm_hub_folder(published):
    folder = published['folder']
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    assert_state_equal_to_file(folder / 'model.safetensors', published['state'])
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 10
    assert config['pretrained_cfg']['tag'] == TAG and config['pretrained_cfg']['first_conv'] == 'conv1'
    assert config['pretrained_cfg']['classifier'] == 'linear'

    readme = (folder / 'README.md').read_text()
    header = readme.split('---')[1]
    assert 'license: mit' in header and '- network-deconvolution' in header and 'datasets:\n- cifar10' in header
    assert 'model-index' in header and 'value: 95.12' in header and 'value: 99.81' in header
    assert '| torch/cifar10 | test | 10000 | 95.12 | 99.81 | 0.2034 |' in readme
    assert 'python scripts/train.py --model resnet18_cifar_deconv --dataset torch/cifar10 --epochs 20' in readme
    assert '"lr": 0.1' in readme  # the arguments the checkpoint recorded
    assert 'title     = {Network Deconvolution}' in readme and '1905.11926' in readme
    assert 'Aloimonos' in readme and 'ICLR' in readme

    sha = deconv_zoo.loading.file_sha256(str(folder / 'model.safetensors'))
    assert f"'{NAME}': PublishedWeights(" in published['output']
    assert f"hf_hub_id='{REPO_ID}', top1=95.12, top5=99.81" in published['output']
    assert f"sha256='{sha}'" in published['output']


def test_push_publishes_the_validated_ema_weights(published, tmp_path):
    results = json.loads(published['results_path'].read_text())
    ema_results = tmp_path / 'validate_ema.json'
    ema_results.write_text(json.dumps(dict(results, use_ema=True)))
    push = load_script('push_to_hub')
    with contextlib.redirect_stdout(io.StringIO()):
        push.main(['--checkpoint', str(published['checkpoint']), '--results', str(ema_results), '--repo-id', REPO_ID,
                   '--output-dir', str(tmp_path / 'repo')])
    saved = load_file(str(tmp_path / 'repo' / 'model.safetensors'))
    assert torch.equal(saved['linear.weight'], published['state']['linear.weight'] + 1)
    with pytest.raises(SystemExit, match='measured on the non-EMA weights'):
        push.main(['--checkpoint', str(published['checkpoint']), '--ema', '--results', str(published['results_path']),
                   '--repo-id', REPO_ID, '--output-dir', str(tmp_path / 'other')])
    with pytest.raises(SystemExit, match='written for another file'):
        push.main(['--weights', str(published['folder'] / 'model.safetensors'), '--results',
                   str(published['results_path']), '--repo-id', REPO_ID, '--output-dir', str(tmp_path / 'other')])


def test_push_with_model_kwargs_round_trips_and_names_them_in_the_card(hf_cache, tmp_path):
    """Weights trained with --model-kwargs: hf-hub: rebuilds that architecture from config.json
    (same outputs); the card's call by tag name, which builds the default one, names them too."""
    model = timm.create_model(ARCH, **SMALL).eval()
    randomize_statistics(model, torch.Generator().manual_seed(3))
    checkpoint = tmp_path / 'model_best.pth.tar'
    torch.save(dict(state_dict=model.state_dict(), args=dict(model=ARCH, model_kwargs=SMALL)), checkpoint)
    results = tmp_path / 'validate.json'
    results.write_text(json.dumps(dict(model=ARCH, tag=TAG, dataset='torch/cifar10', split='test', num_images=100,
                                       top1=90.0, top5=99.0, loss=0.3)))
    folder = tmp_path / 'repo'
    with contextlib.redirect_stdout(io.StringIO()):
        load_script('push_to_hub').main(['--checkpoint', str(checkpoint), '--results', str(results),
                                         '--repo-id', REPO_ID, '--output-dir', str(folder)])
    add_to_hf_cache(hf_cache, REPO_ID, {n: folder / n for n in ('model.safetensors', 'config.json')})
    loaded = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True).eval()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))
    readme = (folder / 'README.md').read_text()
    assert f"timm.create_model('{NAME}', pretrained=True, deconv_cfg={{'block': 8}}, block_fc=64)" in readme


def test_push_reads_the_arguments_of_timms_train_script(published, tmp_path):
    """timm's train.py records a Namespace: its model kwargs and the card's arguments are read too."""
    checkpoint = tmp_path / 'timm_checkpoint.pth.tar'
    torch.save(dict(state_dict=published['state'], args=argparse.Namespace(model=ARCH, model_kwargs={}, lr=0.3)),
               checkpoint)
    results = tmp_path / 'validate.json'
    results.write_text(json.dumps(dict(json.loads(published['results_path'].read_text()), sha256=None)))
    with contextlib.redirect_stdout(io.StringIO()):
        load_script('push_to_hub').main(['--checkpoint', str(checkpoint), '--results', str(results),
                                         '--repo-id', REPO_ID, '--output-dir', str(tmp_path / 'repo')])
    assert '"lr": 0.3' in (tmp_path / 'repo' / 'README.md').read_text()


@pytest.mark.parametrize('change, message', [
    (dict(model='resnet18_cifar'), 'trained as resnet18_cifar_deconv, not resnet18_cifar'),
    (dict(dataset='digits'), "validated on digits, but tag 'cifar10' is for cifar10"),
    (dict(input_size=[3, 8, 8]), r"validated at input size \(3, 8, 8\), but tag 'cifar10' declares \(3, 32, 32\)"),
    (dict(mean=[0.5, 0.5, 0.5]), r"validated with mean \[0.5, 0.5, 0.5\], but tag 'cifar10' declares \(0.4914"),
    (dict(interpolation='nearest'), r"validated with interpolation nearest, but tag 'cifar10' declares bilinear"),
    (dict(tag='digits'), "resnet18_cifar_deconv has no pretrained tag 'digits'; its tags: cifar10, cifar100"),
], ids=['other_model', 'other_dataset', 'other_input_size', 'other_mean', 'other_interpolation', 'unknown_tag'])
def test_push_refuses_results_that_do_not_fit_the_tag(published, tmp_path, change, message):
    results = tmp_path / 'validate.json'
    results.write_text(json.dumps(dict(json.loads(published['results_path'].read_text()), **change)))
    with pytest.raises(SystemExit, match=message):
        load_script('push_to_hub').main(['--checkpoint', str(published['checkpoint']), '--results', str(results),
                                         '--repo-id', REPO_ID, '--output-dir', str(tmp_path / 'repo')])


@pytest.mark.parametrize('content, message', [
    (None, r'--results .*validate\.json: No such file or directory'),
    ('{"top1": 95.1', r'--results .*validate\.json is not JSON \(Expecting'),
    ('[95.1]', r'holds a JSON list, not the object scripts/validate\.py writes'),
    ('{"dataset": "torch/cifar10", "top1": 95.1}', r'lacks split, num_images, top5, loss'),
], ids=['missing', 'not_json', 'not_an_object', 'fields_missing'])
def test_push_names_a_results_file_it_cannot_use(published, tmp_path, content, message):
    """A missing or malformed --results file was a traceback (FileNotFoundError, JSONDecodeError,
    AttributeError, or a KeyError once the model card was being written)."""
    results = tmp_path / 'validate.json'
    if content is not None:
        results.write_text(content)
    with pytest.raises(SystemExit, match=message):
        load_script('push_to_hub').main(['--checkpoint', str(published['checkpoint']), '--results', str(results),
                                         '--repo-id', REPO_ID, '--output-dir', str(tmp_path / 'repo')])
    assert not (tmp_path / 'repo').exists()


def test_push_refuses_a_converted_batchnorm_tag(tmp_path):
    """validate.py reports an ImageNet ResNet's default tag, .tv_in1k, whose name loads timm's converted
    BN weights under any organisation: weights pushed there were unreachable by name, and their card
    said they were not trained with deconvolution."""
    checkpoint = tmp_path / 'model_best.pth.tar'
    state = timm.create_model('resnet18_deconv', **SMALL).state_dict()
    torch.save(dict(state_dict=state, args=dict(model='resnet18_deconv', model_kwargs=SMALL)), checkpoint)
    results = tmp_path / 'validate.json'
    results.write_text(json.dumps(dict(model='resnet18_deconv', tag='tv_in1k', dataset='', split='validation',
                                       num_images=50000, top1=70.1, top5=89.4, loss=1.2)))
    with pytest.raises(SystemExit, match=r"tag 'tv_in1k' of resnet18_deconv loads timm's batch-norm weights "
                                         r"resnet18.tv_in1k.*--tag in1k"):
        load_script('push_to_hub').main(['--checkpoint', str(checkpoint), '--results', str(results), '--org', ORG,
                                         '--output-dir', str(tmp_path / 'repo')])
    assert not (tmp_path / 'repo').exists()


def test_push_without_output_dir_uploads_and_fails_clearly_offline(published, hf_cache):
    arguments = ['--checkpoint', str(published['checkpoint']), '--results', str(published['results_path']),
                 '--org', ORG]
    with pytest.raises(OfflineModeIsEnabled):
        load_script('push_to_hub').main(arguments)
    # The command line says it in one line (it printed huggingface_hub's traceback).
    run = subprocess.run([sys.executable, str(REPO_ROOT / 'scripts' / 'push_to_hub.py'), *arguments],
                         env=dict(os.environ, HF_HUB_OFFLINE='1'), capture_output=True, text=True)
    assert run.returncode == 1 and 'Traceback' not in run.stderr
    assert 'Not uploaded: the Hub is switched off here' in run.stderr and '--output-dir' in run.stderr


def test_org_override_by_env_var_and_keyword(cached_repo, published, monkeypatch):
    assert_state_equal(timm.create_model(NAME, pretrained=True, hub_org=ORG), published['state'])
    monkeypatch.setenv(weights.HUB_ORG_ENV, ORG)
    model = timm.create_model(ARCH, pretrained=True)  # default tag: cifar10
    assert_state_equal(model, published['state'])
    assert model.pretrained_cfg['hf_hub_id'] == REPO_ID


def test_hf_hub_model_name_uses_the_cached_config(cached_repo, published):
    model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    assert isinstance(model, deconv_zoo.models.cifar_resnet.ResNetCifar)
    assert_state_equal(model, published['state'])


def test_explicit_cache_dir(published, tmp_path):
    add_to_hf_cache(tmp_path, REPO_ID, {'model.safetensors': published['folder'] / 'model.safetensors'})
    model = timm.create_model(NAME, pretrained=True, hub_org=ORG, cache_dir=str(tmp_path))
    assert_state_equal(model, published['state'])


def test_file_overlay_safetensors_pth_legacy_and_url(hf_cache, published, tmp_path):
    path = published['folder'] / 'model.safetensors'
    pth, legacy = tmp_path / 'weights.pth', tmp_path / 'weights.t7'
    torch.save(published['state'], pth)
    torch.save(published['state'], legacy, _use_new_zipfile_serialization=False)
    for overlay in (dict(file=str(path)), dict(file=str(pth)), dict(file=str(legacy)), dict(url=f'file://{pth}')):
        assert_state_equal(timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=overlay), published['state'])


def test_torch_hub_load_local_pretrained(cached_repo, published, monkeypatch):
    monkeypatch.setenv(weights.HUB_ORG_ENV, ORG)
    model = torch.hub.load(str(REPO_ROOT), ARCH, source='local', pretrained=True)
    assert_state_equal(model, published['state'])


def test_listed_sha256_is_verified(cached_repo, published, monkeypatch):
    sha = deconv_zoo.loading.file_sha256(str(published['folder'] / 'model.safetensors'))
    monkeypatch.setitem(weights.PUBLISHED_WEIGHTS, NAME, PublishedWeights(REPO_ID, 95.12, 99.81, sha))
    assert_state_equal(timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True), published['state'])
    monkeypatch.setitem(weights.PUBLISHED_WEIGHTS, NAME, PublishedWeights(REPO_ID, 95.12, 99.81, '0' * 64))
    with pytest.raises(ChecksumMismatchError, match=f'lists {"0" * 64}.*{REPO_ID}'):
        timm.create_model(NAME, pretrained=True, hub_org=ORG)


def test_new_num_classes_resets_the_whole_classifier(cached_repo, published):
    model = timm.create_model(NAME, pretrained=True, hub_org=ORG, num_classes=5)
    assert_state_equal(model, published['state'], skip='linear.')
    assert model.linear.weight.shape == (5, 512)
    assert torch.equal(model.linear.running_deconv, torch.eye(512))  # fresh, as reset_classifier makes it
    assert torch.equal(model.linear.running_mean, torch.zeros(512))
    headless = timm.create_model(NAME, pretrained=True, hub_org=ORG, num_classes=0)
    assert_state_equal(headless, published['state'], skip='linear.')


def test_in_chans_adapts_weight_and_whitening(cached_repo, published):
    model = timm.create_model(NAME, pretrained=True, hub_org=ORG, in_chans=1)
    state = published['state']
    assert torch.allclose(model.conv1.weight, state['conv1.weight'].sum(dim=1, keepdim=True))
    mean, deconv = gray_whitening(state['conv1.running_mean'], state['conv1.running_deconv'], 3)
    assert torch.equal(model.conv1.running_mean, mean) and torch.equal(model.conv1.running_deconv, deconv)
    assert_state_equal(model, state, skip='conv1.')
    with pytest.warns(UserWarning, match='conv1: fresh whitening statistics .* for 5 input channels'):
        five = timm.create_model(NAME, pretrained=True, hub_org=ORG, in_chans=5)
    assert torch.equal(five.conv1.running_deconv, torch.eye(45))  # 5 channels: fresh statistics


def test_gray_adaptation_is_exact_for_channel_symmetric_statistics(hf_cache, tmp_path):
    """A stem whose statistics are the same for every channel (e.g. trained on gray images copied
    to RGB): the 1-channel model on a gray image equals the 3-channel model on its copies."""
    generator = torch.Generator().manual_seed(1)
    model = timm.create_model(ARCH, **SMALL).eval()
    randomize_statistics(model, generator)
    with torch.no_grad():
        channel_mix = 0.8 * torch.eye(3) + 0.1 * torch.ones(3, 3)  # keeps (1, 1, 1) an eigenvector
        model.conv1.running_deconv.copy_(torch.kron(channel_mix, spd(9, generator=generator)))
        model.conv1.running_mean.copy_(torch.randn(9, generator=generator).repeat(3))
    path = tmp_path / 'rgb.safetensors'
    save_file(model.state_dict(), str(path))
    gray = timm.create_model(ARCH, pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path)),
                             **SMALL).eval()
    image = torch.randn(2, 1, 32, 32, generator=generator)
    with torch.no_grad():
        assert_close(gray(image), model(image.expand(-1, 3, -1, -1)), rel=1e-4)


def test_features_only_pretrained(cached_repo, published):
    features = timm.create_model(NAME, pretrained=True, hub_org=ORG, features_only=True, out_indices=(1, 2))
    assert features.feature_info.channels() == [64, 128]
    # The head and the levels after the last one kept are pruned, as in timm.
    assert_state_equal(features.model, published['state'], skip=('linear.', 'layer3.', 'layer4.'))


def test_unknown_tag_and_unpublished_tag(hf_cache):
    with pytest.raises(RuntimeError, match='Invalid pretrained tag'):
        timm.create_model(f'{ARCH}.imagenet', pretrained=True)
    with pytest.raises(NoPublishedWeightsError, match=f"published for '{NAME}'.*hub_org") as info:
        timm.create_model(ARCH, pretrained=True)
    # The checkpoint_path advice is a call of its own: with pretrained=True it raised this error again.
    assert f"timm.create_model('{NAME}', checkpoint_path='checkpoint.pth.tar')" in str(info.value)
    # The suggested call keeps the tag: without it timm would drop a 100-class classifier.
    with pytest.raises(NoPublishedWeightsError, match=rf"timm.create_model\('{ARCH}.cifar100', pretrained=True"):
        timm.create_model(f'{ARCH}.cifar100', pretrained=True)


def test_cache_miss_offline_names_repo_and_fix(hf_cache):
    with pytest.raises(WeightsNotCachedError, match=f"'{REPO_ID}'.*HF_HUB_OFFLINE.*hf download {REPO_ID}") as info:
        timm.create_model(NAME, pretrained=True, hub_org=ORG)
    assert isinstance(info.value, LocalEntryNotFoundError)  # still caught by huggingface_hub handlers
    # An hf-hub: name fails earlier, in timm, on the repo's config.json.
    with pytest.raises(WeightsNotCachedError, match=f"config.json of Hub repo '{REPO_ID}'.*hf download {REPO_ID}"):
        timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)


def test_truncated_safetensors_is_named(cached_repo, published, tmp_path):
    data = (published['folder'] / 'model.safetensors').read_bytes()
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptWeightsError, match=f'{truncated}.*truncated or corrupt'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated)))
    add_to_hf_cache(cached_repo, 'dzlab/broken', {'model.safetensors': truncated})
    with pytest.raises(CorruptWeightsError, match='snapshots/rev0/model.safetensors.*truncated'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='dzlab/broken'))
    with pytest.raises(CorruptWeightsError, match='not found: /no/such/file.safetensors'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file='/no/such/file.safetensors'))


def test_corrupt_files_are_named_on_every_route(hf_cache, published, tmp_path):
    """local-dir: folders, file:// urls, and torch files that are neither zip nor legacy format,
    or legacy-format ones cut short (the authors' checkpoints are legacy format)."""
    data = (published['folder'] / 'model.safetensors').read_bytes()
    folder = tmp_path / 'local'
    folder.mkdir()
    shutil.copy(published['folder'] / 'config.json', folder / 'config.json')
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptWeightsError, match='local/model.safetensors.*truncated or corrupt'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    url = f"file://{folder / 'model.safetensors'}"
    with pytest.raises(CorruptWeightsError, match='model.safetensors.*truncated or corrupt'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(url=url))
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptWeightsError, match='garbage.pth is not a weights file'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(garbage)))
    legacy = tmp_path / 'legacy.t7'
    torch.save({'net': published['state']}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-1000])
    with pytest.raises(CorruptWeightsError, match='legacy.t7 could not be read as a torch checkpoint'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(legacy)))


def test_non_finite_weights_are_refused(hf_cache, published, tmp_path):
    """NaN or inf weights (a diverged run) loaded silently and the model answered NaN."""
    state = dict(published['state'], **{'layer1.0.conv1.weight': published['state']['layer1.0.conv1.weight'].clone(),
                                        'linear.running_deconv': torch.full((512, 512), float('inf'))})
    state['layer1.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    path = tmp_path / 'diverged.safetensors'
    save_file(state, str(path))
    with pytest.raises(CorruptWeightsError,
                       match=f'{path}.*NaN or inf values in 2 tensors: layer1.0.conv1.weight, linear.running_deconv'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CorruptWeightsError, match='the given state_dict.*NaN or inf'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))


def test_own_batch_norm_weights_load_under_the_converted_tag():
    """A deconv=False VGG (torchvision's layout: no norm) loads its own weights with the default
    .tv_in1k tag: they were taken for timm's vgg11_bn weights to convert, and refused."""
    kwargs = dict(deconv=False, num_classes=10, init_weights=False)
    state = timm.create_model('vgg11_deconv', **kwargs).state_dict()
    model = timm.create_model('vgg11_deconv', pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(state_dict=state, num_classes=10))
    assert model.pretrained_cfg['tag'] == 'tv_in1k'
    assert_state_equal(model, state)


def test_checkpoint_path_and_checkpoint_option_check_the_file(published, tmp_path):
    """timm's ``checkpoint_path=`` loaded NaN weights silently, said nothing for a missing file
    (an empty FileNotFoundError) and only pickle internals for a broken one; validate.py's
    ``--checkpoint`` (create_model_with_weights) loaded NaN weights too."""
    diverged = dict(published['state'], **{'linear.weight': published['state']['linear.weight'].clone()})
    diverged['linear.weight'][0, 0] = float('inf')
    for suffix in ('.safetensors', '.pth'):
        path = tmp_path / f'diverged{suffix}'
        if suffix == '.safetensors':
            save_file(diverged, str(path))
        else:  # a training checkpoint, as scripts/train.py writes it
            torch.save({'state_dict': diverged}, path)
        with pytest.raises(CorruptWeightsError, match=f'{path}.*NaN or inf values in 1 tensors: linear.weight'):
            timm.create_model(ARCH, checkpoint_path=str(path))
        with pytest.raises(CorruptWeightsError, match=f'{path}.*NaN or inf values in 1 tensors: linear.weight'):
            create_model_with_weights(ARCH, checkpoint=str(path))
    with pytest.raises(CorruptWeightsError, match='not found: /no/such/checkpoint.pth'):
        timm.create_model(ARCH, checkpoint_path='/no/such/checkpoint.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptWeightsError, match='garbage.pth is not a weights file'):
        timm.create_model(ARCH, checkpoint_path=str(garbage))
    good = tmp_path / 'good.safetensors'
    save_file(published['state'], str(good))
    assert_state_equal_to_file(good, timm.create_model(ARCH, checkpoint_path=str(good)).state_dict())
    # timm's own models keep timm's behaviour.
    with pytest.raises(FileNotFoundError):
        timm.create_model('resnet10t', checkpoint_path='/no/such/checkpoint.pth')


def test_checkpoint_of_another_architecture_lists_keys(hf_cache, tmp_path):
    path = tmp_path / 'bn_twin.safetensors'
    save_file(timm.create_model('resnet18_cifar').state_dict(), str(path))
    for num_classes in (10, 5):  # also when the classifier is reset (timm then loads non-strictly)
        with pytest.raises(CheckpointMismatchError, match=r'(?s)missing \(\d+\): conv1\.bias, conv1\.running_mean.*'
                                                          r'unexpected \(100\): bn1\.') as info:
            timm.create_model(ARCH, pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(path)))
        assert str(path) in str(info.value) and 'bn_to_deconv' in str(info.value)


def test_converted_bn_tag_loads_timm_batchnorm_weights(hf_cache, tmp_path):
    """resnet18_deconv.tv_in1k: timm's resnet18.tv_in1k weights converted on load."""
    generator = torch.Generator().manual_seed(2)
    bn_model = timm.create_model('resnet18').eval()
    randomize_batchnorm(bn_model, generator)
    path = tmp_path / 'model.safetensors'
    save_file(bn_model.state_dict(), str(path))
    add_to_hf_cache(hf_cache, 'timm/resnet18.tv_in1k', {'model.safetensors': path})

    model = timm.create_model('resnet18_deconv', pretrained=True).eval()  # the default tag
    assert model.pretrained_cfg['tag'] == 'tv_in1k' and 'converted on load' in model.pretrained_cfg['description']
    assert torch.equal(model.layer1[0].conv1.running_deconv, torch.eye(576))  # identity whitening
    image = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        assert_close(model(image), bn_model(image), rel=1e-4)
    tuned = timm.create_model('resnet18_deconv.tv_in1k', pretrained=True, num_classes=10, in_chans=1)
    assert torch.allclose(tuned.conv1.weight, model.conv1.weight.sum(dim=1, keepdim=True))


@pytest.mark.parametrize('arch, bn_arch, kwargs', [
    ('resnet18_deconv', 'resnet18', dict(num_classes=0)),
    ('vgg11_deconv', 'vgg11_bn', dict(num_classes=0)),
    ('vgg11_deconv', 'vgg11_bn', dict(num_classes=0, global_pool='')),
], ids=['resnet', 'vgg', 'vgg_no_mlp'])
def test_converted_bn_tag_loads_as_a_headless_backbone(hf_cache, tmp_path, arch, bn_arch, kwargs):
    """num_classes=0 (timm's backbone call) on a converted tag: the BN model's classifier (VGG's MLP
    too, without pooling) has no place in the model and is left out. The conversion paired layers by
    count and refused: 'resnet18 has 21 convolution/linear layers, ResNet has 20'."""
    generator = torch.Generator().manual_seed(3)
    bn_model = timm.create_model(bn_arch).eval()
    randomize_batchnorm(bn_model, generator)
    path = tmp_path / 'model.safetensors'
    save_file(bn_model.state_dict(), str(path))
    add_to_hf_cache(hf_cache, f'timm/{bn_arch}.tv_in1k', {'model.safetensors': path})
    model = timm.create_model(arch, pretrained=True, **kwargs).eval()
    image = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        assert_close(model.forward_features(image), bn_model.forward_features(image), rel=1e-4)
        if not kwargs.get('global_pool') == '':
            assert_close(model(image), bn_model.forward_head(bn_model.forward_features(image), pre_logits=True),
                         rel=1e-4)


def test_a_checkpoints_class_count_and_the_features_only_call(hf_cache, tmp_path):
    """A 5-class checkpoint under a 10-class tag: features_only refused it (timm loads feature
    extractors headless; the filter compared the model's 10 classes), and num_classes=5 without the
    overlay's num_classes left its classifier out without a word."""
    five = timm.create_model(ARCH, num_classes=5)
    randomize_statistics(five, torch.Generator().manual_seed(4))
    path = tmp_path / 'five.safetensors'
    save_file(five.state_dict(), str(path))
    features = timm.create_model(ARCH, pretrained=True, features_only=True, out_indices=(1,),
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert_state_equal(features.model, five.state_dict(), skip=('linear.', 'layer2.', 'layer3.', 'layer4.'))
    with pytest.warns(UserWarning, match=r'fits num_classes=5.*says 10 classes.*num_classes=5 in pretrained_cfg_'):
        fresh = timm.create_model(ARCH, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(fresh.linear.running_deconv, torch.eye(512))
    loaded = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
    assert_state_equal(loaded, five.state_dict())


def test_damaged_and_misnamed_torch_files_are_named(published, tmp_path):
    """One flipped bit in a zip-format checkpoint's tensor data loaded without a word (its CRC-32
    names it); safetensors under a .bin name and an empty file were 'neither' format."""
    path = tmp_path / 'model.pth'
    torch.save(published['state'], path)
    data = bytearray(path.read_bytes())
    offset = data.index(published['state']['layer4.1.conv2.weight'].numpy().tobytes()[:64])
    data[offset + 10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError, match=r'model.pth is a corrupt torch checkpoint: its entry .* fails'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    misnamed = tmp_path / 'pytorch_model.bin'
    shutil.copy(published['folder'] / 'model.safetensors', misnamed)
    with pytest.raises(CorruptWeightsError, match='holds safetensors data.*rename it to pytorch_model.safetensors'):
        timm.create_model(ARCH, checkpoint_path=str(misnamed))
    empty = tmp_path / 'empty.safetensors'
    empty.write_bytes(b'')
    with pytest.raises(CorruptWeightsError, match=r'empty.safetensors is empty \(0 bytes\)'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(empty)))


def test_checkpoint_path_that_does_not_fit_lists_the_keys(published, tmp_path):
    """checkpoint_path= gave torch's RuntimeError listing every key, without the conversions to try."""
    path = tmp_path / 'bn_twin.safetensors'
    save_file(timm.create_model('resnet18_cifar').state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match=rf'(?s){path} do not fit {NAME}:.*unexpected \(100\): bn1\..*'
                                                      r'bn_to_deconv'):
        timm.create_model(ARCH, checkpoint_path=str(path))


def test_local_dir_reads_only_timms_file_and_a_config_without_classifier(published, tmp_path):
    """local-dir: refused a valid folder for a file timm never reads (a pickled training_args.bin);
    a hand-written config.json without 'classifier' made timm load strictly, so num_classes=5
    failed on the classifier keys the filter had left out."""
    folder = tmp_path / 'local'
    folder.mkdir()
    shutil.copy(published['folder'] / 'model.safetensors', folder / 'model.safetensors')
    config = json.loads((published['folder'] / 'config.json').read_text())
    del config['pretrained_cfg']['classifier']
    (folder / 'config.json').write_text(json.dumps(config))
    (folder / 'training_args.bin').write_bytes(b'\x80\x04\x95 not a checkpoint')
    model = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=5)
    assert_state_equal(model, published['state'], skip='linear.')


def test_hub_names_are_checked_where_they_are_given(published, hf_cache, monkeypatch, capsys, tmp_path):
    with pytest.raises(ValueError, match=r"hub_org='my lab' cannot name a Hub repo"):
        timm.create_model(NAME, pretrained=True, hub_org='my lab')
    monkeypatch.setenv(weights.HUB_ORG_ENV, 'a/b')
    with pytest.raises(ValueError, match=rf"{weights.HUB_ORG_ENV}='a/b' cannot name a Hub repo"):
        timm.create_model(NAME, pretrained=True)
    push = load_script('push_to_hub')
    base = ['--checkpoint', str(published['checkpoint']), '--results', str(published['results_path'])]
    (tmp_path / 'file').write_text('')
    for extra, message in ((['--org', 'my lab'], "argument --org: 'my lab' cannot name a Hub repo"),
                           (['--repo-id', 'a/b/c'], "argument --repo-id: 'a/b/c' cannot name a Hub repo"),
                           (['--org', ORG, '--output-dir', str(tmp_path / 'file' / 'repo')],
                            f"argument --output-dir: {tmp_path / 'file'} is a file, not a folder")):
        with pytest.raises(SystemExit):
            push.main(base + extra)
        assert message in capsys.readouterr().err


def test_an_unreachable_hub_is_asked_once(hf_cache, monkeypatch):
    """Online but unreachable, each weight file name retried for several seconds (46 s in all):
    after the first miss, the other names are looked up in the cache only."""
    calls = []

    def unreachable(repo_id, filename, local_files_only=False, **kwargs):
        calls.append((filename, local_files_only))
        raise LocalEntryNotFoundError('no connection')
    monkeypatch.setattr(deconv_zoo.loading, 'hf_hub_download', unreachable)
    with pytest.raises(WeightsNotCachedError, match='model.safetensors or pytorch_model.bin'):
        timm.create_model(NAME, pretrained=True, hub_org=ORG)
    assert calls == [('model.safetensors', False), ('pytorch_model.bin', True)]
