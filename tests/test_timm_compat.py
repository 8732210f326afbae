"""A timm user's command lines: ``train.py DIR`` / ``--data-dir`` / ``reinforce.py DIR`` read DIR, and
``--reinforced`` validates on the data the shards were made from (or says which flags to pass)."""
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import reinforce
import train
from dr.checkpoint import load_checkpoint_file

TINY = ['--model', 'test_resnet', '--img-size', '16', '-j', '0', '--epochs', '1', '-b', '4', '--warmup-epochs', '0',
        '--lr', '0.05', '--no-progress', '--log-interval', '1000']


def write_image_folder(root, classes=2, per_class=8, size=16, splits=('train', 'validation')):
    """An ImageFolder of solid-colour-ish PNGs, one colour per class, under root/<split>/<class>/."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            d = os.path.join(root, split, f'class{c}')
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), np.uint8)
                base[..., c % 3] = 200
                img = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f'{i}.png'))
    return str(root)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('imagefolder'))


def _args_yaml(out):
    with open(os.path.join(out, 'args.yaml')) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize('how', ['positional', 'data-dir'])
def test_train_reads_the_dataset_root(tmp_path, folder, how):
    where = [folder] if how == 'positional' else ['--data-dir', folder]
    result = train.main([*where, *TINY, '--output', str(tmp_path), '--experiment', 'r'])
    saved = _args_yaml(result['output_dir'])
    assert saved['data_dir'] == folder and saved['dataset'] == ''
    assert saved['num_classes'] == 2  # the folder's classes, not the digits' 10
    ckpt = load_checkpoint_file(os.path.join(result['output_dir'], 'last.pth.tar'))
    assert ckpt['state_dict']['fc.weight'].shape[0] == 2
    # validated on the folder's 16 validation images
    assert result['last_eval']['top1'] in {100.0 * k / 16 for k in range(17)}


def test_digits_with_a_root_is_an_error(folder, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([folder, '--dataset', 'digits', *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'error: --dataset digits and DIR' in err and folder in err
    assert reinforce.main([folder, '--dataset', 'digits', '--teacher', 'test_resnet', '--output', 'x']) == 2
    assert '--dataset digits and DIR' in capsys.readouterr().err


def test_without_a_root_the_digits_are_used(tmp_path):
    args, _ = train.parse_args(['--model', 'test_resnet'])
    assert args.dataset == 'digits' and args.data_dir is None


@pytest.fixture(scope='module')
def folder_reinforcement(tmp_path_factory, folder):
    out = str(tmp_path_factory.mktemp('rd') / 'shards')
    torch.manual_seed(0)
    status = reinforce.main([folder, '--teacher', 'test_resnet', '--teacher-img-size', '16', '--num-samples', '2',
                             '--topk', '2', '--aug', 'rrc', '-j', '0', '--no-progress', '--output', out])
    assert status == 0
    return out


def test_reinforce_reads_the_dataset_root(folder_reinforcement):
    with open(os.path.join(folder_reinforcement, 'reinforce.json')) as f:
        meta = json.load(f)
    assert meta['num_classes'] == 2 and meta['num_images'] == 16
    assert meta['dataset']['name'] == ''


def test_reinforced_without_its_dataset_says_what_to_pass(tmp_path, folder_reinforcement, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['--reinforced', folder_reinforcement, *TINY, '--output', str(tmp_path), '--experiment', 'x'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'was made from an ImageFolder' in err and 'DIR or --data-dir' in err and '--val-split ""' in err
    assert not os.path.exists(os.path.join(tmp_path, 'x', 'args.yaml'))  # nothing written


def test_reinforced_validates_on_the_folder_it_was_made_from(tmp_path, folder, folder_reinforcement):
    result = train.main([folder, '--reinforced', folder_reinforcement, *TINY, '--output', str(tmp_path),
                         '--experiment', 'rd'])
    assert result['last_eval'] is not None and 0.0 <= result['last_eval']['top1'] <= 100.0
    result = train.main(['--reinforced', folder_reinforcement, '--val-split', '', *TINY, '--output', str(tmp_path),
                         '--experiment', 'rd-noval'])
    assert result['last_eval'] is None


def test_reinforced_on_another_class_count_is_an_error(tmp_path, folder_reinforcement, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['--reinforced', folder_reinforcement, '--dataset', 'digits', '--val-split', 'val', *TINY,
                    '--output', str(tmp_path), '--experiment', 'x'])
    assert e.value.code == 2
    assert 'holds 2 classes but the validation data (--dataset digits, split val) have 10' in capsys.readouterr().err
