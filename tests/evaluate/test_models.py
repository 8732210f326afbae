"""Models of a validate.py run: tags, data config precedence (flags, then the checkpoint, then timm)."""
import argparse
import os

import pytest
import timm
import torch

import validate
from dr.evaluate.models import EvalModel, default_tag, read_checkpoint, resolve_eval_data_config


def test_default_tags_name_the_run_and_stay_unique(tmp_path):
    run = tmp_path / 'bake-run'
    run.mkdir()
    used = set()
    assert default_tag(str(run), used) == 'bake-run'
    assert default_tag(str(run / 'model_best.pth.tar'), used) == 'bake-run-2'
    assert default_tag(str(tmp_path / 'r50_a1.pth.tar'), used) == 'r50_a1'
    assert used == {'bake-run', 'bake-run-2', 'r50_a1'}


def test_data_config_flags_then_checkpoint_then_model(tmp_path):
    model = timm.create_model('test_efficientnet', num_classes=10)
    stored = {'input_size': (3, 24, 24), 'interpolation': 'bilinear', 'mean': (0.1, 0.2, 0.3),
              'std': (0.5, 0.5, 0.5), 'crop_pct': 0.9, 'crop_mode': 'center'}
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': 'test_efficientnet',
                'args': argparse.Namespace(digits_size=24, data_config=stored)}, path)
    info, ckpt = read_checkpoint(str(tmp_path))
    assert info['path'] == str(path) and info['arch'] == 'test_efficientnet' and len(info['sha256']) == 64
    assert 'state_dict' in ckpt
    em = EvalModel(model, 'test_efficientnet', 'run', info)
    args = validate.parse_args(['--dataset', 'digits'])[0]
    cfg, digits_size = resolve_eval_data_config(args, em, digits_sets=True)
    assert digits_size == 24 and cfg['input_size'] == (3, 24, 24) and cfg['mean'] == (0.1, 0.2, 0.3)
    assert cfg['crop_pct'] == pytest.approx(0.9)  # the checkpoint's stored value wins over the digits default
    args = validate.parse_args(['--dataset', 'digits', '--img-size', '32', '--crop-pct', '1.0'])[0]
    cfg, _ = resolve_eval_data_config(args, em, digits_sets=True)
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
    bare = EvalModel(model, 'test_efficientnet', 'bare', {'path': '', 'sha256': '', 'arch': None, 'train_args': {}})
    cfg, digits_size = resolve_eval_data_config(validate.parse_args([])[0], bare, digits_sets=True)
    assert digits_size == 32 and cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert os.path.basename(info['path']) == 'model_best.pth.tar'
