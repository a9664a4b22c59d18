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

from deconv_zoo.data import DatasetError, SkipUnreadable, create_image_dataset, resolve_input_config, set_image_transform


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
