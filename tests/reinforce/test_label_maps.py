"""ReLabel-style label maps: the per-location map, top-k storage, RoIAlign pooling, flip, schema 3, verify/stats,
and reinforce.py --label-maps + train.py --reinforced end to end."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import reinforce
from dr.reinforce import format as rd_format
from dr.reinforce.format import LABEL_MAP_FIELDS, decode_records, iter_shard, load_meta, record_dtype
from dr.reinforce.label_maps import (
    crop_box_in_map,
    densify_map,
    label_map_dtype,
    member_label_map,
    pool_logits,
    pool_target,
    storage_comparison,
    topk_map,
)
from dr.reinforce.loader import create_reinforced_loader
from dr.reinforce.verify import compute_stats, verify_dir
from tests.reinforce.common import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_IMAGES, TOPK = 16, 3


def _lm_args(out, ckpts, *extra):
    return ['--label-maps', '--dataset', 'digits', '--max-images', str(N_IMAGES), '--topk', str(TOPK),
            '--shard-size', '6', '--teacher', *ckpts, '--teacher-img-size', '64', '-b', '8', '-j', '0',
            '--device', 'cpu', '--no-progress', '--output', str(out), *extra]


@pytest.fixture(scope='module')
def lm_dir(tmp_path_factory, ckpts):
    out = tmp_path_factory.mktemp('lm') / 'lm'
    assert reinforce.main(_lm_args(out, ckpts)) == 0
    return str(out)


def _bilinear(m: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's RoIAlign bilinear sample of ``m`` [C, H, W] at (y, x) (0 outside [-1, H] x [-1, W])."""
    _, h, w = m.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(m.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * m[:, y0, x0] + (1 - ly) * lx * m[:, y0, x1] + ly * (1 - lx) * m[:, y1, x0]
            + ly * lx * m[:, y1, x1])


def _roi_align_ref(m: np.ndarray, box) -> np.ndarray:
    """Mean of the ceil(h) x ceil(w) bilinear samples of a box (aligned: pixel centres at +0.5) into one bin."""
    x1, y1, x2, y2 = (v - 0.5 for v in box)
    bh, bw = y2 - y1, x2 - x1
    gh, gw = math.ceil(bh), math.ceil(bw)
    acc = np.zeros(m.shape[0])
    for iy in range(gh):
        for ix in range(gw):
            acc += _bilinear(m, y1 + (iy + 0.5) * bh / gh, x1 + (ix + 0.5) * bw / gw)
    return acc / (gh * gw)


def _records(dense: np.ndarray, k: int) -> np.ndarray:
    return topk_map(torch.from_numpy(dense), k)


def test_member_label_map_averages_to_the_teachers_logits():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=7).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        lmap = member_label_map(model, x)
        logits = model(x)
    assert lmap.shape[:2] == (2, 7) and lmap.shape[2] * lmap.shape[3] > 1
    torch.testing.assert_close(lmap.mean((2, 3)), logits, atol=1e-5, rtol=0)


def test_member_label_map_rejects_token_features():
    model = timm.create_model('test_vit', num_classes=5).eval()
    with pytest.raises(ValueError, match='convolutional feature map'):
        member_label_map(model, torch.zeros(1, 3, *model.pretrained_cfg['input_size'][1:]))


def test_topk_storage_round_trip():
    rng = np.random.default_rng(0)
    dense = (rng.permuted(np.tile(np.arange(6, dtype=np.float32), (12, 1)), axis=1) / 8).T.reshape(6, 3, 4)
    full = _records(dense, 6)  # every class stored: exact (multiples of 1/8 are exact in float16)
    assert full.dtype == label_map_dtype(6, 6)
    np.testing.assert_array_equal(densify_map(full, (3, 4), 6).numpy(), dense)
    top2 = _records(dense, 2)
    back = densify_map(top2, (3, 4), 6, fill=-9.0).numpy()
    kept = dense >= np.sort(dense, axis=0)[-2]
    np.testing.assert_array_equal(back[kept], dense[kept])
    assert (back[~kept] == -9.0).all()
    assert (np.diff(top2['logits'].astype(np.float32), axis=1) <= 0).all()


@pytest.mark.parametrize('box', [(0.3, 0.7, 2.9, 2.2), (0.0, 0.0, 4.0, 3.0), (2.5, 1.2, 4.0, 3.0),
                                 (1.1, 0.4, 1.6, 0.9)])
def test_roi_align_pooling_matches_the_formula(box):
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(2, 3, 4)).astype(np.float32)
    got = pool_logits(torch.from_numpy(dense), box).numpy()
    np.testing.assert_allclose(got, _roi_align_ref(dense.astype(np.float64), box), atol=1e-6, rtol=0)


def test_pool_target_maps_the_crop_box_and_takes_the_softmax():
    assert crop_box_in_map((10, 6, 20, 12), (40, 24), (3, 4)) == [1.0, 0.75, 3.0, 2.25]
    dense = np.arange(3 * 3 * 4, dtype=np.float32).reshape(3, 3, 4) / 8
    recs = _records(dense, 3)
    got = pool_target(recs, (3, 4), 3, (10, 6, 20, 12), (40, 24)).numpy()
    pooled = _roi_align_ref(dense.astype(np.float64), [1.0, 0.75, 3.0, 2.25])
    ref = np.exp(pooled - pooled.max()) / np.exp(pooled - pooled.max()).sum()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_label_map_shards_hold_the_ensemble_mean_map(lm_dir, ckpts):
    meta = load_meta(lm_dir)
    assert meta['schema_version'] == 3 and meta['kind'] == 'label_maps' and meta['num_classes'] == 10
    h, w = meta['label_map']['height'], meta['label_map']['width']
    assert (h, w) == (2, 2) and meta['num_samples'] == h * w and len(meta['teachers']) == 2
    sample = next(iter_shard(os.path.join(lm_dir, meta['shards'][0]['name']), 'shard 0'))
    arr = decode_records(sample['records'], 'x', LABEL_MAP_FIELDS)
    from dr.reinforce.augment import decode_image
    from dr.reinforce.label_maps import ensemble_label_map, teacher_inputs
    from dr.reinforce.teachers import create_teacher
    teacher = create_teacher(ckpts, 10, img_size=64)
    members = [x[None] for x in teacher_inputs(decode_image(sample['image']), teacher.member_cfgs)]
    with torch.no_grad():
        maps = [member_label_map(m, x) for m, x in zip(teacher.members, members)]
    mean = ((maps[0] + maps[1]) / 2)[0]
    np.testing.assert_allclose(arr['logits'].astype(np.float32), topk_map(mean, TOPK)['logits'].astype(np.float32),
                               atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(arr['ids'], ensemble_label_map(teacher, members)[0].reshape(10, -1).t()
                                  .topk(TOPK, -1).indices.numpy())


def test_old_reader_rejects_label_maps_naming_the_file(lm_dir, monkeypatch):
    monkeypatch.setattr(rd_format, 'READABLE_SCHEMA_VERSIONS', (1, 2))  # the reader before schema 3
    with pytest.raises(ValueError, match=r'lm/reinforce\.json: unsupported schema_version 3'):
        load_meta(lm_dir)


def test_schema_3_without_label_map_kind_is_refused(lm_dir, tmp_path):
    meta = json.load(open(os.path.join(lm_dir, 'reinforce.json')))
    meta.pop('kind')
    (tmp_path / 'reinforce.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r'reinforce\.json: schema_version 3 with kind None'):
        load_meta(str(tmp_path))


def test_verify_and_stats_on_label_maps(lm_dir, tmp_path):
    report = verify_dir(lm_dir)
    assert report['ok'], report['problems']
    assert report['images'] == N_IMAGES
    stats = compute_stats(lm_dir)
    meta = load_meta(lm_dir)
    assert stats['num_images'] == N_IMAGES and stats['teacher_forwards_per_image'] == 1
    assert stats['bytes_per_image'] == (stats['total_bytes'] - stats['image_bytes']) / N_IMAGES
    assert stats['record_bytes_per_image'] == 4 * (TOPK * 2 + TOPK * 2)
    assert stats['storage_per_image.relabel_top5_15x15'] == 15 * 15 * (5 * 2 + 5 * 2)
    assert stats['storage_per_image.fkd_200'] == 200 * (5 * 2 + 5 * 2 + 4 * 2 + 1)  # ids, probs, crop, flags
    assert stats['storage_per_image.imagenet_plus'] == 400 * record_dtype(10, 10, 'rrc+ra_re').itemsize
    assert meta['teacher_seconds_per_image'] > 0
    # a modified shard is reported
    import shutil
    bad = tmp_path / 'bad'
    shutil.copytree(lm_dir, bad)
    path = bad / meta['shards'][1]['name']
    data = bytearray(path.read_bytes())
    data[2048 + 700] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_dir(str(bad))
    assert not report['ok'] and any(p['shard'] == meta['shards'][1]['name'] for p in report['problems'])


def test_dr_stats_carry_the_table9_storage_comparison(ref):
    stats = compute_stats(ref)
    assert stats['teacher_forwards_per_image'] == stats['num_samples']
    assert {k: v for k, v in stats.items() if k.startswith('storage_per_image.')} == storage_comparison(10)


def test_loader_targets_are_the_pooled_map_of_a_fresh_crop_and_ignore_the_flip(lm_dir):
    meta = load_meta(lm_dir)
    loader = create_reinforced_loader(lm_dir, batch_size=4, num_workers=0, input_size=(3, 32, 32),
                                      mean=(0.5,) * 3, std=(0.5,) * 3, shuffle_buffer=1)
    x, target, labels = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and target.shape == (4, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    ds = loader.dataset
    sample = next(iter_shard(os.path.join(lm_dir, meta['shards'][0]['name']), 'shard 0'))
    from dr.reinforce.augment import decode_image
    img = decode_image(sample['image'])
    arr = decode_records(sample['records'], 'x', LABEL_MAP_FIELDS)
    from dr.reinforce.augment import sample_records

    def crop(seed):
        return sample_records(np.random.default_rng(seed), img.width, img.height, ds.spec, 1, ds.crop_dtype)[0]

    seed = next(s for s in range(100) if 2 * int(crop(s)['crop'][0]) + int(crop(s)['crop'][2]) != img.width)
    rec = crop(seed)
    outs = {}
    for p in (0.0, 1.0):
        ds.spec = dataclasses.replace(ds.spec, hflip=p)
        outs[p] = ds.crop_sample(img, arr, sample['label'], crop_seed=seed)
    np.testing.assert_array_equal(outs[1.0][1], outs[0.0][1][:, ::-1])  # the pixels are flipped ...
    np.testing.assert_array_equal(outs[1.0][4], outs[0.0][4])  # ... the target is the same box's
    expect = pool_target(arr, (2, 2), 10, rec['crop'], img.size).numpy()
    np.testing.assert_allclose(outs[1.0][4], expect, atol=1e-6, rtol=0)
    x0, y0, cw, ch = (int(v) for v in rec['crop'])
    mirrored = pool_target(arr, (2, 2), 10, (img.width - x0 - cw, y0, cw, ch), img.size).numpy()
    assert not np.allclose(expect, mirrored, atol=1e-7)  # a mirrored box would give another target


def test_training_refuses_a_truncated_label_map_shard(lm_dir, tmp_path):
    import shutil
    bad = tmp_path / 'bad'
    shutil.copytree(lm_dir, bad)
    name = load_meta(lm_dir)['shards'][0]['name']
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[:-1024])
    with pytest.raises(ValueError, match=rf'--reinforced: shard .*{name} has {len(data) - 1024} bytes but'):
        create_reinforced_loader(str(bad), batch_size=4, num_workers=0, input_size=(3, 32, 32), mean=(0.5,) * 3,
                                 std=(0.5,) * 3)
    with pytest.raises(ValueError, match='--reinforced: .*num_classes=10 but the model is built with 5'):
        create_reinforced_loader(lm_dir, batch_size=4, num_workers=0, input_size=(3, 32, 32), mean=(0.5,) * 3,
                                 std=(0.5,) * 3, num_classes=5)


def test_show_refuses_label_maps(lm_dir, capsys):
    assert reinforce.main(['--show', lm_dir]) == 2
    assert 'holds label maps' in capsys.readouterr().err


def test_label_maps_rerun_resumes_and_refuses_another_configuration(lm_dir, ckpts, tmp_path, capsys):
    before = {n: open(os.path.join(lm_dir, n), 'rb').read() for n in os.listdir(lm_dir) if n.endswith('.tar')}
    assert reinforce.main(_lm_args(lm_dir, ckpts)) == 0
    assert before == {n: open(os.path.join(lm_dir, n), 'rb').read() for n in before}
    assert load_meta(lm_dir)['teacher_seconds_per_image'] > 0  # kept from the run that wrote the shards
    assert reinforce.main(_lm_args(tmp_path / 'amp', ckpts, '--amp')) == 2
    assert '--label-maps runs the teacher in float32' in capsys.readouterr().err
    assert reinforce.main(_lm_args(lm_dir, ckpts[:1])) == 2
    assert 'different configuration' in capsys.readouterr().err


@pytest.mark.slow
def test_label_maps_end_to_end_train(lm_dir, tmp_path):
    out = str(tmp_path / 'out')
    cmd = [sys.executable, 'train.py', '--dataset', 'digits', '--digits-size', '32', '--img-size', '32', '--model',
           'test_resnet', '--reinforced', lm_dir, '--epochs', '1', '-b', '8', '--lr', '0.1', '--warmup-epochs', '0',
           '-j', '0', '--seed', '0', '--output', out, '--experiment', 'lm']
    env = dict(subprocess_env(), WANDB_MODE='offline', PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '2 updates per epoch' in res.stdout + res.stderr
    assert os.path.isfile(os.path.join(out, 'lm', 'summary.csv'))
