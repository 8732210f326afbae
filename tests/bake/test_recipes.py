"""Every BAKE recipe under hparams/bake loads through train.py's real parser and is self-consistent."""
import glob
import os
import re

import pytest
import timm
import torch
import yaml

import train
from dr.config import parse_key_values
from tests.helpers import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, 'hparams', 'bake', '**', '*.yaml'), recursive=True))
TIMM_MODELS = set(timm.list_models())


def _rel(path):
    return os.path.relpath(path, REPO)


def test_recipe_set_is_complete():
    names = {_rel(p) for p in RECIPES}
    for key in ('resnet50', 'resnet101', 'resnet152', 'resnest50', 'resnest101', 'resnext101_32x4d',
                'resnext152_32x4d', 'mobilenetv2', 'efficientnet_b0'):
        for kind in ('bake', 'vanilla'):
            assert f'hparams/bake/in1k/{key}_{kind}.yaml' in names
    for key in ('swin_tiny', 'swin_small', 'swin_base'):
        assert f'hparams/bake/swin/{key}_bake.yaml' in names
    for ds in ('cifar100', 'tinyimagenet', 'cub200', 'stanford_dogs', 'mit67'):
        for arch in ('resnet18', 'densenet121'):
            assert f'hparams/bake/small/{ds}_{arch}_bake.yaml' in names


@pytest.mark.parametrize('path', RECIPES, ids=_rel)
def test_recipe_parses_and_is_consistent(path):
    args, args_text = train.parse_args(['--config', path])
    assert args.config == path
    # every key of the file reached the namespace with the file's value
    with open(path) as f:
        raw = yaml.safe_load(f)
    for key, value in raw.items():
        got = getattr(args, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    # the header names the table row it reproduces and the paper's number
    with open(path) as f:
        header = ''.join(line for line in f if line.startswith('#'))
    assert re.search(r'Table (2|3|8)\b', header), 'recipe header must name the table'
    assert re.search(r'\d\d\.\d', header), 'recipe header must quote the paper\'s number'
    assert 'train.py' in header

    assert args.model in TIMM_MODELS, f'{args.model} is not a timm 1.x model name'
    if args.model_kwargs:
        kwargs = parse_key_values(args.model_kwargs, '--model-kwargs')
        with torch.device('meta'):  # builds the architecture without allocating weights
            model = timm.create_model(args.model, num_classes=args.num_classes, **kwargs)
        assert model.num_classes == args.num_classes
    assert args.lr is None and args.lr_base > 0 and args.lr_base_scale == 'linear'
    assert args.num_classes and args.epochs in (100, 200, 300)

    name = os.path.basename(path)
    assert args.bake == name.endswith('_bake.yaml')
    if args.bake:
        assert args.batch_size % (1 + args.bake_intra) == 0
        assert 0.0 <= args.bake_omega < 1.0 and not args.bake_one_step  # omega = 1 would need --bake-one-step
        assert args.bake_temp == 4.0 and args.bake_weight == 1.0 and args.bake_knowledge == 'preds'
        assert args.bake_global
    if '/in1k/' in path or '/swin/' in path:
        assert args.num_classes == 1000 and args.warmup_epochs in (5, 20)
        if args.bake:
            assert args.bake_omega == 0.5 and args.bake_intra == 1
    if '/in1k/' in path:
        assert args.opt == 'sgd' and args.momentum == 0.9 and args.sched == 'cosine' and args.epochs == 100
        assert args.lr_base_size == 256 and args.warmup_epochs == 5
        assert args.sync_bn == args.bake  # the paper's BAKE runs use SyncBN (Table 15), its vanilla runs do not
        # the paper doubles the batch for BAKE: 256 anchors + 256 class mates, lr scaled with all images
        other = path.replace('_bake.yaml', '_vanilla.yaml') if args.bake else path.replace('_vanilla', '_bake')
        other_args, _ = train.parse_args(['--config', other])
        bake_args, vanilla_args = (args, other_args) if args.bake else (other_args, args)
        assert bake_args.batch_size == 2 * vanilla_args.batch_size
        assert bake_args.lr_base == vanilla_args.lr_base and bake_args.model == vanilla_args.model
    if '/swin/' in path:
        assert args.opt == 'adamw' and args.epochs == 300 and args.weight_decay == 0.05
    if '/small/' in path:
        assert args.epochs == 200 and args.sched == 'multistep'
    # the resolved args can be fed back to the parser (args.yaml of a run)
    loaded = yaml.safe_load(args_text)
    assert loaded['model'] == args.model and loaded['bake'] == args.bake
