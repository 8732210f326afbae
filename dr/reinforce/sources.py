"""Image sources for the reinforcement job: (key, extension, original bytes, label) by global index."""
import dataclasses
import io
import logging
import os
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from timm.data.readers.reader_image_tar import ReaderImageTar

from ..data import create_dataset, dataset_classes, is_digits
from .format import (
    IMAGE_EXTS,
    sanitize_key,
    split_member_name,
)

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SourceImage:
    key: str
    ext: str
    data: bytes
    label: int


class ImageSource:
    """Random access to a dataset's original encoded images."""
    stores_png: bool = False  # True when images only exist decoded and are stored re-encoded as PNG

    def __init__(self, dataset, name: str):
        self.ds = dataset
        self.name = name
        self.classes: Optional[List[str]] = dataset_classes(dataset)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, index: int) -> SourceImage:
        raise NotImplementedError


class DigitsSource(ImageSource):
    """The embedded digits (PNG bytes from ``DigitsDataset.image_bytes``)."""

    def __init__(self, dataset):
        super().__init__(dataset, 'digits')

    def get(self, index: int) -> SourceImage:
        return SourceImage(self.ds.key(index), 'png', self.ds.image_bytes(index), int(self.ds.targets[index]))


def _ext_of(filename: str, where: str) -> str:
    ext = os.path.splitext(filename)[1].lstrip('.').lower()
    if ext not in IMAGE_EXTS:
        raise ValueError(f'{where}: file {filename!r} has extension {ext!r}, expected one of {", ".join(IMAGE_EXTS)}')
    return ext


class FolderSource(ImageSource):
    """timm folder / tar readers: raw file bytes with the file's own extension."""

    def get(self, index: int) -> SourceImage:
        filename = self.ds.reader._filename(index)
        f, target = self.ds.reader[index]
        try:
            data = f.read()
        finally:
            f.close()
        stem = os.path.splitext(filename)[0]
        key = f'{index:08d}_{sanitize_key(stem)}'
        return SourceImage(key, _ext_of(filename, f'image {index}'), data, int(target))


class PILSource(ImageSource):
    """Datasets that only yield decoded PIL images (``torch/``, ``hfds/``): stored as lossless PNG."""
    stores_png = True

    def get(self, index: int) -> SourceImage:
        img, target = self.ds[index][:2]
        if not isinstance(img, Image.Image):
            raise TypeError(f'image {index} of {self.name}: expected a PIL image, got {type(img).__name__}')
        buf = io.BytesIO()
        img.convert('RGB').save(buf, format='PNG')
        return SourceImage(f'{index:08d}', 'png', buf.getvalue(), int(target))


class WdsSource(ImageSource):
    """Existing WebDataset shards (``wds/`` through timm's split info): a header index of the local tar files gives
    random access to the original image bytes and ``.cls`` labels."""

    def __init__(self, files: Sequence[str], name: str, classes: Optional[List[str]] = None,
                 image_exts: Sequence[str] = ('jpg', 'png', 'webp')):
        self.name = name
        self.classes = classes
        self.samples: List[Tuple[str, str, str, int, int, int, int]] = []
        preferred = [e.lower() for e in image_exts] + [e for e in IMAGE_EXTS if e not in image_exts]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{name}: shard {path} is not a local file (reinforce.py needs random access)')
            entries: Dict[str, Dict[str, Tuple[int, int]]] = {}
            order: List[str] = []
            try:
                with tarfile.open(path, 'r:') as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, ext = split_member_name(info.name)
                        if key not in entries:
                            entries[key] = {}
                            order.append(key)
                        entries[key][ext.lower()] = (info.offset_data, info.size)
            except tarfile.TarError as e:
                raise ValueError(f'{name}: cannot index shard {path}: {e}') from e
            for key in order:
                members = entries[key]
                img_ext = next((e for e in preferred if e in members), None)
                if img_ext is None:
                    continue
                if 'cls' not in members:
                    raise ValueError(f'{name}: sample {key} in {path} has no .cls label member')
                (io_off, io_size), (co, cs) = members[img_ext], members['cls']
                self.samples.append((path, key, img_ext, io_off, io_size, co, cs))

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> SourceImage:
        path, key, ext, off, size, cls_off, cls_size = self.samples[index]
        with open(path, 'rb') as f:
            f.seek(off)
            data = f.read(size)
            f.seek(cls_off)
            label = int(f.read(cls_size).decode('ascii').strip())
        return SourceImage(f'{index:08d}_{sanitize_key(key)}', ext, data, label)


class LimitedSource(ImageSource):
    """The first ``n`` images of another source."""

    def __init__(self, source: ImageSource, n: int):
        self.source = source
        self.n = min(n, len(source))
        self.name, self.classes, self.stores_png = source.name, source.classes, source.stores_png

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> SourceImage:
        if index >= self.n:
            raise IndexError(index)
        return self.source.get(index)


def create_source(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        digits_size: int = 32,
        max_images: int = 0,
) -> ImageSource:
    """An ``ImageSource`` for any dataset train.py accepts (digits, folders, ``wds/``, ``torch/``, ``hfds/``).

    Raises:
        ValueError: for streaming-only datasets (``tfds/``) and unusable inputs, naming ``--dataset``.
    """
    if is_digits(name):
        source: ImageSource = DigitsSource(create_dataset(name, split=split, digits_size=digits_size))
    elif name.lower().startswith('wds/'):
        ds = create_dataset(name, root=root, split=split)
        reader = ds.reader
        files = [os.path.join(reader.root, f) for f in reader.split_info.filenames]
        classes = [k for k, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])] or None
        image_exts = [e for e in str(reader.input_key).split(';') if e]
        source = WdsSource(files, name, classes, image_exts=image_exts)
    else:
        ds = create_dataset(name, root=root, split=split)
        if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, '__getitem__'):
            raise ValueError(f'--dataset {name}: streaming datasets are not supported by reinforce.py '
                             f'(use an image folder, wds/ shards or a torch/ dataset)')
        reader = getattr(ds, 'reader', None)
        if isinstance(reader, (ReaderImageFolder, ReaderImageInTar, ReaderImageTar)):
            source = FolderSource(ds, name or (root or ''))
        else:
            _logger.warning(f'--dataset {name}: images are only available decoded; storing them as lossless PNG')
            source = PILSource(ds, name)
    if len(source) == 0:
        raise ValueError(f'--dataset {name or root}: no images found (split {split})')
    if max_images and max_images > 0:
        source = LimitedSource(source, max_images)
    return source
