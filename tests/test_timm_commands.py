"""Documented timm command lines run unchanged apart from sizes (model, image size, epochs, batch) on a small
ImageFolder written here: ResNet Strikes Back (BCE + repeated augmentation), DeiT (distillation token), AugMix."""
import csv
import math
import os

import pytest
import timm
import torch

import train
from tests.test_timm_compat import write_image_folder

# 260 training images: timm's RepeatAugSampler keeps multiples of 256 images per epoch
SIZES = ['-j', '0', '--epochs', '1', '-b', '16', '--warmup-epochs', '0', '--no-progress', '--log-interval', '1000']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('folder'), classes=2, per_class=130, size=32)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('teacher') / 'test_resnet.pth.tar'
    torch.save({'state_dict': timm.create_model('test_resnet', num_classes=2).state_dict()}, path)
    return f'test_resnet={path}'


def _summary(out):
    with open(os.path.join(out, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def _run(tmp_path, name, argv):
    result = train.main([*argv, *SIZES, '--output', str(tmp_path), '--experiment', name])
    rows = _summary(result['output_dir'])
    assert len(rows) == 1 and math.isfinite(float(rows[0]['train_loss'])) and float(rows[0]['eval_top1']) >= 0
    return result


@pytest.mark.slow
def test_resnet_strikes_back_command(tmp_path, folder):
    # timm's RSB A3 recipe command (docs), sizes reduced: resnet50 -> test_resnet, 160 px -> 32, 100 epochs -> 1
    argv = [folder, '--model', 'test_resnet', '--img-size', '32', '--aa', 'rand-m6-mstd0.5-inc1', '--mixup', '0.1',
            '--cutmix', '1.0', '--aug-repeats', '3', '--remode', 'pixel', '--reprob', '0.0', '--crop-pct', '0.95',
            '--drop-path', '0.05', '--smoothing', '0.0', '--bce-loss', '--bce-target-thresh', '0.2', '--opt', 'lamb',
            '--weight-decay', '0.02', '--sched', 'cosine', '--lr', '8e-3', '--amp']
    result = _run(tmp_path, 'rsb', argv)
    args = train.parse_args([*argv, *SIZES])[0]
    criterion = train.create_criterion(args, mixup_active=True)
    assert isinstance(criterion, timm.loss.BinaryCrossEntropy) and criterion.target_threshold == 0.2
    assert result['best_epoch'] == 0


@pytest.mark.slow
def test_deit_distillation_token_command(tmp_path, folder, teacher):
    # DeiT's distillation (timm's --kd-* flags): a distilled DeiT student learns from a CNN teacher through its
    # distillation token; deit_tiny at 32 px (4 patches), a random test_resnet teacher
    argv = [folder, '--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=16',
            '--img-size', '32', '--kd-model-name', teacher, '--kd-distill-type', 'token', '--opt', 'adamw',
            '--lr', '5e-4', '--weight-decay', '0.05', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25',
            '--drop-path', '0.1', '--smoothing', '0.1']
    result = _run(tmp_path, 'deit', argv)
    rows = _summary(result['output_dir'])
    assert float(rows[0]['train_task_loss']) > 0 and float(rows[0]['train_distill_loss']) > 0


@pytest.mark.slow
def test_augmix_command(tmp_path, folder):
    # timm's AugMix ResNet-50 command (docs), sizes reduced
    argv = [folder, '--model', 'test_resnet', '--img-size', '32', '--aa', 'augmix-m5-w4-d2', '--aug-splits', '3',
            '--jsd-loss', '--split-bn', '--reprob', '0.4', '--remode', 'pixel', '--resplit', '--lr', '0.05']
    _run(tmp_path, 'augmix', argv)


@pytest.mark.slow
def test_naflex_command(tmp_path, folder):
    # timm's NaFlex ViT training (variable sequence lengths, mixup inside the loader), sizes reduced: a one-block
    # NaFlex ViT, sequence lengths 4 and 16 patches of 16 px
    argv = [folder, '--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=32', 'depth=1',
            'num_heads=2', '--naflex-loader', '--naflex-train-seq-lens', '4', '16', '--naflex-max-seq-len', '16',
            '--mixup', '0.8', '--cutmix', '1.0', '--opt', 'adamw', '--lr', '1e-3']
    _run(tmp_path, 'naflex', argv)


@pytest.mark.slow
def test_feature_distillation_command(tmp_path, folder, teacher):
    # timm's feature distillation (pooled features, a learned projection), sizes reduced
    result = _run(tmp_path, 'feature', [folder, '--model', 'test_resnet', '--img-size', '32', '--kd-model-name',
                                        teacher, '--kd-distill-type', 'feature', '--distill-loss-weight', '0.5',
                                        '--task-loss-weight', '1.0', '--lr', '0.05'])
    row = _summary(result['output_dir'])[0]
    assert float(row['train_loss']) == pytest.approx(float(row['train_task_loss']) + 0.5 * float(row['train_kd_loss']),
                                                     rel=1e-4)
