"""Image datasets read through timm's factory: folder layouts and image modes and sizes that do not
match the model's input (deconv_zoo.data)."""
import struct
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from deconv_zoo.data import (
    DatasetError, DigitsDataset, ShardSampler, SkipUnreadable, create_image_dataset, dataset_class_names,
    dataset_num_classes, resolve_input_config, set_image_transform, splits_share_images,
)


def _input_config(input_size: Sequence[int]) -> Dict[str, Any]:
    chans = input_size[0]
    return dict(input_size=tuple(input_size), interpolation='bilinear', mean=(0.5,) * chans, std=(0.5,) * chans,
                crop_pct=1.0, crop_mode='center')


def _save_images(folder: Path, images: Sequence[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f'{i}.png')


def _write_fake_mnist(root: Path, count: int = 4, side: int = 28) -> None:
    """torchvision's raw MNIST files (big-endian idx format) holding random digits."""
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (count, side, side), dtype=np.uint8)
    for prefix in ('train', 't10k'):
        (raw / f'{prefix}-images-idx3-ubyte').write_bytes(struct.pack('>4i', 2051, count, side, side) + pixels.tobytes())
        (raw / f'{prefix}-labels-idx1-ubyte').write_bytes(struct.pack('>2i', 2049, count) + bytes(range(count)))


def test_missing_folder_and_missing_split_are_named_errors(tmp_path: Path) -> None:
    """A missing root was "ValueError: dataset 'folder': " with no more; a root with train/ only
    gave the validation split the root itself, i.e. the training images."""
    with pytest.raises(FileNotFoundError, match=f"dataset folder '{tmp_path / 'nosuch'}' does not exist"):
        create_image_dataset('folder', str(tmp_path / 'nosuch'), 'train')
    _save_images(tmp_path / 'train' / 'cat', [np.zeros((4, 4, 3), np.uint8)])
    assert len(create_image_dataset('folder', str(tmp_path), 'train')) == 1
    with pytest.raises(FileNotFoundError, match=r'has train/ but no validation split \(val/'):
        create_image_dataset('folder', str(tmp_path), 'validation')


def test_recorded_class_names_label_a_folder_as_the_model_was_trained(tmp_path: Path) -> None:
    """A validation-only root without one class: timm numbered its own folders, so 'dog' became 0."""
    _save_images(tmp_path / 'val' / 'dog', [np.zeros((4, 4, 3), np.uint8)])
    dataset = create_image_dataset('folder', str(tmp_path), 'validation', class_names=['cat', 'dog'])
    assert dataset[0][1] == 1 and dataset_class_names(dataset) == ['cat', 'dog']
    assert dataset_class_names(create_image_dataset('folder', str(tmp_path), 'validation')) == ['dog']
    _save_images(tmp_path / 'val' / 'emu', [np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(DatasetError, match=r"classes the model was not trained on: emu \(its checkpoint records 2"):
        create_image_dataset('folder', str(tmp_path), 'validation', class_names=['cat', 'dog'])


def test_a_root_without_split_folders_is_told_apart(tmp_path: Path) -> None:
    """A root of class folders is both splits (timm reads it for each): train.py warns that its
    validation then scores the training images."""
    _save_images(tmp_path / 'flat' / 'cat', [np.zeros((4, 4, 3), np.uint8)])
    _save_images(tmp_path / 'split' / 'train' / 'cat', [np.zeros((4, 4, 3), np.uint8)])
    _save_images(tmp_path / 'split' / 'val' / 'cat', [np.zeros((4, 4, 3), np.uint8)])
    assert splits_share_images('folder', str(tmp_path / 'flat'))
    assert len(create_image_dataset('folder', str(tmp_path / 'flat'), 'validation')) == 1
    assert not splits_share_images('folder', str(tmp_path / 'split'))
    assert not splits_share_images('digits', '')


@pytest.mark.parametrize('is_training, crop_padding', [(True, 0), (True, 4), (False, 0)])
def test_images_take_the_model_channel_count(tmp_path: Path, is_training: bool, crop_padding: int) -> None:
    """RGB files for an in_chans=1 model, and MNIST's greyscale images for an RGB one: the items had
    the files' channel count (3, or a Normalize broadcast error)."""
    _save_images(tmp_path / 'folder' / 'train' / 'cat', [np.full((10, 10, 3), 200, np.uint8)])
    _save_images(tmp_path / 'folder' / 'val' / 'cat', [np.full((10, 10, 3), 200, np.uint8)])
    _write_fake_mnist(tmp_path / 'mnist')
    split = 'train' if is_training else 'validation'
    for name, root, input_size in (('folder', 'folder', (1, 8, 8)), ('torch/mnist', 'mnist', (3, 8, 8))):
        dataset = create_image_dataset(name, str(tmp_path / root), split)
        set_image_transform(dataset, _input_config(input_size), is_training, crop_padding=crop_padding, hflip=0.5)
        assert dataset[0][0].shape == input_size, name
    with pytest.raises(ValueError, match='1- or 3-channel images, not the 4 channels of the model input'):
        set_image_transform(dataset, _input_config((4, 8, 8)), is_training)
    with pytest.raises(DatasetError):  # one of the errors the scripts report in one line
        set_image_transform(dataset, _input_config((4, 8, 8)), is_training)


@pytest.mark.parametrize('args', [{}, dict(in_chans=1, img_size=16)])
def test_input_config_statistics_follow_the_model_channels(args: Dict[str, Any]) -> None:
    """With in_chans among the arguments (train.py and validate.py pass theirs) timm's config already
    had one channel, so its 3-channel mean and std were kept: the digits came out with 3 channels."""
    with torch.device('meta'):
        model = timm.create_model('resnet18_cifar', in_chans=1)
    config = resolve_input_config(model, args)
    assert config['input_size'][0] == len(config['mean']) == len(config['std']) == 1
    assert config['mean'][0] == pytest.approx(sum(model.pretrained_cfg['mean']) / 3)


def test_input_config_takes_one_or_a_channel_count_of_statistics() -> None:
    """Another count of --mean/--std values ended the scripts with timm's bare AssertionError; the count
    is the model's channels (a 1-channel model asserted against timm's default of 3)."""
    with torch.device('meta'):
        grey, colour = (timm.create_model('resnet18_cifar', in_chans=c) for c in (1, 3))
    assert resolve_input_config(grey, dict(mean=(0.5,), std=(0.25,)))['mean'] == (0.5,)
    assert resolve_input_config(colour, dict(mean=(0.5,)))['mean'] == (0.5,) * 3
    assert resolve_input_config(colour, dict(std=(0.1, 0.2, 0.3)))['std'] == (0.1, 0.2, 0.3)
    with pytest.raises(DatasetError, match=r'--mean takes 1 or 3 values \(the model input has 3 channel\(s\)\), got 2'):
        resolve_input_config(colour, dict(mean=(0.5, 0.5)))
    with pytest.raises(DatasetError, match=r'--std takes 1 value \(the model input has 1 channel\(s\)\), got 3'):
        resolve_input_config(grey, dict(std=(0.2, 0.2, 0.2)))


def test_cifar_crop_augmentation_works_at_any_image_size(tmp_path: Path) -> None:
    """The padded random crop (the CIFAR recipe) cut an input-sized window out of the image as it
    was: a 16x16 window of a 64x64 image, and an error for a 4x4 one. The image is now resized to
    the input first, as the eval transform does, so every crop shows both halves of it."""
    def halves(side: int) -> np.ndarray:
        pixels = np.zeros((side, side, 3), np.uint8)
        pixels[:, side // 2:] = 255
        return pixels

    _save_images(tmp_path / 'train' / 'halves', [halves(64), halves(4)])
    dataset = create_image_dataset('folder', str(tmp_path), 'train')
    set_image_transform(dataset, dict(_input_config((3, 16, 16)), interpolation='random'), is_training=True,
                        crop_padding=2, hflip=0.0)
    torch.manual_seed(0)
    for _ in range(4):
        for index in range(len(dataset)):
            image = dataset[index][0]
            assert image.shape == (3, 16, 16)
            # Black left, white right, in the pixels that the crop (shifted by up to 2 each way, the
            # padding black) and the blur of the resize leave to each half.
            assert (image[:, 2:14, :4] == -1).all() and (image[:, 2:14, 12:14] == 1).all(), index


def test_unreadable_training_images_are_replaced_by_the_next_one(tmp_path: Path) -> None:
    """Training keeps timm's replacement of an unreadable image by the next readable one (batches keep
    their size, the order is a function of the index), naming each file; too many in a row is an error."""
    _save_images(tmp_path / 'train' / 'cat', [np.full((4, 4, 3), value, np.uint8) for value in (0, 100)])
    for name in ('0a.png', '0b.png'):  # sort between 0.png and 1.png
        (tmp_path / 'train' / 'cat' / name).write_bytes(b'not an image')
    dataset = create_image_dataset('folder', str(tmp_path), 'train')
    set_image_transform(dataset, _input_config((3, 4, 4)), is_training=False)
    assert [dataset.filename(i) for i in range(4)] == ['cat/0.png', 'cat/0a.png', 'cat/0b.png', 'cat/1.png']
    assert torch.equal(SkipUnreadable(dataset, substitute=True)[1][0], dataset[3][0])
    assert SkipUnreadable(dataset)[1] is None
    with pytest.raises(RuntimeError, match='2 consecutive unreadable images from cat/0a.png on'):
        SkipUnreadable(dataset, substitute=True, max_substitutes=1)[1]


def test_a_failing_transform_is_raised_not_taken_for_an_unreadable_image(tmp_path: Path) -> None:
    """A transform's ValueError (a random-resized crop with a negative ratio: 'math domain error')
    was caught as an unreadable file: every image replaced, then '37 consecutive unreadable images'."""
    _save_images(tmp_path / 'train' / 'cat', [np.full((4, 4, 3), value, np.uint8) for value in (0, 100)])
    dataset = create_image_dataset('folder', str(tmp_path), 'train')

    def failing(image):
        raise ValueError('math domain error')

    dataset.transform = failing
    for readable in (SkipUnreadable(dataset, substitute=True), SkipUnreadable(dataset)):
        with pytest.raises(ValueError, match='math domain error'):
            readable[0]


def test_sixteen_bit_greyscale_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG (medical and scientific images) went through PIL's conversion to RGB,
    which clips at 255: every pixel above 255 of 65535 came out white. It is now scaled to 8 bits."""
    ramp = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    _save_images(tmp_path / 'train' / 'scan', [ramp])
    _save_images(tmp_path / 'val' / 'scan', [np.full((4, 4, 3), 255, np.uint8)])  # an 8-bit RGB file beside it
    expected = torch.from_numpy(np.rint(ramp / 257.0)).float() / 255  # the 8-bit value of each pixel
    for split, input_size in (('train', (3, 4, 4)), ('train', (1, 4, 4)), ('validation', (1, 4, 4))):
        dataset = create_image_dataset('folder', str(tmp_path), split)
        config = dict(_input_config(input_size), mean=(0.0,) * input_size[0], std=(1.0,) * input_size[0])
        set_image_transform(dataset, config, is_training=False)
        image = dataset[0][0]
        assert image.shape == input_size
        if split == 'train':
            assert torch.allclose(image, expected.expand(input_size), atol=1.5 / 255), split
        else:
            assert torch.equal(image, torch.ones(input_size))


def test_images_that_fail_to_decode_are_replaced_too(tmp_path: Path) -> None:
    """A truncated file opens (its header is whole) and fails when its pixels are decoded, which now
    happens in the transform: it is still replaced by the next image, as one that does not open is."""
    _save_images(tmp_path / 'train' / 'cat', [np.full((64, 64, 3), value, np.uint8) for value in (0, 100)])
    whole = (tmp_path / 'train' / 'cat' / '0.png').read_bytes()
    (tmp_path / 'train' / 'cat' / '0.png').write_bytes(whole[:len(whole) // 2])
    dataset = create_image_dataset('folder', str(tmp_path), 'train')
    set_image_transform(dataset, _input_config((3, 8, 8)), is_training=False)
    with pytest.raises(OSError):
        dataset[0]
    assert torch.equal(SkipUnreadable(dataset, substitute=True)[0][0], dataset[1][0])
    assert SkipUnreadable(dataset)[0] is None


@pytest.mark.parametrize('name, where', [
    ('torch/cifar10', 'cifar-10-batches-py/ there ({root}/cifar-10-batches-py, extracted from cifar-10-python.tar.gz)'),
    ('torch/cifar100', 'cifar-100-python/ there ({root}/cifar-100-python, extracted from cifar-100-python.tar.gz)'),
    ('torch/mnist', 'place the unzipped idx files of MNIST in {root}/MNIST/raw/ (train-images-idx3-ubyte, '),
], ids=['cifar10', 'cifar100', 'mnist'])
def test_a_missing_local_copy_names_where_it_goes(tmp_path: Path, name: str, where: str) -> None:
    """Every torchvision dataset was told to put its files in cifar-10-batches-py; an incomplete copy
    (torchvision: "not found or corrupted") gets the same message."""
    with pytest.raises(FileNotFoundError) as error:
        create_image_dataset(name, str(tmp_path), 'train')
    assert 'nothing is downloaded' in str(error.value) and where.format(root=tmp_path) in str(error.value)
    (tmp_path / 'cifar-10-batches-py').mkdir()
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_1').write_bytes(b'truncated')
    with pytest.raises(FileNotFoundError, match=r'not found \(or incomplete\)'):
        create_image_dataset('torch/cifar10', str(tmp_path), 'validation')


def test_validation_labels_are_the_training_split_classes(tmp_path: Path) -> None:
    """timm numbered each split's class folders on its own: a validation split without 'b' gave
    'c' the label 1, which the model had learnt as 'b'. A validation class without training
    images is an error (the model has no output for it)."""
    pixels = [np.zeros((4, 4, 3), np.uint8)]
    for name in ('a', 'b', 'c'):
        _save_images(tmp_path / 'train' / name, pixels)
    for name in ('a', 'c'):
        _save_images(tmp_path / 'val' / name, pixels)
    train, val = (create_image_dataset('folder', str(tmp_path), split) for split in ('train', 'validation'))
    assert [val.filename(i) for i in range(len(val))] == ['a/0.png', 'c/0.png']
    assert [target for _, target in val.reader.samples] == [0, 2]
    assert val.reader.class_to_idx == train.reader.class_to_idx and dataset_num_classes(val) == 3
    _save_images(tmp_path / 'val' / 'd', pixels)
    with pytest.raises(DatasetError, match=r'validation classes without training images in .*train: d \('):
        create_image_dataset('folder', str(tmp_path), 'validation')


def test_arguments_that_leave_nothing_are_errors() -> None:
    """Each was accepted: an empty dataset (limit), a shard of another process count, or
    scikit-learn's errors about a 'test_size' that DigitsDataset does not have."""
    with pytest.raises(ValueError, match='limit must be at least 1, not 0'):
        create_image_dataset('digits', limit=0)
    with pytest.raises(ValueError, match=r'rank 2 is not one of the 2 processes \(0 to 1\)'):
        ShardSampler(list(range(10)), num_replicas=2, rank=2)
    assert [list(ShardSampler(list(range(5)), 2, rank)) for rank in (0, 1)] == [[0, 2, 4], [1, 3]]
    for fraction in (0, 1.0):
        with pytest.raises(ValueError, match=f'val_fraction must be in \\(0, 1\\): {fraction} leaves one split empty'):
            DigitsDataset(val_fraction=fraction)
    with pytest.raises(ValueError, match='val_fraction 0.001: each split needs an image of every digit'):
        DigitsDataset(val_fraction=0.001)


def test_normalisation_must_fit_the_input_channels() -> None:
    """3-channel statistics for a 1-channel input gave digits of 3 channels."""
    dataset = create_image_dataset('digits')
    with pytest.raises(DatasetError, match=r'mean \(0.5, 0.5, 0.5\) does not fit the 1 channels of input size'):
        set_image_transform(dataset, dict(_input_config((1, 8, 8)), mean=(0.5,) * 3), is_training=False)
    set_image_transform(dataset, dict(_input_config((3, 8, 8)), mean=(0.5,), std=(0.5,)), is_training=False)
    assert dataset[0][0].shape == (3, 8, 8)
