"""Training on label-map shards (``reinforce.py --label-maps``): a fresh crop per step, its target pooled from the map.

:class:`LabelMapShards` is the reinforced loader (:class:`dr.reinforce.loader.ReinforcedShards`: the same epochs,
shard pieces, shuffling, checksums and ``rd_p`` fallback) with one change per sample: instead of replaying a stored
augmentation, it draws a random-resized crop + flip (the ``augmentation`` recorded in ``reinforce.json``, this
project's ``rrc`` draws) from a generator keyed on (seed, epoch, key), and the target is
:func:`dr.reinforce.label_maps.pool_target` of the stored map over that crop box.
"""
import logging
from typing import Any, Dict, Tuple

import numpy as np

from .augment import apply_record_pil, sample_records
from .format import LABEL_MAP_FIELDS, META_NAME, decode_records, record_dtype
from .label_maps import DEFAULT_FILL, check_label_map_records, map_size, pool_target
from .loader import ReinforcedDataError, ReinforcedShards, SampleDecoder, sample_draws

_logger = logging.getLogger(__name__)


class LabelMapDecoder(SampleDecoder):
    """:class:`SampleDecoder` whose records are a label map (checked by ``label_maps.check_label_map_records``)."""

    def __init__(self, meta: Dict[str, Any], where_flag: str = '--reinforced'):
        super().__init__(meta, where_flag)
        self.meta = meta
        map_size(meta)  # a bad label_map entry is an error naming reinforce.json

    def check_all(self, records: np.ndarray, img, sample: Dict[str, Any]) -> None:
        """Nothing more to check: a label map has no crop boxes (its layout was checked by :meth:`records`)."""

    def records(self, data: bytes, sample: Dict[str, Any]) -> np.ndarray:
        where = f'shard {sample.get("__url__")} key {sample.get("__key__")}'
        arr = decode_records(data, where, LABEL_MAP_FIELDS)
        check_label_map_records(arr, where, self.meta)
        return arr


class LabelMapShards(ReinforcedShards):
    """Batches ``(input, target_probs, labels)`` of one epoch from label-map shards (see the module docstring)."""

    def __init__(self, shards, meta: Dict[str, Any], **kwargs):
        if kwargs.get('replay_device'):
            raise ValueError(f'--replay-device: {meta.get("_path", META_NAME)} holds label maps (nothing stored to '
                             f'replay); drop --replay-device')
        super().__init__(shards, meta, **kwargs)
        self.map_meta = {k: meta[k] for k in ('num_classes', 'topk', 'label_map', '_path') if k in meta}
        self._decoder = LabelMapDecoder(self.map_meta | {'num_samples': meta['num_samples'],
                                                         'augmentation': meta['augmentation'],
                                                         'schema_version': meta['schema_version']}, self.where_flag)
        self.map_size = map_size(meta)
        self.fill = float(meta['label_map'].get('fill', DEFAULT_FILL))
        self.crop_dtype = record_dtype(1, self.num_classes, 'rrc')
        self._all_ids = np.arange(self.num_classes)

    def crop_sample(self, img, records: np.ndarray, label: int, crop_seed: int) -> Tuple[Any, ...]:
        """A fresh random-resized crop + flip of ``img`` drawn from ``crop_seed`` and its pooled-map target, as
        :meth:`collate` takes an ``'rd'`` row (the target as a dense top-``num_classes``)."""
        rng = np.random.default_rng(crop_seed)
        rec = sample_records(rng, img.width, img.height, self.spec, 1, self.crop_dtype)[0]
        _, h, w = self.input_size
        out = apply_record_pil(img, rec, self.spec, (h, w), self.interpolation)
        target = pool_target(records, self.map_size, self.num_classes, rec['crop'], img.size, self.fill)
        return 'rd', np.asarray(out), label, self._all_ids, target.numpy(), None, None

    def _process(self, sample: Dict[str, Any]) -> Tuple[Any, ...]:
        img, label, records = self._decoder(sample)
        u, _, seed = sample_draws(self.seed, self.epoch, sample['__pass__'], sample['__key__'], 1)
        if u >= self.rd_p:
            return self._fallback(img, label, seed)
        try:
            return self.crop_sample(img, records, label, seed)
        except ValueError as e:
            raise ReinforcedDataError(f'{self._decoder.where(sample)}: {e}') from e

