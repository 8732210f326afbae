"""Crash-safe file output and run metadata shared by the scripts."""
import contextlib
import csv
import hashlib
import importlib.metadata
import logging
import os
import platform
import sys
import tempfile
from typing import Any, Dict, Iterator, Optional

from . import __version__

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb') -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    A crash or exception leaves ``path`` untouched (either absent or the previous complete version).
    """
    directory = os.path.dirname(os.path.abspath(path)) or '.'
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory`` (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def truncate_summary(path: str, first_epoch: int) -> int:
    """Drop the rows of a per-epoch ``summary.csv`` whose ``epoch`` is ``>= first_epoch`` (rewritten atomically).

    A run killed after writing an epoch's row but before saving its checkpoint repeats that epoch on resume; without
    this the file would hold the epoch twice. The header is kept even when no row remains.

    Returns:
        The number of rows removed (0 when the file does not exist).
    """
    if not os.path.isfile(path):
        return 0
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    col = header.index('epoch') if 'epoch' in header else 0
    keep = [r for r in body if r and _int_or_none(r[col]) is not None and _int_or_none(r[col]) < first_epoch]
    removed = len(body) - len(keep)
    if removed:
        with atomic_write(path, 'w') as f:
            csv.writer(f).writerows([header] + keep)
    return removed


def _int_or_none(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def sha256_file(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def software_versions() -> Dict[str, str]:
    """Versions of the packages that determine results, for metadata files."""
    versions = {'python': sys.version.split()[0], 'platform': platform.platform(), 'dr': __version__}
    for dist in ('torch', 'torchvision', 'timm', 'numpy', 'webdataset'):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = 'not installed'
    torch = sys.modules.get('torch')  # the CUDA build of the torch in use (read without importing it here)
    versions['cuda'] = str(torch.version.cuda) if torch is not None else 'not imported'
    return versions
