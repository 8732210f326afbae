"""The embedded digits dataset, timm dataset passthrough, config parsing and checkpoint loading helpers."""
import argparse
import os
import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dr import config as dr_config
from dr.checkpoint import load_model_weights, resolve_checkpoint_path
from dr.data import DigitsDataset, create_dataset, dataset_classes, dataset_targets, digits_split_indices
from dr.io import atomic_write


def test_digits_split_is_fixed_stratified_and_disjoint():
    train_idx, val_idx = digits_split_indices()
    assert len(train_idx) + len(val_idx) == 1797
    assert not set(train_idx) & set(val_idx)
    again = digits_split_indices()
    assert np.array_equal(train_idx, again[0]) and np.array_equal(val_idx, again[1])
    val = DigitsDataset('val')
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 40  # ~20% of each class (~180 per class)


def test_digits_images_are_rgb_upsampled_and_transformable():
    ds = DigitsDataset('train', img_size=24)
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (24, 24)
    assert 0 <= label < 10 and ds.classes == [str(i) for i in range(10)]
    arr = np.asarray(img)
    assert arr.max() > 100 and np.array_equal(arr[..., 0], arr[..., 1])  # grey ink replicated to RGB
    png = Image.open(__import__('io').BytesIO(ds.image_bytes(0)))
    assert np.array_equal(np.asarray(png.convert('RGB')), arr)  # PNG bytes are lossless
    ds.transform = timm.data.create_transform(24, is_training=True)
    x, _ = ds[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert dataset_targets(ds) == ds.targets and len(dataset_classes(ds)) == 10


def test_imagefolder_through_timm(tmp_path):
    for c in ('cat', 'dog'):
        os.makedirs(tmp_path / 'train' / c)
        for i in range(3):
            Image.new('RGB', (8, 8), (i * 40, 0, 0)).save(tmp_path / 'train' / c / f'{i}.png')
    ds = create_dataset('', root=str(tmp_path), split='train')
    assert len(ds) == 6
    assert dataset_targets(ds) == [0, 0, 0, 1, 1, 1]
    assert dataset_classes(ds) == ['cat', 'dog']
    with pytest.raises(ValueError, match='No dataset'):
        create_dataset('', root=None)


def test_unknown_digits_split():
    with pytest.raises(ValueError, match='unknown split'):
        DigitsDataset('holdout')


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--model', default='a')
    return p


def test_config_unknown_key_and_roundtrip(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 0.5\nmodle: x\n')
    with pytest.raises(SystemExit):
        dr_config.parse_args(_parser(), argv=['-c', str(cfg)])
    assert 'modle' in capsys.readouterr().err
    cfg.write_text('lr: 0.5\n')
    args, text = dr_config.parse_args(_parser(), argv=['-c', str(cfg), '--model', 'b'])
    assert args.lr == 0.5 and args.model == 'b'
    path = dr_config.save_args_yaml(text, str(tmp_path / 'out'))
    again, _ = dr_config.parse_args(_parser(), argv=['-c', path])
    assert vars(again) | {'config': ''} == vars(args) | {'config': ''}
    cfg.write_text('- just a list\n')
    with pytest.raises(SystemExit):
        dr_config.parse_args(_parser(), argv=['-c', str(cfg)])


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / 'f.txt'
    with atomic_write(str(path), 'w') as f:
        f.write('complete')
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), 'w') as f:
            f.write('partial')
            raise RuntimeError('crash')
    assert path.read_text() == 'complete'
    assert os.listdir(tmp_path) == ['f.txt']  # no temporary left behind


def test_checkpoint_loading_weights_only_and_class_check(tmp_path):
    model = timm.create_model('test_resnet', num_classes=10)
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}, 'epoch': 1,
                'args': argparse.Namespace(model='test_resnet')}, tmp_path / 'last.pth.tar')
    other = timm.create_model('test_resnet', num_classes=10)
    assert resolve_checkpoint_path(str(tmp_path)).endswith('last.pth.tar')
    load_model_weights(other, str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    wrong = timm.create_model('test_resnet', num_classes=7)
    with pytest.raises(ValueError, match='10 classes'):
        load_model_weights(wrong, str(tmp_path / 'last.pth.tar'))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint_path(str(tmp_path / 'missing'))

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    torch.save({'state_dict': model.state_dict(), 'x': Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        load_model_weights(other, str(tmp_path / 'evil.pth'))
