"""Reading the published ml-dr reinforcements (apple/ml-dr "rdata": ImageNet+, CIFAR-100+, ...).

An rdata archive (``reinforced_data.tar.gz``, or its extracted directory) holds ``config.pth.tar`` (the reinforcement
config, with ``reinforce.image_augmentation``) and one ``<index>.pth.tar`` per image: ``torch.save`` of
``(index, [{"params": compressed params, "prob": (probs, class ids)}, ...])`` with ``pickle_protocol=4``, where
``index`` is the image's position in torchvision's ``ImageFolder`` order of the training folder.

Nothing here executes pickled code: the pickles are read by :class:`RestrictedUnpickler`, which builds only the
builtin containers and numbers these files hold (numpy integer/float scalars included, rebuilt from their raw bytes)
and rejects any other global, naming the file. ``torch.load(weights_only=True)`` cannot be used (it refuses the
protocol-4 FRAME opcode), and a plain ``torch.load`` would run whatever the file asks.

:func:`convert_image` turns one image's samples into this project's record array (``dr.reinforce.format``) so that
``dr.reinforce.augment.apply_record`` replays exactly what ml-dr's students trained on (``Compose.reapply`` on the
PIL image): crop ``(top, left, h, w)`` -> ``(x, y, w, h)``; flip; RandAugment ``(op, signed magnitude)`` -> op index
+ sign flag (the magnitude must be torchvision's table value at the stored output size); the erase box (pixels ->
1/255 units, exact for output sides <= 255; ml-dr erases with 0 before normalisation: ``re_fill='black'``); mixup
lambda; the cutmix box ``(x1, y1, x2, y2)`` = (top, left, bottom, right) rows/columns; the partner ``id2`` and its own
crop/flip/RandAugment/erase parameters. Probabilities are stored ascending (``np.argpartition`` order) with their
ids; they are sorted descending here.
"""
import dataclasses
import io
import math
import os
import pickle
import tarfile
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..augment import RA_OPS, AugmentSpec, _ra_table, px_to_q255, q255_to_px
from ..format import (
    AUG_RRC,
    AUG_RRC_MIX,
    AUG_RRC_RA_RE,
    AUG_RRC_RA_RE_MIX,
    FLAG_CUTMIX,
    FLAG_ERASE,
    FLAG_HFLIP,
    FLAG_MIXUP,
    FLAG_RA_NEG,
)

CONFIG_NAME = 'config.pth.tar'
SAMPLE_SUFFIX = '.pth.tar'
# ml-dr's Compose order (dr/transforms.py TRANSFORMATION_TO_NAME) and the transforms without stored parameters
MLDR_ORDER = ('uint8', 'resize', 'center_crop', 'random_crop', 'random_resized_crop', 'random_horizontal_flip',
              'rand_augment', 'to_tensor', 'random_erase', 'normalize', 'mixup', 'cutmix')
MLDR_NO_PARAM = ('uint8', 'center_crop', 'to_tensor', 'normalize')
MLDR_SUPPORTED = ('uint8', 'random_resized_crop', 'random_horizontal_flip', 'rand_augment', 'to_tensor',
                  'random_erase', 'normalize', 'mixup', 'cutmix')
# legacy (non-zip) torch.save: magic number and protocol version pickled before the object
TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
TORCH_LEGACY_PROTOCOL = 1001
# numpy scalar types the files may hold (ml-dr's cutmix box is numpy int64): dtype codes allowed by the unpickler
_NUMPY_CODES = {'b1', '?', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8'}
_NUMPY_SCALAR = {('numpy._core.multiarray', 'scalar'), ('numpy.core.multiarray', 'scalar')}
MAGNITUDE_RTOL = 1e-5


class MldrFormatError(ValueError):
    """An ml-dr reinforcement file that cannot be read or converted; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# restricted unpickling


class _NumpyDtype:
    """Stand-in for ``numpy.dtype`` during unpickling: only plain numeric dtypes, rebuilt from their code."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or code not in _NUMPY_CODES:
            raise pickle.UnpicklingError(f'numpy dtype {code!r} is not a plain number type')
        self.code = code
        self.dtype = np.dtype(code)

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ('<', '>', '|', '='):
            raise pickle.UnpicklingError(f'unexpected numpy dtype state {state!r}')
        if any(v is not None for v in state[2:5]):
            raise pickle.UnpicklingError('structured/sub-array numpy dtypes are not allowed')
        order = '<' if state[1] == '|' else state[1]
        self.dtype = np.dtype(self.code).newbyteorder(order)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for ``numpy.core.multiarray.scalar``: the Python number of a numeric dtype's raw bytes."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError('malformed numpy scalar')
    return np.frombuffer(data, dtype=dtype.dtype, count=1)[0].item()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings, bytes and numbers (numpy numeric scalars become Python numbers).

    Any other global (a class, a function such as ``os.system`` or ``torch._utils._rebuild_tensor_v2``) and any
    persistent id (tensor storage) raise :class:`pickle.UnpicklingError` naming ``where``.
    """

    def __init__(self, file: Any, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_SCALAR:
            return _numpy_scalar
        if (module, name) == ('numpy', 'dtype'):
            return _NumpyDtype
        raise pickle.UnpicklingError(f'{self.where}: refusing to unpickle global {module}.{name} (only builtin '
                                     f'containers and numbers are allowed in ml-dr reinforcement files)')

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f'{self.where}: refusing persistent id {str(pid)[:60]!r} (tensor storage): '
                                     f'ml-dr reinforcement files hold only lists, tuples, dicts and numbers')


def restricted_loads(data: bytes, where: str) -> Any:
    """One pickle from ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), where).load()


def load_torch_save(data: bytes, where: str) -> Any:
    """The object of a ``torch.save`` file (zip or legacy format) without executing code.

    Raises:
        MldrFormatError: naming ``where`` for anything else, a refused global or tensor storage.
    """
    try:
        if data[:4] == b'PK\x03\x04':
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pickles = [n for n in z.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')]
                if len(pickles) != 1:
                    raise MldrFormatError(f'{where}: a torch.save zip archive without exactly one data.pkl')
                return restricted_loads(z.read(pickles[0]), where)
        f = io.BytesIO(data)
        magic = RestrictedUnpickler(f, where).load()
        if magic != TORCH_LEGACY_MAGIC:
            raise MldrFormatError(f'{where}: not a torch.save file (neither a zip archive nor the legacy format)')
        if RestrictedUnpickler(f, where).load() != TORCH_LEGACY_PROTOCOL:
            raise MldrFormatError(f'{where}: unsupported legacy torch.save protocol version')
        RestrictedUnpickler(f, where).load()  # sys_info
        obj = RestrictedUnpickler(f, where).load()
        if RestrictedUnpickler(f, where).load():
            raise MldrFormatError(f'{where}: holds tensor storages (ml-dr reinforcement files hold none)')
        return obj
    except MldrFormatError:
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)  # the refusals name the file already; anything else is a damaged pickle
        raise MldrFormatError(msg if msg.startswith(where) else f'{where}: unreadable torch.save file ({msg})') from e
    except (zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError) as e:
        raise MldrFormatError(f'{where}: unreadable torch.save file ({type(e).__name__}: {e})') from e


# ----------------------------------------------------------------------------------------------------------------------
# the rdata archive


def _member_kind(name: str) -> Optional[str]:
    base = name.rsplit('/', 1)[-1]
    if base == CONFIG_NAME:
        return 'config'
    if base.endswith(SAMPLE_SUFFIX) and base[:-len(SAMPLE_SUFFIX)].isdigit():
        return 'image'
    return None


def _iter_directory(path: str) -> Iterator[Tuple[str, str, bytes]]:
    root = path
    if not os.path.isfile(os.path.join(root, CONFIG_NAME)) and os.path.isdir(os.path.join(root, 'reinforced_data')):
        root = os.path.join(root, 'reinforced_data')
    config = os.path.join(root, CONFIG_NAME)
    if not os.path.isfile(config):
        raise MldrFormatError(f'{path}: no {CONFIG_NAME} (expected an ml-dr reinforced_data directory)')
    with open(config, 'rb') as f:
        yield 'config', config, f.read()
    for name in sorted(os.listdir(root)):
        if _member_kind(name) == 'image':
            with open(os.path.join(root, name), 'rb') as f:
                yield 'image', os.path.join(root, name), f.read()


def _iter_tar(path: str, max_buffer: int) -> Iterator[Tuple[str, str, bytes]]:
    """Stream the archive once; members before ``config.pth.tar`` are buffered (up to ``max_buffer`` bytes, else the
    archive is first scanned for the config alone)."""
    buffered: List[Tuple[str, str, bytes]] = []
    size = 0
    config_seen = False
    try:
        with tarfile.open(path, mode='r|*') as tar:
            for info in tar:
                kind = _member_kind(info.name) if info.isfile() else None
                if kind is None:
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b''
                where = f'{path}:{info.name}'
                if kind == 'config':
                    config_seen = True
                    yield 'config', where, data
                    yield from buffered
                    buffered.clear()
                elif config_seen:
                    yield 'image', where, data
                elif size + len(data) <= max_buffer:
                    buffered.append(('image', where, data))
                    size += len(data)
                else:
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MldrFormatError(f'{path}: corrupt or truncated archive ({type(e).__name__}: {e})') from e
    if config_seen:
        return
    config = _find_tar_config(path)
    yield 'config', config[0], config[1]
    with tarfile.open(path, mode='r|*') as tar:
        for info in tar:
            if info.isfile() and _member_kind(info.name) == 'image':
                f = tar.extractfile(info)
                yield 'image', f'{path}:{info.name}', f.read() if f is not None else b''


def _find_tar_config(path: str) -> Tuple[str, bytes]:
    with tarfile.open(path, mode='r|*') as tar:
        for info in tar:
            if info.isfile() and _member_kind(info.name) == 'config':
                f = tar.extractfile(info)
                return f'{path}:{info.name}', f.read() if f is not None else b''
    raise MldrFormatError(f'{path}: no {CONFIG_NAME} in the archive (not an ml-dr rdata tarball?)')


def iter_rdata(path: str, max_buffer: int = 256 << 20) -> Iterator[Tuple[str, str, bytes]]:
    """``(kind, where, bytes)`` of an rdata archive (``.tar.gz``/``.tar``, streamed) or directory: the config first
    (kind ``config``), then every ``<index>.pth.tar`` (kind ``image``) in archive order."""
    if os.path.isdir(path):
        yield from _iter_directory(path)
    elif os.path.isfile(path):
        yield from _iter_tar(path, max_buffer)
    else:
        raise FileNotFoundError(f'--import-ml-dr: {path} does not exist')


# ----------------------------------------------------------------------------------------------------------------------
# the reinforcement config


def _size2(value: Any, where: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], int):
        return int(value[0]), int(value[0])
    raise MldrFormatError(f'{where}: random_resized_crop size {value!r} is not an int or (h, w)')


def _check_keys(where: str, name: str, cfg: Dict[str, Any], allowed: Sequence[str]) -> None:
    bad = sorted(set(cfg) - set(allowed) - {'enable'})
    if bad:
        raise MldrFormatError(f'{where}: {name} option(s) {", ".join(bad)} are not supported by the importer')


@dataclasses.dataclass
class MldrConfig:
    """What the importer needs from ml-dr's ``config.pth.tar``.

    Attributes:
        spec: this project's augmentation spec equivalent to ml-dr's ``image_augmentation``.
        out_size: (h, w) of ml-dr's random-resized-crop output (the resolution the teacher saw).
        mean: normalisation mean.
        std: normalisation std.
        num_samples: stored augmentations per image.
        topk: stored classes per augmentation.
        transforms: ml-dr's transforms in Compose order (those enabled in the config).
        raw: the ``reinforce`` section of the config (JSON-safe copy for reinforce.json).
        teacher: the config's ``teacher`` section (JSON-safe), if any.
    """
    spec: AugmentSpec
    out_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_samples: int
    topk: int
    transforms: Tuple[str, ...]
    raw: Dict[str, Any]
    teacher: Any = None

    @property
    def mixing(self) -> bool:
        return 'mixup' in self.transforms or 'cutmix' in self.transforms

    @property
    def param_transforms(self) -> Tuple[str, ...]:
        """The transforms whose parameters the compressed list holds, in order."""
        return tuple(t for t in self.transforms if t not in MLDR_NO_PARAM)


def _enabled(aug: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """ml-dr's ``clean_config``: entries with ``enable: false`` are dropped."""
    out = {}
    for k, v in aug.items():
        v = dict(v or {})
        if v.pop('enable', True):
            out[k] = v
    return out


def parse_config(obj: Any, where: str) -> MldrConfig:
    """:class:`MldrConfig` from the unpickled ``config.pth.tar``.

    Raises:
        MldrFormatError: naming ``where`` for a config this importer cannot convert exactly (e.g. CIFAR-100's
            ``resize`` + ``random_crop``, a RandAugment of more than 2 ops, a non-zero erase value).
    """
    try:
        rcfg = obj['reinforce']
        aug = _enabled(rcfg['image_augmentation'])
        num_samples, topk = int(rcfg['num_samples']), int(rcfg['topk'])
    except (KeyError, TypeError, ValueError) as e:
        raise MldrFormatError(f'{where}: not an ml-dr reinforcement config (missing {e})') from e
    unknown = [k for k in aug if k not in MLDR_ORDER]
    unsupported = [k for k in aug if k in MLDR_ORDER and k not in MLDR_SUPPORTED]
    if unknown:
        raise MldrFormatError(f'{where}: unknown transform(s) {", ".join(unknown)} in image_augmentation')
    if unsupported:
        raise MldrFormatError(f'{where}: transform(s) {", ".join(unsupported)} cannot be converted to stored '
                              f'crops of the original image (only random_resized_crop reinforcements import)')
    if 'random_resized_crop' not in aug or 'normalize' not in aug:
        raise MldrFormatError(f'{where}: image_augmentation needs random_resized_crop and normalize')
    rrc = aug['random_resized_crop']
    _check_keys(where, 'random_resized_crop', rrc, ('size', 'scale', 'ratio', 'antialias'))
    if rrc.get('antialias', True) is not True:
        raise MldrFormatError(f'{where}: random_resized_crop antialias=False is not supported')
    out_size = _size2(rrc.get('size'), where)
    fields: Dict[str, Any] = {'scale': tuple(rrc.get('scale', (0.08, 1.0))),
                              'ratio': tuple(rrc.get('ratio', (3.0 / 4.0, 4.0 / 3.0))),
                              'hflip': float(aug.get('random_horizontal_flip', {}).get('p', 0.5))
                              if 'random_horizontal_flip' in aug else 0.0,
                              'interpolation': 'bilinear', 're_fill': 'black'}
    ra = 'rand_augment' in aug
    if ra:
        fields.update(_ra_fields(aug['rand_augment'], where))
    if 'random_erase' in aug:
        fields.update(_re_fields(aug['random_erase'], where))
    elif ra:
        fields['re_prob'] = 0.0
    mixing = 'mixup' in aug or 'cutmix' in aug
    if mixing:
        fields.update(_mix_fields(aug, where))
    if 'random_erase' in aug and not ra:
        raise MldrFormatError(f'{where}: random_erase without rand_augment has no equivalent here')
    name = {(False, False): AUG_RRC, (True, False): AUG_RRC_RA_RE, (False, True): AUG_RRC_MIX,
            (True, True): AUG_RRC_RA_RE_MIX}[(ra, mixing)]
    if not ra:
        fields.update(ra_num_ops=0, re_prob=0.0)
    try:
        spec = AugmentSpec(name=name, **fields)
    except (ValueError, TypeError) as e:
        raise MldrFormatError(f'{where}: {e}') from e
    norm = aug['normalize']
    _check_keys(where, 'normalize', norm, ('mean', 'std'))
    return MldrConfig(spec=spec, out_size=out_size, mean=tuple(float(v) for v in norm['mean']),
                      std=tuple(float(v) for v in norm['std']), num_samples=num_samples, topk=topk,
                      transforms=tuple(t for t in MLDR_ORDER if t in aug), raw=_json_safe(rcfg),
                      teacher=_json_safe(obj.get('teacher')) if isinstance(obj, dict) else None)


def _ra_fields(cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
    _check_keys(where, 'rand_augment', cfg, ('p', 'num_ops', 'magnitude', 'num_magnitude_bins', 'fill',
                                              'interpolation'))
    if cfg.get('fill') is not None or cfg.get('interpolation') not in (None, 'nearest'):
        raise MldrFormatError(f'{where}: rand_augment fill/interpolation other than the defaults are not supported')
    num_ops = int(cfg.get('num_ops', 2))
    if not 0 <= num_ops <= 2:
        raise MldrFormatError(f'{where}: rand_augment num_ops={num_ops}; stored records hold at most 2 ops')
    return {'ra_num_ops': num_ops, 'ra_magnitude': int(cfg.get('magnitude', 9)),
            'ra_num_bins': int(cfg.get('num_magnitude_bins', 31))}


def _re_fields(cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
    _check_keys(where, 'random_erase', cfg, ('p', 'scale', 'ratio', 'value', 'inplace'))
    if cfg.get('value', 0) != 0:
        raise MldrFormatError(f'{where}: random_erase value {cfg["value"]!r} (only 0 = black is supported)')
    return {'re_prob': float(cfg.get('p', 0.5)), 're_scale': tuple(cfg.get('scale', (0.02, 0.33))),
            're_ratio': tuple(cfg.get('ratio', (0.3, 3.3)))}


def _mix_fields(aug: Dict[str, Any], where: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {'mix_group': 0}
    if 'mixup' in aug:
        _check_keys(where, 'mixup', aug['mixup'], ('alpha', 'p', 'div_by'))
        out.update(mixup_p=float(aug['mixup'].get('p', 1.0)), mixup_alpha=float(aug['mixup'].get('alpha', 1.0)),
                   mixup_div_by=float(aug['mixup'].get('div_by', 1.0)))
    if 'cutmix' in aug:
        _check_keys(where, 'cutmix', aug['cutmix'], ('alpha', 'p'))
        out.update(cutmix_p=float(aug['cutmix'].get('p', 1.0)), cutmix_alpha=float(aug['cutmix'].get('alpha', 1.0)))
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


# ----------------------------------------------------------------------------------------------------------------------
# one image's samples -> records


def decompress_params(params: Any, cfg: MldrConfig, where: str) -> Dict[str, Any]:
    """ml-dr's ``Compose.decompress`` in its stored meaning: ``{transform: (own params, partner params or None),
    'id2': partner index, 'mixup': lam, 'cutmix': (lam, box)}`` from a compressed list (or an uncompressed dict)."""
    if isinstance(params, dict):  # reinforce.compress=false: every transform stored as (own, partner)
        out: Dict[str, Any] = {}
        for t in cfg.param_transforms:
            p = params.get(t)
            if t in ('mixup', 'cutmix'):
                if p is not None:
                    out[t] = p
            elif p is None:
                out[t] = (None, None)
            elif isinstance(p, (list, tuple)) and len(p) == 2:
                out[t] = (p[0], p[1])
            else:
                raise MldrFormatError(f'{where}: uncompressed {t} parameters are not an (own, partner) pair')
        if params.get('id2') is not None:
            out['id2'] = params['id2']
        return out
    if not isinstance(params, (list, tuple)):
        raise MldrFormatError(f'{where}: params are neither a compressed list nor a dict')
    params = list(params)
    out = {}
    paired = False
    if cfg.mixing:
        if not params:
            raise MldrFormatError(f'{where}: empty compressed params')
        id2 = params.pop(0)
        if id2 is not None:
            out['id2'] = id2
            paired = True
    if len(params) != len(cfg.param_transforms):
        raise MldrFormatError(f'{where}: {len(params)} compressed parameters, the config has '
                              f'{len(cfg.param_transforms)} ({", ".join(cfg.param_transforms)})')
    for t, p in zip(cfg.param_transforms, params):
        if t in ('mixup', 'cutmix'):
            if p is not None:
                out[t] = (p[0], tuple(p[1:])) if t == 'cutmix' else p
        elif paired:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise MldrFormatError(f'{where}: {t} parameters of a mixed sample are not a pair')
            out[t] = (p[0], p[1])
        else:
            out[t] = (p, None)
    return out


def _crop(p: Any, where: str) -> Tuple[int, int, int, int]:
    """ml-dr's RRC params (top, left, h, w) -> this project's (x, y, w, h)."""
    if not isinstance(p, (list, tuple)) or len(p) != 4:
        raise MldrFormatError(f'{where}: random_resized_crop parameters {p!r} are not (top, left, h, w)')
    top, left, h, w = (int(v) for v in p)
    if top < 0 or left < 0 or h < 1 or w < 1:
        raise MldrFormatError(f'{where}: invalid crop (top, left, h, w) = {(top, left, h, w)}')
    return left, top, w, h


def _ra(p: Any, spec: AugmentSpec, out_size: Tuple[int, int], where: str) -> Tuple[List[int], int]:
    """RandAugment ``[(op, signed magnitude), ...]`` (op name or index) -> (op indices, sign flags)."""
    identity = spec.ra_ops.index('Identity')
    if p is None:
        return [identity] * 2, 0
    if not isinstance(p, (list, tuple)) or len(p) != spec.ra_num_ops:
        raise MldrFormatError(f'{where}: rand_augment parameters {p!r} do not hold {spec.ra_num_ops} ops')
    table = _ra_table(spec.ra_num_bins, spec.ra_magnitude, out_size[0], out_size[1])
    ops, flags = [identity] * 2, 0
    for j, item in enumerate(p):
        op, magnitude = item
        name = RA_OPS[op] if isinstance(op, int) and 0 <= op < len(RA_OPS) else op
        if name not in spec.ra_ops:
            raise MldrFormatError(f'{where}: unknown RandAugment op {op!r}')
        expected, signed = table[name]
        magnitude = float(magnitude)
        if not math.isclose(abs(magnitude), expected, rel_tol=MAGNITUDE_RTOL, abs_tol=1e-6) or \
                (magnitude < 0 and not signed):
            raise MldrFormatError(f'{where}: RandAugment {name} magnitude {magnitude} is not +/-{expected} (the '
                                  f'table value at magnitude {spec.ra_magnitude} of {spec.ra_num_bins} bins for '
                                  f'{out_size[0]}x{out_size[1]})')
        ops[j] = spec.ra_ops.index(name)
        if signed and magnitude < 0:
            flags |= FLAG_RA_NEG[j]
    return ops, flags


def _q255_exact(px: Sequence[int], size: int, where: str, what: str) -> List[int]:
    q = px_to_q255(np.asarray(px, dtype=np.int64), size)
    if not np.array_equal(q255_to_px(q, size), np.asarray(px)):
        raise MldrFormatError(f'{where}: {what} {list(px)} has no exact 1/255-unit code at output side {size} '
                              f'(sides > 255 are not representable)')
    return [int(v) for v in q]


def _erase(p: Any, out_size: Tuple[int, int], where: str) -> Tuple[List[int], int]:
    """ml-dr erase box (top, left, h, w) pixels (or None) -> (1/255-unit box, FLAG_ERASE or 0)."""
    if p is None:
        return [0, 0, 0, 0], 0
    if not isinstance(p, (list, tuple)) or len(p) != 4:
        raise MldrFormatError(f'{where}: random_erase parameters {p!r} are not (top, left, h, w)')
    top, left, h, w = (int(v) for v in p)
    if top == -1 or h <= 0 or w <= 0:  # ml-dr erases nothing for these
        return [0, 0, 0, 0], 0
    if top < 0 or left < 0 or top + h > out_size[0] or left + w > out_size[1]:
        raise MldrFormatError(f'{where}: erase box {(top, left, h, w)} outside the {out_size} output')
    qt, qh = _q255_exact([top, h], out_size[0], where, 'erase box (top, h)')
    ql, qw = _q255_exact([left, w], out_size[1], where, 'erase box (left, w)')
    return [qt, ql, qh, qw], FLAG_ERASE


def _sorted_probs(prob: Any, topk: int, num_classes: int, where: str) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(prob, (list, tuple)) or len(prob) != 2:
        raise MldrFormatError(f'{where}: prob is not (probabilities, class ids)')
    p = np.asarray(prob[0], dtype=np.float64).reshape(-1)
    ids = np.asarray(prob[1], dtype=np.float64).reshape(-1)
    if len(p) != topk or len(ids) != topk:
        raise MldrFormatError(f'{where}: {len(p)} probabilities / {len(ids)} ids, the config says topk={topk}')
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any() or p.sum() > 1.0 + 1e-3:
        raise MldrFormatError(f'{where}: invalid probabilities {p.tolist()}')
    if (ids != np.round(ids)).any() or (ids < 0).any() or (ids >= num_classes).any() or len(set(ids)) != len(ids):
        raise MldrFormatError(f'{where}: class ids {ids.tolist()} are not distinct integers < {num_classes}')
    order = np.argsort(-p, kind='stable')
    return ids[order].astype(np.int64), p[order]


def convert_image(
        obj: Any,
        where: str,
        cfg: MldrConfig,
        dtype: np.dtype,
        num_classes: int,
        num_images: int,
        position_of: Callable[[int], int],
) -> Tuple[int, np.ndarray]:
    """One unpickled ``<index>.pth.tar`` -> (image index, record array of ``dtype``).

    Args:
        obj: ``(index, [{"params": ..., "prob": ...}, ...])``.
        where: the file, named in errors.
        cfg: the parsed config.
        dtype: the record dtype (``format.record_dtype`` of ``cfg.spec.name``).
        num_classes: class ids must be below it.
        num_images: image indices (own and partners) must be below it (the ImageFolder size).
        position_of: maps a partner's image index to its ``mix_ref`` (its position in the output).

    Raises:
        MldrFormatError: naming ``where`` (and the sample) for anything that does not convert exactly.
    """
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[0], int) \
            or not isinstance(obj[1], (list, tuple)):
        raise MldrFormatError(f'{where}: expected (index, [samples]), got {type(obj).__name__}')
    index, samples = obj
    if not 0 <= index < num_images:
        raise MldrFormatError(f'{where}: image index {index} outside the image folder (0..{num_images - 1}): '
                              f'does --data-dir hold the images these reinforcements were made from?')
    if len(samples) != cfg.num_samples:
        raise MldrFormatError(f'{where}: {len(samples)} samples, the config says num_samples={cfg.num_samples}')
    rec = np.zeros(len(samples), dtype=dtype)
    for k, sample in enumerate(samples):
        at = f'{where} sample {k}'
        if not isinstance(sample, dict) or 'params' not in sample or 'prob' not in sample:
            raise MldrFormatError(f'{at}: expected a dict with params and prob')
        rec[k] = _convert_sample(decompress_params(sample['params'], cfg, at), sample['prob'], cfg, at,
                                 num_classes, num_images, position_of, rec.dtype)
    return index, rec


def _convert_sample(p: Dict[str, Any], prob: Any, cfg: MldrConfig, at: str, num_classes: int, num_images: int,
                    position_of: Callable[[int], int], dtype: np.dtype) -> np.ndarray:
    spec = cfg.spec
    row = np.zeros((), dtype=dtype)
    ids, probs = _sorted_probs(prob, cfg.topk, num_classes, at)
    row['ids'], row['probs'] = ids, probs.astype(np.float16)

    def own(i: int) -> Tuple[Tuple[int, ...], int, List[int], List[int]]:
        crop_p = p.get('random_resized_crop', (None, None))[i]
        if crop_p is None:
            raise MldrFormatError(f'{at}: no random_resized_crop parameters' + (' for the partner' if i else ''))
        flags = FLAG_HFLIP if p.get('random_horizontal_flip', (False, False))[i] else 0
        ops, re_box = [0, 0], [0, 0, 0, 0]
        if spec.has_ra_re:
            ops, ra_flags = _ra(p.get('rand_augment', (None, None))[i], spec, cfg.out_size, at)
            re_box, re_flag = _erase(p.get('random_erase', (None, None))[i], cfg.out_size, at)
            flags |= ra_flags | re_flag
        return _crop(crop_p, at), flags, ops, re_box

    crop, flags, ops, re_box = own(0)
    row['crop'] = crop
    if spec.has_ra_re:
        row['ra_ops'], row['re_box'] = ops, re_box
    if spec.has_mix and ('mixup' in p or 'cutmix' in p):
        id2 = p.get('id2')
        if not isinstance(id2, int) or not 0 <= id2 < num_images:
            raise MldrFormatError(f'{at}: partner id2={id2!r} outside the image folder (0..{num_images - 1})')
        crop2, flags2, ops2, re_box2 = own(1)
        row['mix_ref'], row['mix_crop'], row['mix_flags'] = position_of(id2), crop2, flags2
        if spec.has_ra_re:
            row['mix_ra_ops'], row['mix_re_box'] = ops2, re_box2
        if 'mixup' in p:
            flags |= FLAG_MIXUP
            row['mix_lam'] = float(p['mixup'])
        if 'cutmix' in p:
            flags |= FLAG_CUTMIX
            row['mix_box'] = _cutmix_box(p['cutmix'], cfg.out_size, at)
    row['flags'] = flags
    return row


def _cutmix_box(p: Any, out_size: Tuple[int, int], at: str) -> List[int]:
    """ml-dr cutmix ``(lam, (x1, y1, x2, y2))`` (rows x, columns y) -> (top, left, bottom, right) in 1/255 units."""
    try:
        _, box = p
        x1, y1, x2, y2 = (int(v) for v in box)
    except (TypeError, ValueError) as e:
        raise MldrFormatError(f'{at}: cutmix parameters {p!r} are not (lam, (x1, y1, x2, y2))') from e
    h, w = out_size
    if not (0 <= x1 <= x2 <= h and 0 <= y1 <= y2 <= w):
        raise MldrFormatError(f'{at}: cutmix box {(x1, y1, x2, y2)} outside the {out_size} output')
    top, bottom = _q255_exact([x1, x2], h, at, 'cutmix box rows')
    left, right = _q255_exact([y1, y2], w, at, 'cutmix box columns')
    return [top, left, bottom, right]


# ----------------------------------------------------------------------------------------------------------------------
# the image folder


def imagefolder_index(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(``[(path, class index)]`` in torchvision ``ImageFolder`` order, class names): ml-dr's image indices."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'--data-dir: {root} is not a directory')
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f'--data-dir {root}: not an ImageFolder ({e})') from e
    return [(str(p), int(c)) for p, c in samples], list(classes)
