"""ReLabel-style label maps (Yun et al., "Re-labeling ImageNet", CVPR 2021): compute, store, pool, summarise.

A teacher runs once per image over the whole image (resized to its input size, no crop). Its final feature map,
before global pooling, goes through the classifier at every location (for a linear head: a 1x1 convolution with the
FC weights), which gives a ``C x h x w`` label map; the top-k logits of every location are stored. A training crop's
target is the softmax of the map RoIAlign-pooled over the crop box (in map coordinates) to ``1 x 1``, the stored
top-k densified with ``fill`` for the other classes (:func:`pool_target`). An ensemble's map is the mean of its
members' maps (they must share the map size).

Storage (schema 3, ``reinforce.json`` ``kind: label_maps``): the usual shards, each sample's ``rd.npy`` holding
the map as ``h * w`` rows (row-major over (y, x)) of :func:`label_map_dtype` (``ids``, float16 ``logits``).
The training side is :mod:`dr.reinforce.label_map_loader`.
"""
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.ops import roi_align
from tqdm import tqdm

from .. import storage
from .augment import create_augment_spec, decode_image
from .format import (
    AUG_RRC,
    AUG_RRC_RA_RE,
    LABEL_MAP_FIELDS,
    LABEL_MAP_KIND,
    LABEL_MAP_SCHEMA_VERSION,
    META_NAME,
    decode_records,
    image_order,
    iter_listed_samples,
    listed_shard_bytes,
    record_dtype,
)
from .writer import ShardPlan, ShardStore

_logger = logging.getLogger(__name__)

DEFAULT_FILL = 0.0  # logit of a class outside a location's stored top-k when the map is densified
# paper: dr/table9/relabel topk=5 num_samples=1; ReLabel's 15 x 15 map side is from the brief (ReLabel's paper)
RELABEL_TOPK, RELABEL_MAP_SIDE = 5, 15
# (label, augmentation, top-k, stored samples per image) of DR Table 9's rows that store per-crop records
# paper: dr/table9/fkd_200 topk=5 num_samples=200; dr/table9/fkd_500 topk=5 num_samples=500
# paper: dr/table9/fkd_our_gen topk=10 num_samples=400; dr/table9/imagenet_plus topk=10 num_samples=400
# paper: dr/table9/imagenet_plus_small topk=5 num_samples=100
TABLE9_RECORD_ROWS = (('fkd_200', AUG_RRC, 5, 200), ('fkd_500', AUG_RRC, 5, 500), ('fkd_our_gen', AUG_RRC, 10, 400),
                      ('imagenet_plus_rrc', AUG_RRC, 10, 400), ('imagenet_plus_small', AUG_RRC_RA_RE, 5, 100),
                      ('imagenet_plus', AUG_RRC_RA_RE, 10, 400))


def is_label_map_meta(meta: Dict[str, Any]) -> bool:
    """Whether a ``reinforce.json`` describes label maps (schema 3, ``kind: label_maps``)."""
    return meta.get('kind') == LABEL_MAP_KIND


def label_map_dtype(topk: int, num_classes: int) -> np.dtype:
    """One stored map location: top-k class ids (descending logit) and their float16 logits."""
    if topk < 1:
        raise ValueError(f'topk must be >= 1, got {topk}')
    return np.dtype([('ids', '<u2' if num_classes <= 65535 else '<u4', (topk,)), ('logits', '<f2', (topk,))])


# ----------------------------------------------------------------------------------------------------------------
# the map of a teacher


def member_label_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-location logits ``[B, C, h, w]`` of a timm model: its classifier head applied to every location of
    ``forward_features`` (each location pooled alone, so a linear head acts as a 1x1 convolution).

    Raises:
        ValueError: the model's features are not an NCHW map (ViT tokens, ...).
    """
    feats = model.forward_features(x)
    if feats.ndim != 4:
        raise ValueError(f'label maps need a convolutional feature map (N, C, H, W); {type(model).__name__}.'
                         f'forward_features gives shape {tuple(feats.shape)}')
    b, f, h, w = feats.shape
    cells = feats.permute(0, 2, 3, 1).reshape(b * h * w, f, 1, 1)
    logits = model.forward_head(cells)
    return logits.float().reshape(b, h, w, -1).permute(0, 3, 1, 2)


def teacher_inputs(img, member_cfgs: Sequence[Dict[str, Any]]) -> List[torch.Tensor]:
    """The whole image resized to each member's input size and normalised with its mean/std: ``[3, H, W]`` each."""
    out = []
    for cfg in member_cfgs:
        size = [int(cfg['input_size'][1]), int(cfg['input_size'][2])]
        interp = TF.InterpolationMode(str(cfg.get('interpolation', 'bilinear')))
        x = TF.to_tensor(TF.resize(img, size, interpolation=interp))
        out.append(TF.normalize(x, cfg['mean'], cfg['std']))
    return out


@torch.inference_mode()
def ensemble_label_map(teacher, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the members' label maps ``[B, C, h, w]`` (one normalised batch per member).

    Raises:
        ValueError: members whose maps differ in size (naming them).
    """
    maps = [member_label_map(m, x) for m, x in zip(teacher.members, inputs)]
    sizes = {tuple(m.shape[-2:]) for m in maps}
    if len(sizes) > 1:
        raise ValueError(f'--label-maps: the ensemble members give label maps of different sizes '
                         f'{dict(zip(teacher.names, (tuple(m.shape[-2:]) for m in maps)))}; use members of the same '
                         f'stride or --teacher-img-size')
    return torch.stack(maps).mean(0)


def topk_map(label_map: torch.Tensor, k: int) -> np.ndarray:
    """``[C, h, w]`` logits -> ``h * w`` records (row-major (y, x)) of the top-``k`` ids and float16 logits."""
    c, h, w = label_map.shape
    flat = label_map.reshape(c, h * w).t()
    top_v, top_i = flat.topk(k, dim=-1)
    out = np.zeros(h * w, dtype=label_map_dtype(k, c))
    out['ids'] = top_i.cpu().numpy()
    out['logits'] = top_v.cpu().numpy().astype(np.float16)
    return out


def densify_map(records: np.ndarray, size: Tuple[int, int], num_classes: int,
                fill: float = DEFAULT_FILL) -> torch.Tensor:
    """Stored top-k records -> dense ``[C, h, w]`` float32 logits (``fill`` outside each location's top-k)."""
    h, w = int(size[0]), int(size[1])
    if len(records) != h * w:
        raise ValueError(f'label map: {len(records)} stored locations, expected {h} x {w}')
    ids = torch.from_numpy(records['ids'].astype(np.int64))
    logits = torch.from_numpy(records['logits'].astype(np.float32))
    dense = torch.full((h * w, num_classes), float(fill), dtype=torch.float32)
    dense.scatter_(1, ids, logits)
    return dense.t().reshape(num_classes, h, w)


def crop_box_in_map(crop: Sequence[float], image_size: Tuple[int, int], map_size: Tuple[int, int]) -> List[float]:
    """Crop ``(x, y, w, h)`` in image pixels -> ``(x1, y1, x2, y2)`` in map coordinates (map cell ``i`` spans
    ``[i, i + 1)``; the whole image maps onto the whole map)."""
    img_w, img_h = float(image_size[0]), float(image_size[1])
    mh, mw = float(map_size[0]), float(map_size[1])
    x, y, cw, ch = (float(v) for v in crop)
    return [x * mw / img_w, y * mh / img_h, (x + cw) * mw / img_w, (y + ch) * mh / img_h]


def pool_logits(dense: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """RoIAlign (``aligned=True``, adaptive sampling) of a ``[C, h, w]`` map over ``box`` (x1, y1, x2, y2, map
    coordinates) into ``1 x 1``: ``[C]``."""
    rois = torch.tensor([[0.0, *[float(v) for v in box]]], dtype=dense.dtype)
    return roi_align(dense[None], rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True).reshape(-1)


def pool_target(records: np.ndarray, map_size: Tuple[int, int], num_classes: int, crop: Sequence[float],
                image_size: Tuple[int, int], fill: float = DEFAULT_FILL) -> torch.Tensor:
    """The target distribution ``[C]`` of a crop: softmax of the stored map pooled over the crop box.

    A horizontal flip of the crop does not change it: the 1 x 1 pooled map is the same for the mirrored pixels of
    the same box (the box is not mirrored: the flip is applied after cropping).
    """
    dense = densify_map(records, map_size, num_classes, fill)
    return pool_logits(dense, crop_box_in_map(crop, image_size, map_size)).softmax(-1)


# ----------------------------------------------------------------------------------------------------------------
# writing


class LabelMapWriter:
    """Writes label-map shards: the images in the seeded order of ``format.image_order``, one teacher pass per image,
    shards written atomically with sidecars (a rerun skips complete shards; another configuration is refused).

    Args:
        source: the images.
        teacher: a ``TeacherEnsemble``.
        output: output directory.
        topk: stored classes per map location.
        seed: image-order seed.
        shard_size: images per shard.
        num_classes: classifier size.
        batch_size: images per teacher batch.
        fill: the logit of classes outside a location's top-k (recorded for the reader).
        train_spec: the random-resized-crop + flip the training loader draws (recorded as ``augmentation``).
    """

    def __init__(self, source, teacher, output: str, *, topk: int, seed: int, shard_size: int, num_classes: int,
                 batch_size: int = 64, device: str = 'cpu', fill: float = DEFAULT_FILL, train_spec=None,
                 dataset_info: Optional[Dict[str, Any]] = None, progress: bool = True):
        if topk > num_classes:
            raise ValueError(f'--topk {topk} is larger than the number of classes ({num_classes})')
        if shard_size < 1 or batch_size < 1:
            raise ValueError('--shard-size and --batch-size must be >= 1')
        self.source, self.teacher, self.output = source, teacher, output
        self.topk, self.seed, self.num_classes = int(topk), int(seed), int(num_classes)
        self.batch_size, self.device, self.fill = int(batch_size), torch.device(device), float(fill)
        self.spec = train_spec or create_augment_spec(AUG_RRC)
        self.dataset_info = dict(dataset_info or {'name': source.name})
        self.progress = progress
        self.plan = ShardPlan(image_order(len(source), self.seed), int(shard_size))
        self.map_size = self._probe_map_size()
        self.dtype = label_map_dtype(self.topk, self.num_classes)
        self.store = ShardStore(output, json.loads(json.dumps(self.content_config())))

    def _probe_map_size(self) -> Tuple[int, int]:
        cfg = self.teacher.member_cfgs
        probe = [torch.zeros(1, *[int(v) for v in c['input_size']], device=self.device) for c in cfg]
        return tuple(int(v) for v in ensemble_label_map(self.teacher, probe).shape[-2:])

    def content_config(self) -> Dict[str, Any]:
        """Everything that determines shard contents (compared on resume)."""
        teachers = []
        for t in self.teacher.info():
            t = dict(t)
            if t.get('weights_sha256'):
                t.pop('weights')
            teachers.append(t)
        ds = {k: v for k, v in self.dataset_info.items() if k != 'root'}
        ds['num_images'] = self.plan.num_images
        return {'schema_version': LABEL_MAP_SCHEMA_VERSION, 'kind': LABEL_MAP_KIND, 'dataset': ds,
                'teachers': teachers, 'augmentation': self.spec.to_dict(), 'num_samples': self.num_locations,
                'topk': self.topk, 'num_classes': self.num_classes, 'seed': self.seed,
                'image_order': {'kind': 'permutation', 'seed': self.seed}, 'shard_size': self.plan.shard_size,
                'record_dtype': self.dtype.descr, 'label_map': self.label_map_info()}

    @property
    def num_locations(self) -> int:
        return self.map_size[0] * self.map_size[1]

    def label_map_info(self) -> Dict[str, Any]:
        return {'height': self.map_size[0], 'width': self.map_size[1], 'fill': self.fill, 'pool': 'roi_align'}

    def _maps(self, images: List[Any]) -> List[np.ndarray]:
        per_member = list(zip(*[teacher_inputs(img, self.teacher.member_cfgs) for img in images]))
        batch = [torch.stack(xs).to(self.device) for xs in per_member]
        maps = ensemble_label_map(self.teacher, batch)
        return [topk_map(m, self.topk) for m in maps]

    def _previous_seconds(self) -> Optional[float]:
        """A rerun that wrote nothing keeps the teacher time the first run measured."""
        try:
            with open(os.path.join(self.output, META_NAME)) as f:
                return json.load(f).get('teacher_seconds_per_image')
        except (OSError, ValueError):
            return None

    def write_shard(self, index: int) -> Tuple[Dict[str, Any], float]:
        """Teacher maps of shard ``index``'s images, then the shard and its sidecar; (sidecar, teacher seconds)."""
        items, seconds = [], 0.0
        entries = self.plan.indices([index])
        for lo in range(0, len(entries), self.batch_size):
            part = entries[lo:lo + self.batch_size]
            srcs = [self.source.get(i) for _, i in part]
            imgs = []
            for (_, i), src in zip(part, srcs):
                if not 0 <= src.label < self.num_classes:
                    raise ValueError(f'image {i} (key {src.key}): label {src.label} outside '
                                     f'0..{self.num_classes - 1} (check --num-classes)')
                try:
                    imgs.append(decode_image(src.data))
                except Exception as e:
                    raise ValueError(f'image {i} (key {src.key}): cannot decode ({e})') from e
            t0 = time.perf_counter()
            maps = self._maps(imgs)
            seconds += time.perf_counter() - t0
            items += [{'index': i, 'key': src.key, 'ext': src.ext, 'image': src.data, 'label': src.label,
                       'records': m} for (_, i), src, m in zip(part, srcs, maps)]
        return self.store.write(index, items, self.num_locations), seconds

    def run(self) -> Dict[str, Any]:
        """Write every incomplete shard, then ``reinforce.json``; returns the metadata."""
        os.makedirs(self.output, exist_ok=True)
        self.store.check_config()
        self.store.check_strays(self.plan.num_shards)
        all_shards = list(range(self.plan.num_shards))
        self.store.clean_stale(all_shards, run_files=True)
        seconds, written = 0.0, 0
        for s in tqdm(all_shards, disable=not self.progress, desc='label maps', unit='shard'):
            lo, hi = self.plan.shard_range(s)
            if self.store.is_complete(s, hi - lo)[0]:
                continue
            info, t = self.write_shard(s)
            seconds += t
            written += info['count']
        fields = {'kind': LABEL_MAP_KIND, 'teachers': self.teacher.info(), 'augmentation': self.spec.to_dict(),
                  'topk': self.topk, 'num_samples': self.num_locations, 'num_classes': self.num_classes,
                  'class_names': list(self.source.classes) if self.source.classes else None, 'seed': self.seed,
                  'image_order': {'kind': 'permutation', 'seed': self.seed}, 'dataset': dict(self.dataset_info),
                  'num_images': self.plan.num_images, 'shard_size': self.plan.shard_size,
                  'record_dtype': self.dtype.descr, 'label_map': self.label_map_info(),
                  'images_stored_as_png': bool(self.source.stores_png),
                  'teacher_forwards_per_image': 1,
                  'teacher_seconds_per_image': seconds / written if written else self._previous_seconds()}
        fields['schema_version'] = LABEL_MAP_SCHEMA_VERSION  # overrides ShardStore.merge's DR schema version
        return self.store.merge(self.plan.num_shards, fields, self.plan.num_images * self.num_locations)


# ----------------------------------------------------------------------------------------------------------------
# checks and --stats


def map_size(meta: Dict[str, Any]) -> Tuple[int, int]:
    lm = meta.get('label_map') or {}
    try:
        return int(lm['height']), int(lm['width'])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{meta.get("_path", META_NAME)}: label_map must give height and width, got {lm!r}') from e


def check_label_map_records(arr: np.ndarray, where: str, meta: Dict[str, Any]) -> None:
    """Validate one decoded label map against ``reinforce.json``.

    Raises:
        ValueError: naming ``where`` and the first problem.
    """
    h, w = map_size(meta)
    topk, num_classes = int(meta['topk']), int(meta['num_classes'])
    if arr.dtype.names is None or set(arr.dtype.names) != {'ids', 'logits'}:
        raise ValueError(f'{where}: a label map needs ids/logits fields, got dtype {arr.dtype.descr}')
    if arr.shape != (h * w,):
        raise ValueError(f'{where}: label map has {arr.shape} locations, {META_NAME} says {h} x {w}')
    k = arr.dtype['ids'].shape[0] if arr.dtype['ids'].shape else 1
    if k != topk:
        raise ValueError(f'{where}: label map holds top-{k}, {META_NAME} says topk={topk}')
    logits = arr['logits'].astype(np.float32)
    if not np.isfinite(logits).all():
        raise ValueError(f'{where}: non-finite logits')
    if arr['ids'].size and int(arr['ids'].max()) >= num_classes:
        raise ValueError(f'{where}: class id {int(arr["ids"].max())} >= num_classes={num_classes}')
    if (np.diff(logits, axis=1) > 0).any():
        raise ValueError(f'{where}: logits not sorted descending')
    srt = np.sort(arr['ids'], axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError(f'{where}: repeated class ids at a location')


def storage_comparison(num_classes: int) -> Dict[str, float]:
    """Soft-label bytes per image (the stored records, without the image) of DR Table 9's methods for a dataset of
    ``num_classes``: ReLabel's top-5 15 x 15 map and the per-crop records of FKD / ImageNet+ in this format."""
    out = {f'storage_per_image.relabel_top{RELABEL_TOPK}_{RELABEL_MAP_SIDE}x{RELABEL_MAP_SIDE}':
           float(RELABEL_MAP_SIDE * RELABEL_MAP_SIDE * label_map_dtype(RELABEL_TOPK, num_classes).itemsize)}
    for name, aug, k, n in TABLE9_RECORD_ROWS:
        out[f'storage_per_image.{name}'] = float(n * record_dtype(k, num_classes, aug).itemsize)
    return out


def label_map_stats(directory: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """``--stats`` of label-map shards: teacher accuracy of the whole-map target, storage and teacher cost per image,
    and :func:`storage_comparison`."""
    h, w = map_size(meta)
    num_classes = int(meta['num_classes'])
    fill = float(meta['label_map'].get('fill', DEFAULT_FILL))
    images = correct = image_bytes = 0
    ent = 0.0
    for _, sample, where in iter_listed_samples(directory, meta):
        arr = decode_records(sample['records'], where, LABEL_MAP_FIELDS)
        check_label_map_records(arr, where, meta)
        p = pool_logits(densify_map(arr, (h, w), num_classes, fill), [0, 0, w, h]).softmax(-1)
        correct += int(int(p.argmax()) == sample['label'])
        ent += float(-(p * p.clamp_min(1e-30).log()).sum())
        images += 1
        image_bytes += len(sample['image'])
    total_bytes = listed_shard_bytes(directory, meta)
    stats: Dict[str, Any] = {
        'directory': storage.absolute(directory),
        'kind': LABEL_MAP_KIND,
        'num_images': images,
        'label_map': f'{h}x{w}',
        'topk': int(meta['topk']),
        'num_classes': num_classes,
        'teacher_accuracy': correct / images if images else 0.0,
        'mean_entropy': ent / images if images else 0.0,
        'max_entropy': math.log(num_classes),
        'total_bytes': total_bytes,
        'image_bytes': image_bytes,
        'bytes_per_image': (total_bytes - image_bytes) / images if images else 0.0,
        'record_bytes_per_image': h * w * label_map_dtype(int(meta['topk']), num_classes).itemsize,
        'teacher_forwards_per_image': 1,
        'teacher_seconds_per_image': meta.get('teacher_seconds_per_image'),
    }
    stats.update(storage_comparison(num_classes))
    return stats
