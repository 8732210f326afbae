"""DeiT's distillation token through train.py (--kd-distill-type token, hard) with a local teacher checkpoint."""
import os

import pytest
import timm
import torch

import train
from dr.checkpoint import load_checkpoint_file

TINY_DEIT = ['img_size=16', 'patch_size=8', 'embed_dim=32', 'depth=1', 'num_heads=2']


@pytest.mark.slow
def test_train_distilled_vit_with_hard_token_distillation(tmp_path):
    teacher = str(tmp_path / 'teacher.pth.tar')
    torch.save({'arch': 'test_resnet', 'state_dict': timm.create_model('test_resnet', num_classes=10).state_dict()},
               teacher)
    result = train.main(['--dataset', 'digits', '--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs',
                         *TINY_DEIT, '--img-size', '16', '--workers', '0', '--epochs', '1', '-b', '64', '--opt',
                         'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--smoothing', '0', '--log-interval', '1000',
                         '--kd-teacher', f'test_resnet={teacher}', '--kd-distill-type', 'token',
                         '--kd-token-distill-type', 'hard', '--output', str(tmp_path), '--experiment', 'deit'])
    with open(os.path.join(result['output_dir'], 'summary.csv')) as f:
        header = f.readline()
    assert 'distill_loss' in header
    ckpt = load_checkpoint_file(os.path.join(result['output_dir'], 'last.pth.tar'))
    kwargs = dict(kv.split('=') for kv in TINY_DEIT)
    student = timm.create_model('deit_tiny_distilled_patch16_224', num_classes=10, **{k: int(v) for k, v in
                                                                                       kwargs.items()})
    student.load_state_dict(ckpt['state_dict'])  # the distillation token and its head are the model's own
    assert 'dist_token' in ckpt['state_dict'] and 'head_dist.weight' in ckpt['state_dict']
