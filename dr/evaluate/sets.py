"""Evaluation sets: ImageNet val (+ReaL), its distribution shifts, ImageNet-C, digits and digits-C.

Every set is read from a documented folder name under a suite root (``validate.py --suite ROOT``); see
``SET_SPECS`` for the names and conventions. All ImageNet-family datasets yield ImageNet-1k class indices as targets
(timm's ``imagenet_synsets.txt`` order, i.e. sorted WordNet ids), except ObjectNet, which yields its own 113-class
index. What a set scores is described by its ``View`` objects: which logit columns are kept (ImageNet-A/-R: 200),
how ObjectNet's 113 class scores are formed from the 1000 logits, and which samples count.
"""
import csv
import hashlib
import io
import json
import logging
import os
import pkgutil
import re
import tarfile
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data import DigitsDataset
from .corruptions import (
    DIGITS_C_CORRUPTIONS,
    DIGITS_C_DEFAULT,
    DIGITS_C_VERSION,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRA,
    SEVERITIES,
    CorruptedDataset,
)

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')
IMAGENET_NUM_CLASSES = 1000
OBJECTNET_BORDER_PIXELS = 2
IMAGENET_C_PROTOCOLS = ('center-crop', 'resize')
IMAGENET_C_PROTOCOL_TEXT = {
    'center-crop': "center-cropped to the input size without resizing (the 224-px files as the ImageNet-C authors' "
                   "test.py feeds them, the protocol behind the AlexNet normalisation)",
    'resize': "through the model's eval transform (resize + center crop), as some papers do",
}
_REAL_NAME = re.compile(r'^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$')
VAL_SOLUTION_CSV = 'LOC_val_solution.csv'  # the Kaggle ImageNet release
DEVKIT = 'ILSVRC2012_devkit_t12'  # the official devkit (folder or .tar.gz)
DEVKIT_GROUND_TRUTH = 'data/ILSVRC2012_validation_ground_truth.txt'
DEVKIT_META = 'data/meta.mat'


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (the message names the path)."""


class SetNotFoundError(FileNotFoundError):
    """A requested evaluation set is not present where it was looked for."""


# --------------------------------------------------------------------------------------------------------------------
# timm's bundled ImageNet metadata

def _timm_info(name: str) -> str:
    data = pkgutil.get_data('timm.data', os.path.join('_info', name))
    if data is None:
        raise FileNotFoundError(f'timm does not bundle timm/data/_info/{name}')
    return data.decode('utf-8')


@cache
def imagenet_synsets() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (timm's ``imagenet_synsets.txt``)."""
    synsets = tuple(s.strip() for s in _timm_info('imagenet_synsets.txt').splitlines() if s.strip())
    if len(synsets) != IMAGENET_NUM_CLASSES:
        raise ValueError(f'timm imagenet_synsets.txt has {len(synsets)} entries, expected 1000')
    return synsets


@cache
def imagenet_wnid_to_index() -> Dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_synsets())}


@cache
def subset_indices(subset: str) -> Tuple[int, ...]:
    """ImageNet-1k indices of the 200 ImageNet-A (``'a'``) or ImageNet-R (``'r'``) classes, from timm's files.

    The indices are checked against timm's ``imagenet_{a,r}_synsets.txt`` and the 1k synset list.
    """
    if subset not in ('a', 'r'):
        raise ValueError(f"subset must be 'a' or 'r', got {subset!r}")
    indices = tuple(int(s) for s in _timm_info(f'imagenet_{subset}_indices.txt').split())
    synsets = tuple(s.strip() for s in _timm_info(f'imagenet_{subset}_synsets.txt').split())
    all_synsets = imagenet_synsets()
    if len(indices) != 200 or len(synsets) != 200 or any(all_synsets[i] != w for i, w in zip(indices, synsets)):
        raise ValueError(f'timm imagenet_{subset}_indices.txt and imagenet_{subset}_synsets.txt disagree')
    return indices


@cache
def real_labels() -> Tuple[Tuple[int, ...], ...]:
    """ImageNet ReaL labels (Beyer et al. 2020) from timm's bundled ``imagenet_real_labels.json``.

    Entry ``i`` holds the labels of ``ILSVRC2012_val_{i + 1:08d}.JPEG``; an empty entry means no valid label (such
    images are left out of the ReaL accuracy).
    """
    labels = json.loads(_timm_info('imagenet_real_labels.json'))
    return tuple(tuple(int(v) for v in entry) for entry in labels)


def real_labels_for_files(paths: Sequence[str]) -> Optional[List[Optional[Tuple[int, ...]]]]:
    """ReaL labels per file (``None`` for files not named ``ILSVRC2012_val_XXXXXXXX.*``), or None if no file matches."""
    table = real_labels()
    out: List[Optional[Tuple[int, ...]]] = []
    hits = 0
    for p in paths:
        m = _REAL_NAME.match(os.path.basename(p))
        if m and 0 < int(m.group(1)) <= len(table):
            out.append(table[int(m.group(1)) - 1])
            hits += 1
        else:
            out.append(None)
    return out if hits else None


# --------------------------------------------------------------------------------------------------------------------
# datasets

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def list_class_folder(folder: str) -> List[str]:
    """Image files below a class folder (recursive, sorted)."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in names if _is_image(n))
    return sorted(files)


def class_folders(root: str) -> List[str]:
    """Sub-directory names of ``root`` (hidden ones excluded), sorted as text."""
    if not os.path.isdir(root):
        raise SetNotFoundError(f'Not a directory: {root}')
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith('.'))


def numeric_class_folders(root: str) -> List[Tuple[str, int]]:
    """ImageNetV2's class folders ``0..999`` as (name, class index), ordered by number (never as text).

    Raises:
        ValueError: naming a folder that is not a class number in [0, 999].
    """
    out = []
    for name in class_folders(root):
        if not name.isdigit() or not 0 <= int(name) < IMAGENET_NUM_CLASSES:
            raise ValueError(f'ImageNetV2 folder {os.path.join(root, name)} is not a class index 0..999')
        out.append((name, int(name)))
    return sorted(out, key=lambda x: x[1])


def wnid_samples(root: str, allowed: Optional[Sequence[int]] = None) -> List[Tuple[str, int]]:
    """(path, ImageNet-1k index) for ``root/<wnid>/**/image`` folders.

    Args:
        root: folder with one sub-folder per WordNet id.
        allowed: ImageNet indices a folder may map to (ImageNet-A/-R: their 200 classes).

    Raises:
        ValueError: naming a folder that is not an ImageNet-1k wnid (or not one of the allowed classes).
    """
    to_index = imagenet_wnid_to_index()
    allowed_set = set(allowed) if allowed is not None else None
    samples = []
    for name in class_folders(root):
        idx = to_index.get(name)
        if idx is None:
            raise ValueError(f'Folder {os.path.join(root, name)} is not an ImageNet-1k class (WordNet id)')
        if allowed_set is not None and idx not in allowed_set:
            raise ValueError(f'Folder {os.path.join(root, name)} ({name}) is not one of the 200 classes of this set')
        samples.extend((p, idx) for p in list_class_folder(os.path.join(root, name)))
    return samples


def numeric_samples(root: str) -> List[Tuple[str, int]]:
    """(path, class index) for ImageNetV2's ``root/<index>/*`` layout."""
    samples = []
    for name, idx in numeric_class_folders(root):
        samples.extend((p, idx) for p in list_class_folder(os.path.join(root, name)))
    return samples


def flat_val_files(folder: str) -> List[str]:
    """``ILSVRC2012_val_XXXXXXXX.*`` files directly in ``folder`` (the official val tar extracts flat), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(e.path for e in os.scandir(folder) if e.is_file() and _REAL_NAME.match(e.name))


def imagenet_val_samples(path: str, search: Sequence[str] = ()) -> List[Tuple[str, int]]:
    """(path, ImageNet-1k index) of ImageNet val: ``<wnid>/`` folders, or flat files with official labels.

    Flat files (as extracted from ``ILSVRC2012_img_val.tar``) are labelled from ``LOC_val_solution.csv`` (Kaggle) or
    the devkit (``ILSVRC2012_devkit_t12/`` or ``.tar.gz``: ``validation_ground_truth.txt`` + ``meta.mat``), looked
    for in ``path``, its parent folders up to two levels, and ``search``.

    Raises:
        ValueError: flat files without a label file, or a file the labels do not cover (named).
    """
    files = flat_val_files(path)
    if not files or class_folders(path):
        return wnid_samples(path)
    labels = find_val_labels(path, search)
    if labels is None:
        raise ValueError(f'ImageNet val at {path} holds flat ILSVRC2012_val_*.JPEG files (the official tar layout) '
                         f'but no labels: put {VAL_SOLUTION_CSV} or {DEVKIT} (folder or .tar.gz) in {path} or a '
                         f'parent folder')
    source, by_name = labels
    samples = []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem not in by_name:
            raise ValueError(f'{source}: no label for {f}')
        samples.append((f, by_name[stem]))
    return samples


def find_val_labels(path: str, search: Sequence[str] = ()) -> Optional[Tuple[str, Dict[str, int]]]:
    """(label file, {``ILSVRC2012_val_XXXXXXXX``: ImageNet-1k index}) from the first label source found."""
    parent = os.path.dirname(os.path.abspath(path))
    folders = list(dict.fromkeys([path, parent, os.path.dirname(parent), *search]))
    for folder in folders:
        csv_path = os.path.join(folder, VAL_SOLUTION_CSV)
        if os.path.isfile(csv_path):
            return csv_path, read_val_solution_csv(csv_path)
        for name in (DEVKIT, DEVKIT + '.tar.gz'):
            devkit = os.path.join(folder, name)
            if os.path.exists(devkit):
                return devkit, read_devkit_labels(devkit)
    return None


def read_val_solution_csv(path: str) -> Dict[str, int]:
    """Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token is the wnid)."""
    to_index = imagenet_wnid_to_index()
    out = {}
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            try:
                wnid = row['PredictionString'].split()[0]
                out[row['ImageId']] = to_index[wnid]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f'{path}: bad row {row}') from None
    return out


def read_devkit_labels(devkit: str) -> Dict[str, int]:
    """Val labels from the ILSVRC2012 devkit (a folder or the ``.tar.gz``): ground-truth ILSVRC ids mapped to
    WordNet ids by ``meta.mat``, then to ImageNet-1k indices."""
    if os.path.isdir(devkit):
        with open(os.path.join(devkit, DEVKIT_GROUND_TRUTH), 'rb') as f:
            truth = f.read()
        with open(os.path.join(devkit, DEVKIT_META), 'rb') as f:
            meta = f.read()
    else:
        with tarfile.open(devkit) as tar:
            truth = _tar_member(tar, DEVKIT_GROUND_TRUTH, devkit)
            meta = _tar_member(tar, DEVKIT_META, devkit)
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)['synsets']
    id_to_wnid = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets if int(s['num_children']) == 0}
    to_index = imagenet_wnid_to_index()
    ids = [int(v) for v in truth.decode().split()]
    return {f'ILSVRC2012_val_{i + 1:08d}': to_index[id_to_wnid[v]] for i, v in enumerate(ids)}


def _tar_member(tar: tarfile.TarFile, suffix: str, name: str) -> bytes:
    for m in tar.getmembers():
        if m.isfile() and m.name.endswith(suffix):
            return tar.extractfile(m).read()
    raise ValueError(f'{name}: no {suffix} inside')


class ImageListDataset(Dataset):
    """Images from a list of (path, target); returns ``(image, target, index, ok)``.

    An unreadable image raises ``BadImageError`` naming its path, unless ``skip_bad_images``: then a black image of
    the same transformed shape is returned with ``ok=0`` and the evaluation leaves it out and counts it.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Any] = None,
                 skip_bad_images: bool = False):
        self.samples = list(samples)
        self.targets = [int(t) for _, t in self.samples]
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.samples)

    def filename(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        ok = 1
        try:
            with open(path, 'rb') as f:
                img = Image.open(f)
                img = img.convert('RGB')
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
            if not self.skip_bad_images:
                raise BadImageError(f'Unreadable image {path}: {type(e).__name__}: {e} '
                                    f'(pass --skip-bad-images to skip and count such files)') from None
            _logger.warning(f'Skipping unreadable image {path}: {e}')
            img, ok = Image.new('RGB', (64, 64)), 0
        if self.transform is not None:
            img = self.transform(img)
        return img, target, index, ok


class IndexedDataset(Dataset):
    """Wraps a map-style ``(image, target)`` dataset to return ``(image, target, index, 1)``.

    Setting ``transform`` on the wrapper sets it on the wrapped dataset.
    """

    def __init__(self, base: Dataset):
        self.base = base

    @property
    def transform(self):
        return getattr(self.base, 'transform', None)

    @transform.setter
    def transform(self, value) -> None:
        self.base.transform = value

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, target = self.base[index]
        return img, int(target), index, 1


# --------------------------------------------------------------------------------------------------------------------
# ObjectNet

def objectnet_mapping(mappings_dir: str) -> Tuple[List[str], List[List[int]]]:
    """ObjectNet folders that overlap ImageNet-1k, and the ImageNet-1k indices of each.

    Reads the dataset's own files in ``objectnet-1.0/mappings/`` (the format of the official release):

    * ``folder_to_objectnet_label.json``: ``{"<image folder>": "<ObjectNet label>"}`` (313 folders);
    * ``objectnet_to_imagenet_1k.json``: ``{"<ObjectNet label>": "<ImageNet label>; <ImageNet label>; ..."}``
      (113 labels; ImageNet labels as written in ``imagenet_to_label_2012_v2``, joined by ``"; "``);
    * ``imagenet_to_label_2012_v2``: text, line ``i`` (0-based) = the label of ImageNet 2012 id ``i``;
    * ``pytorch_to_imagenet_2012_id.json``: ``{"<pytorch index>": <2012 id>}``, where the pytorch index is the
      usual sorted-wnid class index of ImageNet-1k models and the 2012 id is a line number of the file above.

    Returns:
        (folders, groups): the mapped folders sorted by name (ObjectNet class ``k`` = ``folders[k]``) and for each
        the sorted ImageNet-1k indices it maps to (113 folders / 125 indices for the real files).

    Raises:
        ValueError / FileNotFoundError: naming the mapping file and the entry at fault.
    """
    def _load_json(name: str) -> Any:
        path = os.path.join(mappings_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'ObjectNet mapping file missing: {path}')
        with open(path) as f:
            return json.load(f)

    folder_to_label = _load_json('folder_to_objectnet_label.json')
    objectnet_to_imagenet = _load_json('objectnet_to_imagenet_1k.json')
    pytorch_to_id = _load_json('pytorch_to_imagenet_2012_id.json')
    labels_path = os.path.join(mappings_dir, 'imagenet_to_label_2012_v2')
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f'ObjectNet mapping file missing: {labels_path}')
    with open(labels_path) as f:
        line_labels = [line.rstrip('\n').strip() for line in f]
    id_to_pytorch = {int(v): int(k) for k, v in pytorch_to_id.items()}
    label_to_pytorch = {}
    for line_no, label in enumerate(line_labels):
        if label and line_no in id_to_pytorch:
            label_to_pytorch[label] = id_to_pytorch[line_no]
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}

    mapped: Dict[str, List[int]] = {}
    for on_label, in_labels in objectnet_to_imagenet.items():
        if on_label not in label_to_folder:
            raise ValueError(f'{os.path.join(mappings_dir, "objectnet_to_imagenet_1k.json")}: ObjectNet label '
                             f'{on_label!r} has no folder in folder_to_objectnet_label.json')
        indices = []
        for name in in_labels.split(';'):
            name = name.strip()
            if name not in label_to_pytorch:
                raise ValueError(f'{os.path.join(mappings_dir, "objectnet_to_imagenet_1k.json")}: ImageNet label '
                                 f'{name!r} (for {on_label!r}) not found in imagenet_to_label_2012_v2 / '
                                 f'pytorch_to_imagenet_2012_id.json')
            indices.append(label_to_pytorch[name])
        mapped[label_to_folder[on_label]] = sorted(set(indices))
    folders = sorted(mapped)
    return folders, [mapped[f] for f in folders]


# --------------------------------------------------------------------------------------------------------------------
# what a pass scores

@dataclass
class View:
    """How one result row is scored from a pass's 1000- (or K-) way logits.

    Attributes:
        name: row name (``imagenet-a``, ``imagenet-a-clean``, ...).
        columns: keep only these logit columns (ImageNet-A/-R: their 200 classes); the class index of the view is the
            position in ``columns``.
        groups: class ``k``'s score is the max logit over ``groups[k]`` (ObjectNet: 113 classes from 125 indices), so
            the prediction is the class of the best mapped ImageNet logit.
        target_map: dataset target -> view target; samples whose target is not a key are left out (``-clean`` rows).
        attack: adversarial attacks (FGSM / AutoAttack) are run on this view.
        real: also report ImageNet ReaL accuracy for this view (needs ``EvalPart.real_labels``).
    """
    name: str
    columns: Optional[List[int]] = None
    groups: Optional[List[List[int]]] = None
    target_map: Optional[Dict[int, int]] = None
    attack: bool = False
    real: bool = False
    _cache: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> Optional[int]:
        if self.groups is not None:
            return len(self.groups)
        if self.columns is not None:
            return len(self.columns)
        return None

    def _tensor(self, key: str, device: torch.device) -> torch.Tensor:
        t = self._cache.get(key)
        if t is None or t.device != device:
            if key == 'columns':
                t = torch.tensor(self.columns, dtype=torch.long)
            elif key == 'group_index':
                t = torch.tensor([c for g in self.groups for c in g], dtype=torch.long)
            elif key == 'group_owner':
                t = torch.tensor([k for k, g in enumerate(self.groups) for _ in g], dtype=torch.long)
            else:  # target lookup table
                size = max(self.target_map) + 1 if self.target_map else 1
                t = torch.full((size,), -1, dtype=torch.long)
                for k, v in self.target_map.items():
                    t[k] = v
            t = t.to(device)
            self._cache[key] = t
        return t

    def select(self, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keep mask, mapped targets) for a batch of dataset targets."""
        if self.target_map is None:
            return torch.ones_like(targets, dtype=torch.bool), targets
        table = self._tensor('target_map', targets.device)
        in_range = targets < table.numel()
        mapped = torch.where(in_range, table[targets.clamp(max=table.numel() - 1)], torch.full_like(targets, -1))
        keep = mapped >= 0
        return keep, mapped

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The view's class scores from the model's logits."""
        if self.groups is not None:
            idx = self._tensor('group_index', logits.device)
            owner = self._tensor('group_owner', logits.device)
            vals = logits.index_select(1, idx)
            out = torch.full((logits.shape[0], len(self.groups)), float('-inf'), device=logits.device,
                             dtype=logits.dtype)
            return out.scatter_reduce(1, owner.expand(logits.shape[0], -1), vals, reduce='amax', include_self=True)
        if self.columns is not None:
            return logits.index_select(1, self._tensor('columns', logits.device))
        return logits


@dataclass
class EvalPart:
    """One pass over one dataset (a set, or one corruption/severity of a -C set).

    Attributes:
        name: row name of the part (``imagenet-c/fog/3``).
        dataset: yields ``(image, target, index, ok)``.
        views: rows scored from this pass.
        crop_border_pixels: pixels cut from each border before resizing (ObjectNet: 2).
        corruption / severity: for -C parts.
        real_labels: per dataset index, the ReaL labels (ImageNet val only).
        expected_size: the official number of images of this pass (None: no official size).
        center_crop_only: feed images center-cropped to the input size without resizing (the ImageNet-C protocol).
        protocol: how images are fed, for the results (``center-crop`` / ``resize``; '' = the model's eval
            transform).
    """
    name: str
    dataset: Dataset
    views: List[View]
    crop_border_pixels: Optional[int] = None
    corruption: Optional[str] = None
    severity: Optional[int] = None
    real_labels: Optional[List[Optional[Tuple[int, ...]]]] = None
    expected_size: Optional[int] = None
    center_crop_only: bool = False
    protocol: str = ''

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def complete(self) -> Optional[bool]:
        """Whether the pass has its official number of images (None when there is no official size)."""
        return None if self.expected_size is None else self.num_samples == self.expected_size

    @cached_property
    def fingerprint(self) -> str:
        """Hash of what the pass reads (file names, sizes, mtimes and labels; generated sets: their recipe)."""
        return dataset_fingerprint(self.dataset)


def dataset_fingerprint(dataset: Any) -> str:
    """Short hash of a dataset's contents as listed: files (path, label, size, mtime) or in-memory images.

    Reruns reuse a stored result only when this is unchanged, so adding, removing or replacing an image (or
    relabelling) recomputes the rows of that set.
    """
    h = hashlib.sha256()
    _update_fingerprint(h, dataset)
    return h.hexdigest()[:16]


def _update_fingerprint(h: Any, ds: Any) -> None:
    if isinstance(ds, IndexedDataset):
        return _update_fingerprint(h, ds.base)
    if isinstance(ds, CorruptedDataset):
        h.update(f'corrupted {ds.corruption} {ds.severity} seed {ds.seed} digits-c v{DIGITS_C_VERSION}\n'.encode())
        return _update_fingerprint(h, ds.base)
    samples = getattr(ds, 'samples', None)
    if samples is None:
        samples = getattr(getattr(ds, 'reader', None), 'samples', None)
    if samples is not None:
        for path, target in samples:
            try:
                st = os.stat(path)
                h.update(f'{path}\t{target}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
            except (OSError, TypeError):
                h.update(f'{path}\t{target}\tmissing\n'.encode())
        return None
    images = getattr(ds, 'images', None)
    h.update(f'{type(ds).__name__} {len(ds)}\n'.encode())
    if images is not None:
        for img in images:
            h.update(np.ascontiguousarray(img).tobytes())
        h.update(np.asarray(getattr(ds, 'targets', []), dtype=np.int64).tobytes())
    return None


@dataclass
class SetSpec:
    """A named evaluation set: where it lives, what it needs, what its headline number is."""
    name: str
    folders: Tuple[str, ...]
    num_classes: int
    kind: str  # 'clean' | 'shift' | 'corruption'
    convention: str
    table_name: str = ''
    builtin: bool = False
    official_size: Optional[int] = None  # images per pass of the official release (ImageNet-C: per corruption+severity)

    def find(self, root: Optional[str]) -> Optional[str]:
        """Path of this set under ``root`` (first documented folder name that exists and looks right)."""
        if self.builtin:
            return ''
        if not root:
            return None
        for name in self.folders:
            path = os.path.join(root, name)
            if _looks_like(self.name, path):
                return path
        return None


def _looks_like(set_name: str, path: str) -> bool:
    if not os.path.isdir(path):
        return False
    if set_name == 'objectnet':
        return os.path.isdir(os.path.join(path, 'images')) and os.path.isdir(os.path.join(path, 'mappings'))
    if set_name == 'imagenet-c':
        known = set(IMAGENET_C_CORRUPTIONS) | set(IMAGENET_C_EXTRA)
        return any(os.path.isdir(os.path.join(path, c)) for c in known)
    if set_name == 'imagenet' and flat_val_files(path):
        return True
    return any(True for _ in class_folders(path))


_V2_CONV = ('ImageNetV2 {}: class folders named by ImageNet-1k index 0..999, ordered numerically; 1000-way top-1.')
DIGITS_VAL_SIZE = 359  # dr.data.DigitsDataset('val'): 20% of each class of scikit-learn's 1797 digits
SET_SPECS: Dict[str, SetSpec] = {s.name: s for s in [
    SetSpec('digits', (), 10, 'clean', 'Embedded scikit-learn digits, val split (dr.data.DigitsDataset, 359 images).',
            'digits', builtin=True, official_size=DIGITS_VAL_SIZE),
    SetSpec('digits-c', (), 10, 'corruption',
            'digits val split corrupted on the fly (seeded per sample) with the ImageNet-C corruption recipes scaled '
            'to the image size, each re-saved as JPEG quality 85: ' + ', '.join(DIGITS_C_DEFAULT)
            + ' by default, at severities 1-5; mean top-1 error over corruptions and severities (no AlexNet '
              'normalisation).', 'digits-C', builtin=True, official_size=DIGITS_VAL_SIZE),
    SetSpec('imagenet', ('imagenet/val', 'imagenet-val', 'val', 'ILSVRC2012_img_val', 'imagenet/ILSVRC2012_img_val',
                         'ILSVRC/Data/CLS-LOC/val', 'imagenet/ILSVRC/Data/CLS-LOC/val'), 1000, 'clean',
            'ImageNet-1k val, <wnid>/ folders or the official flat ILSVRC2012_val_*.JPEG files labelled by '
            'LOC_val_solution.csv or the ILSVRC2012 devkit; 1000-way; also imagenet-real (ReaL labels from timm, '
            'files named ILSVRC2012_val_XXXXXXXX.*) and imagenet-a-clean / imagenet-r-clean (val images of the 200 '
            'A/R classes, logits restricted to those 200).', 'ImageNet', official_size=50000),
    SetSpec('imagenetv2-matched-frequency',
            ('imagenetv2-matched-frequency', 'imagenetv2-matched-frequency-format-val',
             'ImageNetV2-matched-frequency'), 1000, 'shift', _V2_CONV.format('matched-frequency'), 'V2-MF',
            official_size=10000),
    SetSpec('imagenetv2-threshold0.7', ('imagenetv2-threshold0.7', 'imagenetv2-threshold0.7-format-val',
                                        'ImageNetV2-threshold0.7'), 1000,
            'shift', _V2_CONV.format('threshold-0.7'), 'V2-T0.7', official_size=10000),
    SetSpec('imagenetv2-top-images', ('imagenetv2-top-images', 'imagenetv2-top-images-format-val',
                                      'ImageNetV2-top-images'), 1000, 'shift',
            _V2_CONV.format('top-images'), 'V2-TI', official_size=10000),
    SetSpec('imagenet-a', ('imagenet-a',), 1000, 'shift',
            'ImageNet-A, <wnid>/ folders of its 200 classes; logits restricted to timm imagenet_a_indices.txt.', 'A',
            official_size=7500),
    SetSpec('imagenet-r', ('imagenet-r',), 1000, 'shift',
            'ImageNet-R, <wnid>/ folders of its 200 classes; logits restricted to timm imagenet_r_indices.txt.', 'R',
            official_size=30000),
    SetSpec('imagenet-sketch', ('imagenet-sketch', 'sketch'), 1000, 'shift',
            'ImageNet-Sketch, <wnid>/ folders, 1000-way top-1.', 'Sketch', official_size=50889),
    SetSpec('objectnet', ('objectnet', 'objectnet-1.0', 'objectnet/objectnet-1.0'), 1000, 'shift',
            'ObjectNet 1.0 (images/<folder>/, mappings/): the 113 classes that map to ImageNet-1k (125 indices) per '
            "the dataset's own mapping files; 2-pixel border cropped; prediction = class of the best logit among "
            'the mapped indices (class score = max over its indices).', 'ObjectNet', official_size=18574),
    SetSpec('imagenet-c', ('imagenet-c', 'ImageNet-C'), 1000, 'corruption',
            'ImageNet-C, <corruption>/<severity 1..5>/<wnid>/, 224-px images fed with a center crop only (the '
            "authors' protocol; --imagenet-c-protocol resize: the model's resize + crop); top-1 error per corruption "
            'and severity; mCE = mean over the 15 corruptions of (mean error / AlexNet mean error), in %; relative '
            'mCE with AlexNet clean error 43.478%; extras (speckle_noise, gaussian_blur, spatter, saturate) reported '
            'separately; table shows 100 - mCE.', 'C', official_size=50000),
]}
SUITE_ORDER = ('imagenet', 'imagenetv2-matched-frequency', 'imagenetv2-threshold0.7', 'imagenetv2-top-images',
               'imagenet-a', 'imagenet-r', 'imagenet-sketch', 'objectnet', 'imagenet-c')


def discover_sets(root: str, names: Optional[Sequence[str]] = None) -> Tuple[Dict[str, str], List[str]]:
    """Which suite sets exist under ``root``.

    Args:
        root: suite root folder.
        names: sets to look for (default: all ImageNet-family sets in ``SUITE_ORDER``).

    Returns:
        (found: name -> path, missing: names not found), both in suite order.
    """
    if not os.path.isdir(root):
        raise SetNotFoundError(f'--suite: not a directory: {root}')
    found, missing = {}, []
    for name in names or SUITE_ORDER:
        spec = SET_SPECS.get(name)
        if spec is None:
            raise ValueError(f'Unknown set {name!r}; known sets: {", ".join(SET_SPECS)}')
        path = spec.find(root)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def subset_view(name: str, subset: str) -> View:
    """View of an ImageNet-A/-R row: logits restricted to the 200 classes, targets remapped to 0..199."""
    idx = list(subset_indices(subset))
    return View(name, columns=idx, target_map={c: k for k, c in enumerate(idx)})


def build_parts(
        name: str,
        path: str = '',
        skip_bad_images: bool = False,
        seed: int = 0,
        digits_size: int = 32,
        corruptions: Optional[Sequence[str]] = None,
        digits_val: Optional[Dataset] = None,
        imagenet_c_protocol: str = 'center-crop',
        search: Sequence[str] = (),
) -> List[EvalPart]:
    """The passes that evaluate set ``name`` found at ``path``.

    Args:
        name: a key of ``SET_SPECS``.
        path: where the set lives (from ``discover_sets`` / ``SetSpec.find``); unused for builtin sets.
        skip_bad_images: unreadable files are skipped and counted instead of being an error.
        seed: digits-C corruption seed.
        digits_size: digits image side.
        corruptions: restrict -C sets to these corruptions.
        digits_val: an existing digits val dataset to reuse.
        imagenet_c_protocol: ``center-crop`` (the 224-px images cropped to the input size, no resize: the protocol
            behind the AlexNet normalisation) or ``resize`` (the model's eval transform).
        search: more folders to look in for ImageNet val label files (the suite root).
    """
    if name not in SET_SPECS:
        raise ValueError(f'Unknown set {name!r}; known sets: {", ".join(SET_SPECS)}')
    parts = _build_parts(name, path, skip_bad_images, seed, digits_size, corruptions, digits_val,
                         imagenet_c_protocol, search)
    for part in parts:
        part.expected_size = SET_SPECS[name].official_size
    return parts


def _build_parts(name: str, path: str, skip_bad_images: bool, seed: int, digits_size: int,
                 corruptions: Optional[Sequence[str]], digits_val: Optional[Dataset], imagenet_c_protocol: str,
                 search: Sequence[str]) -> List[EvalPart]:
    if name in ('digits', 'digits-c'):
        return _digits_parts(name, seed, digits_size, corruptions, digits_val)
    if name == 'objectnet':
        return _objectnet_parts(path, skip_bad_images)
    if name == 'imagenet-c':
        return _imagenet_c_parts(path, skip_bad_images, corruptions, imagenet_c_protocol)
    if name == 'imagenet':
        ds = _image_list(name, path, imagenet_val_samples(path, search), skip_bad_images)
        views = [View('imagenet', attack=True, real=True), subset_view('imagenet-a-clean', 'a'),
                 subset_view('imagenet-r-clean', 'r')]
        real = real_labels_for_files([p for p, _ in ds.samples])
        if real is None:
            views[0].real = False
            _logger.info(f'{path}: file names are not ILSVRC2012_val_XXXXXXXX.*, no ReaL labels')
        return [EvalPart('imagenet', ds, views, real_labels=real)]
    if name.startswith('imagenetv2-'):
        return [EvalPart(name, _image_list(name, path, numeric_samples(path), skip_bad_images), [View(name)])]
    if name in ('imagenet-a', 'imagenet-r'):
        subset = name[-1]
        ds = _image_list(name, path, wnid_samples(path, allowed=subset_indices(subset)), skip_bad_images)
        return [EvalPart(name, ds, [subset_view(name, subset)])]
    if name == 'imagenet-sketch':
        return [EvalPart(name, _image_list(name, path, wnid_samples(path), skip_bad_images), [View(name)])]
    raise ValueError(f'Set {name} has no builder')  # pragma: no cover


def _image_list(name: str, path: str, samples: List[Tuple[str, int]], skip_bad_images: bool) -> ImageListDataset:
    if not samples:
        raise ValueError(f'Set {name}: no images found under {path}')
    return ImageListDataset(samples, skip_bad_images=skip_bad_images)


def _digits_parts(name: str, seed: int, digits_size: int, corruptions: Optional[Sequence[str]],
                  digits_val: Optional[Dataset]) -> List[EvalPart]:
    base = digits_val if digits_val is not None else DigitsDataset('val', img_size=digits_size)
    if name == 'digits':
        return [EvalPart('digits', IndexedDataset(base), [View('digits', attack=True)])]
    chosen = _check_corruptions(corruptions, DIGITS_C_CORRUPTIONS, DIGITS_C_DEFAULT, name)
    parts = [EvalPart('digits-c/clean', IndexedDataset(base), [View('digits-c/clean')])]
    for c in chosen:
        for s in SEVERITIES:
            ds = IndexedDataset(CorruptedDataset(base, c, s, seed=seed))
            parts.append(EvalPart(f'digits-c/{c}/{s}', ds, [View(f'digits-c/{c}/{s}')], corruption=c, severity=s))
    return parts


def _objectnet_parts(path: str, skip_bad_images: bool) -> List[EvalPart]:
    folders, groups = objectnet_mapping(os.path.join(path, 'mappings'))
    images = os.path.join(path, 'images')
    present = set(class_folders(images))
    samples = []
    for k, folder in enumerate(folders):
        if folder in present:
            samples.extend((p, k) for p in list_class_folder(os.path.join(images, folder)))
    missing = [f for f in folders if f not in present]
    if missing:
        _logger.warning(f'ObjectNet: {len(missing)} mapped folders absent under {images}: {", ".join(missing)}')
    return [EvalPart('objectnet', _image_list('objectnet', path, samples, skip_bad_images),
                     [View('objectnet', groups=groups)], crop_border_pixels=OBJECTNET_BORDER_PIXELS)]


def _imagenet_c_parts(path: str, skip_bad_images: bool, corruptions: Optional[Sequence[str]], protocol: str
                      ) -> List[EvalPart]:
    if protocol not in IMAGENET_C_PROTOCOLS:
        raise ValueError(f'--imagenet-c-protocol: {protocol!r} is not one of {", ".join(IMAGENET_C_PROTOCOLS)}')
    present = [c for c in IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA if os.path.isdir(os.path.join(path, c))]
    chosen = _check_corruptions(corruptions, IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA, tuple(present), 'imagenet-c')
    parts = []
    for c in chosen:
        if c not in present:
            _logger.warning(f'ImageNet-C: corruption {c} not under {path}')
            continue
        for s in SEVERITIES:
            sev_dir = os.path.join(path, c, str(s))
            if not os.path.isdir(sev_dir):
                _logger.warning(f'ImageNet-C: missing {sev_dir}')
                continue
            parts.append(EvalPart(f'imagenet-c/{c}/{s}', _image_list('imagenet-c', sev_dir, wnid_samples(sev_dir),
                                                                      skip_bad_images),
                                  [View(f'imagenet-c/{c}/{s}')], corruption=c, severity=s,
                                  center_crop_only=protocol == 'center-crop', protocol=protocol))
    if not parts:
        raise ValueError(f'ImageNet-C: no <corruption>/<severity>/ folders under {path}')
    return parts


def _check_corruptions(requested: Optional[Sequence[str]], known: Sequence[str], default: Sequence[str],
                       set_name: str) -> List[str]:
    if not requested:
        return list(default)
    bad = [c for c in requested if c not in known]
    if bad:
        raise ValueError(f'--corruptions for {set_name}: unknown {", ".join(bad)}; known: {", ".join(known)}')
    return list(requested)


def folder_parts(root: str, name: str = 'folder', skip_bad_images: bool = False) -> Tuple[List[EvalPart], List[str]]:
    """A generic ImageFolder (``root/<class>/**``, classes sorted as text, timm's convention) as one part.

    Returns:
        (parts, class names).
    """
    classes = class_folders(root)
    if not classes:
        raise SetNotFoundError(f'No class folders under {root}')
    samples = []
    for k, c in enumerate(classes):
        samples.extend((p, k) for p in list_class_folder(os.path.join(root, c)))
    if not samples:
        raise ValueError(f'No images under {root}')
    ds = ImageListDataset(samples, skip_bad_images=skip_bad_images)
    return [EvalPart(name, ds, [View(name, attack=True)])], classes
