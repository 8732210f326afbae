#!/usr/bin/env python3
"""Image classification training with BAKE self-distillation and reinforced datasets, in the timm style.

Plain training, BAKE (``--bake``), training on reinforced WebDataset shards (``--reinforced``) and online
knowledge distillation (``--kd-teacher``) share one loop built from timm pieces (models, transforms, optimizers,
schedulers, EMA, checkpoint saver) and ``timm.task`` training tasks.

    python train.py --dataset digits --model resnet18 --img-size 32 -b 64 --epochs 10 --bake
    torchrun --nproc_per_node=8 train.py /data/imagenet --config hparams/bake/in1k/resnet50_bake.yaml
"""
from __future__ import annotations  # annotations name torch/timm types, which load only in main()

import argparse
import dataclasses
import difflib
import fnmatch
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from typing import Any, Dict, Optional, Sequence, Tuple

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dr import config as dr_config
from dr.io import atomic_write, software_versions, truncate_summary
from dr.methods import start_method_epoch, wrap_method_train_data
from dr.methods.options import add_method_args, check_method_args
from dr.wandb_logger import init_wandb, log_epoch

_logger = logging.getLogger('train')

# What train.py writes into a run folder: --overwrite clears these and refuses a folder holding anything else.
RUN_FOLDER_FILES = ('args.yaml', 'versions.json', 'summary.csv', 'results.json', 'wandb_run_id.txt', 'wandb',
                    '*.pth.tar', '.*.tmp')


def _import_training_libraries() -> None:
    """The one deliberate lazy import: torch, timm and the dr modules built on them.

    They take seconds to import, so ``main`` loads them only after the flags and the config file are parsed and
    checked: ``--help`` and flag errors answer at once. Binds the module-level names the training code uses.
    """
    global torch, torchvision, nn, utils, Mixup, create_loader, create_transform, resolve_data_config, AugMixDataset
    global create_naflex_loader, NaFlexMixup
    global LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy, JsdCrossEntropy
    global create_model, is_model, list_models, safe_model_name, RepeatAugSampler, convert_splitbn_model, set_fast_norm
    global FeatureDistillationTask, TokenDistillationTask
    global create_optimizer_v2, optimizer_kwargs, create_scheduler_v2, scheduler_kwargs
    global ClassificationTask, evaluation_sample_limit, load_task_ema_checkpoint, resume_task_checkpoint
    global CheckpointSaver, NativeScaler, dr_data, load_checkpoint_file, load_model_weights, LogitDistillationTask
    global DeviceLoader, set_loader_epoch, create_train_loader, resolve_input_size, seed_everything_for_epoch
    global BakeTask, ClassAwareSampler, ReinforcedTask, check_reinforced, create_reinforced_loader, create_teacher
    import torch
    import torch.nn as nn
    import torchvision.utils
    from timm import utils
    from timm.data import (
        AugMixDataset,
        Mixup,
        NaFlexMixup,
        create_loader,
        create_naflex_loader,
        create_transform,
        resolve_data_config,
    )
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.layers import convert_splitbn_model, set_fast_norm
    from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.models import create_model, is_model, list_models, safe_model_name
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.task import (
        ClassificationTask,
        FeatureDistillationTask,
        LogitDistillationTask,
        TokenDistillationTask,
        evaluation_sample_limit,
        load_task_ema_checkpoint,
        resume_task_checkpoint,
    )
    from timm.utils import CheckpointSaver, NativeScaler

    from dr import data as dr_data
    from dr.bake.sampler import ClassAwareSampler
    from dr.bake.task import BakeTask
    from dr.checkpoint import load_checkpoint_file, load_model_weights
    from dr.loaders import (
        DeviceLoader,
        create_train_loader,
        resolve_input_size,
        seed_everything_for_epoch,
        set_loader_epoch,
    )
    from dr.reinforce.loader import check_reinforced, create_reinforced_loader
    from dr.reinforce.task import ReinforcedTask
    from dr.reinforce.teachers import create_teacher


def create_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``--config`` pre-parser and the full argument parser.

    Every flag of timm's train.py is here with timm's name, type and default (``tests/timm_flags`` holds timm's list
    and ``tests/test_timm_parity.py`` checks it); the project's own groups (BAKE, reinforced data) follow timm's.
    """
    config_parser = dr_config.create_config_parser()
    parser = argparse.ArgumentParser(description='BAKE / reinforced-data image classification training',
                                     usage='%(prog)s [-h] [-c FILE] [options] [DIR]')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', metavar='DIR', nargs='?', default=None,
                       help='path to the dataset root (as --data-dir); without a root the embedded digits are used')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='path to the dataset root: an ImageFolder/tar, or the root of the timm dataset --dataset '
                            'names')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name: "" for an ImageFolder/ImageTar at DIR, a timm prefix (wds/, hfds/, '
                            'tfds/, torch/), or "digits" (embedded; the default when no DIR is given)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split (default: validation); "" disables evaluation')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                       help='number of samples in the train split, for iterable datasets (wds/, hfids/, tfds/)')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                       help='number of samples in the validation split, for iterable datasets')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of torch/ and tfds/ datasets that support it')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (timm datasets)')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode')
    group.add_argument('--input-key', default=None, type=str, help='dataset key for input images (wds/, hfds/)')
    group.add_argument('--target-key', default=None, type=str, help='dataset key for target labels (wds/, hfds/)')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help='allow Hugging Face dataset import to execute code from the dataset repository')
    group.add_argument('--digits-size', type=int, default=None, metavar='N',
                       help='side of the upsampled digits images (default: 32)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='name of a timm model to train (default: resnet50)')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start with pretrained weights (timm hub / --pretrained-path)')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='load this checkpoint as the pretrained weights (classifier adapted by timm)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load model weights from this checkpoint (weights_only) before training')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume model, optimizer, scaler, EMA, epoch and sampler state from a checkpoint or a '
                            'run folder (its last.pth.tar)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='do not restore the optimizer state when resuming')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: from the dataset / reinforced shards)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pool type override (fast, avg, max, avgmax, avgmaxc)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='image size (default: digits-size for digits, else the model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input dimensions (C H W), overrides --img-size')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='eval center crop percentage')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='dataset pixel mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='dataset pixel std')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='images per batch per process, class mates included under class-aware sampling '
                            '(default: 128; see --batch-anchors)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (default: --batch-size)')
    group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    group.add_argument('--fuser', default='', type=str, help="select jit fuser: '', 'te', 'old' or 'nvfuser'")
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='number of steps to accumulate gradients over (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='gradient checkpointing through model blocks/stages (model.set_grad_checkpointing)')
    group.add_argument('--fast-norm', action='store_true', default=False, help="timm's experimental fast-norm")
    group.add_argument('--model-kwargs', nargs='*', default={}, action=dr_config.ParseKwargs, metavar='KEY=VALUE',
                       help='extra create_model kwargs, values parsed as YAML scalars')
    group.add_argument('--head-init-scale', default=None, type=float, help='scale of the initial classifier weights')
    group.add_argument('--head-init-bias', default=None, type=float, help='initial classifier bias value')
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0.)')
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                       help='drop connect rate, deprecated: use --drop-path')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate (default: None)')
    scripting = group.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', dest='torchscript', action='store_true',
                           help='torch.jit.script the model')
    scripting.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='torch.compile the model with this backend (default when given: inductor)')

    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='device (default: cuda if available, else cpu; timm: cuda)')
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision with torch.autocast')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='autocast dtype (default: float16; bfloat16 on CPU)')
    group.add_argument('--amp-impl', default='native', type=str, choices=('native',),
                       help='AMP implementation: native (torch.autocast; timm dropped apex)')
    group.add_argument('--model-dtype', default=None, type=str,
                       help='model dtype override without AMP, e.g. bfloat16 (default: float32)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='no DDP buffer broadcast (broadcast_buffers=False)')
    group.add_argument('--synchronize-step', action='store_true', default=False,
                       help='synchronize the device at the end of each step')
    group.add_argument('--local_rank', default=0, type=int, help='set by older torch.distributed launchers')
    group.add_argument('--device-modules', default=None, type=str, nargs='+',
                       help='python modules to import for a device backend')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: sgd)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm/value')
    group.add_argument('--clip-mode', type=str, default='norm', help='gradient clipping mode: norm, value, agc')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--layer-decay-min-scale', type=float, default=0,
                       help='layer-wise lr decay minimum scale clamp (default: 0)')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                       help='layer-wise lr decay scale below which parameters are not optimized (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=dr_config.ParseKwargs, metavar='KEY=VALUE',
                       help='extra timm create_optimizer_v2 kwargs, values parsed as YAML scalars, e.g. '
                            'filter_bias_and_bn=false (weight decay on BN/bias too, as pycls)')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (cosine, step, multistep, plateau, tanh, poly, ...; default: cosine)')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='apply the LR schedule per optimizer update instead of per epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate (default: lr-base scaled by global batch / lr-base-size)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate for --lr-base-size images per step (default: 0.1)')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='global batch size the base learning rate refers to (default: 256)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='how lr scales with the global batch: linear, sqrt, or "" (default): sqrt for '
                            'Adam/LAMB-family optimizers (names containing ada or lamb), else linear (as timm)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise std-dev (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='learning rate cycle length multiplier (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='amount to decay each learning rate cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup start lr (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs (default: 300)')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='epoch repeat multiplier (times the dataset is repeated per train epoch, timm datasets)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number')
    group.add_argument('--stop-epoch', default=None, type=int, metavar='N',
                       help='leave after finishing epoch N-1 (checkpointed) as if interrupted; the schedule still '
                            'spans --epochs, so a later --resume continues exactly (time-limited jobs)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='epochs of the multistep decays')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval of step decay')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='warmup epochs (default: 5)')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude warmup from the decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at min-lr after decay')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs of the plateau scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation')
    group.add_argument('--train-crop-mode', type=str, default=None, help='training crop mode (timm transforms)')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resized crop area range (two values)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resized crop aspect ratio range (two values)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying any color jitter')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                       help='probability of random grayscale conversion')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                       help='probability of gaussian blur')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='repeated augmentation (DeiT): each image N times per epoch, spread over the processes '
                            "(timm's RepeatAugSampler; default: 0, off)")
    group.add_argument('--aug-splits', type=int, default=0,
                       help='number of augmentation splits (AugMix; 0 or >= 2)')
    group.add_argument('--jsd-loss', action='store_true', default=False,
                       help='Jensen-Shannon divergence + CE loss (timm JsdCrossEntropy); use with --aug-splits')
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='binary cross-entropy loss (timm BinaryCrossEntropy), with or without mixup/cutmix')
    group.add_argument('--bce-sum', action='store_true', default=False, help='sum over classes in the BCE loss')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='threshold for binarizing softened BCE targets (default: None, disabled)')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='positive weighting of the BCE loss')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: pixel)')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False,
                       help='do not random erase the first (clean) augmentation split')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of applying mixup or cutmix')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of switching to cutmix')
    group.add_argument('--mixup-mode', type=str, default='batch', help='mixup mode: batch, pair or elem')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn off mixup after epoch N')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random', help='training interpolation')
    group.add_argument('--train-img-sizes', type=int, nargs='+', default=None, metavar='N',
                       help='scheduled resolution (progressive resizing): per-batch training image sizes, drawn by '
                            "timm's ScheduledBatchSampler (default: off, --img-size)")
    group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None, metavar='N',
                       help='batch size of each --train-img-sizes choice (default: -b for all)')
    group.add_argument('--train-size-weights', type=float, nargs='+', default=None,
                       help='sampling weight of each --train-img-sizes choice (default: uniform)')
    group.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                       help='constant: every epoch draws the sizes by weight; progressive: moves from the first '
                            'size to the last over --train-size-schedule-epochs (default: constant)')
    group.add_argument('--train-size-schedule-epochs', type=int, default=None, metavar='N',
                       help='epochs over which a progressive schedule moves through the sizes (default: --epochs)')
    group.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                       help='progressive schedule window std-dev, in choice-index units (default: 0.65)')
    group.add_argument('--train-size-schedule-random-mix', type=float, default=0.1,
                       help='progressive schedule: fraction of uniform random choices (default: 0.1)')

    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    group.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                       help='synchronised BatchNorm across processes (CUDA only); default: on under torchrun on CUDA '
                            'with class-aware sampling and without --shuffle-bn (as the BAKE paper), else off')
    group.add_argument('--dist-bn', type=str, default='reduce', choices=('reduce', 'broadcast', ''),
                       help='under torchrun, make the BatchNorm statistics of all processes equal after each '
                            'training epoch: reduce (average, default), broadcast (rank 0\'s) or "" (leave them)')
    group.add_argument('--split-bn', action='store_true', default=False,
                       help='separate BatchNorm layers per augmentation split (with --aug-splits)')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False, help='track an EMA of the weights')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU (rank 0 only), no EMA validation')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='warm up the EMA decay')

    group = parser.add_argument_group('BAKE (batch knowledge ensembling) parameters')
    group.add_argument('--bake', action=argparse.BooleanOptionalAction, default=False,
                       help='train with BAKE self-distillation (--no-bake runs the vanilla baseline of a BAKE recipe)')
    group.add_argument('--bake-omega', type=float, default=0.5, help='propagation weight omega (default: 0.5)')
    group.add_argument('--bake-temp', type=float, default=4.0, help='softmax temperature tau (default: 4.0)')
    group.add_argument('--bake-weight', type=float, default=1.0, help='loss weight lambda (default: 1.0)')
    group.add_argument('--bake-intra', type=int, default=1, metavar='M',
                       help='same-class images sampled with each anchor under --bake (default: 1)')
    group.add_argument('--class-aware-intra', type=int, default=None, metavar='M',
                       help='class-aware sampling with M same-class images per anchor, with or without --bake '
                            '(Table 10 vanilla rows); default: --bake-intra under --bake, else off')
    group.add_argument('--batch-anchors', type=int, default=None, metavar='N',
                       help='randomly sampled (anchor) images per process and step; sets -b to N x (1 + M) with M '
                            'the class mates, so --no-bake on a BAKE recipe keeps N images (default: use -b)')
    group.add_argument('--bake-random-walk', action='store_true', default=False,
                       help='Table 16 baseline: supervise the random-walk propagated predictions with the hard labels '
                            'instead of distilling from them')
    group.add_argument('--shuffle-bn', action='store_true', default=False,
                       help='under torchrun, shuffle the batch across processes before the forward pass and restore '
                            'the order after (Table 15, MoCo shuffle BN); needs --bake')
    group.add_argument('--bake-knowledge', type=str, default='preds', choices=('preds', 'labels'),
                       help='ensemble predictions or one-hot labels (Table 14 ablation) (default: preds)')
    group.add_argument('--bake-one-step', action='store_true', default=False,
                       help='one propagation step instead of the closed form (Fig. 4 ablation)')
    group.add_argument('--bake-global', action=argparse.BooleanOptionalAction, default=True,
                       help='under DDP ensemble over the global batch of all ranks (default: on)')

    group = parser.add_argument_group('Reinforced data parameters')
    group.add_argument('--reinforced', type=str, default=None, metavar='DIR_OR_URLS',
                       help='train on reinforced WebDataset shards (dir, brace pattern or URL)')
    group.add_argument('--rd-densify', type=str, default='smooth', choices=('smooth', 'renorm'),
                       help='dense target from the stored top-k: spread the residual (smooth) or renormalise')
    group.add_argument('--rd-loss', type=str, default='kl', help='reinforced-data loss (kl)')
    group.add_argument('--rd-gt-weight', type=float, default=0.0, help='weight of an extra CE on the labels')
    group.add_argument('--rd-p', type=float, default=1.0,
                       help='probability a sample uses a stored reinforcement (else the plain transform)')
    group.add_argument('--rd-shuffle-buffer', type=int, default=1000, help='sample shuffle buffer size')
    group.add_argument('--rd-pad-last', action='store_true', default=False,
                       help='pad the last batch of an epoch by wrapping around, so every image is seen every epoch '
                            '(default: drop the partial batch, as timm\'s training loaders do)')
    group.add_argument('--replay-device', default='', choices=('', 'cpu', 'cuda'),
                       help='replay the stored augmentations batched with tensors on this device in the main process '
                            '(workers only read and check shards); default: PIL in the workers (docs/reinforce.md)')

    group = parser.add_argument_group('Knowledge distillation parameters')
    group.add_argument('--kd-model-name', default=None, type=str, metavar='NAME[=CKPT]',
                       help="timm's teacher flag: one teacher model (hub weights, or a checkpoint after '=')")
    group.add_argument('--kd-teacher', type=str, nargs='+', default=None, metavar='NAME[=CKPT]',
                       help='teacher or teacher ensemble (mean of softmaxes; DR Fig. 1 baseline); several members '
                            'extend --kd-model-name')
    group.add_argument('--kd-distill-type', default='logit', type=str, choices=('logit', 'feature', 'token'),
                       help="timm's distillation tasks: logit (outputs), feature (pooled features, a single teacher) "
                            "or token (DeiT's distillation token, a *_distilled_* student) (default: logit)")
    group.add_argument('--kd-loss-type', default='kl', type=str, choices=('kl',),
                       help='logit distillation loss (default: kl)')
    group.add_argument('--distill-loss-weight', '--kd-weight', default=None, type=float,
                       help='weight of the distillation loss (timm: with only --task-loss-weight given, '
                            '1 - task weight; default: 1)')
    group.add_argument('--task-loss-weight', '--kd-task-weight', default=None, type=float,
                       help='weight of the task (classification) loss next to distillation (timm semantics; '
                            '0 is pure distillation as in the DR paper)')
    group.add_argument('--kd-temperature', '--kd-temp', default=4.0, type=float,
                       help='distillation softmax temperature (default: 4.0)')
    group.add_argument('--kd-student-feature-dim', default=None, type=int,
                       help='student feature dimension for feature distillation (default: detected)')
    group.add_argument('--kd-teacher-feature-dim', default=None, type=int,
                       help='teacher feature dimension for feature distillation (default: detected)')
    group.add_argument('--kd-token-distill-type', default='soft', type=str, choices=('soft', 'hard'),
                       help='token distillation: soft (KL with temperature) or hard (CE with teacher argmax)')
    group.add_argument('--kd-teacher-img-size', type=int, default=None, metavar='N',
                       help='teacher input resolution (default: the data config stored in a train.py checkpoint, '
                            'else the teacher\'s pretrained config)')

    add_method_args(parser)

    group = parser.add_argument_group('NaFlex loader parameters')
    group.add_argument('--naflex-loader', action='store_true', default=False,
                       help="timm's NaFlex loader (variable resolution/aspect sequences; a NaFlex ViT model)")
    group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                       help='sequence lengths of the NaFlex training batches')
    group.add_argument('--naflex-max-seq-len', type=int, default=576,
                       help='fixed maximum sequence length of the NaFlex loader (validation)')
    group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None,
                       help='patch sizes for variable patch size training')
    group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                       help='probability of each patch size (uniform if not given)')
    group.add_argument('--naflex-loss-scale', default='linear', type=str,
                       help='scale the loss by batch size: none, sqrt or linear')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all',
                       help="loader worker seeding (timm loader paths): all or part (default: all)")
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='epochs between evaluations (and best-checkpoint decisions); the last epoch is always '
                            'evaluated (default: 1)')
    group.add_argument('--no-progress', action='store_true', default=False,
                       help='no tqdm progress bar (it is shown only when stderr is a terminal)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='batches between recovery checkpoints (0: off)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='checkpoints to keep')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes (default: 4)')
    group.add_argument('--save-images', action='store_true', default=False,
                       help='save a PNG grid of the first training batch of each epoch in the run folder')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in the loader')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='disable the CUDA prefetch/normalise loader')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='root folder of the run folders (default: "" = ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='run folder name under --output (default: date-model-mode)')
    dr_config.cli_only(group.add_argument(
        '--overwrite', action='store_true', default=False,
        help='start over in an existing run folder, deleting what an earlier run wrote there (without it, a '
             'non-empty run folder is refused unless --resume continues it)'))
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='metric picking the best checkpoint (default: top1)')
    group.add_argument('--tta', type=int, default=0, metavar='N',
                       help='test-time augmentation factor of the evaluation (0: none)')
    group.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                       help="timm's MultiEpochsDataLoader (workers kept across epochs; timm loader paths)")
    group.add_argument('--log-wandb', action='store_true', default=False, help='log to Weights & Biases')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project (default: wandb\'s)')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, help='explicit wandb run id to resume')
    return config_parser, parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse ``argv`` with YAML defaults from ``--config``; returns (args, resolved args as YAML)."""
    config_parser, parser = create_parser()
    args, args_text = dr_config.parse_args(parser, config_parser, argv)
    _resolve_data_root(parser, args)
    _check_values(parser, args)  # first: these need no torch
    _check_args(parser, args)
    args._parser = parser
    return args, args_text


def _resolve_data_root(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The dataset root as timm reads it (``DIR`` or ``--data-dir``) and the dataset: the embedded digits only when
    no root is given. With ``--reinforced`` and neither a root nor ``--dataset``, the validation data are resolved
    from the shards' metadata later (``_prepare_data``)."""
    if args.data and args.data_dir and not _same_path(args.data, args.data_dir):
        if args.data_dir != parser.get_default('data_dir'):  # both on the command line
            parser.error(f'DIR {args.data} and --data-dir {args.data_dir} name different dataset roots; pass one')
        args.data_dir = args.data  # DIR on the command line overrides a config file's data_dir
    args.data_dir = args.data_dir or args.data
    root_flag = 'DIR' if args.data else '--data-dir'
    if args.reinforced and not args.dataset and not args.data_dir:
        return
    try:
        args.dataset = dr_config.resolve_dataset_name(args.dataset, args.data_dir, root_flag)
    except ValueError as e:
        parser.error(str(e))


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, reported before any work starts."""
    if args.kd_model_name and args.kd_teacher and args.kd_teacher != [args.kd_model_name]:
        parser.error('--kd-model-name and --kd-teacher both name the teacher; pass one (--kd-teacher takes several '
                     'for an ensemble)')
    if args.kd_model_name:
        args.kd_teacher = [args.kd_model_name]
    _resolve_sampling(parser, args)
    _check_timm_args(parser, args)
    check_method_args(parser, args)
    if args.bake and (args.reinforced or args.kd_teacher):
        parser.error('--bake cannot be combined with --reinforced or --kd-teacher')
    if (args.shuffle_bn or args.bake_random_walk) and not args.bake:
        parser.error('--shuffle-bn and --bake-random-walk are BAKE options: add --bake')
    if args.shuffle_bn and args.sync_bn:
        parser.error('--shuffle-bn and --sync-bn are alternatives (BAKE Table 15); pass one')
    if args.replay_device and not args.reinforced:
        parser.error('--replay-device needs --reinforced (it replays the stored augmentations)')
    if args.replay_device == 'cuda' and not __import__('torch').cuda.is_available():  # torch only when asked
        parser.error('--replay-device cuda: CUDA is not available on this machine (use --replay-device cpu)')
    if args.reinforced and args.kd_teacher:
        parser.error('--reinforced and --kd-teacher are alternatives; pass one')
    if args.reinforced and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        parser.error('--mixup/--cutmix are not supported with --reinforced (targets come from the shards)')
    if args.rd_loss != 'kl':
        parser.error(f'--rd-loss {args.rd_loss!r} is not supported (only "kl")')
    if not 0.0 <= args.rd_p <= 1.0:
        parser.error(f'--rd-p must be in [0, 1], got {args.rd_p}')
    if args.grad_accum_steps < 1:
        parser.error('--grad-accum-steps must be >= 1')


def _resolve_sampling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Class-aware sampling and batch size: sets ``args.sampler_intra`` (M, 0 = plain sampling) and, with
    ``--batch-anchors N``, ``args.batch_size = N x (1 + M)``; checks that groups of ``1 + M`` fill the batch."""
    if args.class_aware_intra is not None:
        m, flag = args.class_aware_intra, '--class-aware-intra'
    elif args.bake:
        m, flag = args.bake_intra, '--bake-intra'
    else:
        m, flag = 0, '--class-aware-intra'
    if m < 0:
        parser.error(f'{flag} must be >= 0, got {m}')
    args.sampler_intra = m
    if args.batch_anchors is not None:
        if args.batch_anchors < 1:
            parser.error(f'--batch-anchors must be >= 1, got {args.batch_anchors}')
        images = args.batch_anchors * (1 + m)
        if args.batch_size not in (images, parser.get_default('batch_size')):
            parser.error(f'-b/--batch-size {args.batch_size} conflicts with --batch-anchors {args.batch_anchors} x '
                         f'(1 + {flag} {m}) = {images} images; pass one of them')
        args.batch_size = images
    if m > 0:
        from dr.bake.sampler import check_batch_size  # loads torch: only when class-aware sampling is asked for
        try:
            check_batch_size(args.batch_size, m, flag)
        except ValueError as e:
            parser.error(str(e))
        if args.reinforced or args.kd_teacher:
            parser.error(f'class-aware sampling ({flag} {m}) cannot be combined with --reinforced or --kd-teacher')


def _check_timm_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """timm's flags that cannot combine with one of this project's modes, or with each other (as timm checks)."""
    class_aware = f'class-aware sampling (--bake / --class-aware-intra {args.sampler_intra})'
    if args.tta:
        parser.error('--tta: timm\'s train.py averages --tta consecutive outputs of a loader that makes no test-time '
                     'augmentations (so it averages different images); use validate.py for test-time evaluation')
    if args.amp_impl != 'native':
        parser.error(f'--amp-impl {args.amp_impl}: only native torch AMP is supported')
    if args.aug_splits == 1:
        parser.error('--aug-splits must be 0 or >= 2 (AugMix splits: the clean image plus augmented copies)')
    if args.jsd_loss and args.aug_splits < 2:
        parser.error('--jsd-loss needs --aug-splits >= 2 (the JSD is taken between the augmentation splits)')
    if args.split_bn and args.aug_splits < 2:
        parser.error('--split-bn needs --aug-splits >= 2 (one BatchNorm per augmentation split)')
    if args.aug_splits and args.sampler_intra > 0:
        parser.error(f'--aug-splits cannot be combined with {class_aware}: BAKE ensembles over the images of one '
                     f'batch, and splits add copies of every image to it')
    if args.aug_repeats and args.sampler_intra > 0:
        parser.error(f'--aug-repeats cannot be combined with {class_aware}: both are batch samplers; the class-aware '
                     f'sampler already draws class mates per anchor')
    for flag, on in (('--aug-splits', args.aug_splits), ('--aug-repeats', args.aug_repeats),
                     ('--jsd-loss', args.jsd_loss), ('--bce-loss', args.bce_loss),
                     ('--naflex-loader', args.naflex_loader)):
        if on and args.reinforced:
            parser.error(f'{flag} cannot be combined with --reinforced: the images and targets come from the '
                         f'reinforced shards (stored augmentations, teacher probabilities and their KL loss)')
    if args.jsd_loss and (args.bake or args.kd_teacher):
        parser.error('--jsd-loss cannot be combined with --bake or --kd-teacher/--kd-model-name: their tasks have '
                     'their own loss on the batch')
    if args.train_img_sizes and (args.sampler_intra > 0 or args.aug_repeats or args.aug_splits or args.reinforced
                                 or args.naflex_loader):
        parser.error('--train-img-sizes cannot be combined with class-aware sampling, --aug-repeats, --aug-splits, '
                     '--reinforced or --naflex-loader: timm\'s ScheduledBatchSampler draws the batches itself')
    if args.naflex_loader and (args.sampler_intra > 0 or args.aug_repeats or args.aug_splits):
        parser.error('--naflex-loader cannot be combined with class-aware sampling, --aug-repeats or --aug-splits: '
                     'the NaFlex loader batches variable-length patch sequences with its own sampler')
    if args.kd_distill_type == 'feature' and args.kd_teacher and len(args.kd_teacher) > 1:
        parser.error('--kd-distill-type feature distills the features of one teacher; --kd-teacher names '
                     f'{len(args.kd_teacher)} (an ensemble has no single feature space)')
    if args.kd_distill_type != 'logit' and not args.kd_teacher:
        parser.error(f'--kd-distill-type {args.kd_distill_type} needs a teacher: --kd-model-name or --kd-teacher')
    if args.naflex_loss_scale not in ('none', 'sqrt', 'linear'):
        parser.error(f'--naflex-loss-scale {args.naflex_loss_scale!r}: expected none, sqrt or linear')
    if args.model_ema_force_cpu and not args.model_ema:
        parser.error('--model-ema-force-cpu is an option of --model-ema: add --model-ema')


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values out of range, reported at parse time."""
    if not 0.0 <= args.bake_omega <= 1.0:
        parser.error(f'--bake-omega must lie in [0, 1], got {args.bake_omega}')
    if args.bake_omega == 1.0 and args.bake and not args.bake_one_step:
        parser.error('--bake-omega 1 makes (I - omega A) singular: add --bake-one-step (the paper\'s form for 1)')
    if args.bake_temp <= 0:
        parser.error(f'--bake-temp must be > 0, got {args.bake_temp}')
    for flag, value in (('--scale', args.scale), ('--ratio', args.ratio)):
        if len(value) != 2:
            parser.error(f'{flag} takes two values (min max), got {len(value)}')
    for flag, value, low in (('--epochs', args.epochs, 1), ('-b/--batch-size', args.batch_size, 1),
                             ('-j/--workers', args.workers, 0), ('--log-interval', args.log_interval, 1),
                             ('--val-interval', args.val_interval, 1), ('--aug-splits', args.aug_splits, 0)):
        if value < low:
            parser.error(f'{flag} must be >= {low}, got {value}')


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Files and folders that are missing or in the way (the run folder), before anything is imported or built.

    ``--resume RUN_DIR`` becomes ``RUN_DIR/last.pth.tar``, and without ``--experiment`` the run continues in the run
    folder it resumes from.
    """
    if not args.dataset and args.data_dir and (not args.reinforced or args.val_split):  # an ImageFolder/tar at DIR
        if not os.path.exists(args.data_dir):
            parser.error(f'DIR {args.data_dir}: no such dataset folder')
    for flag, path in (('--initial-checkpoint', args.initial_checkpoint), ('--pretrained-path', args.pretrained_path)):
        if path and not os.path.isfile(path):
            parser.error(f'{flag} {path}: no such file')
    if args.resume:
        args.resume = _resolve_resume(parser, args.resume)
        folder = os.path.dirname(os.path.abspath(args.resume))
        if not args.experiment and os.path.isfile(os.path.join(folder, 'args.yaml')):
            args.output, args.experiment = os.path.split(folder)  # continue in the run folder resumed from
    if args.experiment:
        problem = run_folder_problem(os.path.join(args.output, args.experiment), args.resume, args.overwrite)
        if problem:
            parser.error(problem)


def _resolve_resume(parser: argparse.ArgumentParser, path: str) -> str:
    """``--resume`` as a file: a run folder gives its ``last.pth.tar``.

    Not ``dr.checkpoint.resolve_checkpoint_path``: that prefers ``model_best`` and its module loads torch, while this
    runs at parse time, before the heavy import.
    """
    if os.path.isdir(path):
        last = os.path.join(path, 'last.pth.tar')
        if os.path.isfile(last):
            return last
        recovery = sorted(fnmatch.filter(os.listdir(path), 'recovery-*.pth.tar'))
        hint = f' (recovery checkpoints there: {", ".join(recovery)})' if recovery else ''
        parser.error(f'--resume {path}: the run folder has no last.pth.tar{hint}')
    if not os.path.isfile(path):
        parser.error(f'--resume {path}: no such checkpoint file or run folder')
    return path


def run_folder_problem(folder: str, resume: str = '', overwrite: bool = False) -> Optional[str]:
    """Why ``folder`` cannot take a new run (None if it can).

    An existing non-empty run folder is only used to continue its run (``--resume`` with a checkpoint inside it) or
    to start over (``--overwrite``, which clears only what train.py writes and refuses a folder holding other files).
    """
    entries = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f'run folder {folder} exists and is not a folder'
    resume_inside = bool(resume) and _same_path(os.path.dirname(os.path.abspath(resume)), folder)
    if overwrite and resume_inside:
        return (f'--overwrite would delete the checkpoint --resume {resume} continues from; pass one of them '
                f'(run folder {folder})')
    if not entries or resume_inside:
        return None
    if overwrite:
        foreign = [e for e in entries if not any(fnmatch.fnmatch(e, p) for p in RUN_FOLDER_FILES)]
        if foreign:
            return (f'--overwrite: run folder {folder} holds files train.py did not write ({", ".join(foreign[:5])}'
                    f'{", ..." if len(foreign) > 5 else ""}); not clearing it: remove them or choose another '
                    f'--experiment')
        return None
    what = 'another run' if 'args.yaml' in entries else f'{len(entries)} entries'
    cont = f' (--resume {resume} is outside it)' if resume else ''
    return (f'run folder {folder} exists and holds {what}{cont}: pass --resume {folder} to continue it, --overwrite '
            f'to start over (deletes its contents), or another --experiment')


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _clear_run_folder(folder: str) -> None:
    """Delete what an earlier run wrote in ``folder`` (``--overwrite``; only ``RUN_FOLDER_FILES`` are there)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    _logger.info(f'--overwrite: cleared run folder {folder}')


def _check_model_and_checkpoints(args: argparse.Namespace) -> None:
    """After the heavy import, before data and model are built: the model name, and every checkpoint the run will
    read is loadable (weights_only; tensors are mapped, not read) and holds the model being trained."""
    name = args.model
    if ':' not in name and not is_model(name) and not is_model(name.split('.')[0]):
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.7)
        hint = f'; did you mean {", ".join(close)}?' if close else ' (timm.list_models() lists the names)'
        raise ValueError(f'--model {name}: unknown timm model{hint}')
    for flag, path in (('--resume', args.resume), ('--initial-checkpoint', args.initial_checkpoint),
                       ('--pretrained-path', args.pretrained_path)):
        if not path:
            continue
        ckpt = load_checkpoint_file(path, mmap=True)
        stored = getattr(ckpt.get('args'), 'model', None) if isinstance(ckpt, dict) else None
        if flag == '--resume' and stored and stored != name:
            raise ValueError(f'--resume {path} holds a {stored} run but --model is {name}')
        del ckpt


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    if logging.getLogger().handlers:  # already configured (e.g. several runs in one process, as the demo does)
        logging.getLogger().setLevel(level)
        return
    utils.setup_default_logging(default_level=level)


def _amp_context(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return nullcontext
    dtype = torch.bfloat16 if (args.amp_dtype == 'bfloat16' or device.type == 'cpu') else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _resolve_lr(args: argparse.Namespace) -> None:
    if args.lr is None:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        ratio = global_batch / args.lr_base_size
        scale = args.lr_base_scale
        if not scale:  # as timm: sqrt for the Adam/LAMB family, linear otherwise
            scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        if scale == 'sqrt':
            ratio = ratio ** 0.5
        elif scale != 'linear':
            raise ValueError(f'--lr-base-scale {args.lr_base_scale!r}: expected linear, sqrt or ""')
        args.lr = args.lr_base * ratio
        _logger.info(f'Learning rate ({args.lr:.6g}) = lr-base ({args.lr_base}) x {scale} '
                     f'scaling of global batch {global_batch} / {args.lr_base_size}')


def _output_dir(args: argparse.Namespace) -> str:
    if not args.output:
        args.output = os.path.join('output', 'train')
    if not args.experiment:
        mode = 'bake' if args.bake else 'rd' if args.reinforced else 'kd' if args.kd_teacher else 'plain'
        args.experiment = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), mode])
    out = os.path.join(args.output, args.experiment)
    problem = run_folder_problem(out, args.resume, args.overwrite)  # checked in main(); the folder may have changed
    if problem:
        raise ValueError(problem)
    if args.overwrite and os.path.isdir(out):
        _clear_run_folder(out)
    os.makedirs(out, exist_ok=True)
    return out


def create_criterion(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    """The training loss, chosen as timm's train.py chooses it (JSD, BCE, soft-target, label smoothing, CE)."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if mixup_active:
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return (BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss
                else LabelSmoothingCrossEntropy(smoothing=args.smoothing))
    return nn.CrossEntropyLoss()


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device,
                rd_meta: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The timm training task for the chosen mode (BAKE, reinforced data, a competing method, online KD or plain)."""
    if args.method:
        from dr.methods import create_method_task
        return create_method_task(args, model, criterion, device)
    if args.bake:
        return BakeTask(
            model, criterion=criterion, omega=args.bake_omega, temperature=args.bake_temp, weight=args.bake_weight,
            knowledge=args.bake_knowledge, one_step=args.bake_one_step, global_ensemble=args.bake_global,
            num_classes=args.num_classes, device=device, verbose=args.rank == 0, random_walk=args.bake_random_walk,
            shuffle_bn=args.shuffle_bn)
    if args.reinforced:
        return ReinforcedTask(model, loss=args.rd_loss, gt_weight=args.rd_gt_weight, device=device,
                              verbose=args.rank == 0)
    if args.kd_teacher:

        flag = '--kd-model-name' if args.kd_model_name else '--kd-teacher'
        pretrained = args.pretrained or bool(args.kd_model_name and '=' not in args.kd_model_name)  # timm: hub
        teacher = create_teacher(args.kd_teacher, num_classes=args.num_classes, pretrained=pretrained,
                                 img_size=args.kd_teacher_img_size, device=device, flag=flag)
        cfg = model.pretrained_cfg
        teacher.set_input_norm(args.data_config['mean'], args.data_config['std'], args.data_config['input_size'])
        model.pretrained_cfg = dict(cfg, mean=tuple(args.data_config['mean']), std=tuple(args.data_config['std']))
        kd = dict(criterion=criterion, distill_loss_weight=args.distill_loss_weight,
                  task_loss_weight=args.task_loss_weight, device=device, verbose=args.rank == 0)
        if args.kd_distill_type == 'token':  # DeiT: the distillation token's head learns from the teacher
            return TokenDistillationTask(model, teacher, distill_type=args.kd_token_distill_type,
                                         temperature=args.kd_temperature, **kd)
        if args.kd_distill_type == 'feature':
            return FeatureDistillationTask(model, teacher.members[0], student_feature_dim=args.kd_student_feature_dim,
                                           teacher_feature_dim=args.kd_teacher_feature_dim, **kd)
        return LogitDistillationTask(model, teacher, loss_type=args.kd_loss_type, temperature=args.kd_temperature,
                                     **kd)
    return ClassificationTask(model, criterion=criterion, device=device, verbose=args.rank == 0)


def _create_datasets(args: argparse.Namespace):
    """Train and validation datasets with timm's dataset flags (keys, sample counts, download, repeats)."""
    common = dict(class_map=args.class_map, batch_size=args.batch_size, seed=args.seed, download=args.dataset_download)
    if args.input_img_mode:
        common['input_img_mode'] = args.input_img_mode
    if args.dataset_trust_remote_code:
        common['trust_remote_code'] = True
    for key in ('input_key', 'target_key'):
        if getattr(args, key):
            common[key] = getattr(args, key)
    train = None
    if not args.reinforced:
        train = dr_data.create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                       digits_size=args.digits_size, num_samples=args.train_num_samples,
                                       repeats=args.epoch_repeats, **common)
    val = None
    if args.val_split:
        val = dr_data.create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                     digits_size=args.digits_size, num_samples=args.val_num_samples, **common)
    return train, val


def _infer_num_classes(args: argparse.Namespace, train_ds, val_ds, rd_meta) -> int:
    if rd_meta is not None:
        return int(rd_meta['num_classes'])
    for ds in (train_ds, val_ds):
        if ds is None:
            continue
        classes = dr_data.dataset_classes(ds)
        if classes:
            return len(classes)
    raise ValueError('--num-classes is required for this dataset (its classes cannot be listed)')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train; returns the final summary (best metric, output dir, last eval metrics).

    Bad input (flags, config file, run folder, checkpoints, datasets) exits with status 2 and a
    ``train.py: error: ...`` message naming the flag, file or folder at fault, before anything is written.
    """
    args, _ = parse_args(argv)
    parser = vars(args).pop('_parser')
    if args.ban_generations:  # born-again generations, each one train.main call (dr/methods/ban.py)
        from dr.methods.ban import run_generations
        return run_generations(sys.argv[1:] if argv is None else argv, args)
    _check_paths(parser, args)
    _import_training_libraries()
    try:
        _check_model_and_checkpoints(args)
        device = _setup_process(args)
        rd_meta, train_ds, val_ds = _prepare_data(args)
        model, data_config = create_train_model(args, device)
        run = _setup_training(args, model, device, rd_meta)
        run.train_loader, run.eval_loader = create_train_eval_loaders(
            args, train_ds, val_ds, data_config, rd_meta, device, model_patch_size=_naflex_patch_size(model),
            naflex_mixup=run.naflex_mixup)
        _setup_schedule(args, run)
        if args.rank == 0:
            _setup_outputs(args, parser, model, run)
    except (ValueError, FileNotFoundError) as e:  # bad input found while setting up: no traceback, exit status 2
        _logger.debug('setup failed', exc_info=True)
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    with logging_redirect_tqdm() if show_progress(args) else nullcontext():  # log lines print above the bar
        result = train_epochs(args, run, device)
    _finish(args, run, result)
    return result


@dataclasses.dataclass
class TrainRun:
    """The pieces the epoch loop works with."""
    task: nn.Module
    optimizer: torch.optim.Optimizer
    amp_autocast: Any
    loss_scaler: Optional[NativeScaler] = None
    mixup_fn: Optional[Mixup] = None
    naflex_mixup: Any = None
    resume_epoch: Optional[int] = None
    train_loader: Any = None
    eval_loader: Any = None
    lr_scheduler: Any = None
    num_epochs: int = 0
    start_epoch: int = 0
    updates_per_epoch: int = 0
    output_dir: Optional[str] = None
    saver: Optional[CheckpointSaver] = None


def _setup_process(args: argparse.Namespace) -> torch.device:
    """Device and process group, logging, and the seed that makes the model init identical on every rank."""
    for module in args.device_modules or []:
        importlib.import_module(module)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = utils.init_distributed_device(args)
    if not args.distributed and os.environ.get('TORCHELASTIC_RUN_ID') and os.environ.get('WORLD_SIZE') == '1':
        # torchrun with one process: timm stays single-process; a group of one runs the same DDP/SyncBN/NCCL path
        # as N processes do (how a one-GPU box checks a multi-GPU command)
        torch.distributed.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', init_method='env://')
        args.distributed = True
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    _setup_logging(args.rank)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size} on {device}')
    utils.random_seed(args.seed, 0)  # identical model init on every rank
    return device


def _prepare_data(args: argparse.Namespace):
    """Reinforced-shard metadata and datasets; fills in ``num_classes`` and the digits image size."""
    rd_meta = None
    if args.digits_size is None:
        args.digits_size = dr_data.DIGITS_DEFAULT_SIZE
    if args.reinforced:
        rd_meta = check_reinforced(args.reinforced, args.num_classes)
        _resolve_reinforced_validation(args, rd_meta)
    train_ds, val_ds = _create_datasets(args)
    if rd_meta is not None and val_ds is not None:
        classes = dr_data.dataset_classes(val_ds)
        if classes and len(classes) != int(rd_meta['num_classes']):
            raise ValueError(f'--reinforced {args.reinforced} holds {rd_meta["num_classes"]} classes but the '
                             f'validation data ({_dataset_desc(args)}, split {args.val_split}) have {len(classes)}; '
                             f'pass the dataset the shards were made from, or --val-split "" to skip evaluation')
    if args.num_classes is None:
        args.num_classes = _infer_num_classes(args, train_ds, val_ds, rd_meta)
    if args.img_size is None and args.input_size is None:
        if dr_data.is_digits(args.dataset):
            args.img_size = args.digits_size
        elif rd_meta is not None and rd_meta.get('dataset', {}).get('digits_size'):
            args.img_size = int(rd_meta['dataset']['digits_size'])
    return rd_meta, train_ds, val_ds


def _dataset_desc(args: argparse.Namespace) -> str:
    return f'--dataset {args.dataset}' if args.dataset else f'the ImageFolder {args.data_dir}'


def _resolve_reinforced_validation(args: argparse.Namespace, rd_meta: Dict[str, Any]) -> None:
    """With ``--reinforced`` and no dataset flags, validate on the data the shards were made from: the digits (at
    their stored size) or, for any other dataset, stop and say which flags to pass."""
    if args.dataset or args.data_dir or not args.val_split:
        return
    info = rd_meta.get('dataset') or {}
    name = str(info.get('name') or '')
    if name.lower() == dr_data.DIGITS_NAME:
        args.dataset = dr_data.DIGITS_NAME
        if args.digits_size == dr_data.DIGITS_DEFAULT_SIZE and info.get('digits_size'):
            args.digits_size = int(info['digits_size'])
        _logger.info(f'--reinforced {args.reinforced}: a reinforcement of the digits; validating on their '
                     f'{args.val_split} split')
        return
    made_from = f'dataset {name!r}' if name else 'an ImageFolder' if 'name' in info else 'an unrecorded dataset'
    raise ValueError(f'--reinforced {args.reinforced} was made from {made_from} (split {info.get("split", "?")}); '
                     f'to validate, pass that dataset\'s root as DIR or --data-dir'
                     f'{" with --dataset " + name if name else ""} (its --val-split {args.val_split} is read), or '
                     f'--val-split "" to train without evaluation')


def create_train_model(args: argparse.Namespace, device: torch.device) -> Tuple[nn.Module, Dict[str, Any]]:
    """The timm model on ``device`` (initial weights, channels-last, SyncBN) and its resolved data config."""
    model_kwargs = dict(args.model_kwargs)
    if args.in_chans is not None:
        model_kwargs['in_chans'] = args.in_chans
    if args.pretrained_path:
        model_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    drop_path = args.drop_path if args.drop_path is not None else args.drop_connect  # timm: deprecated alias
    # None values (model defaults) are dropped by timm's create_model, as in timm's train.py
    try:
        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                             drop_rate=args.drop, drop_path_rate=drop_path, drop_block_rate=args.drop_block,
                             global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
                             scriptable=args.torchscript or None, **model_kwargs)
    except TypeError as e:  # a model kwarg this architecture does not take (as in timm, e.g. --bn-momentum)
        raise ValueError(f'--model {args.model} does not take an argument it was given ({e}); --drop-block, '
                         f'--bn-momentum, --bn-eps and --model-kwargs apply only to models that accept them') from None
    if args.initial_checkpoint:
        load_model_weights(model, args.initial_checkpoint)
    if args.head_init_scale is not None or args.head_init_bias is not None:
        with torch.no_grad():
            head = model.get_classifier()
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                nn.init.constant_(head.bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if args.split_bn:
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    if args.rank == 0:
        _logger.info(f'Model {safe_model_name(args.model)} created, '
                     f'param count: {sum(p.numel() for p in model.parameters()):,}')
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    args.data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}

    model.to(device=device, dtype=_model_dtype(args))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    sync_bn = args.sync_bn
    if sync_bn is None:  # the paper's runs with class-aware sampling use SyncBN (Table 15)
        sync_bn = args.sampler_intra > 0 and not args.shuffle_bn and device.type == 'cuda'
    if sync_bn and args.distributed:
        if device.type != 'cuda':
            raise ValueError('--sync-bn needs CUDA devices (torch SyncBatchNorm does not run on CPU)')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sampler_intra > 0 and not args.shuffle_bn and args.distributed and args.rank == 0:
        _logger.warning('Class-aware sampling with per-process BatchNorm: BAKE Table 15 needs --sync-bn/--shuffle-bn')
    if args.torchscript:
        model = torch.jit.script(model)
    return model, data_config


def _model_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """``--model-dtype`` as a torch dtype (None: float32)."""
    if not args.model_dtype:
        return None
    dtype = getattr(torch, args.model_dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f'--model-dtype {args.model_dtype}: not a torch floating point dtype (e.g. bfloat16)')
    return dtype


def _setup_training(args: argparse.Namespace, model: nn.Module, device: torch.device,
                    rd_meta: Optional[Dict[str, Any]]) -> TrainRun:
    """Task, optimizer, AMP, resumed state, EMA, compile and DDP, in that order."""
    _resolve_lr(args)
    mixup_active = (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None)
    criterion = create_criterion(args, mixup_active)
    task = create_task(args, model, criterion, device, rd_meta)
    task.to(device)
    # a method with trainable parts beside the model (BYOT's heads, KDCL's second student) lists them all
    optimizer = create_optimizer_v2(getattr(task, 'optimizer_module', model), **optimizer_kwargs(cfg=args),
                                    **args.opt_kwargs)
    run = TrainRun(task=task, optimizer=optimizer, amp_autocast=_amp_context(args, device))
    if args.amp and device.type == 'cuda' and args.amp_dtype == 'float16':
        run.loss_scaler = NativeScaler(device=device.type)

    if args.resume:
        run.resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=run.loss_scaler,
            log_info=args.rank == 0)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else device)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        ddp = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None, **ddp)
    if mixup_active and args.naflex_loader:  # timm: mixing variable-size batches happens inside the NaFlex loader
        run.naflex_mixup = NaFlexMixup(num_classes=args.num_classes, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                       switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
                                       label_smoothing=args.smoothing, mixup_off_epoch=args.mixup_off_epoch)
    elif mixup_active:
        run.mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                             prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                             label_smoothing=args.smoothing, num_classes=args.num_classes)
    return run


def create_train_eval_loaders(args: argparse.Namespace, train_ds, val_ds, data_config: Dict[str, Any],
                              rd_meta: Optional[Dict[str, Any]], device: torch.device,
                              model_patch_size: Optional[Tuple[int, int]] = None,
                              naflex_mixup: Any = None) -> Tuple[Any, Any]:
    """The training loader (reinforced shards, a streaming timm loader, or a map-style loader with the class-aware
    sampler under BAKE / --class-aware-intra) and the evaluation loader (None without a validation split)."""
    input_size = resolve_input_size(data_config)
    use_prefetcher = device.type == 'cuda' and not args.no_prefetcher
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    aug = dict(no_aug=args.no_aug, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
               hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
               color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.,
               gaussian_blur_prob=args.gaussian_blur_prob or 0., auto_augment=args.aa,
               interpolation=train_interpolation, mean=data_config['mean'], std=data_config['std'],
               re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    timm_loader = dict(num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem,
                       device=device, worker_seeding=args.worker_seeding,
                       use_multi_epochs_loader=args.use_multi_epochs_loader)
    train_transform = create_transform(input_size, is_training=True, **aug)
    train_ds, train_transform = wrap_method_train_data(args, train_ds, train_transform)  # PS-KD indices, DDGSD views
    if args.reinforced:
        train_loader = create_reinforced_loader(
            args.reinforced, rd_meta, batch_size=args.batch_size, num_workers=args.workers, input_size=input_size,
            mean=data_config['mean'], std=data_config['std'], interpolation=None,  # replay as the teacher saw it
            rd_p=args.rd_p, rd_densify=args.rd_densify, fallback_transform=train_transform,
            num_classes=args.num_classes, seed=args.seed, rank=args.rank, world_size=args.world_size,
            shuffle_buffer=args.rd_shuffle_buffer, device=device, pin_memory=args.pin_mem,
            drop_last=not args.rd_pad_last, replay_device=args.replay_device)
    elif args.naflex_loader:
        train_loader = create_naflex_loader(train_ds, **_naflex_kwargs(args, model_patch_size), is_training=True,
                                            train_seq_lens=args.naflex_train_seq_lens, re_split=args.resplit,
                                            mixup_fn=naflex_mixup,
                                            use_prefetcher=True, rank=args.rank, world_size=args.world_size,
                                            seed=args.seed, **aug,
                                            **{k: v for k, v in timm_loader.items() if k != 'use_multi_epochs_loader'})
    elif isinstance(train_ds, torch.utils.data.IterableDataset):
        if args.sampler_intra > 0:
            raise ValueError(f'class-aware sampling (--bake / --class-aware-intra) needs a map-style dataset with '
                             f'known labels; --dataset {args.dataset!r} streams (use an ImageFolder, digits or torch/)')
        if args.aug_repeats:
            raise ValueError(f'--aug-repeats needs a map-style dataset (a sampler repeats its indices); '
                             f'--dataset {args.dataset!r} streams')
        train_loader = create_loader(
            train_ds, input_size=input_size, batch_size=args.batch_size, is_training=True, re_split=args.resplit,
            num_aug_splits=args.aug_splits, use_prefetcher=use_prefetcher, **aug, **timm_loader)
    elif args.train_img_sizes:
        # scheduled resolution (progressive resizing): timm's ScheduledBatchSampler picks each batch's size
        loader = create_loader(
            train_ds, input_size=input_size, batch_size=args.batch_size, is_training=True, re_split=args.resplit,
            use_prefetcher=use_prefetcher, input_size_choices=args.train_img_sizes,
            batch_size_choices=args.train_batch_sizes, batch_choice_weights=args.train_size_weights,
            batch_choice_seed=args.seed, batch_choice_schedule=args.train_size_schedule,
            batch_schedule_epochs=args.train_size_schedule_epochs or (
                args.epochs if args.train_size_schedule == 'progressive' else None),
            batch_schedule_spread=args.train_size_schedule_spread,
            batch_schedule_random_mix=args.train_size_schedule_random_mix, **aug, **timm_loader)
        train_loader = loader if use_prefetcher else DeviceLoader(loader, device, channels_last=args.channels_last)
    elif args.aug_splits:
        # AugMix splits: timm's AugMixDataset and loader; its fast collate lays the splits out as JsdCrossEntropy
        # expects (the prefetcher also normalises on the CPU)
        train_loader = create_loader(
            AugMixDataset(train_ds, num_splits=args.aug_splits), input_size=input_size, batch_size=args.batch_size,
            is_training=True, re_split=args.resplit, num_aug_splits=args.aug_splits,
            num_aug_repeats=_aug_repeats(args), use_prefetcher=True, **aug, **timm_loader)
    else:
        sampler = None
        if args.sampler_intra > 0:
            sampler = ClassAwareSampler(dr_data.dataset_targets(train_ds), num_intra=args.sampler_intra,
                                        num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
        elif args.aug_repeats:  # DeiT's repeated augmentation: timm's sampler, on one process too
            sampler = RepeatAugSampler(train_ds, num_replicas=args.world_size, rank=args.rank,
                                       num_repeats=_aug_repeats(args))
        train_loader = DeviceLoader(
            create_train_loader(train_ds, train_transform, args.batch_size, sampler=sampler,
                                num_replicas=args.world_size, rank=args.rank, seed=args.seed,
                                num_workers=args.workers, pin_memory=args.pin_mem),
            device, channels_last=args.channels_last)

    eval_loader = None
    if val_ds is not None and args.naflex_loader:
        eval_loader = create_naflex_loader(
            val_ds, **_naflex_kwargs(args, model_patch_size, eval_batch=True), is_training=False,
            interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
            crop_pct=data_config['crop_pct'], num_workers=args.workers, distributed=args.distributed,
            rank=args.rank, world_size=args.world_size, pin_memory=args.pin_mem, device=device, use_prefetcher=True)
    elif val_ds is not None:
        eval_loader = create_loader(
            val_ds, input_size=input_size, batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
            crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher)
    return train_loader, eval_loader


def _naflex_kwargs(args: argparse.Namespace, model_patch_size: Optional[Tuple[int, int]],
                   eval_batch: bool = False) -> Dict[str, Any]:
    """timm's NaFlex loader: the model's patch size, or --naflex-patch-sizes for variable patch sizes."""
    kwargs: Dict[str, Any] = dict(max_seq_len=args.naflex_max_seq_len,
                                  batch_size=(args.validation_batch_size or args.batch_size) if eval_batch
                                  else args.batch_size)
    if args.naflex_patch_sizes and not eval_batch:
        kwargs.update(patch_size_choices=args.naflex_patch_sizes, patch_size_choice_probs=args.naflex_patch_size_probs)
    else:
        if model_patch_size is None:
            raise ValueError(f'--naflex-loader needs a NaFlex model (timm naflexvit_*); --model {args.model} has no '
                             f'patch embedding with a patch size')
        kwargs['patch_size'] = model_patch_size
    return kwargs


def _naflex_patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    get = getattr(model, 'get_patch_size', None)
    return tuple(get()) if callable(get) else None


def _aug_repeats(args: argparse.Namespace) -> int:
    if args.aug_repeats != int(args.aug_repeats) or args.aug_repeats < 0:
        raise ValueError(f'--aug-repeats must be a whole number of repeats, got {args.aug_repeats}')
    return int(args.aug_repeats)


def _setup_schedule(args: argparse.Namespace, run: TrainRun) -> None:
    """The LR scheduler, the number of epochs and the first epoch (stepped to where a resumed run left off)."""
    run.updates_per_epoch = (len(run.train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    run.lr_scheduler, run.num_epochs = create_scheduler_v2(
        run.optimizer, **scheduler_kwargs(args, decreasing_metric='loss' in args.eval_metric),
        updates_per_epoch=run.updates_per_epoch)
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
    elif run.resume_epoch is not None:
        run.start_epoch = run.resume_epoch
    if run.lr_scheduler is not None and run.start_epoch > 0:
        if args.sched_on_updates:
            run.lr_scheduler.step_update(run.start_epoch * run.updates_per_epoch)
        else:
            run.lr_scheduler.step(run.start_epoch)


def _setup_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser, model: nn.Module, run: TrainRun) -> None:
    """Rank 0: the run folder with args.yaml and versions.json, the checkpoint saver and wandb."""
    run.output_dir = output_dir = _output_dir(args)
    dr_config.save_args_yaml(dr_config.args_to_yaml(args, parser), output_dir)
    with atomic_write(os.path.join(output_dir, 'versions.json'), 'w') as f:
        json.dump(software_versions(), f, indent=2)
    run.saver = CheckpointSaver(model=model, optimizer=run.optimizer, args=args, amp_scaler=run.loss_scaler,
                                checkpoint_dir=output_dir, recovery_dir=output_dir,
                                decreasing='loss' in args.eval_metric, max_history=args.checkpoint_hist, task=run.task)
    if args.resume and _same_path(os.path.dirname(os.path.abspath(args.resume)), output_dir):
        run.saver.load_state_dict_from_checkpoint(args.resume)
        removed = truncate_summary(os.path.join(output_dir, 'summary.csv'), run.start_epoch)
        if removed:
            _logger.info(f'summary.csv: dropped {removed} row(s) of epoch {run.start_epoch} and later (rerun now)')
    if args.log_wandb:
        init_wandb(output_dir, args.wandb_project, config=vars(args), name=args.experiment,
                   tags=args.wandb_tags, run_id=args.wandb_resume_id or None)
    _logger.info(f'Scheduled epochs: {run.num_epochs}, {run.updates_per_epoch} updates per epoch; '
                 f'outputs: {output_dir}')


def train_epochs(args: argparse.Namespace, run: TrainRun, device: torch.device) -> Dict[str, Any]:
    """The epoch loop: train, evaluate (and the EMA) every ``--val-interval`` epochs and after the last, log a summary
    row, checkpoint, step the schedule."""
    best_metric, best_epoch, eval_metrics = None, None, None
    stop_epoch = run.num_epochs if args.stop_epoch is None else min(run.num_epochs, args.stop_epoch)
    for epoch in range(run.start_epoch, stop_epoch):
        seed_everything_for_epoch(args.seed, epoch, args.rank)
        set_loader_epoch(run.train_loader, epoch)
        start_method_epoch(run.task, epoch, run.num_epochs, run.output_dir)  # PS-KD: alpha_t, last epoch's predictions
        if run.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            run.mixup_fn.mixup_enabled = False
        train_metrics = train_one_epoch(epoch, run.task, run.train_loader, run.optimizer, args, device,
                                        run.lr_scheduler, run.amp_autocast, run.loss_scaler, run.mixup_fn, run.saver,
                                        run.updates_per_epoch)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):  # timm: equal BN statistics on all ranks
            utils.distribute_bn(run.task.get_eval_model(), args.world_size, args.dist_bn == 'reduce')
            if run.task.has_ema() and not args.model_ema_force_cpu:  # as timm: the EMA's statistics too
                utils.distribute_bn(run.task.get_eval_model(ema=True), args.world_size, args.dist_bn == 'reduce')
        evaluate = (epoch + 1) % args.val_interval == 0 or epoch + 1 == run.num_epochs
        if run.eval_loader is not None and evaluate:
            eval_metrics = validate(run.task, run.eval_loader, args, run.amp_autocast)
            if run.task.has_ema() and not args.model_ema_force_cpu:  # timm: no EMA validation on the CPU copy
                ema_metrics = validate(run.task, run.eval_loader, args, run.amp_autocast, ema=True)
                eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
        elif run.eval_loader is not None:  # --val-interval: the summary keeps its columns, without values
            ema = run.task.has_ema() and not args.model_ema_force_cpu
            keys = list(eval_metrics) if eval_metrics else _eval_keys(ema)
            eval_metrics = OrderedDict((k, float('nan')) for k in keys)
        if args.rank == 0:
            lrs = [g['lr'] for g in run.optimizer.param_groups]
            lr = sum(lrs) / len(lrs)
            utils.update_summary(epoch, train_metrics, eval_metrics or {},
                                 os.path.join(run.output_dir, 'summary.csv'), lr=lr)
            if args.log_wandb:  # at step=epoch, so the segments of a resumed run line up
                log_epoch(epoch, train_metrics, eval_metrics, lr=lr)
            metric = eval_metrics[args.eval_metric] if eval_metrics and evaluate else None
            best_metric, best_epoch = run.saver.save_checkpoint(epoch, metric=metric)
        if run.lr_scheduler is not None:
            run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics and evaluate else None)
    return OrderedDict(output_dir=run.output_dir, best_metric=best_metric, best_epoch=best_epoch,
                       eval_metric=args.eval_metric, last_eval=eval_metrics)


def _eval_keys(ema: bool) -> list:
    keys = ['loss', 'top1', 'top5']
    return keys + [f'ema_{k}' for k in keys] if ema else keys


def _finish(args: argparse.Namespace, run: TrainRun, result: Dict[str, Any]) -> None:
    """Rank 0 writes results.json and closes wandb; every rank leaves the process group."""
    if args.rank == 0 and hasattr(run.task, 'save_outputs'):  # a method's extra models (KDCL's second student)
        run.task.save_outputs(run.output_dir)
    if args.rank == 0:
        with atomic_write(os.path.join(run.output_dir, 'results.json'), 'w') as f:
            json.dump(result, f, indent=2)
        if result['best_metric'] is not None:
            _logger.info(f'*** Best metric: {result["best_metric"]} (epoch {result["best_epoch"]})')
        best = (f'best {args.eval_metric} {result["best_metric"]:.4f} (epoch {result["best_epoch"]})'
                if result['best_metric'] is not None else 'no evaluation')
        _logger.info(f'Done: {best}; outputs in {run.output_dir}')
        if args.log_wandb:
            import wandb
            wandb.finish()
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train_one_epoch(
        epoch: int,
        task: nn.Module,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler: Any,
        amp_autocast: Any,
        loss_scaler: Optional[NativeScaler],
        mixup_fn: Optional[Mixup],
        saver: Optional[CheckpointSaver],
        updates_per_epoch: int,
) -> Dict[str, float]:
    """One pass over the loader; returns the epoch means of the loss and of every loss component."""
    task.train()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    last_accum_steps = num_batches % accum or accum
    last_batch_idx_to_accum = num_batches - last_accum_steps
    sums: Dict[str, torch.Tensor] = {}
    count = 0
    num_updates = epoch * updates_per_epoch
    data_start = time.time()
    batch_time = utils.AverageMeter()
    optimizer.zero_grad()
    bar = tqdm(total=num_batches, desc=f'Epoch {epoch}', unit='batch', leave=False, dynamic_ncols=True,
               disable=not show_progress(args))
    model_dtype = _model_dtype(args)
    for batch_idx, batch in enumerate(loader):
        if len(batch) == 3:  # reinforced data: (input, teacher probabilities, labels); PS-KD: (input, labels, indices)
            input, target = batch[0], (batch[1], batch[2])
        else:
            input, target = batch[0], batch[1]
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        naflex = isinstance(input, dict)  # timm's NaFlex batches: patches, coordinates, validity
        if model_dtype is not None:
            if naflex:
                input = dict(input, patches=input['patches'].to(dtype=model_dtype))
            else:
                input = input.to(dtype=model_dtype)
        num_images = (target[-1] if isinstance(target, tuple) else target).shape[0]
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum == 0
        update_accum = accum if batch_idx < last_batch_idx_to_accum else last_accum_steps

        sync_ctx = task.no_sync() if (args.distributed and not need_update) else nullcontext()
        with sync_ctx:
            with amp_autocast():
                out = task(input, target)
            loss = out['loss'] / update_accum
            if naflex and args.naflex_loss_scale != 'none':  # NaFlex batches vary in size: weight by images
                ratio = num_images / args.batch_size
                loss = loss * (ratio if args.naflex_loss_scale == 'linear' else ratio ** 0.5)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(), need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(task.get_clip_parameters(), value=args.clip_grad,
                                                 mode=args.clip_mode)
                    optimizer.step()
        for k, v in out.items():
            if k.startswith('loss') or k.endswith('_loss'):
                sums[k] = sums.get(k, 0.0) + v.detach().float() * num_images
        count += num_images
        bar.update()
        if args.save_images and saver is not None and batch_idx == 0 and not naflex:  # timm: the batch, for debugging
            torchvision.utils.save_image(input.float(), os.path.join(saver.checkpoint_dir, f'train-batch-{epoch}.jpg'),
                                         padding=0, normalize=True)
        if not need_update:
            continue
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize(device)
        optimizer.zero_grad()
        num_updates += 1
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        batch_time.update(time.time() - data_start)
        data_start = time.time()
        if args.rank == 0 and (last_batch or batch_idx % args.log_interval == 0):
            lr = optimizer.param_groups[0]['lr']
            parts = ' '.join(f'{k}: {float(v) / count:.4f}' for k, v in sums.items())
            pct = 100. * (batch_idx + 1) / num_batches
            _logger.info(f'Train: {epoch} [{batch_idx:>4d}/{num_batches} ({pct:>3.0f}%)] {parts} '
                         f'time: {batch_time.avg:.3f}s/update lr: {lr:.3e}')
            bar.set_postfix_str(f'{parts} lr: {lr:.3e}')  # refreshed with the log line: no per-batch device sync
        if saver is not None and args.recovery_interval and (num_updates % args.recovery_interval == 0):
            saver.save_recovery(epoch, batch_idx=batch_idx)
    bar.close()
    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(count), device=device)]) if keys else None
    if totals is None:
        raise RuntimeError('The training loader yielded no batch: check --batch-size against the dataset size')
    totals = totals.to(device)
    if args.distributed:
        torch.distributed.all_reduce(totals)
    metrics = OrderedDict((k, (totals[i] / totals[-1]).item()) for i, k in enumerate(keys))
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f'Non-finite training loss in epoch {epoch}: {dict(metrics)}')
    return metrics


def show_progress(args: argparse.Namespace) -> bool:
    """The tqdm bar: on rank 0, unless --no-progress or stderr is not a terminal (logs, CI, pipes)."""
    return getattr(args, 'rank', 0) == 0 and not args.no_progress and sys.stderr.isatty()


def validate(task: nn.Module, loader: Any, args: argparse.Namespace, amp_autocast: Any,
             ema: bool = False) -> Dict[str, float]:
    """Top-1/top-5/loss of the eval model (plain model, never the task wrapper) on the validation loader."""
    model = task.get_eval_model(ema=ema)
    model.eval()
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader))
    with torch.inference_mode():
        for input, target in loader:
            target = target.to(task.device)
            if isinstance(input, dict):  # NaFlex
                input = {k: v.to(task.device) if torch.is_tensor(v) else v for k, v in input.items()}
                if _model_dtype(args) is not None:
                    input['patches'] = input['patches'].to(_model_dtype(args))
            else:
                input = input.to(task.device, dtype=_model_dtype(args))
            if args.channels_last and not isinstance(input, dict):
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            evaluator.update(output, target)
    metrics = evaluator.compute(distributed=args.distributed)
    if args.rank == 0:
        prefix = 'EMA ' if ema else ''
        _logger.info(f'{prefix}Eval: ' + ' '.join(f'{k}: {v:.4f}' for k, v in metrics.items()))
    return metrics


if __name__ == '__main__':
    main()
