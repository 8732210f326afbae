"""Every DR training recipe in hparams/dr/train loads through train.py's real parser and says what it targets."""
import glob
import os
import re
import sys

import pytest

from tests.helpers import REPO as ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, 'hparams', 'dr', 'train', '*.yaml')))
NAME_RE = re.compile(r'^(?P<arch>[a-z0-9_]+)_e(?P<epochs>\d+)_(?P<data>imagenet|imagenet_plus)\.yaml$')
TARGET_RE = re.compile(r'^# target: top-1 (?P<top1>\d+\.\d) \(EMA (?P<ema>\d+\.\d)\).* reaches (?P<other>\d+\.\d)\.',
                       re.M)
ROW_RE = re.compile(r'^# row: (?P<row>.+), (?P<epochs>\d+) epochs, trained on (?P<data>ImageNet\+?)$', re.M)


def _train_module():
    sys.path.insert(0, ROOT)
    try:
        import train
    finally:
        sys.path.remove(ROOT)
    return train


def test_recipe_set_is_complete():
    names = {os.path.basename(p) for p in RECIPES}
    for arch in ('mobilenetv3_large', 'resnet50', 'swin_tiny', 'vit_tiny', 'vit_small'):
        for epochs in (150, 300, 1000):
            for data in ('imagenet', 'imagenet_plus'):
                assert f'{arch}_e{epochs}_{data}.yaml' in names


@pytest.mark.parametrize('path', RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_parses_and_documents_its_target(path):
    train = _train_module()
    args, _ = train.parse_args(['--config', path])
    m = NAME_RE.match(os.path.basename(path))
    assert m, f'unexpected recipe name {path}'
    text = open(path).read()
    row, target = ROW_RE.search(text), TARGET_RE.search(text)
    assert row and target, f'{path}: needs "# row: ..." and "# target: top-1 X (EMA Y) ... reaches Z." comments'
    plus = m['data'] == 'imagenet_plus'
    assert int(row['epochs']) == int(m['epochs']) == args.epochs
    assert row['data'] == ('ImageNet+' if plus else 'ImageNet')
    assert 50.0 < float(target['top1']) < 90.0 and 50.0 < float(target['ema']) < 90.0
    # ImageNet+ improves on ImageNet in every row the recipes target
    gain = float(target['top1']) - float(target['other'])
    assert gain > 0 if plus else gain < 0
    assert args.num_classes == 1000 and args.img_size == 224
    if plus:
        assert args.reinforced and args.rd_loss == 'kl' and args.rd_densify == 'smooth'
        assert args.mixup == 0 and args.cutmix == 0 and args.smoothing == 0
        assert 0.0 < args.rd_p <= 1.0
    else:
        assert args.reinforced is None and args.smoothing == pytest.approx(0.1)
    assert isinstance(args.weight_decay, float) and isinstance(args.lr_base, float)


def test_recipe_pairs_differ_only_in_data_and_its_regularisers():
    train = _train_module()
    allowed = {'reinforced', 'rd_densify', 'rd_loss', 'rd_p', 'rd_gt_weight', 'rd_shuffle_buffer', 'mixup', 'cutmix',
               'smoothing', 'experiment', 'aa', 'reprob', 'remode', 'config', '_parser'}
    for path in RECIPES:
        if not path.endswith('_imagenet.yaml'):
            continue
        base = vars(train.parse_args(['--config', path])[0])
        plus = vars(train.parse_args(['--config', path.replace('_imagenet.yaml', '_imagenet_plus.yaml')])[0])
        diff = {k for k in base if base[k] != plus[k]} - allowed
        assert not diff, f'{path}: ImageNet and ImageNet+ recipes also differ in {sorted(diff)}'
