"""Replay on the device (``dr.reinforce.device_replay``, ``train.py --replay-device``) against the PIL replay
(``augment.apply_record_pil`` / ``apply_record``, the reference): per operation, on the authors' ml-dr fixture,
through the training loader, through a trained model's predictions, and through train.py. CPU only.

Bounds (in 1/255 of the uint8 scale, the unit both paths quantise to):

* exact: hflip, every geometric RandAugment op and Brightness/Sharpness/Posterize/Solarize/Equalize (torchvision's
  tensor ops sample and round as PIL does at these sizes), and erasing and mixing given the same uint8 input (the same
  float32 ops on the same integer boxes);
* <= 1: Color, Contrast, AutoContrast (PIL blends in fixed point, torch in float and rounds differently);
* <= 2 (resampling): the crop + resize (PIL's bilinear/bicubic filter vs torch's antialiased interpolation round
  their weights differently); that is the whole difference of ``rrc`` and ``rrc+mix`` replays;
* RandAugment after a resize: a 1-level difference can cross a Solarize threshold or a Posterize bit and become up
  to ~130 levels in those few pixels; bounded as a share of the pixel values (and a mean), measured in the tests.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from dr.data import DigitsDataset
from dr.reinforce import device_replay as D
from dr.reinforce.augment import (
    RA_INTERPOLATION,
    _apply_op,
    _ra_table,
    apply_record,
    apply_record_pil,
    create_augment_spec,
    cutmix_pixel_box,
    erase_mask,
    mix_batch,
    needs_partner,
    re_pixel_boxes,
    sample_records,
)
from dr.reinforce.format import (
    FLAG_CUTMIX,
    FLAG_ERASE,
    FLAG_HFLIP,
    FLAG_MIXUP,
    FLAG_RA_NEG,
    build_shard,
    encode_records,
    record_dtype,
    shard_name,
)
from tests import helpers
from tests.reinforce.common import subprocess_env
from tests.reinforce.test_import_mldr import FIXTURE, VARIANTS, _convert, needs_fixture
from tests.reinforce.test_mixing import MEAN, SIZE, STD, _loader, make_mixing

REPO = helpers.REPO
U8 = 1.0 / 255  # one uint8 level on the [0, 1] scale
RESAMPLE_BOUND = 2  # levels: PIL's resampling filter vs torch's antialias (module docstring)
# RandAugment after a resize (threshold ops amplify a 1-level resize difference): share of pixel values more than
# RESAMPLE_BOUND apart, and mean abs difference in levels
RA_SHARE_BOUND, RA_MEAN_BOUND = 0.002, 0.2


def _smooth_image(rng, w, h):
    """A natural-looking image: random 8x8 colours upsampled (noise would exaggerate resampling differences)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _u8(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def _full_records(spec, n, w, h, rng):
    """Records whose crop is the whole image (replayed at the image's size, the resize is the identity)."""
    dtype = record_dtype(3, 10, spec.name)
    rec = sample_records(rng, w, h, spec, n, dtype)
    rec['crop'] = (0, 0, w, h)
    return rec


def _levels(a, b, std=None):
    """Abs difference in uint8 levels (normalised tensors: times std)."""
    d = (a.float() - b.float()).abs()
    if std is not None:
        d = d * torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
    return d


# ----------------------------------------------------------------------------------------------------------------------
# per operation


def test_randaugment_ops_match_pil():
    rng = np.random.default_rng(0)
    spec = create_augment_spec('rrc+ra_re')
    one_level = {'Color', 'Contrast', 'AutoContrast'}  # PIL's fixed-point blends round differently
    for w, h in ((32, 32), (40, 28)):
        img = _smooth_image(rng, w, h)
        table = _ra_table(spec.ra_num_bins, spec.ra_magnitude, h, w)
        for op in spec.ra_ops:
            magnitude, signed = table[op]
            for m in ((magnitude, -magnitude) if signed else (magnitude,)):
                ref = _u8(_apply_op(img, op, m, interpolation=RA_INTERPOLATION, fill=None))
                out = D.apply_ra_op(_u8(img)[None], op, m)[0]
                d = _levels(ref, out)
                assert d.max() <= (1 if op in one_level else 0), (op, m, w, h, float(d.max()))


def test_record_stages_flip_and_ops_match_pil_without_resampling():
    """hflip + the stored RandAugment ops (signs and slot order, batched per op) through replay_uint8, with the
    identity resize: equal to apply_record_pil up to the one-level ops."""
    rng = np.random.default_rng(1)
    spec = create_augment_spec('rrc+ra_re')
    w, h = 36, 30
    img = _smooth_image(rng, w, h)
    rec = _full_records(spec, 64, w, h, rng)
    rec['flags'] |= FLAG_HFLIP * (np.arange(64) % 2).astype(rec['flags'].dtype)
    rec['flags'][:8] |= FLAG_RA_NEG[0] | FLAG_RA_NEG[1]
    ref = torch.stack([_u8(apply_record_pil(img, r, spec, (h, w))) for r in rec])
    out = D.replay_uint8([_u8(img)] * len(rec), rec['crop'], rec['flags'], rec['ra_ops'], spec, (h, w), None)
    levels = _levels(ref, out).flatten(1)
    exact_ops = {i for i, op in enumerate(spec.ra_ops) if op not in ('Color', 'Contrast', 'AutoContrast')}
    exact = torch.from_numpy(np.array([set(r['ra_ops'][:spec.ra_num_ops].tolist()) <= exact_ops for r in rec]))
    assert exact.sum() > 10
    assert levels[exact].max() == 0
    # a one-level op followed by a threshold op (Posterize, Solarize, Equalize) can amplify that level in a few pixels
    assert float((levels[~exact] > 1).float().mean()) <= 0.01
    # flip alone (no ops): exact
    spec0 = create_augment_spec('rrc')
    rec0 = _full_records(spec0, 4, w, h, rng)
    rec0['flags'] = [FLAG_HFLIP, 0, FLAG_HFLIP, 0]
    ref0 = torch.stack([_u8(apply_record_pil(img, r, spec0, (h, w))) for r in rec0])
    assert torch.equal(ref0, D.replay_uint8([_u8(img)] * 4, rec0['crop'], rec0['flags'], None, spec0, (h, w), None))


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic', 'nearest'])
def test_crop_resize_within_the_resampling_bound(interpolation):
    rng = np.random.default_rng(2)
    spec = create_augment_spec('rrc')
    worst, diffs = 0.0, []
    for w, h, out in ((64, 48, 32), (20, 24, 32), (96, 96, 24)):
        img = _smooth_image(rng, w, h)
        rec = sample_records(rng, w, h, spec, 16, record_dtype(3, 10, spec.name))
        ref = torch.stack([_u8(apply_record_pil(img, r, spec, (out, out), interpolation)) for r in rec])
        got = D.crop_resize([_u8(img)] * len(rec), rec['crop'], (out, out), D._interp(interpolation))
        got = torch.where(torch.from_numpy((rec['flags'] & FLAG_HFLIP) > 0).view(-1, 1, 1, 1), got.flip(-1), got)
        diffs.append(_levels(ref, got).flatten())
        worst = max(worst, float(diffs[-1].max()))
    share = float((torch.cat(diffs) > 0).float().mean())
    print(f'crop+resize {interpolation}: max abs diff {worst:.0f} levels, share of values that differ {share:.4f}')
    if interpolation == 'nearest':
        # PIL and torch ('nearest-exact') both sample the source pixel under the output pixel's centre; where that
        # centre falls (in float) on a source pixel edge they may pick the neighbour: a whole pixel, in a few places
        assert share <= 0.02
    else:
        assert worst <= RESAMPLE_BOUND


@pytest.mark.parametrize('aug', ['rrc+ra_re', 'rrc+ra_re+mix'])
def test_erasing_and_mixing_are_exact_given_equal_inputs(aug):
    """Identity resize, RandAugment off: the uint8 inputs agree, so erasing and mixing must give the same bits."""
    rng = np.random.default_rng(3)
    spec = create_augment_spec(aug, ra_num_ops=0, re_prob=1.0, re_fill='black')
    w = h = 24
    imgs = [_smooth_image(rng, w, h) for _ in range(4)]
    rec = _full_records(spec, 32, w, h, rng)
    partners = None
    if spec.has_mix:
        rec['mix_ref'] = np.arange(32) % 4
        rec['mix_crop'] = (0, 0, w, h)
        rec['mix_flags'] = np.where(np.arange(32) % 3 == 0, FLAG_ERASE, 0)
        rec['mix_re_box'] = rec['re_box'][::-1]
        kinds = np.array([FLAG_MIXUP, FLAG_CUTMIX, FLAG_MIXUP | FLAG_CUTMIX, 0])
        rec['flags'] |= kinds[np.arange(32) % 4].astype(rec['flags'].dtype)
        rec['mix_lam'] = rng.uniform(0.05, 0.95, 32)
        rec['mix_box'] = np.sort(rng.integers(0, 256, (32, 2, 2)), axis=1).reshape(32, 4)[:, [0, 2, 1, 3]]
        partners = [(('png', _png(imgs[int(r['mix_ref'])])) if needs_partner(r) else None) for r in rec]
    assert ((rec['flags'] & FLAG_ERASE) > 0).sum() > 10
    ref = torch.stack([apply_record(imgs[i % 4], r, spec, (h, w), MEAN, STD,
                                    partner=imgs[int(r['mix_ref'])] if spec.has_mix and needs_partner(r) else None)
                       for i, r in enumerate(rec)])
    out = D.replay_bytes([_png(imgs[i % 4]) for i in range(32)], ['png'] * 32, rec, spec, (h, w), MEAN, STD,
                         partners=partners)
    assert torch.equal(ref, out)


def test_erase_and_cutmix_pixel_boxes_are_the_stored_ones():
    rng = np.random.default_rng(4)
    for h, w in ((32, 32), (17, 29), (224, 160)):
        boxes = rng.integers(0, 256, (50, 4))
        mask = erase_mask(boxes, np.ones(50, bool), h, w)[:, 0]
        for m, (top, left, bh, bw) in zip(mask, re_pixel_boxes(boxes, h, w)):
            expect = torch.zeros(h, w, dtype=torch.bool)
            expect[top:top + bh, left:left + bw] = True
            assert torch.equal(m, expect)
        rec = np.zeros(50, dtype=[('flags', 'u2'), ('mix_lam', 'f4'), ('mix_box', 'u1', (4,))])
        rec['flags'] = FLAG_CUTMIX
        rec['mix_box'] = np.sort(rng.integers(0, 256, (50, 2, 2)), axis=1).reshape(50, 4)[:, [0, 2, 1, 3]]
        mixed = mix_batch(torch.zeros(50, 1, h, w), torch.ones(50, 1, h, w), rec)[:, 0] > 0
        for m, box in zip(mixed, rec['mix_box']):
            top, left, bottom, right = cutmix_pixel_box(box, h, w)
            expect = torch.zeros(h, w, dtype=torch.bool)
            expect[top:bottom, left:right] = True
            assert torch.equal(m, expect)


def test_decode_matches_pil_and_names_a_bad_image():
    rng = np.random.default_rng(5)
    img = _smooth_image(rng, 20, 12)
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=90)
    jpg, png = buf.getvalue(), _png(img.convert('L'))
    out = D.decode_images([jpg, png], ['jpg', 'png'], 'cpu')
    assert torch.equal(out[1], _u8(img.convert('L').convert('RGB')))
    # libjpeg builds may differ in the IDCT/upsampling: within a few levels of PIL's decode
    assert _levels(out[0], _u8(Image.open(io.BytesIO(jpg)).convert('RGB'))).max() <= 4
    with pytest.raises(ValueError, match=r'shard s\.tar key k1: undecodable image member \.png'):
        D.decode_images([jpg, b'not an image'], ['jpg', 'png'], 'cpu', ['shard s.tar key k0', 'shard s.tar key k1'])


def test_check_replay_device():
    assert D.check_replay_device(None) == '' and D.check_replay_device('cpu') == 'cpu'
    with pytest.raises(ValueError, match='--replay-device'):
        D.check_replay_device('tpu')


# ----------------------------------------------------------------------------------------------------------------------
# the authors' fixture


@needs_fixture
@pytest.mark.parametrize('variant', VARIANTS)
def test_device_replay_of_the_mldr_fixture(variant):
    """Every stored view of the ml-dr fixture (180 per variant, 32x32 from PNGs) replayed on the device path against
    the authors' replay (expected.npz)."""
    cfg, samples, recs = _convert(variant)
    data = [open(p, 'rb').read() for p, _ in samples]
    expected = np.load(os.path.join(FIXTURE, variant, 'expected.npz'))
    keys = [tuple(int(v) for v in k.split('_')) for k in expected.files]
    records = np.stack([recs[i][k] for i, k in keys])
    partners = None
    if cfg.spec.has_mix:
        partners = [('png', data[int(r['mix_ref'])]) if needs_partner(r) else None for r in records]
    x = D.replay_bytes([data[i] for i, _ in keys], ['png'] * len(keys), records, cfg.spec, cfg.out_size, cfg.mean,
                       cfg.std, partners=partners)
    ref = torch.from_numpy(np.stack([expected[k] for k in expected.files]))
    d = torch.stack([_levels(a, b, cfg.std) for a, b in zip(x, ref)])
    share = float((d > RESAMPLE_BOUND + 1e-3).float().mean())
    print(f'ml-dr {variant}: {len(keys)} views, max abs diff {float(d.max()):.2f}/255, mean '
          f'{float(d.mean()):.4f}/255, share of values > {RESAMPLE_BOUND}/255: {share:.5f}')
    assert len(keys) == 180
    if cfg.spec.has_ra_re:
        assert share <= RA_SHARE_BOUND and float(d.mean()) <= RA_MEAN_BOUND
    else:
        assert float(d.max()) <= RESAMPLE_BOUND + 1e-3


@needs_fixture
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (no GPU on this machine)')
def test_cuda_replay_matches_the_cpu_device_replay():
    """The same pipeline on CUDA (nvJPEG for JPEGs, torch's CUDA kernels) against the CPU device replay."""
    cfg, samples, recs = _convert('rrc_ra_re_mix')
    data = [open(p, 'rb').read() for p, _ in samples]
    jpegs = []
    for b in data:
        buf = io.BytesIO()
        Image.open(io.BytesIO(b)).convert('RGB').save(buf, format='JPEG', quality=95)
        jpegs.append(buf.getvalue())
    records = np.stack([recs[i][k] for i in sorted(recs) for k in range(len(recs[i]))])
    owner = np.repeat(sorted(recs), [len(recs[i]) for i in sorted(recs)])
    for blobs, ext in ((data, 'png'), (jpegs, 'jpg')):
        partners = [(ext, blobs[int(r['mix_ref'])]) if needs_partner(r) else None for r in records]
        args = ([blobs[i] for i in owner], [ext] * len(owner), records, cfg.spec, cfg.out_size, cfg.mean, cfg.std)
        cpu = D.replay_bytes(*args, partners=partners, device='cpu')
        gpu = D.replay_bytes(*args, partners=partners, device='cuda').cpu()
        d = torch.stack([_levels(a, b, cfg.std) for a, b in zip(cpu, gpu)])
        share = float((d > RESAMPLE_BOUND + 1e-3).float().mean())
        print(f'cuda vs cpu ({ext}): max {float(d.max()):.2f}/255, mean {float(d.mean()):.4f}/255, share {share:.5f}')
        # nvJPEG and libjpeg decode JPEGs a little differently: a looser share for them
        assert share <= (RA_SHARE_BOUND if ext == 'png' else 0.05) and float(d.mean()) <= (RA_MEAN_BOUND * 5)


# ----------------------------------------------------------------------------------------------------------------------
# the loader


@pytest.mark.parametrize('aug,workers,rd_p', [('rrc', 0, 1.0), ('rrc+mix', 2, 0.7), ('rrc+ra_re+mix', 0, 0.7)])
def test_loader_device_path_gives_the_pil_batches(tmp_path, aug, workers, rd_p):
    from timm.data import create_transform
    make_mixing(str(tmp_path / 'rd'), aug=aug)
    fallback = create_transform(SIZE, is_training=True, mean=MEAN, std=STD)
    kw = dict(num_workers=workers, rd_p=rd_p, fallback_transform=fallback)
    pil = list(_loader(str(tmp_path / 'rd'), **kw))
    dev = list(_loader(str(tmp_path / 'rd'), replay_device='cpu', **kw))
    assert len(pil) == len(dev) > 1
    for (x, t, y), (x2, t2, y2) in zip(pil, dev):
        assert torch.equal(y, y2) and torch.equal(t, t2)  # same samples, stored augmentations and targets, in order
        assert x2.dtype == torch.float32 and x2.shape == x.shape
    d = torch.cat([_levels(a, b, STD) for (x, _, _), (x2, _, _) in zip(pil, dev) for a, b in zip(x, x2)])
    share = float((d > RESAMPLE_BOUND + 1e-3).float().mean())
    print(f'loader {aug}: max abs diff {float(d.max()):.2f}/255, mean {float(d.mean()):.4f}/255, share > '
          f'{RESAMPLE_BOUND}/255: {share:.5f}')
    if 'ra_re' in aug:
        assert share <= RA_SHARE_BOUND and float(d.mean()) <= RA_MEAN_BOUND
    else:
        assert float(d.max()) <= RESAMPLE_BOUND + 1e-3


def test_loader_device_path_names_an_undecodable_image(tmp_path):
    rd = make_mixing(str(tmp_path / 'rd'), aug='rrc', num_images=6, shard_size=6)
    samples = [{'key': f'img{p:04d}', 'image_ext': 'png', 'image': rd['images'][p] if p else b'\x89PNG garbage',
                'label': p, 'records': encode_records(rd['records'][p]), 'index': p} for p in range(6)]
    data = build_shard(samples, shard=shard_name(0))
    with open(tmp_path / 'rd' / shard_name(0), 'wb') as f:
        f.write(data)
    meta = json.load(open(tmp_path / 'rd' / 'reinforce.json'))
    meta['shards'][0]['bytes'] = len(data)
    json.dump(meta, open(tmp_path / 'rd' / 'reinforce.json', 'w'))
    with pytest.raises(ValueError, match=r'shard .*000000\.tar key img0000'):
        list(_loader(str(tmp_path / 'rd'), batch_size=2, replay_device='cpu'))


# ----------------------------------------------------------------------------------------------------------------------
# a trained model sees the same images


def test_trained_model_predicts_the_same_on_both_replays():
    """A small CNN trained on PIL replays of digits (rrc+ra_re views) predicts the same class for >= 99% of the stored
    views when they are replayed on the device path."""
    torch.manual_seed(0)
    rng = np.random.default_rng(6)
    ds = DigitsDataset('train', img_size=40)
    n = 300
    spec = create_augment_spec('rrc+ra_re')
    dtype = record_dtype(3, 10, spec.name)
    imgs = [ds.image(i) for i in range(n)]
    recs = np.concatenate([sample_records(rng, 40, 40, spec, 4, dtype) for _ in range(n)])
    owner = np.repeat(np.arange(n), 4)
    labels = torch.tensor([ds.targets[i] for i in owner])
    pil = torch.stack([apply_record(imgs[i], r, spec, (32, 32), MEAN, STD) for i, r in zip(owner, recs)])
    dev = D.replay_bytes([_png(imgs[i]) for i in owner], ['png'] * len(owner), recs, spec, (32, 32), MEAN, STD)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(0, len(pil), (64,))
        loss = nn.functional.cross_entropy(model(pil[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        a, b = model(pil).argmax(1), model(dev).argmax(1)
    accuracy = float((a == labels).float().mean())
    agreement = float((a == b).float().mean())
    print(f'teacher agreement: {agreement:.4f} of {len(a)} views (model accuracy on the PIL views {accuracy:.3f})')
    assert accuracy > 0.3  # a model that has learned something (chance: 0.1; RandAugment at magnitude 9 is hard)
    assert agreement >= 0.99


# ----------------------------------------------------------------------------------------------------------------------
# train.py


def test_train_flag_errors():
    import train
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset', 'digits', '--replay-device', 'cpu'])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.parse_args(['--dataset', 'digits', '--reinforced', '/nonexistent', '--replay-device', 'cuda'])


def test_train_flag_error_messages():
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'digits', '--replay-device', 'cpu']
    res = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and 'error: --replay-device needs --reinforced' in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_train_one_epoch_with_replay_on_the_cpu(ref, tmp_path):
    out = tmp_path / 'out'
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'digits', '--model', 'test_resnet',
           '--reinforced', ref, '--replay-device', 'cpu', '--epochs', '1', '-b', '8', '--lr', '0.05',
           '--warmup-epochs', '0', '-j', '1', '--log-interval', '1000', '--output', str(out), '--experiment', 's']
    res = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = (out / 's' / 'summary.csv').read_text().splitlines()
    assert len(summary) == 2 and 'nan' not in summary[1].lower()
    assert yaml.safe_load((out / 's' / 'args.yaml').read_text())['replay_device'] == 'cpu'
