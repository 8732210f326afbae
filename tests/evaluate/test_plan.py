"""Planning a validate.py run from its flags: which sets, which class count, which flags are wrong, which sets are
incomplete. No model is built and no image is read here."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

import validate
from dr.evaluate.plan import ValidateError, plan_evaluation, plan_sets, prepare_sets
from dr.evaluate.sets import imagenet_synsets, subset_indices


def _png(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _args(*argv):
    return validate.parse_args(list(argv))[0]


@pytest.fixture()
def suite(tmp_path):
    syn = imagenet_synsets()
    for k, i in enumerate(subset_indices('a')[:2]):
        _png(str(tmp_path / 'imagenet-a' / syn[i] / 'x.png'), k)
    _png(str(tmp_path / 'imagenet-c' / 'fog' / '1' / syn[0] / 'x.png'))
    return str(tmp_path)


def test_sets_named_explicitly_must_exist(suite):
    with pytest.raises(ValidateError, match=r'not found under .*imagenet-r \(looked for imagenet-r\)'):
        plan_sets(_args('--suite', suite, '--sets', 'imagenet-a', 'imagenet-r'))
    sets, missing = plan_sets(_args('--suite', suite))  # discovery: whatever is there, the rest listed
    assert [n for n, _ in sets] == ['imagenet-a', 'imagenet-c'] and 'imagenet-r' in missing
    sets, missing = plan_sets(_args('--suite', suite, '--sets', 'digits', 'imagenet-a'))
    assert sets[0] == ('digits', '') and missing == []
    with pytest.raises(ValidateError, match='unknown set'):
        plan_sets(_args('--sets', 'imagenet-z'))
    with pytest.raises(ValidateError, match='pass --suite ROOT'):
        plan_sets(_args('--sets', 'imagenet-a'))


def test_class_counts_and_flag_checks(suite, tmp_path):
    plan = plan_evaluation(_args('--suite', suite, '--sets', 'imagenet-a'))
    assert plan.num_classes == 1000 and plan.has_imagenet and not plan.has_digits
    with pytest.raises(ValidateError, match='different class counts: digits \\(10 classes\\), imagenet-a'):
        plan_evaluation(_args('--suite', suite, '--sets', 'digits', 'imagenet-a'))
    with pytest.raises(ValidateError, match='--num-classes 5 does not fit'):
        plan_evaluation(_args('--dataset', 'digits', '--num-classes', '5'))
    with pytest.raises(ValidateError, match='--tags: 2 names for 1 model'):
        plan_evaluation(_args('--dataset', 'digits', '--tags', 'a', 'b'))
    with pytest.raises(SystemExit):  # --model-kwargs: expected key=value, at parse time (as timm's ParseKwargs)
        _args('--dataset', 'digits', '--model-kwargs', 'drop_rate')
    for k in range(3):
        _png(str(tmp_path / 'three' / f'c{k}' / 'x.png'), k)
    plan = plan_evaluation(_args(str(tmp_path / 'three')))
    assert plan.needs == {'folder': 3} and not plan.has_imagenet
    with pytest.raises(ValidateError, match='AutoAttack standard needs >= 4 classes'):
        plan_evaluation(_args(str(tmp_path / 'three'), '--autoattack'))


def test_prepare_sets_flags_incomplete_sets(suite, caplog):
    args = _args('--suite', suite)
    with caplog.at_level(logging.WARNING):
        parts = prepare_sets(args, plan_evaluation(args))
    text = ' '.join(caplog.messages)
    assert 'imagenet-a at' in text and '2 images, the official set 7500' in text
    assert 'imagenet-c at' in text and 'lacks 74 of the 75 benchmark folders' in text
    part, = parts.parts('imagenet-a', os.path.join(suite, 'imagenet-a'), 0)
    assert part.complete is False and part.expected_size == 7500
    args = _args('--suite', suite, '--strict')
    with pytest.raises(ValidateError, match='--strict: incomplete set'):
        prepare_sets(args, plan_evaluation(args))
    # restricting the corruptions is a choice: no complaint about the other folders
    args = _args('--suite', suite, '--sets', 'imagenet-c', '--corruptions', 'fog')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_sets(args, plan_evaluation(args))
    assert not any('benchmark folders' in m for m in caplog.messages)
