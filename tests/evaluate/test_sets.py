"""Evaluation sets on fabricated folder trees, scored through the real loader and loop with a model whose logits we
control: the model reads the (uniform) grey value of each image and returns a logit row chosen for that value."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dr.evaluate.loop import create_eval_loader, create_eval_transform, evaluate_part, summarize_real, summarize_records
from dr.evaluate.sets import (
    BadImageError,
    ImageListDataset,
    build_parts,
    discover_sets,
    imagenet_synsets,
    numeric_class_folders,
    objectnet_mapping,
    real_labels,
    subset_indices,
)

DATA_CONFIG = {'input_size': (3, 16, 16), 'interpolation': 'bilinear', 'mean': (0.0, 0.0, 0.0),
               'std': (1.0, 1.0, 1.0), 'crop_pct': 1.0, 'crop_mode': 'center'}


pytestmark = pytest.mark.usefixtures('one_thread')


class ValueModel(nn.Module):
    """Logits looked up by the image's mean grey value (0..255); unknown values get all-zero logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.register_buffer('table', torch.zeros(256, num_classes))
        self.num_classes = num_classes

    def set(self, value: int, scores: dict) -> None:
        for k, v in scores.items():
            self.table[value, k] = v

    def forward(self, x):
        v = (x.mean(dim=(1, 2, 3)) * 255).round().long().clamp(0, 255)
        return self.table[v]


def _png(path, value, size=16, border=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.full((size, size, 3), value, np.uint8)
    if border is not None:
        arr[:2], arr[-2:], arr[:, :2], arr[:, -2:] = border, border, border, border
    Image.fromarray(arr).save(path)


def _evaluate(model, part, batch_size=3):
    loader = create_eval_loader(part.dataset, DATA_CONFIG, batch_size=batch_size,
                                crop_border_pixels=part.crop_border_pixels, center_crop_only=part.center_crop_only)
    records, skipped = evaluate_part(model, part, loader, torch.device('cpu'), progress=False)
    return {name: summarize_records(rec) for name, rec in records.items()}, records, skipped


def test_imagenet_a_masking(tmp_path):
    a_idx = subset_indices('a')
    syn = imagenet_synsets()
    assert 0 not in a_idx and 1 not in a_idx
    root = tmp_path / 'imagenet-a'
    # sample value -> (class index, logits)
    cases = {
        10: (a_idx[0], {0: 10.0, a_idx[0]: 5.0}),  # unmasked wrong (class 0), masked right
        20: (a_idx[0], {0: 10.0, a_idx[1]: 5.0}),  # masked wrong
        30: (a_idx[1], {a_idx[1]: 3.0}),  # right either way
        40: (a_idx[2], {1: 9.0, a_idx[2]: 2.0, a_idx[0]: 1.0}),  # masked right
    }
    model = ValueModel()
    for v, (cls, scores) in cases.items():
        _png(str(root / syn[cls] / f'img{v}.png'), v)
        model.set(v, scores)
    part, = build_parts('imagenet-a', str(root))
    assert part.views[0].num_classes == 200
    summary, records, _ = _evaluate(model, part)
    s = summary['imagenet-a']
    assert s['count'] == 4
    assert s['top1'] == pytest.approx(75.0)
    # the unrestricted prediction would be right only once
    full = torch.stack([model.table[v] for v in cases])
    assert (full.argmax(1) == torch.tensor([c for c, _ in cases.values()])).sum() == 1
    # confidence and NLL are computed over the 200 kept classes only
    rec = records['imagenet-a']
    order = {int(i): k for k, i in enumerate(rec['index'])}
    sample30 = order[[p for p, _ in part.dataset.samples].index(str(root / syn[a_idx[1]] / 'img30.png'))]
    restricted = torch.zeros(200)
    restricted[1] = 3.0
    assert float(rec['conf'][sample30]) == pytest.approx(float(restricted.softmax(0).max()), rel=1e-5)
    assert int(rec['target'][sample30]) == 1


def test_imagenet_a_rejects_foreign_class(tmp_path):
    syn = imagenet_synsets()
    _png(str(tmp_path / 'imagenet-a' / syn[0] / 'x.png'), 5)
    with pytest.raises(ValueError, match='not one of the 200 classes'):
        build_parts('imagenet-a', str(tmp_path / 'imagenet-a'))


def test_imagenet_val_views_clean_subsets_and_real(tmp_path):
    syn = imagenet_synsets()
    a_idx, r_idx = subset_indices('a'), subset_indices('r')
    only_a = next(i for i in a_idx if i not in r_idx)
    both = next(i for i in a_idx if i in r_idx)
    assert 0 not in a_idx and 0 not in r_idx
    labels = real_labels()
    assert labels[0] == () and 795 in labels[1]
    root = tmp_path / 'val'
    model = ValueModel()
    # file 1 has no ReaL label; file 2's ReaL labels include 795 although its folder says class 0
    _png(str(root / syn[0] / 'ILSVRC2012_val_00000001.png'), 11)
    model.set(11, {0: 4.0})
    _png(str(root / syn[0] / 'ILSVRC2012_val_00000002.png'), 12)
    model.set(12, {795: 4.0})
    _png(str(root / syn[only_a] / 'ILSVRC2012_val_00000003.png'), 13)
    model.set(13, {0: 6.0, only_a: 5.0})  # wrong 1000-way, right on the A classes
    _png(str(root / syn[both] / 'ILSVRC2012_val_00000004.png'), 14)
    model.set(14, {both: 6.0})
    part, = build_parts('imagenet', str(root))
    summary, records, _ = _evaluate(model, part)
    assert summary['imagenet']['count'] == 4 and summary['imagenet']['top1'] == pytest.approx(50.0)
    assert summary['imagenet-a-clean']['count'] == 2 and summary['imagenet-a-clean']['top1'] == pytest.approx(100.0)
    assert summary['imagenet-r-clean']['count'] == 1 and summary['imagenet-r-clean']['top1'] == pytest.approx(100.0)
    real = summarize_real(records['imagenet'], part.real_labels)
    # file 1 left out; file 2 right by ReaL (795); files 3, 4 judged by their ReaL labels
    expected = [795 in labels[1], 0 in labels[2], both in labels[3]]
    assert real['count'] == 3
    assert real['top1'] == pytest.approx(100.0 * sum(expected) / 3)


def test_imagenetv2_numeric_folder_order(tmp_path):
    root = tmp_path / 'imagenetv2-matched-frequency-format-val'
    model = ValueModel()
    for k in range(13):
        _png(str(root / str(k) / 'a.png'), 10 * (k + 1))
        model.set(10 * (k + 1), {k: 1.0})
    names = [n for n, _ in numeric_class_folders(str(root))]
    assert names == [str(k) for k in range(13)]
    assert sorted(names) != names  # text order would put '10' after '1'
    part, = build_parts('imagenetv2-matched-frequency', str(root))
    assert [t for _, t in part.dataset.samples] == list(range(13))
    assert all(p.endswith(f'/{t}/a.png') for p, t in part.dataset.samples)
    summary, _, _ = _evaluate(model, part, batch_size=4)
    assert summary['imagenetv2-matched-frequency']['top1'] == pytest.approx(100.0)
    (root / 'x').mkdir()
    with pytest.raises(ValueError, match='not a class index'):
        numeric_class_folders(str(root))


def _objectnet_tree(root):
    """Fabricated ObjectNet in the release's format (ImageNet 2012 ids permuted against pytorch indices)."""
    maps = root / 'mappings'
    maps.mkdir(parents=True)
    (maps / 'imagenet_to_label_2012_v2').write_text(''.join(f'name{i}, alias{i}\n' for i in range(1000)))
    (maps / 'pytorch_to_imagenet_2012_id.json').write_text(json.dumps({str(p): 999 - p for p in range(1000)}))
    (maps / 'objectnet_to_imagenet_1k.json').write_text(json.dumps({
        'Alarm clock': 'name5, alias5; name7, alias7',
        'Banana': 'name100, alias100',
    }))
    (maps / 'folder_to_objectnet_label.json').write_text(json.dumps({
        'alarm_clock': 'Alarm clock', 'banana': 'Banana', 'air_freshener': 'Air freshener'}))
    _png(str(root / 'images' / 'alarm_clock' / 'a.png'), 50, size=20, border=255)
    _png(str(root / 'images' / 'banana' / 'b.png'), 60, size=20, border=255)
    _png(str(root / 'images' / 'banana' / 'c.png'), 70, size=20, border=255)
    _png(str(root / 'images' / 'air_freshener' / 'd.png'), 80, size=20, border=255)


def test_objectnet_mapping_crop_and_restricted_prediction(tmp_path):
    root = tmp_path / 'objectnet-1.0'
    _objectnet_tree(root)
    folders, groups = objectnet_mapping(str(root / 'mappings'))
    assert folders == ['alarm_clock', 'banana']
    assert groups == [[992, 994], [899]]  # line 5 -> pytorch 994, line 7 -> 992, line 100 -> 899
    part, = build_parts('objectnet', str(root))
    assert part.crop_border_pixels == 2
    assert sorted((os.path.basename(p), t) for p, t in part.dataset.samples) == [('a.png', 0), ('b.png', 1),
                                                                                 ('c.png', 1)]
    # the 2-pixel white border is gone before resizing: the model sees the uniform interior only
    tf = create_eval_transform(DATA_CONFIG, crop_border_pixels=part.crop_border_pixels)
    x = tf(Image.open(part.dataset.samples[0][0]).convert('RGB'))
    assert x.shape == (3, 16, 16) and int(x.min()) == int(x.max()) == 50
    model = ValueModel()
    model.set(50, {0: 9.0, 994: 5.0, 899: 4.0})  # best logit unmapped; best mapped is alarm clock -> right
    model.set(60, {992: 3.0, 899: 2.0})  # alarm clock -> wrong
    model.set(70, {899: 1.0, 5: 8.0, 7: 8.0})  # pytorch 5/7 are not mapped (only lines 5/7 are) -> banana, right
    summary, records, _ = _evaluate(model, part)
    s = summary['objectnet']
    assert s['count'] == 3 and s['top1'] == pytest.approx(200.0 / 3)
    assert records['objectnet']['top5'][:, 2:].eq(-1).all()  # only 2 classes
    bad = root / 'mappings' / 'objectnet_to_imagenet_1k.json'
    bad.write_text(json.dumps({'Banana': 'no such label'}))
    with pytest.raises(ValueError, match='no such label'):
        objectnet_mapping(str(root / 'mappings'))


def test_suite_discovery_lists_missing_sets(tmp_path):
    syn = imagenet_synsets()
    a_idx = subset_indices('a')
    _png(str(tmp_path / 'imagenet-a' / syn[a_idx[3]] / 'x.png'), 1)
    _png(str(tmp_path / 'imagenetv2-top-images-format-val' / '7' / 'x.png'), 1)
    (tmp_path / 'imagenet-r').mkdir()  # empty: not a set
    (tmp_path / 'objectnet-1.0' / 'images').mkdir(parents=True)  # no mappings/: not a set
    _png(str(tmp_path / 'imagenet-c' / 'fog' / '3' / syn[2] / 'x.png'), 1)
    found, missing = discover_sets(str(tmp_path))
    assert list(found) == ['imagenetv2-top-images', 'imagenet-a', 'imagenet-c']
    assert found['imagenetv2-top-images'].endswith('imagenetv2-top-images-format-val')
    assert missing == ['imagenet', 'imagenetv2-matched-frequency', 'imagenetv2-threshold0.7', 'imagenet-r',
                       'imagenet-sketch', 'objectnet']
    parts = build_parts('imagenet-c', found['imagenet-c'])
    assert [(p.corruption, p.severity, p.name) for p in parts] == [('fog', 3, 'imagenet-c/fog/3')]
    assert parts[0].dataset.samples[0][1] == 2


def test_unreadable_image_error_and_skip(tmp_path):
    good = tmp_path / 'good.png'
    _png(str(good), 40)
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not an image at all')
    samples = [(str(good), 3), (str(bad), 3), (str(good), 3)]
    ds = ImageListDataset(samples)
    loader = create_eval_loader(ds, DATA_CONFIG, batch_size=2)
    with pytest.raises(BadImageError, match='broken.png'):
        list(loader)
    from dr.evaluate.sets import EvalPart, View
    part = EvalPart('folder', ImageListDataset(samples, skip_bad_images=True), [View('folder')])
    model = ValueModel(10)
    model.set(40, {3: 1.0})
    summary, _, skipped = _evaluate(model, part, batch_size=2)
    assert skipped == 1
    assert summary['folder']['count'] == 2 and summary['folder']['top1'] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------------------------
# official layouts, official sizes, fingerprints and the ImageNet-C protocol

def _flat_val(root, n=4):
    """ILSVRC2012_val_0000000{1..n}.png flat in ``root`` (as the official val tar extracts), grey value 10 * i."""
    for i in range(1, n + 1):
        _png(str(root / f'ILSVRC2012_val_{i:08d}.png'), 10 * i)


def test_imagenet_val_flat_files_labelled_by_loc_val_solution_csv(tmp_path):
    syn = imagenet_synsets()
    root = tmp_path / 'ILSVRC' / 'Data' / 'CLS-LOC' / 'val'
    _flat_val(root)
    labels = {1: 5, 2: 900, 3: 5, 4: 17}
    rows = ['ImageId,PredictionString'] + [f'ILSVRC2012_val_{i:08d},{syn[c]} 1 2 30 40 {syn[c]} 5 6 7 8'
                                           for i, c in labels.items()]
    with pytest.raises(ValueError, match='no labels'):
        build_parts('imagenet', str(root))
    (tmp_path / 'LOC_val_solution.csv').write_text('\n'.join(rows) + '\n')  # Kaggle: at the release root
    found, _ = discover_sets(str(tmp_path), ['imagenet'])
    assert found['imagenet'] == str(root)
    part, = build_parts('imagenet', found['imagenet'], search=[str(tmp_path)])
    assert [(os.path.basename(p), t) for p, t in part.dataset.samples] == [
        (f'ILSVRC2012_val_{i:08d}.png', c) for i, c in labels.items()]
    assert part.real_labels is not None  # ReaL labels work on the flat names too
    model = ValueModel()
    model.set(10, {5: 1.0})
    model.set(20, {900: 1.0})
    summary, _, _ = _evaluate(model, part)
    assert summary['imagenet']['top1'] == pytest.approx(50.0)


@pytest.mark.parametrize('packed', [False, True])
def test_imagenet_val_flat_files_labelled_by_the_devkit(tmp_path, packed):
    import tarfile

    import scipy.io
    syn = imagenet_synsets()
    # ILSVRC2012 ids are not the sorted-wnid order: id 1 is the 3rd synset here, id 2 the 1st, ...
    order = [syn[2], syn[0], syn[999], syn[1]] + [s for s in syn if s not in (syn[0], syn[1], syn[2], syn[999])]
    synsets = np.zeros(len(order) + 1, dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'), ('num_children', 'O')])
    for i, w in enumerate(order):
        synsets[i] = (i + 1, w, 0)
    synsets[-1] = (1001, 'n00001740', 12)  # an inner node of the hierarchy, not a class
    devkit = tmp_path / 'ILSVRC2012_devkit_t12'
    (devkit / 'data').mkdir(parents=True)
    scipy.io.savemat(str(devkit / 'data' / 'meta.mat'), {'synsets': synsets})
    (devkit / 'data' / 'ILSVRC2012_validation_ground_truth.txt').write_text('1\n2\n3\n4\n')
    if packed:
        with tarfile.open(tmp_path / 'ILSVRC2012_devkit_t12.tar.gz', 'w:gz') as tar:
            tar.add(devkit, arcname='ILSVRC2012_devkit_t12')
        import shutil
        shutil.rmtree(devkit)
    root = tmp_path / 'ILSVRC2012_img_val'
    _flat_val(root)
    part, = build_parts('imagenet', str(root))
    assert [t for _, t in part.dataset.samples] == [2, 0, 999, 1]


def test_official_folder_names_are_found(tmp_path):
    syn = imagenet_synsets()
    _png(str(tmp_path / 'ImageNet-C' / 'fog' / '1' / syn[3] / 'x.png'), 1)  # RobustBench's name
    _png(str(tmp_path / 'ImageNetV2-matched-frequency' / '7' / 'x.png'), 1)
    _objectnet_tree(tmp_path / 'objectnet' / 'objectnet-1.0')  # the official zip's folder inside objectnet/
    found, missing = discover_sets(str(tmp_path))
    assert found['imagenet-c'] == str(tmp_path / 'ImageNet-C')
    assert found['imagenetv2-matched-frequency'] == str(tmp_path / 'ImageNetV2-matched-frequency')
    assert found['objectnet'] == str(tmp_path / 'objectnet' / 'objectnet-1.0')


def test_parts_know_their_official_size():
    from dr.evaluate.sets import SET_SPECS
    sizes = {n: s.official_size for n, s in SET_SPECS.items()}
    assert sizes == {'digits': 359, 'digits-c': 359, 'imagenet': 50000, 'imagenetv2-matched-frequency': 10000,
                     'imagenetv2-threshold0.7': 10000, 'imagenetv2-top-images': 10000, 'imagenet-a': 7500,
                     'imagenet-r': 30000, 'imagenet-sketch': 50889, 'objectnet': 18574, 'imagenet-c': 50000}
    part, = build_parts('digits', digits_size=16)
    assert part.expected_size == 359 and part.complete is True


def test_fingerprint_follows_the_files(tmp_path):
    syn = imagenet_synsets()
    root = tmp_path / 'imagenet-sketch'
    _png(str(root / syn[0] / 'a.png'), 1)
    _png(str(root / syn[1] / 'b.png'), 2)
    fp = build_parts('imagenet-sketch', str(root))[0].fingerprint
    assert build_parts('imagenet-sketch', str(root))[0].fingerprint == fp  # same files, same fingerprint
    _png(str(root / syn[1] / 'c.png'), 3)
    fp2 = build_parts('imagenet-sketch', str(root))[0].fingerprint
    assert fp2 != fp
    os.utime(root / syn[1] / 'c.png', ns=(1, 1))  # same names and sizes, another mtime
    assert build_parts('imagenet-sketch', str(root))[0].fingerprint not in (fp, fp2)
    a = build_parts('digits-c', corruptions=['contrast'], digits_size=16, seed=1)
    b = build_parts('digits-c', corruptions=['contrast'], digits_size=16, seed=2)
    assert a[0].fingerprint == b[0].fingerprint and a[1].fingerprint != b[1].fingerprint  # clean vs corrupted


def test_imagenet_c_center_crop_protocol(tmp_path):
    """ImageNet-C's images are fed center-cropped, without the resize of the model's eval transform."""
    syn = imagenet_synsets()
    path = tmp_path / 'imagenet-c'
    # 20-px image: 16-px center of value 90 inside a 2-px border of 250
    _png(str(path / 'fog' / '1' / syn[4] / 'x.png'), 90, size=20, border=250)
    crop, = build_parts('imagenet-c', str(path))
    resize, = build_parts('imagenet-c', str(path), imagenet_c_protocol='resize')
    assert crop.center_crop_only and crop.protocol == 'center-crop' and resize.protocol == 'resize'
    model = ValueModel()
    model.set(90, {4: 1.0})
    summary, _, _ = _evaluate(model, crop)
    assert summary['imagenet-c/fog/1']['top1'] == pytest.approx(100.0)  # the model saw exactly the center
    summary, _, _ = _evaluate(model, resize)
    assert summary['imagenet-c/fog/1']['top1'] == pytest.approx(0.0)  # resizing 20 -> 16 keeps the border
    with pytest.raises(ValueError, match='center-crop, resize'):
        build_parts('imagenet-c', str(path), imagenet_c_protocol='squash')
