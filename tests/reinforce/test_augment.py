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
    cutmix_pixel_box,
    erase_fill,
    erase_mask,
    normalize_uint8,
    partner_fields,
    px_to_q255,
    q255_to_px,
    re_pixel_box,
    re_pixel_boxes,
    sample_crops,
    sample_mix_records,
    sample_records,
)
from dr.reinforce.format import FLAG_CUTMIX, FLAG_ERASE, FLAG_HFLIP, FLAG_MIXUP, FLAG_RA_NEG, record_dtype

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


# ----------------------------------------------------------------------------------------------------------------------
# random-erasing fill, mixing variants (+M*)


def test_erase_fill_black_is_zero_before_normalisation():
    img = _image()
    box = (51, 102, 77, 40)
    spec = create_augment_spec('rrc+ra_re', re_fill='black')
    erased = apply_record(img, _one(spec, (0, 0, 40, 30), flags=FLAG_ERASE, re_box=box), spec, (32, 32), MEAN, STD)
    top, left, h, w = re_pixel_box(box, 32, 32)
    black = TF.normalize(torch.zeros(3, 1, 1), MEAN, STD)  # what torchvision's Normalize makes of a zeroed pixel
    assert torch.equal(erased[:, top:top + h, left:left + w], black.expand(3, h, w))
    assert torch.equal(erase_fill(spec, MEAN, STD), black)
    assert not erase_fill(create_augment_spec('rrc+ra_re'), MEAN, STD).any()  # the project's default: mean colour
    with pytest.raises(ValueError, match='re_fill'):
        create_augment_spec('rrc+ra_re', re_fill='grey')


def test_version1_spec_dict_keeps_its_meaning():
    """A schema-1 reinforce.json has no re_fill / mixing keys: it erased with the mean colour and never mixed."""
    old = create_augment_spec('rrc+ra_re').to_dict()
    for k in ('re_fill', 'mixup_p', 'mixup_alpha', 'mixup_div_by', 'cutmix_p', 'cutmix_alpha', 'mix_group'):
        old.pop(k)
    spec = AugmentSpec.from_dict(old)
    assert spec.re_fill == 'mean' and spec.mixup_p == 0 and spec.cutmix_p == 0 and not spec.has_mix


def test_mix_spec_defaults_and_errors():
    spec = create_augment_spec('rrc+ra_re+mix')
    assert spec.has_mix and spec.has_ra_re and (spec.mixup_p, spec.cutmix_p, spec.mixup_div_by) == (0.5, 0.5, 2.0)
    assert create_augment_spec('rrc+mix').ra_num_ops == 0 and not create_augment_spec('rrc+mix').has_ra_re
    with pytest.raises(ValueError, match='does not mix'):
        create_augment_spec('rrc+ra_re', mixup_p=0.5)
    with pytest.raises(ValueError, match='mixup_p'):
        create_augment_spec('rrc+mix', mixup_p=1.5)


def test_vectorised_crops_per_sample_sizes():
    """Partner crops use one image size per sample; each row equals the scalar-size draw's rule."""
    sizes = np.array([[40, 30], [7, 200], [300, 5], [64, 64]])
    pick = np.random.default_rng(0).integers(0, 4, 500)
    crops = sample_crops(np.random.default_rng(1), sizes[pick, 0], sizes[pick, 1], 500, (0.08, 1.0), (0.75, 4 / 3))
    x, y, w, h = crops.T
    assert (w >= 1).all() and (h >= 1).all()
    assert (x + w <= sizes[pick, 0]).all() and (y + h <= sizes[pick, 1]).all()
    single = sample_crops(np.random.default_rng(1), np.full(500, 40), np.full(500, 30), 500, (0.08, 1.0), (0.75, 4 / 3))
    assert np.array_equal(single, sample_crops(np.random.default_rng(1), 40, 30, 500, (0.08, 1.0), (0.75, 4 / 3)))


def _mix_records(spec, n=2000, seed=0, candidates=(7, 8, 9), sizes=((40, 30), (24, 48), (33, 33))):
    rng = np.random.default_rng(seed)
    rec = sample_records(rng, 40, 30, spec, n, record_dtype(5, 10, spec.name))
    sample_mix_records(rng, rec, list(candidates), list(sizes), spec)
    return rec


@pytest.mark.parametrize('name', ['rrc+mix', 'rrc+ra_re+mix'])
def test_mix_sampling_rates_and_fields(name):
    spec = create_augment_spec(name)
    rec = _mix_records(spec)
    assert rec.tobytes() == _mix_records(spec).tobytes()
    mixup, cutmix = rec['flags'] & FLAG_MIXUP > 0, rec['flags'] & FLAG_CUTMIX > 0
    assert abs(mixup.mean() - 0.5) < 0.05 and abs(cutmix.mean() - 0.5) < 0.05
    assert abs((mixup & cutmix).mean() - 0.25) < 0.04  # both may apply, independently
    lam = rec['mix_lam'][mixup]
    assert (lam >= 0).all() and (lam <= 0.5).all() and abs(lam.mean() - 0.25) < 0.03  # Beta(1, 1) / div_by 2
    mixed = mixup | cutmix
    assert set(np.unique(rec['mix_ref'][mixed])) == {7, 8, 9}
    assert not rec['mix_ref'][~mixed].any() and not rec['mix_crop'][~mixed].any()
    assert not rec['mix_lam'][~mixup].any() and not rec['mix_box'][~cutmix].any()
    sizes = {7: (40, 30), 8: (24, 48), 9: (33, 33)}
    for ref, (w, h) in sizes.items():
        x, y, cw, ch = rec['mix_crop'][mixed & (rec['mix_ref'] == ref)].T.astype(int)
        assert (x + cw <= w).all() and (y + ch <= h).all() and (cw >= 1).all()
    top, left, bottom, right = rec['mix_box'][cutmix].T.astype(int)
    assert (top <= bottom).all() and (left <= right).all() and (bottom <= 255).all()
    if spec.has_ra_re:
        assert abs((rec['mix_flags'][mixed] & FLAG_ERASE > 0).mean() - 0.25) < 0.05
        assert set(np.unique(rec['mix_ra_ops'][mixed])) == set(range(len(RA_OPS)))


def test_mix_replay_is_mixup_then_cutmix_of_the_two_replays():
    spec = create_augment_spec('rrc+ra_re+mix', re_fill='black', re_prob=0.5)
    img, partner = _image(seed=0), _image(48, 36, seed=1)
    rec = _mix_records(spec, n=64, candidates=(3,), sizes=((48, 36),))
    seen = set()
    for r in rec:
        x = apply_record(img, r, spec, (24, 28), MEAN, STD, partner=partner)
        own = apply_record(img, r, dataclass_replace(spec), (24, 28), MEAN, STD)
        other = apply_record(partner, _as_record(spec, partner_fields(r)), dataclass_replace(spec), (24, 28), MEAN,
                             STD)
        ref = own.clone()
        if r['flags'] & FLAG_MIXUP:
            ref = own * float(r['mix_lam']) + other * (1.0 - float(r['mix_lam']))
        if r['flags'] & FLAG_CUTMIX:
            top, left, bottom, right = cutmix_pixel_box(r['mix_box'], 24, 28)
            ref[:, top:bottom, left:right] = other[:, top:bottom, left:right]
        assert torch.equal(x, ref)
        seen.add(int(r['flags']) & (FLAG_MIXUP | FLAG_CUTMIX))
    assert seen == {0, FLAG_MIXUP, FLAG_CUTMIX, FLAG_MIXUP | FLAG_CUTMIX}
    mixing = next(r for r in rec if r['flags'] & FLAG_MIXUP)
    with pytest.raises(ValueError, match='partner'):
        apply_record(img, mixing, spec, (24, 28), MEAN, STD)


def dataclass_replace(spec):
    """The same spec without mixing (replays a record's own / partner half alone)."""
    d = spec.to_dict()
    d.update(name=d['name'].replace('+mix', ''), mixup_p=0.0, cutmix_p=0.0)
    return AugmentSpec.from_dict(d)


def _as_record(spec, fields):
    rec = np.zeros(1, dtype=record_dtype(5, 10, spec.name.replace('+mix', '')))
    for k, v in fields.items():
        rec[k] = v
    return rec[0]


@pytest.mark.parametrize('size', [1, 7, 32, 224, 255])
def test_q255_codes_are_exact_up_to_255(size):
    px = np.arange(size + 1)
    assert np.array_equal(q255_to_px(px_to_q255(px, size), size), px)


def test_q255_codes_approximate_above_255():
    px = np.arange(385)
    back = q255_to_px(px_to_q255(px, 384), 384)
    assert (np.abs(back - px) <= 1).all() and (back != px).any()
