"""Datasets: the embedded scikit-learn digits set plus everything ``timm.data.create_dataset`` opens.

``--dataset digits`` gives scikit-learn's bundled 8x8 handwritten digits (1797 real images, 10 classes, no download)
as upsampled RGB PIL images with a fixed, seeded, stratified train/val split. Any other name is handed to timm:
ImageFolder paths (empty name + ``data_dir``), ``wds/``, ``hfds/``, ``tfds/`` and ``torch/`` prefixes.
"""
import io
import logging
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import create_dataset as timm_create_dataset
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

DIGITS_NAME = 'digits'
DIGITS_SPLIT_SEED = 0  # fixed: the split never depends on a run's --seed
DIGITS_VAL_FRACTION = 0.2
DIGITS_DEFAULT_SIZE = 32
DIGITS_CLASSES = tuple(str(i) for i in range(10))


def is_digits(name: Optional[str]) -> bool:
    """True for the embedded dataset's name (``digits``, case-insensitive)."""
    return bool(name) and name.lower() == DIGITS_NAME


def _train_split(split: str) -> bool:
    s = split.lower()
    if s in ('train', 'training'):
        return True
    if s in ('val', 'validation', 'test', 'eval'):
        return False
    raise ValueError(f'digits: unknown split {split!r} (use train or val)')


def digits_split_indices(seed: int = DIGITS_SPLIT_SEED, val_fraction: float = DIGITS_VAL_FRACTION
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified split of the 1797 digits: per class, a seeded permutation puts ``val_fraction`` into val."""
    labels = load_digits().target
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as RGB PIL images of ``img_size`` pixels.

    Args:
        split: ``train`` (80%) or ``val`` (20%), stratified, fixed by ``DIGITS_SPLIT_SEED``.
        img_size: side of the upsampled square image (bicubic from 8x8).
        transform: applied to the PIL image (timm's loaders set this attribute).
        target_transform: applied to the integer label.
    """

    def __init__(
            self,
            split: str = 'train',
            img_size: int = DIGITS_DEFAULT_SIZE,
            transform: Optional[Any] = None,
            target_transform: Optional[Any] = None,
    ):
        if img_size < 8:
            raise ValueError(f'digits: img_size must be >= 8, got {img_size}')
        data = load_digits()
        train_idx, val_idx = digits_split_indices()
        self.split = 'train' if _train_split(split) else 'val'
        self.indices = train_idx if self.split == 'train' else val_idx
        pixels = np.clip(np.round(data.images[self.indices] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.images = [self._upsample(p, img_size) for p in pixels]
        self.targets: List[int] = [int(t) for t in data.target[self.indices]]
        self.classes = list(DIGITS_CLASSES)
        self.img_size = img_size
        self.transform = transform
        self.target_transform = target_transform

    @staticmethod
    def _upsample(pixels: np.ndarray, size: int) -> np.ndarray:
        img = Image.fromarray(pixels, mode='L').resize((size, size), Image.BICUBIC).convert('RGB')
        return np.asarray(img)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        """The untransformed RGB image."""
        return Image.fromarray(self.images[index])

    def image_bytes(self, index: int) -> bytes:
        """The image encoded losslessly as PNG (what reinforce.py stores as the original image)."""
        buf = io.BytesIO()
        self.image(index).save(buf, format='PNG', optimize=False)
        return buf.getvalue()

    def key(self, index: int) -> str:
        """Stable sample key: split and index into scikit-learn's array."""
        return f'digits_{self.split}_{int(self.indices[index]):05d}'

    def __getitem__(self, index: int):
        img = self.image(index)
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        is_training: bool = False,
        digits_size: int = DIGITS_DEFAULT_SIZE,
        **kwargs,
) -> Dataset:
    """Create a dataset: ``digits`` is built in, anything else goes through ``timm.data.create_dataset``.

    Args:
        name: ``digits``, a timm prefix name (``wds/``, ``hfds/``, ``tfds/``, ``torch/``) or '' for a folder.
        root: data root (ImageFolder path, shard dir, ...); unused for digits.
        split: split name (``train``/``validation``/...).
        is_training: passed to timm (shuffling of iterable datasets).
        digits_size: image side for digits.
        **kwargs: forwarded to ``timm.data.create_dataset`` (``batch_size``, ``seed``, ``class_map``, ...).
    """
    if is_digits(name):
        return DigitsDataset(split=split, img_size=digits_size)
    if not name and not root:
        raise ValueError('No dataset given: pass --dataset digits, a timm dataset prefix, or a data_dir folder')
    kwargs.setdefault('download', False)
    return timm_create_dataset(name, root=root, split=split, is_training=is_training, **kwargs)


def dataset_targets(dataset: Dataset) -> List[int]:
    """Integer labels of a map-style dataset without decoding images (needed by the class-aware sampler).

    Raises:
        TypeError: for datasets whose labels cannot be listed up front (iterable/streaming datasets).
    """
    targets = getattr(dataset, 'targets', None)
    if targets is not None:
        return [int(t) for t in targets]
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    for attr in ('dataset', 'parser'):
        inner = getattr(dataset, attr, None)
        if inner is not None and hasattr(inner, 'targets'):
            return [int(t) for t in inner.targets]
    raise TypeError(
        f'Cannot list the labels of dataset type {type(dataset).__name__}: the class-aware sampler needs a map-style '
        f'dataset with known labels (digits, an ImageFolder or a torch/ dataset).')


def dataset_classes(dataset: Dataset) -> Optional[Sequence[str]]:
    """Class names when the dataset knows them."""
    classes = getattr(dataset, 'classes', None)
    if classes is not None:
        return list(classes)
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if class_to_idx:
        return [k for k, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    return None
