"""The embedded digits dataset, timm dataset passthrough, config parsing and checkpoint loading helpers."""
import argparse
import os
import pickle

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from dr import config as dr_config
from dr.checkpoint import CheckpointError, load_checkpoint_file, load_model_weights, resolve_checkpoint_path
from dr.data import DigitsDataset, create_dataset, dataset_classes, dataset_targets, digits_split_indices
from dr.io import atomic_write, truncate_summary


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


def _typed_parser():
    p = argparse.ArgumentParser(prog='prog')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--lr', type=float, default=None)
    p.add_argument('--name', default='x')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    p.add_argument('--bake', action=argparse.BooleanOptionalAction, default=False)
    p.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None)  # None: decided at run time
    p.add_argument('--amp', action='store_true')
    p.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0])
    p.add_argument('--tags', nargs='+', default=[])
    p.add_argument('--names', nargs='+', default=None)
    p.add_argument('--compile', nargs='?', const='inductor', default=None)
    p.add_argument('-v', '--verbose', action='count', default=0)
    dr_config.cli_only(p.add_argument('--overwrite', action='store_true'))
    return p


def test_config_values_convert_like_the_command_line(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text("epochs: '3'\nlr: 1e-4\nname: 2024\namp-dtype: bfloat16\nbake: false\namp: true\n"
                   "scale: [0.5, 1]\ntags: solo\ncompile: true\nverbose: 2\n")

    args, text = dr_config.parse_args(_typed_parser(), argv=['-c', str(cfg)])
    assert (args.epochs, args.lr, args.name, args.amp_dtype) == (3, 1e-4, '2024', 'bfloat16')
    assert args.bake is False and args.amp is True and args.scale == [0.5, 1.0] and args.tags == ['solo']
    assert args.compile == 'inductor' and args.verbose == 2 and args.overwrite is False
    assert 'overwrite' not in yaml.safe_load(text)  # command-line-only flags are not recorded
    args, _ = dr_config.parse_args(_typed_parser(), argv=['-c', str(cfg), '--epochs', '5', '--no-bake', '--overwrite'])
    assert args.epochs == 5 and args.overwrite
    # what args_to_yaml writes for untouched arguments loads again, e.g. `tags: []` (nargs='+', default [])
    args, text = dr_config.parse_args(_typed_parser(), argv=[])
    assert yaml.safe_load(text)['tags'] == [] and yaml.safe_load(text)['sync_bn'] is None
    again, _ = dr_config.parse_args(_typed_parser(), argv=['-c', dr_config.save_args_yaml(text, str(tmp_path))])
    assert vars(again) | {'config': ''} == vars(args) | {'config': ''}


@pytest.mark.parametrize('text, key, problem', [
    ('bake: "no"\n', 'bake', "expected true or false, got the string 'no'"),
    ('amp: 1\n', 'amp', 'expected true or false'),
    ('bake: null\n', 'bake', 'expected true or false, got null'),
    ('sync_bn: "yes"\n', 'sync_bn', "expected true or false, or null (the default: decided at run time), got the"),
    ('amp_dtype: float8\n', 'amp_dtype', "'float8' is not one of the choices"),
    ('epochs: 1.5\n', 'epochs', 'expected an integer, got the number 1.5'),
    ('epochs: true\n', 'epochs', 'expected an integer, got the boolean true'),
    ('epochs: null\n', 'epochs', 'got null'),
    ('lr: [0.1, 0.2]\n', 'lr', 'expected a number, got a list'),
    ('name: {a: 1}\n', 'name', 'got a mapping'),
    ('scale: 0.5\n', 'scale', 'a list of 2 value(s)'),
    ('scale: [0.5, x]\n', 'scale', "item 2: expected a number, got the string 'x'"),
    ('names: []\n', 'names', 'one or more values'),
    ('verbose: -1\n', 'verbose', 'expected a count'),
    ('overwrite: true\n', 'overwrite', 'command-line-only'),
    ('epoch: 3\n', 'epoch', 'unknown key; did you mean epochs?'),
    ('amp-dtype: float16\namp_dtype: float16\n', 'amp_dtype', 'given twice'),
])
def test_config_values_refused_with_file_and_key(tmp_path, capsys, text, key, problem):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    with pytest.raises(SystemExit) as info:
        dr_config.parse_args(_typed_parser(), argv=['-c', str(cfg)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f'{cfg}: {key}: ' in err and problem in err, err


def test_config_reports_every_problem_and_malformed_yaml(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 1.5\nbake: "no"\nfoo: 1\n')
    with pytest.raises(dr_config.ConfigError) as info:
        dr_config.load_config_defaults(str(cfg), _typed_parser())
    assert [line.split(': ')[1] for line in str(info.value).splitlines()] == ['epochs', 'bake', 'foo']
    cfg.write_text('epochs: [1, 2\n')
    with pytest.raises(dr_config.ConfigError, match=r'c\.yaml:2:1: not valid YAML'):
        dr_config.load_config_defaults(str(cfg), _typed_parser())
    with pytest.raises(FileNotFoundError, match='missing.yaml: config file not found'):
        dr_config.load_config_defaults(str(tmp_path / 'missing.yaml'), _typed_parser())


def test_config_flag_listed_in_help():
    parser = _typed_parser()
    dr_config.add_config_argument(parser)
    dr_config.add_config_argument(parser)  # idempotent
    assert parser.format_help().count('-c FILE, --config FILE') == 1


def test_truncate_summary_drops_rerun_epochs(tmp_path):
    path = tmp_path / 'summary.csv'
    assert truncate_summary(str(path), 1) == 0  # no file yet
    path.write_text('epoch,train_loss,lr\r\n0,2.0,0.1\r\n1,1.5,0.1\r\n2,1.2,0.1\r\n2,1.2,0.1\r\n')
    assert truncate_summary(str(path), 2) == 2
    assert path.read_bytes() == b'epoch,train_loss,lr\r\n0,2.0,0.1\r\n1,1.5,0.1\r\n'  # as timm writes rows
    assert truncate_summary(str(path), 2) == 0
    assert truncate_summary(str(path), 0) == 2
    assert path.read_bytes() == b'epoch,train_loss,lr\r\n'
    assert os.listdir(tmp_path) == ['summary.csv']


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
    with pytest.raises(CheckpointError) as info:
        load_model_weights(other, str(tmp_path / 'evil.pth'))
    msg = str(info.value)
    assert str(tmp_path / 'evil.pth') in msg and 'not a loadable checkpoint' in msg and 'NOT loaded, for safety' in msg
    assert 'posix.system' in msg  # what it tried to load
    assert 'will likely succeed' not in msg and 'set to `False`' not in msg  # torch's unsafe advice is not passed on


def test_garbage_checkpoints_are_named_and_refused(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'a': torch.zeros(1000)}, good)
    files = {'random.pth': os.urandom(2000), 'empty.pth': b'', 'text.pth': b'hello world\n',
             'truncated.pth': good.read_bytes()[:2000], 'pickle.pth': pickle.dumps({'a': 1})}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        for mmap in (False, True):
            with pytest.raises(CheckpointError, match='not a loadable checkpoint') as info:
                load_checkpoint_file(str(tmp_path / name), mmap=mmap)
            assert str(tmp_path / name) in str(info.value) and 'weights_only` set to `False' not in str(info.value)
    legacy = tmp_path / 'legacy.pth'
    torch.save({'a': torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(str(legacy), mmap=True)['a'], torch.ones(3))  # falls back to a full read
    assert torch.equal(load_checkpoint_file(str(good), mmap=True)['a'], torch.zeros(1000))
