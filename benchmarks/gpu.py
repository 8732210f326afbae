#!/usr/bin/env python3
"""Every GPU figure of the project in one command, within a wall-clock budget (default 8 minutes on one GPU).

Sections (each runs in its own forked process with its own time box; a failure or a timeout is recorded and the
run goes on; a box's unused time goes to the sections after it):

* ``environment``: device name, memory, torch / CUDA / cuDNN / driver versions, TF32 settings.
* ``bake``: BAKE training step / plain step (``bake_overhead.run``: ResNet-50, 224 px, batch 256 = 128 anchors +
  128 class mates), float32, AMP bfloat16, AMP bfloat16 + channels-last; memory peak of one step of each.
* ``reinforce``: reinforce.py's writer (``reinforce_throughput.measure``) vs the bare teacher forward on the same
  batches, a large random-weight teacher (resnext101_32x16d, batch 256) over generated ImageNet-like JPEGs.
* ``loader``: the generated JPEGs reinforced by ``dr.reinforce.Reinforcer`` (small random-weight teacher), then
  the reinforced loader vs ``timm.data.create_loader`` over the same files, each feeding a ResNet-50 training step
  (plus the step alone on one resident batch, the ceiling), and the loaders alone.
* ``validate``: validate.py's evaluation loop vs a bare forward loop (``validate_throughput``), ResNet-50 224 px.
* ``bake_compile``: the ``bake`` step with ``torch.compile`` (both tasks), bfloat16 + channels-last.
* ``cuda_checks``: train.py on a tiny generated ImageFolder, once each: a baseline run, ``--sync-bn`` under
  ``torchrun --nproc_per_node=1`` (NCCL), ``--amp --amp-dtype float16`` (grad scaler), ``--torchcompile``;
  pass/fail with the command and the output's tail.

Writes ``<output>/<device-name>.json`` and ``<output>/<device-name>.md`` (a table). Needs no network: random-weight
models, images generated in the run. ``--smoke`` runs every section's code on CPU at tiny sizes (the CUDA-only
checks are recorded as skipped) and writes ``<cpu-name>-smoke.*``; the test suite runs it, so the script cannot rot
between GPU loans. Never read a smoke file as a GPU figure.

    python benchmarks/gpu.py                            # on a machine with a GPU: the full run, ~8 minutes
    python benchmarks/gpu.py --smoke                    # CPU, ~20 s; writes output/gpu_smoke/<cpu>-smoke.*
    python benchmarks/gpu.py --sections bake validate    # rerun some sections (default budget split over them)
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for _p in (BENCH, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bake_overhead  # noqa: E402
import loader_throughput  # noqa: E402
import reinforce_throughput  # noqa: E402
import validate_throughput  # noqa: E402
from bench_utils import cpu_name, peak_memory, reset_peak_memory, slug, sync, write_jpeg_folder  # noqa: E402

from dr.io import atomic_write, software_versions  # noqa: E402
from dr.reinforce.augment import AugmentSpec, create_augment_spec  # noqa: E402
from dr.reinforce.loader import check_reinforced  # noqa: E402
from dr.reinforce.sources import create_source  # noqa: E402
from dr.reinforce.teachers import create_teacher  # noqa: E402
from dr.reinforce.writer import Reinforcer  # noqa: E402

_logger = logging.getLogger('gpu')

DEFAULT_BUDGET_S = 480.0  # the 8 minutes on one H100, start-up of this process included
MIB = 2 ** 20


# ----------------------------------------------------------------------------------------------------------------
# sizes

@dataclasses.dataclass
class Sizes:
    """Everything that sets the amount of work; ``FULL`` on a GPU, ``SMOKE`` on CPU (same code, tiny sizes)."""
    # bake / bake_compile (bake_overhead.py flags)
    bake_model: str = 'resnet50'
    bake_img: int = 224
    bake_batch: int = 256
    bake_classes: int = 1000
    bake_steps: int = 15
    bake_warmup: int = 3
    compile_backend: str = 'inductor'
    compile_steps: int = 10
    # generated ImageNet-like JPEGs (375 x 500)
    images: int = 2048
    image_classes: int = 100
    # reinforce
    teacher: str = 'resnext101_32x16d'
    teacher_img: int = 224
    teacher_batch: int = 256
    reinforce_images: int = 96
    reinforce_samples: int = 64
    reinforce_repeats: int = 2
    topk: int = 10
    # loader
    loader_teacher: str = 'resnet18'
    loader_teacher_img: int = 224
    loader_samples: int = 8
    student: str = 'resnet50'
    student_img: int = 224
    student_batch: int = 256
    loader_epochs: int = 2
    # validate
    val_model: str = 'resnet50'
    val_img: int = 224
    val_batch: int = 256
    val_images: int = 1024
    val_rounds: int = 4
    # cuda_checks (train.py)
    check_model: str = 'resnet18'
    check_img: int = 64
    check_batch: int = 32
    check_train_images: int = 128
    check_val_images: int = 32
    check_classes: int = 8


FULL = Sizes()
SMOKE = Sizes(
    bake_model='test_resnet', bake_img=32, bake_batch=8, bake_classes=10, bake_steps=2, bake_warmup=1,
    compile_backend='eager', compile_steps=2,
    images=24, image_classes=4,
    teacher='test_resnet', teacher_img=16, teacher_batch=8, reinforce_images=6, reinforce_samples=4,
    reinforce_repeats=1, topk=3,
    loader_teacher='test_resnet', loader_teacher_img=16, loader_samples=2, student='test_resnet', student_img=32,
    student_batch=8, loader_epochs=1,
    val_model='test_resnet', val_img=32, val_batch=16, val_images=32, val_rounds=2,
    check_model='test_resnet', check_img=32, check_batch=8, check_train_images=16, check_val_images=8,
    check_classes=4,
)

# expected seconds per section on an H100 (full sizes); each section's time box is the remaining budget split in
# these proportions over the sections still to run. The compile-heavy sections run last, so time they overrun can
# only come out of each other, never out of the eager figures.
WEIGHTS = {'environment': 5, 'bake': 60, 'reinforce': 45, 'loader': 60, 'validate': 35, 'bake_compile': 150,
           'cuda_checks': 120}


@dataclasses.dataclass
class Context:
    """What a section gets: sizes, device, paths of the generated data, its deadline."""
    sizes: Sizes
    device: str
    smoke: bool
    workers: int
    work: str
    images_root: str  # ImageFolder with a train/ split
    tiny_root: str  # train/ and validation/ splits for train.py
    deadline: float  # time.time() by which the section is killed
    cuda: bool
    threads: int = 0  # torch intra-op threads of the section processes and train.py runs (0: torch's default)


# ----------------------------------------------------------------------------------------------------------------
# recording

class Recorder:
    """A section's results, flushed to ``path`` after every variant so a section killed at its time box keeps what it
    measured."""

    def __init__(self, path: str):
        self.path = path
        self.data: Dict[str, Any] = {'variants': []}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        with atomic_write(self.path, 'w') as f:
            json.dump(self.data, f, indent=1, default=str)

    def variant(self, name: str, fn: Callable[[], Dict[str, Any]], **info: Any) -> Optional[Dict[str, Any]]:
        """Run one measurement; its exception is recorded as ``fail`` (with the error) and the section goes on."""
        entry: Dict[str, Any] = {'name': name, **info}
        _logger.info(f'  {name} ...')
        t0 = time.perf_counter()
        try:
            entry.update(fn())
            entry['status'] = 'ok'
        except Exception as e:  # noqa: BLE001 - every failure is a result here
            entry['status'] = 'fail'
            entry['error'] = f'{type(e).__name__}: {e}'[:2000]
            entry['traceback'] = traceback.format_exc()[-4000:]
            _logger.warning(f'  {name} failed: {entry["error"][:300]}')
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        entry['seconds'] = time.perf_counter() - t0
        self.data['variants'].append(entry)
        self.flush()
        return entry if entry['status'] == 'ok' else None


def _gib(m: Optional[Dict[str, Any]]) -> str:
    return f'{m["peak_bytes"] / 2 ** 30:.2f} GiB' if m and m.get('peak_bytes') is not None else 'n/a'


def _amp_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return getattr(torch, name) if name else None


# ----------------------------------------------------------------------------------------------------------------
# sections (each runs in its own process; ``rec`` collects its variants)

def section_environment(ctx: Context, rec: Recorder) -> None:
    env: Dict[str, Any] = {'versions': software_versions(), 'cpu': cpu_name(), 'cpu_count': os.cpu_count(),
                           'cuda_available': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda,
                           'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           'torch_threads': torch.get_num_threads(),
                           'float32_matmul_precision': torch.get_float32_matmul_precision(),
                           'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
                           'cudnn_benchmark': torch.backends.cudnn.benchmark,
                           'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32}
    if env['cuda_available']:
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
                   total_memory_bytes=int(props.total_memory), nccl=str(torch.cuda.nccl.version()))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version,name', '--format=csv,noheader'],
                                 capture_output=True, text=True, timeout=20)
            env['nvidia_smi'] = out.stdout.strip()
    rec.set('environment', env)


def _bake_argv(ctx: Context, amp: bool, channels_last: bool, compile_backend: Optional[str] = None,
               steps: Optional[int] = None) -> List[str]:
    s = ctx.sizes
    argv = ['--model', s.bake_model, '--img-size', str(s.bake_img), '-b', str(s.bake_batch), '--intra', '1',
            '--num-classes', str(s.bake_classes), '--steps', str(steps or s.bake_steps), '--warmup',
            str(s.bake_warmup), '--device', ctx.device]
    if amp:
        argv += ['--amp', '--amp-dtype', 'bfloat16']
    if channels_last:
        argv += ['--channels-last']
    if compile_backend:
        argv += ['--torchcompile', compile_backend]
    return argv


def _bake_variant(argv: List[str]) -> Dict[str, Any]:
    res = bake_overhead.run(bake_overhead.create_parser().parse_args(argv))
    res.pop('versions', None)
    mem = res['memory']
    return {
        'metrics': res, 'memory': mem,
        'summary': {'figure': f'plain {res["plain"]["median_ms"]:.1f} ms, BAKE {res["bake"]["median_ms"]:.1f} ms '
                              f'per step (median)',
                    'ratio': res['ratio_paired_median'], 'ratio_of': 'BAKE / plain step (paired median)',
                    'memory': f'plain {_gib(mem["plain"])}, BAKE {_gib(mem["bake"])}'},
    }


def section_bake(ctx: Context, rec: Recorder) -> None:
    for name, amp, cl in (('float32', False, False), ('bf16', True, False), ('bf16_channels_last', True, True)):
        argv = _bake_argv(ctx, amp, cl)
        rec.variant(name, lambda argv=argv: _bake_variant(argv),
                    command=shlex.join(['python', 'benchmarks/bake_overhead.py', *argv]))


def section_bake_compile(ctx: Context, rec: Recorder) -> None:
    argv = _bake_argv(ctx, True, True, ctx.sizes.compile_backend, ctx.sizes.compile_steps)
    rec.variant(f'bf16_channels_last_compile_{ctx.sizes.compile_backend}', lambda: _bake_variant(argv),
                command=shlex.join(['python', 'benchmarks/bake_overhead.py', *argv]))


def section_reinforce(ctx: Context, rec: Recorder) -> None:
    s, device = ctx.sizes, torch.device(ctx.device)
    source = create_source('', root=ctx.images_root, split='train', max_images=s.reinforce_images)
    spec = create_augment_spec('rrc+ra_re')

    def run(amp: Optional[str], channels_last: bool) -> Dict[str, Any]:
        torch.manual_seed(0)
        teacher = create_teacher([s.teacher], num_classes=s.image_classes, img_size=s.teacher_img, device=device)
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        m = reinforce_throughput.measure(
            source, teacher, spec, device, num_samples=s.reinforce_samples, topk=s.topk, batch_size=s.teacher_batch,
            workers=ctx.workers, repeats=s.reinforce_repeats, shard_size=max(16, s.reinforce_images // 2),
            num_classes=s.image_classes, amp_dtype=_amp_dtype(amp), channels_last=channels_last)
        m.update(teacher=s.teacher, teacher_img=s.teacher_img, augmentation=spec.name,
                 images='generated JPEG 375x500 (ImageNet-like)')
        return {'metrics': m, 'memory': m['memory'], 'summary': {
            'figure': f'writer {m["writer_augmentations_per_s"]:.0f} aug/s, bare teacher forward '
                      f'{m["bare_forward_augmentations_per_s"]:.0f} aug/s',
            'ratio': m['ratio_writer_over_bare'], 'ratio_of': 'writer / bare teacher forward',
            'memory': f'writer {_gib(m["memory"]["writer"])} (incl. {m["captured_input_bytes"] / 2 ** 30:.2f} GiB '
                      f'kept inputs), bare {_gib(m["memory"]["bare_forward"])}'}}

    rec.variant('bf16_channels_last', lambda: run('bfloat16', True),
                settings={'teacher': s.teacher, 'batch': s.teacher_batch, 'workers': ctx.workers})


class ResidentBatches:
    """``count`` copies of one batch already on the device: the training step alone (the loaders' ceiling)."""

    def __init__(self, batch: Tuple[torch.Tensor, torch.Tensor], count: int):
        self.batch, self.count = batch, count

    def __iter__(self):
        return iter([self.batch] * self.count)


def _loader_args(ctx: Context, shuffle_buffer: int) -> argparse.Namespace:
    s = ctx.sizes
    return argparse.Namespace(img_size=s.student_img, batch_size=s.student_batch, workers=ctx.workers, seed=0,
                              shuffle_buffer=shuffle_buffer)


def _reinforce_folder(ctx: Context, out: str) -> Dict[str, Any]:
    """The generated JPEGs reinforced by the library code reinforce.py runs (small random-weight teacher)."""
    s, device = ctx.sizes, torch.device(ctx.device)
    source = create_source('', root=ctx.images_root, split='train')
    teacher = create_teacher([s.loader_teacher], num_classes=s.image_classes, img_size=s.loader_teacher_img,
                             device=device)
    amp = torch.bfloat16 if device.type == 'cuda' else None
    writer = Reinforcer(source, teacher, create_augment_spec('rrc+ra_re'), out, num_samples=s.loader_samples,
                        topk=s.topk, seed=0, shard_size=max(8, len(source) // 8), num_classes=s.image_classes,
                        batch_size=s.teacher_batch, workers=ctx.workers, amp_dtype=amp, device=device,
                        dataset_info={'name': '', 'root': ctx.images_root, 'split': 'train'}, progress=False)
    result = writer.run()
    writer.merge(class_names=source.classes)
    return result


def section_loader(ctx: Context, rec: Recorder) -> None:
    s, device = ctx.sizes, torch.device(ctx.device)
    rd_dir = os.path.join(ctx.work, 'reinforced')
    prep = rec.variant('reinforce_images', lambda: {'metrics': _reinforce_folder(ctx, rd_dir)},
                       settings={'teacher': s.loader_teacher, 'num_samples': s.loader_samples})
    if prep is None:
        return
    meta = check_reinforced(rd_dir, s.image_classes)
    spec = AugmentSpec.from_dict(meta['augmentation'])
    args = _loader_args(ctx, shuffle_buffer=min(1000, meta['num_images']))
    folder = os.path.join(ctx.images_root, 'train')
    steps_per_epoch = meta['num_images'] // s.student_batch

    torch.manual_seed(0)
    model = timm.create_model(s.student, num_classes=s.image_classes).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = torch.bfloat16

    def step(batch) -> None:
        x, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp):
            out = model(x)
        if target.is_floating_point() and target.ndim == 2:  # reinforced: dense teacher probabilities
            loss = torch.sum(-target * F.log_softmax(out.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    resident = (torch.randn(s.student_batch, 3, s.student_img, s.student_img, device=device),
                torch.randint(0, s.image_classes, (s.student_batch,), device=device))
    # The loader variants fed to the same training step. One entry per variant: (name, build() -> (loader,
    # set_epoch)): the step alone on a resident batch, timm's loader, the reinforced loader replaying with PIL in the
    # workers, and replaying on the device (train.py --replay-device: nvJPEG decode + tensor ops on CUDA).
    def _timm():
        loader, _ = loader_throughput.build_timm_loader(folder, meta['num_images'], spec, args, device=ctx.device)
        return loader, getattr(loader.sampler, 'set_epoch', None)

    def _rd(**variant):
        loader = loader_throughput.build_rd_loader(rd_dir, meta, s.image_classes, args, device=ctx.device,
                                                   **variant)
        return loader, loader.set_epoch

    variants: List[Tuple[str, Callable[[], Tuple[Any, Any]]]] = [
        ('step_only', lambda: (ResidentBatches(resident, steps_per_epoch), None)),
        ('timm', _timm),
        ('reinforced_pil', _rd),
        ('reinforced_device', lambda: _rd(replay_device=device.type)),
    ]
    loaders: Dict[str, Tuple[Any, Any]] = {}
    for name, build in variants:
        def _build(name: str = name, build: Callable = build) -> Dict[str, Any]:
            loaders[name] = build()
            return {}
        rec.variant(f'build_{name}', _build)
    feeding = {k: v for k, v in loaders.items()}
    alone = {k: v for k, v in loaders.items() if k != 'step_only'}

    def compare(consume: Optional[Callable], which: Dict[str, Tuple[Any, Any]]) -> Dict[str, Any]:
        reset_peak_memory(device)
        runs = loader_throughput.run_rounds(which, s.loader_epochs, consume, finish=lambda: sync(device))
        mem = peak_memory(device)
        rates = {k: sum(r['samples'] for r in v) / sum(r['seconds'] for r in v) for k, v in runs.items()}
        ratios = {}
        if 'timm' in rates:
            ratios.update({f'{k}_over_timm': v / rates['timm'] for k, v in rates.items() if k != 'timm'})
        if 'step_only' in rates:
            ratios.update({f'{k}_over_step_only': v / rates['step_only'] for k, v in rates.items()
                           if k != 'step_only'})
        main_ratio = ratios.get('reinforced_pil_over_timm')
        return {'metrics': {'samples_per_s': rates, 'ratios': ratios, 'runs': runs,
                            'num_images': meta['num_images'], 'epochs': s.loader_epochs},
                'memory': mem, 'summary': {
                    'figure': ', '.join(f'{k} {v:.0f} img/s' for k, v in rates.items()),
                    'ratio': main_ratio, 'ratio_of': 'reinforced (PIL workers) / timm', 'memory': _gib(mem)}}

    settings = {'student': s.student, 'img': s.student_img, 'batch': s.student_batch, 'workers': ctx.workers,
                'amp': 'bfloat16', 'channels_last': True, 'augmentation': spec.name}
    rec.variant('feeding_train_step', lambda: compare(step, feeding), settings=settings)
    rec.variant('loaders_alone', lambda: compare(None, alone), settings=settings)


def section_validate(ctx: Context, rec: Recorder) -> None:
    s, device = ctx.sizes, torch.device(ctx.device)

    def run(argv: List[str]) -> Dict[str, Any]:
        args = validate_throughput.create_parser().parse_args(argv)
        bare, full, images = validate_throughput.build_loops(args, device)
        rates, cpu_rates = validate_throughput.time_interleaved({'bare': bare, 'validate': full}, images,
                                                                args.rounds, device)
        res = validate_throughput.report(args, device, images, rates, cpu_rates)
        mem = {}
        for name, fn in (('bare', bare), ('validate', full)):
            reset_peak_memory(device)
            fn()
            mem[name] = peak_memory(device)
        med = res['median']
        return {'metrics': res, 'memory': mem, 'summary': {
            'figure': f'bare forward {med["bare"]:.0f} img/s, validate loop {med["validate"]:.0f} img/s',
            'ratio': res['ratio'], 'ratio_of': 'validate / bare forward (paired median)',
            'memory': f'bare {_gib(mem["bare"])}, validate {_gib(mem["validate"])}'}}

    base = ['--model', s.val_model, '--img-size', str(s.val_img), '--num-classes', '10', '--batch-size',
            str(s.val_batch), '--workers', str(0 if ctx.smoke else ctx.workers), '--rounds', str(s.val_rounds),
            '--images', str(s.val_images), '--device', ctx.device]
    for name, extra in (('float32', []), ('bf16_channels_last', ['--amp', '--amp-dtype', 'bfloat16',
                                                                 '--channels-last'])):
        argv = base + extra
        rec.variant(name, lambda argv=argv: run(argv),
                    command=shlex.join(['python', 'benchmarks/validate_throughput.py', *argv]))


def _train_checks(ctx: Context, out: str, port: int) -> List[Dict[str, Any]]:
    s = ctx.sizes
    py = sys.executable
    train = [os.path.join(ROOT, 'train.py'), ctx.tiny_root, '--dataset', '', '--model', s.check_model,
             '--img-size', str(s.check_img), '-b', str(s.check_batch), '--bake', '--epochs', '1',
             '--warmup-epochs', '0', '--lr', '0.05', '--workers', str(min(2, ctx.workers)), '--log-interval', '1000',
             '--no-progress', '--device', ctx.device, '--output', out]
    torchrun = [py, '-m', 'torch.distributed.run', '--nproc_per_node=1', f'--master_port={port}']
    return [
        {'name': 'baseline', 'needs_cuda': False, 'argv': [py, *train, '--experiment', 'baseline']},
        {'name': 'sync_bn_nccl_torchrun', 'needs_cuda': True,
         'argv': [*torchrun, *train, '--experiment', 'sync_bn', '--sync-bn'],
         'expect': 'Distributed training: process 0 of 1',
         'expect_why': 'no process group was started under torchrun, so --sync-bn, NCCL and DDP were not exercised'},
        {'name': 'amp_float16_grad_scaler', 'needs_cuda': True,
         'argv': [py, *train, '--experiment', 'amp_fp16', '--amp', '--amp-dtype', 'float16'],
         'expect_checkpoint_key': 'amp'},
        {'name': 'torchcompile', 'needs_cuda': True, 'argv': [py, *train, '--experiment', 'compile',
                                                              '--torchcompile'], 'weight': 3},
    ]


def _check_run(check: Dict[str, Any], out: str, timeout: float, threads: int = 0) -> Dict[str, Any]:
    """Run one train.py command; pass = exit 0, results.json written, finite train loss, and the check's own
    evidence (a log line, a checkpoint key)."""
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE='offline')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    t0 = time.perf_counter()
    # own session: a timeout ends torchrun's workers too
    proc = subprocess.Popen(check['argv'], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        raise TimeoutError(f'no result within {timeout:.0f} s; output tail:\n{(stdout or "")[-3000:]}') from None
    seconds = time.perf_counter() - t0
    text = stdout or ''
    res: Dict[str, Any] = {'returncode': proc.returncode, 'train_seconds': seconds}
    run_dir = os.path.join(out, check['argv'][check['argv'].index('--experiment') + 1])
    problems = []
    if proc.returncode != 0:
        problems.append(f'exit status {proc.returncode}')
    elif not os.path.isfile(os.path.join(run_dir, 'results.json')):
        problems.append('no results.json')
    else:
        import csv
        with open(os.path.join(run_dir, 'summary.csv')) as f:
            rows = list(csv.DictReader(f))
        loss = float(rows[-1]['train_loss']) if rows and rows[-1].get('train_loss') else float('nan')
        res['train_loss'] = loss
        if not math.isfinite(loss):
            problems.append(f'train loss {loss}')
        if check.get('expect') and check['expect'] not in text:
            problems.append(check['expect_why'])
        key = check.get('expect_checkpoint_key')
        if key:
            from dr.checkpoint import load_checkpoint_file
            ckpt = load_checkpoint_file(os.path.join(run_dir, 'last.pth.tar'))
            res['checkpoint_has_' + key] = key in ckpt
            if key not in ckpt:
                problems.append(f'the checkpoint has no {key!r} state (grad scaler not used)')
    if problems:
        raise RuntimeError('; '.join(problems) + '\noutput tail:\n' + text[-3000:])
    res['output_tail'] = text[-1000:]
    return res


def section_cuda_checks(ctx: Context, rec: Recorder) -> None:
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    out = os.path.join(ctx.work, 'train_checks')
    checks = _train_checks(ctx, out, port)
    on_cuda = ctx.device == 'cuda'
    for i, check in enumerate(checks):
        command = shlex.join(check['argv'])
        if check['needs_cuda'] and not on_cuda:
            reason = 'skipped: --smoke runs on CPU' if ctx.cuda else 'skipped: no CUDA'
            rec.data['variants'].append({'name': check['name'], 'status': 'skipped', 'reason': reason,
                                         'command': command})
            rec.flush()
            continue
        todo = [c for c in checks[i:] if on_cuda or not c['needs_cuda']]
        share = check.get('weight', 1) / sum(c.get('weight', 1) for c in todo)
        timeout = max(5.0, (ctx.deadline - time.time() - 5) * share)
        rec.variant(check['name'],
                    lambda check=check, timeout=timeout: {'metrics': _check_run(check, out, timeout, ctx.threads)},
                    command=command, timeout_s=timeout)


SECTIONS: Dict[str, Callable[[Context, Recorder], None]] = {
    'environment': section_environment,
    'bake': section_bake,
    'reinforce': section_reinforce,
    'loader': section_loader,
    'validate': section_validate,
    'bake_compile': section_bake_compile,
    'cuda_checks': section_cuda_checks,
}


# ----------------------------------------------------------------------------------------------------------------
# the run: each section in a forked child with a time box

def _child(name: str, ctx: Context, path: str) -> None:
    with contextlib.suppress(OSError):
        os.setpgrp()  # its own process group: a timeout ends its loader workers and train.py runs with it
    logging.basicConfig(level=logging.INFO, format=f'[{name}] %(message)s', force=True)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    rec = Recorder(path)
    rec.flush()
    try:
        SECTIONS[name](ctx, rec)
    except Exception as e:  # noqa: BLE001
        rec.set('error', f'{type(e).__name__}: {e}'[:2000])
        rec.set('traceback', traceback.format_exc()[-4000:])
        os._exit(1)
    os._exit(0)


def _kill_group(proc: multiprocessing.Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        proc.join(5)
        if not proc.is_alive():
            return
    proc.kill()
    proc.join(5)


def run_section(name: str, ctx: Context, timeout: float, command: str) -> Dict[str, Any]:
    """Run a section in a forked process (the parent never initialises CUDA, so each child can); its record with
    ``status`` ok / partial (some variants failed) / fail / timeout."""
    path = os.path.join(ctx.work, f'section_{name}.json')
    mp = multiprocessing.get_context('fork')
    t0 = time.perf_counter()
    proc = mp.Process(target=_child, args=(name, ctx, path), daemon=False)
    proc.start()
    proc.join(timeout)
    timed_out = proc.is_alive()
    if timed_out:
        _kill_group(proc)
    seconds = time.perf_counter() - t0
    data: Dict[str, Any] = {'variants': []}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
    variants = data.get('variants', [])
    if timed_out:
        status = 'timeout'
        data['error'] = f'killed at its time box of {timeout:.0f} s (the variants listed finished before)'
    elif proc.exitcode != 0:
        status = 'fail'
        data.setdefault('error', f'the section process ended with exit code {proc.exitcode}')
    elif any(v['status'] == 'fail' for v in variants):
        status = 'partial' if any(v['status'] == 'ok' for v in variants) else 'fail'
    else:
        status = 'ok'
    return {'status': status, 'seconds': seconds, 'timeout_s': timeout, 'command': command, **data}


def _prepare_data(ctx: Context, processes: int) -> Dict[str, Any]:
    s = ctx.sizes
    t0 = time.perf_counter()
    info = {'images': write_jpeg_folder(os.path.join(ctx.images_root, 'train'), max(s.images, s.reinforce_images),
                                        s.image_classes, seed=0, processes=processes),
            'tiny_train': write_jpeg_folder(os.path.join(ctx.tiny_root, 'train'), s.check_train_images,
                                            s.check_classes, seed=1, processes=processes),
            'tiny_validation': write_jpeg_folder(os.path.join(ctx.tiny_root, 'validation'), s.check_val_images,
                                                 s.check_classes, seed=2, processes=processes)}
    for v in info.values():
        v.pop('root')
    info['seconds'] = time.perf_counter() - t0
    return info


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='All GPU figures in one run (see the module docstring)')
    parser.add_argument('--output', default=None,
                        help='folder of <device-name>.json and .md (default: benchmarks/results; with --smoke: '
                             'output/gpu_smoke, so smoke files never sit beside GPU figures)')
    parser.add_argument('--budget-s', type=float, default=DEFAULT_BUDGET_S,
                        help=f'wall-clock budget of the whole run in seconds (default: {DEFAULT_BUDGET_S:.0f})')
    parser.add_argument('--smoke', action='store_true',
                        help='CPU, tiny sizes: checks that every section runs (the test suite uses it)')
    parser.add_argument('--sections', nargs='+', default=None, choices=[k for k in SECTIONS if k != 'environment'],
                        help='only these sections (default: all)')
    parser.add_argument('-j', '--workers', type=int, default=0,
                        help='data-loader workers (default: min(12, CPUs - 2); 1 with --smoke)')
    parser.add_argument('--threads', type=int, default=-1,
                        help='torch intra-op threads per section (default: torch\'s own; 1 with --smoke, where more '
                             'threads only contend on a small shared CPU)')
    parser.add_argument('--work-dir', default='', help='where generated data goes (default: a temporary folder, '
                                                       'removed at the end)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    sizes = SMOKE if args.smoke else FULL
    output = args.output or (os.path.join(ROOT, 'output', 'gpu_smoke') if args.smoke
                             else os.path.join(BENCH, 'results'))
    workers = args.workers or (1 if args.smoke else max(1, min(12, (os.cpu_count() or 2) - 2)))
    work = args.work_dir or tempfile.mkdtemp(prefix='gpu_bench_')
    os.makedirs(work, exist_ok=True)
    command = shlex.join(['python', 'benchmarks/gpu.py', *argv])
    ctx = Context(sizes=sizes, device='cpu', smoke=args.smoke, workers=workers, work=work,
                  images_root=os.path.join(work, 'images'), tiny_root=os.path.join(work, 'tiny'),
                  deadline=started + args.budget_s, cuda=False,
                  threads=(1 if args.smoke else 0) if args.threads < 0 else args.threads)
    try:
        # the environment probe runs in a child too: the parent must not initialise CUDA before forking
        env_rec = run_section('environment', ctx, 60.0, command)
        env = env_rec.get('environment') or {}
        ctx.cuda = bool(env.get('cuda_available'))
        if not args.smoke and not ctx.cuda:
            print('error: benchmarks/gpu.py: no CUDA device here (environment section: '
                  f'{env_rec.get("error") or "torch.cuda.is_available() is False"}); use --smoke for the CPU check '
                  '(never a GPU figure)', file=sys.stderr)
            sys.exit(2)
        ctx.device = 'cpu' if args.smoke else 'cuda'
        device_name = env.get('device_name') if ctx.device == 'cuda' else env.get('cpu', cpu_name())
        _logger.info(f'device: {device_name}; budget {args.budget_s:.0f} s; work dir {work}')
        data = _prepare_data(ctx, processes=max(1, min(16, os.cpu_count() or 1)))
        names = [k for k in SECTIONS if k != 'environment' and (args.sections is None or k in args.sections)]
        sections: Dict[str, Any] = {'environment': env_rec}
        for i, name in enumerate(names):
            remaining = started + args.budget_s - time.time() - 5  # 5 s to write the results
            share = WEIGHTS[name] / sum(WEIGHTS[k] for k in names[i:])
            timeout = max(5.0, remaining * share)
            ctx.deadline = time.time() + timeout
            _logger.info(f'section {name}: time box {timeout:.0f} s')
            sections[name] = run_section(name, ctx, timeout, shlex.join(
                ['python', 'benchmarks/gpu.py', '--sections', name, *(['--smoke'] if args.smoke else [])]))
            _logger.info(f'section {name}: {sections[name]["status"]} in {sections[name]["seconds"]:.1f} s')
        result = {
            'schema': 1, 'mode': 'smoke (CPU, tiny sizes: not a GPU figure)' if args.smoke else 'full',
            'device': device_name, 'command': command, 'argv': [sys.executable, os.path.abspath(__file__), *argv],
            'started_utc': datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
            'budget_s': args.budget_s, 'wall_s': time.time() - started, 'workers': workers,
            'torch_threads': ctx.threads or 'default',
            'sizes': dataclasses.asdict(sizes), 'versions': env.get('versions') or software_versions(),
            'environment': env, 'data': data, 'sections': sections,
        }
        stem = slug(device_name or 'unknown') + ('-smoke' if args.smoke else '')
        json_path = os.path.join(output, f'{stem}.json')
        md_path = os.path.join(output, f'{stem}.md')
        with atomic_write(json_path, 'w') as f:
            json.dump(result, f, indent=1, default=str)
        with atomic_write(md_path, 'w') as f:
            f.write(markdown(result))
        result['files'] = [json_path, md_path]
        print(markdown(result))
        print(f'wrote {json_path} and {md_path} in {result["wall_s"]:.0f} s')
        return result
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _fmt_ratio(x: Any) -> str:
    return f'{x:.3f}' if isinstance(x, (int, float)) and math.isfinite(x) else ''


def markdown(result: Dict[str, Any]) -> str:
    """The results as a markdown page: setting, one table row per measurement, the commands."""
    env, v = result['environment'], result['versions']
    lines = [f'# GPU figures: {result["device"]}', '',
             f'- mode: {result["mode"]}',
             f'- command: `{result["command"]}` (started {result["started_utc"]}, {result["wall_s"]:.0f} s of a '
             f'{result["budget_s"]:.0f} s budget, {result["workers"]} loader workers)',
             f'- torch {v.get("torch")} (CUDA {env.get("torch_cuda")}, cuDNN {env.get("cudnn")}'
             + (f', NCCL {env["nccl"]}' if env.get('nccl') else '') + f'), torchvision {v.get("torchvision")}, '
             f'timm {v.get("timm")}, python {v.get("python")}'
             + (f'; driver/GPU: {env["nvidia_smi"]}' if env.get('nvidia_smi') else ''),
             f'- CPU: {env.get("cpu")}; TF32: cuDNN {env.get("cudnn_allow_tf32")}, matmul '
             f'{env.get("matmul_allow_tf32")} (torch defaults)',
             f'- generated data: {result["data"]["images"]["num_images"]} JPEGs '
             f'{result["data"]["images"]["size_hw"][0]}x{result["data"]["images"]["size_hw"][1]} '
             f'(mean {result["data"]["images"]["mean_kb"]:.0f} KB), {result["data"]["images"]["num_classes"]} classes',
             '', '| section | variant | figure | ratio | ratio of | memory peak | status |',
             '|---|---|---|---|---|---|---|']
    for name, sec in result['sections'].items():
        if name == 'environment':
            continue
        variants = sec.get('variants') or []
        for var in variants:
            summ = var.get('summary') or {}
            status = var['status'] if var['status'] != 'fail' else f'fail: {var.get("error", "")[:160]}'
            if var['status'] == 'skipped':
                status = var.get('reason', 'skipped')
            if var['status'] == 'ok' and not summ:
                status = f'ok ({var["seconds"]:.1f} s)'
            cell = ' '.join(str(status).split()).replace('|', '/')
            lines.append(f'| {name} | {var["name"]} | {summ.get("figure", "")} | {_fmt_ratio(summ.get("ratio"))} | '
                         f'{summ.get("ratio_of", "")} | {summ.get("memory", "")} | {cell} |')
        if sec['status'] in ('fail', 'timeout') or not variants:
            err = ' '.join(str(sec.get('error', '')).split())[:200].replace('|', '/')
            lines.append(f'| {name} | (section) | | | | | {sec["status"]}: {err} |')
    lines += ['', 'Each section: its status, seconds used of its time box, and the command that reruns it.', '']
    for name, sec in result['sections'].items():
        lines.append(f'- {name}: {sec["status"]}, {sec["seconds"]:.1f} of {sec["timeout_s"]:.0f} s; '
                     f'`{sec["command"]}`')
        for var in sec.get('variants') or []:
            if var.get('command'):
                lines.append(f'  - {var["name"]}: `{var["command"]}`')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
