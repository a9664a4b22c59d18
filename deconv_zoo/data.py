"""Datasets and loaders for training and validation.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, read from the
  installed package, no network), a fixed stratified train/validation split, resized to the
  model's input. The embedded default for the scripts and for tests that must learn something.
- ImageNet-layout folders and local CIFAR / MNIST copies through ``timm.data.create_dataset``
  (never downloading).
- ``synthetic``: random tensors, for speed and smoke tests only.

Loaders are built here rather than with ``timm.data.create_loader``: that function creates its
own unseeded sampler, while exact resumption needs a data order fixed by (seed, epoch) that can
start mid-epoch (``ResumableSampler``) and augmentation randomness fixed per sample
(``PerSampleSeed``). The transforms are timm's own (``timm.data.create_transform``).
"""
import functools
import logging
import os
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, default_collate

__all__ = [
    'DIGITS', 'SYNTHETIC', 'SPLITS', 'DigitsDataset', 'SyntheticDataset', 'check_dataset', 'create_image_dataset',
    'dataset_num_classes', 'dataset_class_names', 'resolve_input_config', 'ResumableSampler', 'ShardSampler',
    'PerSampleSeed',
    'SkipUnreadable', 'collate_readable', 'create_data_loader', 'set_image_transform', 'splits_share_images',
    'fixed_interpolation', 'DatasetError', 'DatasetNotFoundError',
]

_logger = logging.getLogger(__name__)

DIGITS = 'digits'
SYNTHETIC = 'synthetic'
FOLDER_NAMES = ('', 'folder')  # an ImageNet-layout folder (timm reads any other unprefixed name as one too)
TIMM_DATASET_PREFIXES = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')
STREAMING_DATASET_PREFIXES = ('hfids/', 'tfds/', 'wds/')  # timm's iterable readers: no indexing, no sampler


class DatasetError(ValueError):
    """A dataset that cannot be used as asked: unknown, streaming, without the local copy it needs,
    or without images of the model's channel count."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's folder, split or files are not where the arguments say."""
_TRAIN_SPLITS = ('train', 'training')
_VAL_SPLITS = ('val', 'validation', 'test')
SPLITS = _TRAIN_SPLITS + _VAL_SPLITS  # every name a split argument takes


def _is_train_split(split: str) -> bool:
    if split in _TRAIN_SPLITS:
        return True
    if split in _VAL_SPLITS:
        return False
    raise ValueError(f'unknown split {split!r}: use one of {SPLITS}')


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits with a deterministic stratified split.

    Pixel values 0..16 are scaled to [0, 1] and repeated to ``input_size[0]`` channels. Without
    a ``transform`` the items are tensors resized to ``input_size`` (bilinear, antialiased) and
    normalised with ``mean``/``std`` when given (``configure`` changes these); with one (e.g.
    timm's ``create_transform``) the items are 8x8 PIL images passed through it.
    """
    num_classes = 10

    def __init__(
            self,
            split: str = 'train',
            input_size: Sequence[int] = (3, 32, 32),
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            transform: Optional[Callable] = None,
            val_fraction: float = 0.2,
            split_seed: int = 0,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not 0 < val_fraction < 1:
            raise ValueError(f'val_fraction must be in (0, 1): {val_fraction} leaves one split empty')
        digits = load_digits()
        indices = np.arange(len(digits.target))
        try:
            train_idx, val_idx = train_test_split(
                indices, test_size=val_fraction, stratify=digits.target, random_state=split_seed)
        except ValueError as error:  # "The test_size = 2 should be greater or equal to the number of classes = 10"
            raise ValueError(
                f'val_fraction {val_fraction}: each split needs an image of every digit ({error})') from None
        chosen = train_idx if _is_train_split(split) else val_idx
        self.split = split
        self.images = torch.from_numpy(digits.images[chosen] / 16.0).float()  # (N, 8, 8) in [0, 1]
        self.targets = torch.from_numpy(digits.target[chosen]).long()
        self.transform = transform
        self.configure(input_size, mean, std)

    def configure(self, input_size: Sequence[int], mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None) -> None:
        """Resize (and normalise) the tensor items for a model's input."""
        self.input_size = tuple(input_size)
        chans, height, width = self.input_size
        x = F.interpolate(self.images[:, None], size=(height, width), mode='bilinear',
                          align_corners=False, antialias=True).clamp_(0, 1)
        x = x.expand(-1, chans, -1, -1)
        if mean is not None:
            x = x - torch.tensor(mean).view(1, -1, 1, 1)
        if std is not None:
            x = x / torch.tensor(std).view(1, -1, 1, 1)
        self._tensors = x.contiguous()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        target = int(self.targets[index])
        if self.transform is None:
            return self._tensors[index], target
        pixels = (self.images[index] * 255).round().to(torch.uint8).numpy()
        mode = 'L' if self.input_size[0] == 1 else 'RGB'
        return self.transform(Image.fromarray(pixels, 'L').convert(mode)), target


class SyntheticDataset(Dataset):
    """Random normal images with random labels, reproducible per index (speed/smoke tests only)."""

    def __init__(self, num_samples: int, num_classes: int, input_size: Sequence[int] = (3, 224, 224), seed: int = 0):
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(self.input_size, generator=generator)
        return image, int(torch.randint(self.num_classes, (), generator=generator))


def check_dataset(name: str, root: Optional[str] = None) -> None:
    """Raise DatasetError (a ValueError) unless ``create_image_dataset`` knows ``name`` and has the ``root`` it needs.

    Unprefixed names other than 'folder' are refused: timm would take a misspelt 'digits' as an
    image folder.
    """
    if name in (DIGITS, SYNTHETIC):
        if root:  # the default dataset: a --data-dir alone trained on digits without a word
            raise DatasetError(f"dataset {name!r} is built in and reads no --data-dir ({root}): for an image folder "
                               f"add --dataset folder, for a local CIFAR copy --dataset torch/cifar10")
        return
    if name not in FOLDER_NAMES and not name.lower().startswith(TIMM_DATASET_PREFIXES):
        raise DatasetError(
            f"unknown dataset {name!r}: use {DIGITS!r}, {SYNTHETIC!r}, 'folder' (ImageNet layout in --data-dir) or "
            f"a timm dataset name starting with {', '.join(TIMM_DATASET_PREFIXES)} (e.g. torch/cifar10)")
    if name.lower().startswith(STREAMING_DATASET_PREFIXES):
        raise DatasetError(
            f'dataset {name!r} is a streaming (iterable) dataset: the seeded, resumable and sharded samplers of '
            f'train.py and validate.py need indexable ones (folder, torch/ or hfds/)')
    if not root:
        raise DatasetError(f'dataset {name!r} needs --data-dir (a local copy; nothing is downloaded)')


def create_image_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        limit: Optional[int] = None,
        num_classes: Optional[int] = None,
        synthetic_size: int = 512,
        seed: int = 0,
        class_names: Optional[Sequence[str]] = None,
) -> Dataset:
    """The dataset called ``name`` for ``split`` ('train' or 'validation'), without transforms.

    ``name``: 'digits', 'synthetic' (``num_classes`` classes, default 10), '' or 'folder'
    (ImageNet layout under ``root``: train/, val/), or any timm dataset name such as
    'torch/cifar10' read from a local copy in ``root``. Prepare it for a model with
    ``set_image_transform``. ``limit`` keeps the first ``limit`` samples (smoke tests).
    Other names raise DatasetError (``check_dataset``). ``class_names``: the labels of a model
    trained on an image folder (``dataset_class_names`` of its training set, recorded in its
    checkpoints), which then label an image folder's split too.
    """
    check_dataset(name, root)
    if limit is not None and limit < 1:  # Subset(range(0 or less)) would be an empty dataset
        raise ValueError(f'limit must be at least 1, not {limit}')
    if name == DIGITS:
        dataset = DigitsDataset(split)
    elif name == SYNTHETIC:
        training = _is_train_split(split)
        dataset = SyntheticDataset(synthetic_size if training else max(synthetic_size // 4, 1), num_classes or 10,
                                   seed=seed + (0 if training else 1))
    else:
        dataset = _timm_dataset(name, root, split, class_names)
    if limit is not None and limit < len(dataset):
        subset = Subset(dataset, range(limit))
        subset.num_classes = dataset_num_classes(dataset)
        dataset = subset
    return dataset


def _timm_dataset(name: str, root: str, split: str, class_names: Optional[Sequence[str]] = None) -> Dataset:
    from timm.data import create_dataset

    is_training = _is_train_split(split)
    options = {}
    if name in FOLDER_NAMES:
        _check_image_folder(root, is_training)
        if class_names:
            options['class_map'] = _recorded_class_map(root, is_training, class_names)
        elif not is_training:
            options['class_map'] = _training_class_map(root)
        # The files stay in their own mode until set_image_transform's conversion, which reads
        # 16-bit greyscale correctly; timm's conversion to RGB here would clip it at 255 first.
        options['input_img_mode'] = None
    try:
        # download=False always: the project never fetches data sets.
        return create_dataset(name, root=root, split='train' if is_training else 'validation',
                              is_training=is_training, download=False, **options)
    except RuntimeError as error:
        if 'download=True' in str(error):  # torchvision: "Dataset not found or corrupted. You can use download=True"
            raise DatasetNotFoundError(
                f'dataset {name!r} not found (or incomplete) under {root!r}; nothing is downloaded: '
                f'{_local_copy_hint(name, root)}') from None
        if 'Found 0 images' in str(error):  # timm's folder reader: a split without images
            raise DatasetNotFoundError(f'dataset {name!r}: {error}') from None
        raise
    except AssertionError as error:  # timm asserts on names it does not know ("Unknown torchvision dataset x")
        raise DatasetError(f'dataset {name!r}: {error}') from None


def _local_copy_hint(name: str, root: str) -> str:
    """Where torchvision looks for the local copy of a ``torch/`` dataset under ``root``."""
    from timm.data.dataset_factory import _TORCH_BASIC_DS

    ds_class = _TORCH_BASIC_DS.get(name.lower().split('/', 1)[-1])
    if ds_class is None:
        return "place a local copy there in torchvision's layout for that dataset"
    if hasattr(ds_class, 'base_folder'):  # CIFAR-10 / -100: the extracted python archive
        folder = ds_class.base_folder
        return f'place {folder}/ there ({root}/{folder}, extracted from {ds_class.filename})'
    raw = os.path.join(root, ds_class.__name__, 'raw')  # MNIST and its variants: the unzipped idx files
    files = ', '.join(os.path.splitext(file)[0] for file, _ in ds_class.resources)
    return f'place the unzipped idx files of {ds_class.__name__} in {raw}/ ({files})'


def _folder_classes(folder: str) -> Set[str]:
    """The class names timm's folder reader gives the images under ``folder`` (leaf folder names)."""
    from timm.data import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    classes = set()
    for path, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            classes.add(os.path.basename(os.path.relpath(path, folder)) if path != folder else '')
    return classes


def _training_class_map(root: str) -> Optional[Dict[str, int]]:
    """The training split's class indices for the validation split of an image folder, when the two
    splits hold other classes; None when they hold the same (timm indexes both alike).

    timm numbers each split's classes on its own, so a validation folder without one of the
    training classes had every later class shifted by one: labels the model never learnt.
    Validation classes without training images are a DatasetError (the model has no output for them).
    """
    from timm.utils.misc import natural_key

    train_folder, val_folder = _split_folders(root)
    if root in (train_folder, val_folder):  # a single split (checked by _check_image_folder)
        return None
    train_classes, val_classes = _folder_classes(train_folder), _folder_classes(val_folder)
    if not train_classes or val_classes == train_classes:
        return None
    unknown = sorted(val_classes - train_classes, key=natural_key)
    if unknown:
        raise DatasetError(
            f'dataset folder {root!r}: validation classes without training images in {train_folder}: '
            f'{", ".join(unknown[:5])}{", ..." if len(unknown) > 5 else ""} (the two splits must share class folders)')
    return {name: index for index, name in enumerate(sorted(train_classes, key=natural_key))}


def _recorded_class_map(root: str, is_training: bool, class_names: Sequence[str]) -> Dict[str, int]:
    """The labels a model was trained with, for a split of an image folder (timm would number the
    split's own folders: a validation-only root without one class shifted every later label)."""
    from timm.utils.misc import natural_key

    folder = _split_folders(root)[0 if is_training else 1]
    unknown = sorted(_folder_classes(folder) - set(class_names), key=natural_key)
    if unknown:
        raise DatasetError(
            f'dataset folder {folder!r}: classes the model was not trained on: {", ".join(unknown[:5])}'
            f'{", ..." if len(unknown) > 5 else ""} (its checkpoint records {len(class_names)}: '
            f'{", ".join(class_names[:5])}{", ..." if len(class_names) > 5 else ""})')
    return {class_name: index for index, class_name in enumerate(class_names)}


def dataset_class_names(dataset: Dataset) -> Optional[List[str]]:
    """An image-folder dataset's class names in label order (timm's folder reader holds them);
    None for other datasets, whose labels are fixed by the dataset itself."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if not class_to_idx:
        return None
    return [class_name for class_name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]


def splits_share_images(name: str, root: str) -> bool:
    """Whether the training and validation splits of a folder dataset are the same images: a root
    with class folders and neither train/ nor val/, which timm reads for both splits (validation
    accuracy is then training accuracy)."""
    return name in FOLDER_NAMES and os.path.isdir(root) and _split_folders(root) == (root, root)


def _split_folders(root: str) -> Tuple[str, str]:
    """The folders timm reads for the training and validation splits of an image folder ``root``
    (``root`` itself where it has no such split folder, or is not a folder)."""
    from timm.data.dataset_factory import _search_split

    return _search_split(root, 'train'), _search_split(root, 'validation')


def _check_image_folder(root: str, is_training: bool) -> None:
    """Raise DatasetNotFoundError (a FileNotFoundError) for a missing root, or one holding the other
    split's folder only: timm then reads the root itself, so validation would run on the training
    images (or the reverse)."""
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM

    if not os.path.exists(root):
        raise DatasetNotFoundError(f'dataset folder {root!r} does not exist')
    if not os.path.isdir(root):  # a .tar of images
        return
    wanted, other = (_TRAIN_SYNONYM, _EVAL_SYNONYM) if is_training else (_EVAL_SYNONYM, _TRAIN_SYNONYM)
    others = [s for s in other if os.path.isdir(os.path.join(root, s))]
    if others and not any(os.path.isdir(os.path.join(root, s)) for s in wanted):
        raise DatasetNotFoundError(
            f'dataset folder {root!r} has {others[0]}/ but no {"training" if is_training else "validation"} split '
            f'({"/, ".join(wanted)}/): the ImageNet layout is {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg')


def dataset_num_classes(dataset: Dataset) -> Optional[int]:
    """Number of classes a dataset declares (digits, synthetic, timm ImageDataset, torchvision)."""
    if hasattr(dataset, 'num_classes'):
        return dataset.num_classes
    for source in (getattr(dataset, 'reader', None), dataset):
        class_to_idx = getattr(source, 'class_to_idx', None)
        if class_to_idx:
            return len(class_to_idx)
    return None


def resolve_input_config(model: torch.nn.Module, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's data config for ``model``, with the channel count of the model's first layer.

    ``timm.data.resolve_data_config`` keeps the pretrained config's 3-channel input size and
    statistics for an ``in_chans=1`` model; here they follow the model (mean/std averaged).
    """
    from timm.data import resolve_data_config

    args = dict(args or {})
    # Checked here against the model's channels (timm asserts on its own count, 3 unless told).
    given = {key: args.pop(key, None) for key in ('mean', 'std')}
    config = resolve_data_config(args, model=model)
    chans = _model_in_chans(model)
    if chans is not None and config['input_size'][0] != chans:
        config['input_size'] = (chans, *config['input_size'][1:])
    chans = config['input_size'][0]
    for key, value in given.items():
        if value is None:
            # Also when the size came with the channels (``in_chans`` in ``args``): timm keeps 3-channel statistics.
            if len(config[key]) != chans:
                config[key] = (sum(config[key]) / len(config[key]),) * chans
        elif len(value) in (1, chans):
            config[key] = tuple(value) * (chans // len(value))
        else:
            counts = '1 value' if chans == 1 else f'1 or {chans} values'
            raise DatasetError(f'--{key} takes {counts} (the model input has {chans} channel(s)), '
                               f'got {len(value)}: {tuple(value)}')
    return config


def _model_in_chans(model: torch.nn.Module) -> Optional[int]:
    first_conv = getattr(model, 'pretrained_cfg', {}).get('first_conv')
    if not first_conv:
        return None
    try:
        return model.get_submodule(first_conv).in_channels
    except AttributeError:
        return None


_IMAGE_MODES = {1: 'L', 3: 'RGB'}  # PIL mode by input channels


def _convert_image(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in PIL ``mode``, with 16-bit greyscale (PNG, TIFF) scaled to 8 bits first: PIL's
    own conversion clips it at 255, which turns most such images white."""
    # A 16-bit greyscale PNG opens as 'I;16' (older Pillow: 'I', the only PNG mode of that name).
    if image.mode.startswith('I;16') or (image.mode == 'I' and image.format == 'PNG'):
        pixels = np.asarray(image, dtype=np.float32) * (255 / 65535)
        image = Image.fromarray(np.rint(pixels).astype(np.uint8), 'L')
    return image.convert(mode)


def set_image_transform(dataset: Dataset, input_config: Dict[str, Any], is_training: bool, **aug: Any) -> None:
    """Prepare a dataset from ``create_image_dataset`` for a model's ``input_config``.

    Digits are resized and normalised as tensors (no augmentation: digits are centred and not
    mirror-symmetric); synthetic data takes the input size; image datasets get timm's train or
    eval transform: ``aug`` holds ``timm.data.create_transform`` options (hflip, scale, auto_augment, re_prob, ...);
    ``crop_padding > 0`` selects the reference's CIFAR augmentation instead: random crop from the
    image (resized to the input size) padded by that many pixels, horizontal flip (``hflip``
    probability). Images are converted to the input's channel count (1 or 3) first.
    """
    from timm.data import create_transform
    from torchvision import transforms

    chans = input_config['input_size'][0]
    for key in ('mean', 'std'):
        if len(input_config[key]) not in (1, chans):  # digits came out with len(mean) channels
            raise DatasetError(f'{key} {tuple(input_config[key])} does not fit the {chans} channels of input size '
                               f'{tuple(input_config["input_size"])} (resolve_input_config adapts it to the model)')
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(base, DigitsDataset):
        base.configure(input_config['input_size'], input_config['mean'], input_config['std'])
        return
    if isinstance(base, SyntheticDataset):
        base.input_size = tuple(input_config['input_size'])
        return
    chans, *size = input_config['input_size']
    if chans not in _IMAGE_MODES:
        raise DatasetError(f'image datasets give 1- or 3-channel images, not the {chans} channels of the model input')
    # The images in the model's channel count: greyscale files (MNIST) for an RGB model, colour ones for in_chans=1.
    to_mode = functools.partial(_convert_image, mode=_IMAGE_MODES[chans])
    crop_padding = aug.pop('crop_padding', 0)
    if is_training and crop_padding > 0:
        from timm.data.transforms import str_to_interp_mode

        resize_interpolation = fixed_interpolation(input_config['interpolation'])
        base.transform = transforms.Compose([
            to_mode,
            # To the input size first (a no-op for CIFAR at 32x32), as the eval transform does: the
            # crop alone would cut an input-sized window from an image of another size.
            transforms.Resize(max(size), interpolation=str_to_interp_mode(resize_interpolation)),
            transforms.RandomCrop(size, padding=crop_padding),
            transforms.RandomHorizontalFlip(aug.get('hflip', 0.5)),
            transforms.ToTensor(),
            transforms.Normalize(input_config['mean'], input_config['std']),
        ])
        return
    config = {key: input_config[key] for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}
    if not is_training:
        config['interpolation'] = fixed_interpolation(config['interpolation'])
    transform = create_transform(**config, is_training=is_training, **(aug if is_training else {}))
    base.transform = transforms.Compose([to_mode, transform])


def fixed_interpolation(mode: str) -> str:
    """timm's 'random' (a mode drawn per image) belongs to its random-resized crop, which alone takes
    it; the other resizes (eval, the CIFAR crop's no-op one) take timm's default mode instead."""
    return 'bilinear' if mode == 'random' else mode


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order fixed by seed and epoch) that can start mid-epoch.

    ``set_epoch(epoch, skip)`` drops the first ``skip`` samples of this rank's epoch order, so a
    run resumed after k steps of batch b sees exactly the batches k, k+1, ... of the original.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


class ShardSampler(Sampler):
    """Evaluation order: rank r takes samples r, r + world, ... (no padding, so the metrics summed
    over ranks count every image exactly once)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        # As DistributedSampler: a shard would be empty or repeat another's.
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not one of the {num_replicas} processes (0 to {num_replicas - 1})')
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PerSampleSeed(Dataset):
    """Draw each sample's augmentation from RNGs seeded by (seed, epoch, index).

    With worker processes, a sample's random crop would otherwise depend on which worker loaded
    it and how many samples that worker had drawn before, which changes when a run resumes
    mid-epoch. The global RNG states are restored afterwards, so the training loop's own random
    stream (dropout, mixup) is unaffected when loading happens in the main process.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == 'dataset':  # not yet set (unpickling): avoid recursing through __getattr__
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


# What PIL and the image readers raise for truncated, corrupt or unreadable files.
_UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class SkipUnreadable(Dataset):
    """Return None (and log the file) for an image that cannot be read, instead of raising.

    Pair with ``collate_readable``, which drops those samples from the batch. timm's
    ``ImageDataset`` would instead return the next readable image in place of a broken one (so
    that image counts twice); it is limited to one attempt here and its failure caught.

    ``substitute=True`` (training) keeps timm's replacement by the next readable image, up to
    ``max_substitutes`` in a row, naming each file it replaces: batches keep their size (mixup,
    drop_last and the per-process steps of distributed training need that), and the replacement
    depends on the index alone, so the data order and an exact resume are unchanged.
    """

    def __init__(self, dataset: Dataset, substitute: bool = False, max_substitutes: int = 50):
        self.dataset = dataset
        self.substitute = substitute
        self.max_substitutes = max_substitutes
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        if hasattr(base, '_max_retries'):
            base._max_retries = 1  # timm ImageDataset: raise "Failed to load 1 consecutive samples"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Optional[Any]:
        attempts = min(self.max_substitutes + 1, len(self)) if self.substitute else 1
        for attempt in range(attempts):
            current = (index + attempt) % len(self)
            try:
                return self.dataset[current]
            except (RuntimeError, *_UNREADABLE) as error:
                if isinstance(error, RuntimeError) and 'consecutive samples' not in str(error):
                    raise
                if self._image_decodes(current):  # the transform failed, not the file: a bad argument or a bug
                    raise
                if self.substitute:
                    _logger.warning('unreadable image %s: %s; using the next image in its place',
                                    self._describe(current), error)
                else:
                    _logger.warning('skipping unreadable image %s: %s', self._describe(current), error)
        if self.substitute:
            raise RuntimeError(f'{attempts} consecutive unreadable images from {self._describe(index)} on')
        return None

    def _base_sample(self, index: int) -> Tuple[Dataset, int]:
        if isinstance(self.dataset, Subset):
            return self.dataset.dataset, self.dataset.indices[index]
        return self.dataset, index

    def _describe(self, index: int) -> str:
        base, base_index = self._base_sample(index)
        filename = getattr(base, 'filename', None)
        return str(filename(base_index)) if callable(filename) else f'#{index}'

    def _image_decodes(self, index: int) -> bool:
        """Whether the image file of sample ``index`` reads without error: then what failed was the
        transform. Datasets without timm's reader (tensors in memory) have no file to fail."""
        base, base_index = self._base_sample(index)
        reader = getattr(base, 'reader', None)
        if reader is None:
            return True
        try:
            file, _ = reader[base_index]
        except _UNREADABLE:
            return False
        try:
            with Image.open(file) as image:
                image.load()
        except _UNREADABLE:
            return False
        finally:
            if hasattr(file, 'close'):
                file.close()
        return True


def collate_readable(batch: List[Optional[Any]]) -> Optional[Any]:
    """``default_collate`` of the readable samples; None when none of the batch was readable."""
    readable = [sample for sample in batch if sample is not None]
    return default_collate(readable) if readable else None


def create_data_loader(
        dataset: Dataset,
        batch_size: int,
        sampler: Sampler,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Optional[Callable] = None,
        drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order is the sampler's alone.

    The loader's own generator is fixed, so creating an iterator (which draws the worker base
    seed) never consumes the global torch RNG that the resumed training state depends on.
    Workers are not persistent: each epoch's workers see the dataset's current epoch.
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=collate_fn, drop_last=drop_last, generator=torch.Generator().manual_seed(0),
        persistent_workers=False)
