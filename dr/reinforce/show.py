"""Look at stored augmentations: ``reinforce.py --show`` replays samples exactly as the training loader does.

Image ``I`` is the source dataset index (``format.meta_image_order`` maps it to its position in the shards); sample
``K`` is its ``K``-th stored augmentation. The replay goes through the training loader's own code
(``ReinforcedShards.replay`` + ``collate``: PIL stages, batch normalisation, erase fill, mixing with the partner), at
the input size, normalisation and interpolation of the first teacher member (for imported ml-dr data: what the
authors' students trained on).
"""
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..io import atomic_write
from .format import meta_image_order
from .loader import check_reinforced, create_reinforced_loader
from .partners import PartnerImages

_logger = logging.getLogger(__name__)


def show_samples(directory: str, images: Sequence[int], samples: Sequence[int],
                 where_flag: str = '--show') -> Dict[str, Dict[str, Any]]:
    """``"<image>_<sample>"`` -> ``{'x': float32 [3, H, W] normalised, 'ids', 'probs' (stored top-k, descending),
    'label', 'mean', 'std'}`` for every image x sample pair, in that order.

    Raises:
        ValueError: naming the flag for an image index outside the dataset or a sample it does not have.
    """
    meta = check_reinforced(directory, None, where_flag=where_flag)
    t = meta['teachers'][0]
    loader = create_reinforced_loader(
        directory, meta, batch_size=1, num_workers=0, input_size=t['input_size'], mean=t['mean'], std=t['std'],
        interpolation=t['interpolation'], rd_p=1.0, shuffle_buffer=0, where_flag=where_flag)
    dataset = loader.dataset
    order = meta_image_order(meta)
    positions = np.empty_like(order)
    positions[order] = np.arange(len(order))
    reader = PartnerImages(meta, where_flag)
    keys: List[str] = []
    items: List[Any] = []
    for i in images:
        if not 0 <= int(i) < len(order):
            raise ValueError(f'--images: {i} outside the dataset (0..{len(order) - 1})')
        sample = reader.sample(int(positions[int(i)]))
        sample['__pass__'] = 0
        for k in samples:
            if not 0 <= int(k) < int(meta['num_samples']):
                raise ValueError(f'--samples: {k} outside 0..{int(meta["num_samples"]) - 1}')
            items.append(dataset.replay(sample, int(k)))
            keys.append(f'{int(i)}_{int(k)}')
    reader.close()
    x, _, labels = dataset.collate(items)
    return {key: {'x': x[n].numpy(), 'ids': np.asarray(items[n][3]), 'probs': np.asarray(items[n][4], np.float32),
                  'label': int(labels[n]), 'mean': t['mean'], 'std': t['std']}
            for n, key in enumerate(keys)}


def save_npz(path: str, shown: Dict[str, Dict[str, Any]]) -> str:
    """``.npz`` with one float32 CHW array per ``"<image>_<sample>"`` (written atomically)."""
    with atomic_write(path) as f:
        np.savez(f, **{k: v['x'] for k, v in shown.items()})
    return path


def _pixels(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    rgb = x * np.asarray(std, dtype=np.float32).reshape(-1, 1, 1) + np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    return np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0)


def save_png(path: str, shown: Dict[str, Dict[str, Any]], class_names: Optional[Sequence[str]] = None,
             topn: int = 3) -> str:
    """A grid (one row per image, one column per sample) titled with each sample's top-``topn`` teacher classes."""
    grid: Dict[str, List[str]] = {}
    for key in shown:
        grid.setdefault(key.split('_')[0], []).append(key)
    cols = max(len(keys) for keys in grid.values())
    fig = Figure(figsize=(2.3 * cols, 3.0 * len(grid)))  # no pyplot: no global figure state, no GUI backend
    axes = fig.subplots(len(grid), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis('off')

    def name(i: int) -> str:
        return str(class_names[i]) if class_names and i < len(class_names) else str(i)

    for r, keys in enumerate(grid.values()):
        for c, key in enumerate(keys):
            item = shown[key]
            axes[r][c].imshow(_pixels(item['x'], item['mean'], item['std']), interpolation='nearest')
            top = [f'{name(int(i))} {float(p):.2f}' for i, p in zip(item['ids'][:topn], item['probs'][:topn])]
            axes[r][c].set_title(f'{key} (label {name(item["label"])})\n' + '\n'.join(top), fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=100)
    return path
