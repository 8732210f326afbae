"""Helpers the benchmark scripts share: device sync, memory peaks, device names and generated test images.

Imported by the scripts as ``from bench_utils import ...`` (``benchmarks/`` is the script directory on ``sys.path``).
"""
import io
import os
import re
import resource
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

# ImageNet's typical photo: 500 x 375 (landscape) or 375 x 500, JPEG quality ~90, ~110 KB
IMAGENET_LIKE_SIZE = (375, 500)  # (height, width)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU), so wall-clock timers measure the work."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new memory-peak window: CUDA's allocator peak, or on CPU the process RSS high-water mark (Linux
    ``/proc/self/clear_refs``; elsewhere the peak stays the process's lifetime peak, see :func:`peak_memory`)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _vm_hwm_bytes() -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device: torch.device) -> Dict[str, Any]:
    """The memory peak since the last :func:`reset_peak_memory`, as ``{'peak_bytes', 'kind', ...}``.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved`` (the caching allocator's pool).
    CPU: this process's resident-set high-water mark (``VmHWM``, reset per window where Linux allows it, else the
    ``getrusage`` lifetime peak); it includes the imported libraries and excludes data-loader worker processes.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        return {'peak_bytes': int(torch.cuda.max_memory_allocated(device)),
                'reserved_peak_bytes': int(torch.cuda.max_memory_reserved(device)),
                'kind': 'torch.cuda.max_memory_allocated'}
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return {'peak_bytes': hwm, 'kind': 'process RSS high-water mark (VmHWM; main process only)'}
    scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {'peak_bytes': int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale,
            'kind': 'process RSS lifetime peak (getrusage; main process only)'}


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a device name (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-') or 'device'


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (else ``platform.processor()``), with the core count."""
    name = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    name = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    if not name:
        import platform
        name = platform.processor() or platform.machine() or 'cpu'
    return f'{name} ({os.cpu_count()} cores)'


def textured_image(rng: np.random.Generator, size: Sequence[int] = IMAGENET_LIKE_SIZE) -> Image.Image:
    """A photo-like RGB image: smooth colour blobs, a few oriented gratings and fine grain (so JPEG sizes and decode
    costs resemble natural photos rather than flat or pure-noise images)."""
    h, w = int(size[0]), int(size[1])
    coarse = rng.uniform(0, 255, size=(max(2, h // 48), max(2, w // 48), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(3):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.25)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        base += rng.uniform(10, 40) * np.sin(freq * phase)[..., None] * rng.uniform(0.3, 1.0, size=3)
    base += rng.normal(0, 8, size=(h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _write_one(job) -> int:
    path, seed, size, quality = job
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    textured_image(rng, size).save(buf, format='JPEG', quality=quality)
    with open(path, 'wb') as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


def write_jpeg_folder(root: str, num_images: int, num_classes: int, size: Sequence[int] = IMAGENET_LIKE_SIZE,
                      seed: int = 0, quality: int = 90, processes: int = 1) -> Dict[str, Any]:
    """``num_images`` generated JPEGs in an ImageFolder layout ``root/<class>/<nnnnnn>.jpg`` (classes round-robin,
    sizes alternating landscape/portrait like ImageNet's); returns ``{'root', 'num_images', 'bytes', ...}``."""
    classes = [f'class_{c:03d}' for c in range(num_classes)]
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
    h, w = int(size[0]), int(size[1])
    jobs = [(os.path.join(root, classes[i % num_classes], f'{i:06d}.jpg'), [seed, i], (h, w) if i % 4 else (w, h),
             quality) for i in range(num_images)]
    if processes > 1 and num_images > 1:
        import multiprocessing
        with multiprocessing.get_context('fork').Pool(processes) as pool:
            sizes: List[int] = pool.map(_write_one, jobs, chunksize=max(1, num_images // (4 * processes)))
    else:
        sizes = [_write_one(j) for j in jobs]
    return {'root': root, 'num_images': num_images, 'num_classes': num_classes, 'size_hw': [h, w],
            'bytes': int(sum(sizes)), 'mean_kb': sum(sizes) / max(1, num_images) / 1024, 'jpeg_quality': quality}
