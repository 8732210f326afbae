"""Stored augmentations: sampling, exact replay and every op of the RandAugment table."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op

from dr.reinforce.augment import (
    RA_OPS,
    AugmentSpec,
    apply_record,
    apply_record_pil,
    augment_uint8,
    create_augment_spec,
    erase_mask,
    normalize_uint8,
    re_pixel_box,
    re_pixel_boxes,
    sample_records,
)
from dr.reinforce.format import FLAG_ERASE, FLAG_HFLIP, FLAG_RA_NEG, record_dtype

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(w=40, h=30, seed=0):
    """A smooth, mid-range RGB image (so contrast/equalize/solarize/... all change it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 200, size=(h // 5, w // 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _records(spec, n=64, seed=0, w=40, h=30):
    return sample_records(np.random.default_rng(seed), w, h, spec, n, record_dtype(5, 10, spec.name))


def test_ra_ops_table_is_torchvisions():
    assert RA_OPS == tuple(RandAugment()._augmentation_space(31, (32, 32)).keys())
    assert len(RA_OPS) == 14 and RA_OPS[0] == 'Identity'


def test_sampling_deterministic_per_seed():
    spec = create_augment_spec('rrc+ra_re')
    a, b, c = _records(spec, seed=1), _records(spec, seed=1), _records(spec, seed=2)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_sampling_ranges_and_rates():
    spec = create_augment_spec('rrc+ra_re')
    w, h = 50, 30
    rec = _records(spec, n=4000, seed=3, w=w, h=h)
    x, y, cw, ch = rec['crop'].T.astype(int)
    assert (cw >= 1).all() and (ch >= 1).all() and (x + cw <= w).all() and (y + ch <= h).all()
    area = cw * ch / (w * h)
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert abs((rec['flags'] & FLAG_HFLIP > 0).mean() - 0.5) < 0.05
    assert abs((rec['flags'] & FLAG_ERASE > 0).mean() - 0.25) < 0.04
    assert set(np.unique(rec['ra_ops'])) == set(range(len(RA_OPS)))
    table = RandAugment()._augmentation_space(31, (32, 32))
    signed = np.array([table[op][1] for op in RA_OPS])
    for j in range(2):
        neg = rec['flags'] & FLAG_RA_NEG[j] > 0
        assert not neg[~signed[rec['ra_ops'][:, j]]].any()  # unsigned ops never carry a sign
        assert 0.4 < neg[signed[rec['ra_ops'][:, j]]].mean() < 0.6
    erased = rec['flags'] & FLAG_ERASE > 0
    qt, ql, qh, qw = rec['re_box'][erased].T.astype(int)
    assert (qt + qh <= 255).all() and (ql + qw <= 255).all() and (qh >= 1).all()
    assert not rec['re_box'][~erased].any()


def test_rrc_spec_stores_crop_and_flip_only():
    spec = create_augment_spec('rrc')
    dtype = record_dtype(5, 10, 'rrc')
    assert set(dtype.names) == {'ids', 'probs', 'crop', 'flags'}
    rec = sample_records(np.random.default_rng(0), 40, 30, spec, 500, dtype)
    assert set(np.unique(rec['flags'])) == {0, FLAG_HFLIP}
    with pytest.raises(ValueError, match='ra_ops'):
        sample_records(np.random.default_rng(0), 40, 30, create_augment_spec('rrc+ra_re'), 5, dtype)


def test_spec_roundtrip_and_errors():
    spec = create_augment_spec('rrc+ra_re', re_prob=0.5)
    d = spec.to_dict()
    assert d['ra_ops'] == list(RA_OPS) and d['re_prob'] == 0.5
    d['mix_future_field'] = 1  # later schema versions may add keys
    assert AugmentSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match='--aug'):
        create_augment_spec('mixup')
    with pytest.raises(ValueError, match='Unknown augmentation parameter'):
        create_augment_spec('rrc', bogus=1)
    with pytest.raises(ValueError, match='unknown RandAugment op'):
        AugmentSpec(ra_ops=('Identity', 'Warp'))


def test_apply_record_deterministic_and_matches_batched_path():
    spec = create_augment_spec('rrc+ra_re', re_prob=0.6)
    img = _image()
    rec = _records(spec, n=48)
    assert (rec['flags'] & FLAG_ERASE > 0).any()
    u8 = augment_uint8(img, rec, spec, (24, 20), 'bicubic')
    batched = normalize_uint8(u8, MEAN, STD)
    batched.masked_fill_(erase_mask(rec['re_box'], rec['flags'] & FLAG_ERASE > 0, 24, 20), 0)
    for i in range(len(rec)):
        a = apply_record(img, rec[i], spec, (24, 20), MEAN, STD, interpolation='bicubic')
        b = apply_record(img, rec[i], spec, (24, 20), MEAN, STD, interpolation='bicubic')
        assert a.shape == (3, 24, 20) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert torch.equal(a, batched[i])


def _one(spec, crop, flags=0, ops=(0, 0), re_box=(0, 0, 0, 0)):
    rec = np.zeros(1, dtype=record_dtype(5, 10, spec.name))
    rec['crop'] = crop
    rec['flags'] = flags
    if 'ra_ops' in rec.dtype.names:
        rec['ra_ops'] = ops
        rec['re_box'] = re_box
    return rec[0]


def test_crop_resize_and_flip_semantics():
    spec = create_augment_spec('rrc')
    img = _image()
    crop = (5, 3, 20, 16)  # x, y, w, h
    out = apply_record_pil(img, _one(spec, crop), spec, (16, 16), 'bilinear')
    ref = img.crop((5, 3, 25, 19)).resize((16, 16), Image.BILINEAR)
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    flipped = apply_record_pil(img, _one(spec, crop, FLAG_HFLIP), spec, (16, 16), 'bilinear')
    assert np.array_equal(np.asarray(flipped), np.asarray(ref)[:, ::-1])


@pytest.mark.parametrize('op', RA_OPS)
def test_each_randaugment_op(op):
    """Every op of the table applies torchvision's op at magnitude bin 9 of 31 with the stored sign."""
    spec = create_augment_spec('rrc+ra_re')
    img = _image()
    idx = RA_OPS.index(op)
    size = (28, 24)
    crop = (0, 0, 40, 30)
    base = apply_record_pil(img, _one(spec, crop), spec, size, 'bilinear')
    mags, signed = RandAugment()._augmentation_space(31, size)[op]
    magnitude = float(mags[9]) if mags.ndim > 0 else 0.0
    for j in range(2):  # the op in slot 1 or slot 2 (other slot Identity)
        ops = (idx, 0) if j == 0 else (0, idx)
        out = apply_record_pil(img, _one(spec, crop, ops=ops), spec, size, 'bilinear')
        ref = _apply_op(base, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        assert np.array_equal(np.asarray(out), np.asarray(ref))
        if op != 'Identity':
            assert not np.array_equal(np.asarray(out), np.asarray(base)), op
        if signed:
            neg = apply_record_pil(img, _one(spec, crop, flags=FLAG_RA_NEG[j], ops=ops), spec, size, 'bilinear')
            ref_neg = _apply_op(base, op, -magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
            assert np.array_equal(np.asarray(neg), np.asarray(ref_neg))
            assert not np.array_equal(np.asarray(neg), np.asarray(out)), op


def test_two_ops_compose_in_order():
    spec = create_augment_spec('rrc+ra_re')
    img = _image()
    size = (24, 24)
    crop = (2, 2, 30, 24)
    a, b = RA_OPS.index('Rotate'), RA_OPS.index('Solarize')
    out = apply_record_pil(img, _one(spec, crop, flags=FLAG_RA_NEG[0], ops=(a, b)), spec, size, 'bilinear')
    base = apply_record_pil(img, _one(spec, crop), spec, size, 'bilinear')
    space = RandAugment()._augmentation_space(31, size)
    ref = _apply_op(base, 'Rotate', -float(space['Rotate'][0][9]), InterpolationMode.NEAREST, None)
    ref = _apply_op(ref, 'Solarize', float(space['Solarize'][0][9]), InterpolationMode.NEAREST, None)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_random_erasing_box_is_zero_after_normalisation():
    spec = create_augment_spec('rrc+ra_re')
    img = _image()
    crop = (0, 0, 40, 30)
    box = (51, 102, 77, 40)  # top, left, h, w in 1/255
    plain = apply_record(img, _one(spec, crop, re_box=box), spec, (32, 32), MEAN, STD)
    erased = apply_record(img, _one(spec, crop, flags=FLAG_ERASE, re_box=box), spec, (32, 32), MEAN, STD)
    top, left, h, w = re_pixel_box(box, 32, 32)
    assert (top, left, h, w) == (6, 13, 10, 5)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[top:top + h, left:left + w] = True
    assert (erased[:, mask] == 0).all()
    assert torch.equal(erased[:, ~mask], plain[:, ~mask])
    assert (plain[:, mask] != 0).any()


def test_erase_boxes_scale_with_output_size():
    boxes = np.array([[0, 0, 255, 255], [254, 254, 1, 1], [100, 30, 60, 200]])
    for h, w in ((16, 16), (224, 160), (7, 300)):
        px = re_pixel_boxes(boxes, h, w)
        assert (px[:, 2] >= 1).all() and (px[:, 3] >= 1).all()
        assert (px[:, 0] + px[:, 2] <= h).all() and (px[:, 1] + px[:, 3] <= w).all()
        assert tuple(px[0]) == (0, 0, h, w)


def test_normalize_matches_torchvision():
    img = _image()
    u8 = TF.pil_to_tensor(img)
    ref = TF.normalize(TF.to_tensor(img), MEAN, STD)
    assert torch.equal(normalize_uint8(u8, MEAN, STD), ref)
