"""Importing the published ml-dr reinforcements: restricted unpickling, config and parameter conversion, and the
replay of every stored sample of the shared fixture against the authors' own replay (``expected.npz``)."""
import io
import json
import os
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dr.reinforce.augment import apply_record
from dr.reinforce.format import record_dtype
from dr.reinforce.importers.mldr import (
    MldrFormatError,
    convert_image,
    imagefolder_index,
    iter_rdata,
    load_torch_save,
    parse_config,
)
from tests import helpers

SHARED = helpers.shared_dir()
FIXTURE = os.path.join(SHARED, 'fixtures', 'ml-dr') if SHARED else None
VARIANTS = ('rrc', 'rrc_ra_re', 'rrc_mix', 'rrc_ra_re_mix')
needs_fixture = pytest.mark.skipif(
    FIXTURE is None or not os.path.isdir(FIXTURE),
    reason='ml-dr fixture not found: set DR_SHARED or place the shared material at <repo>/../shared or <repo>/shared')


def _torch_zip(obj_pickle: bytes, name: str = 'x') -> bytes:
    """A torch.save-style zip archive around raw pickle bytes (as torch writes it: <name>/data.pkl + records)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        z.writestr(f'{name}/data.pkl', obj_pickle)
        z.writestr(f'{name}/byteorder', 'little')
        z.writestr(f'{name}/version', '3\n')
    return buf.getvalue()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')  # would create a file if the pickle were loaded for real


# ----------------------------------------------------------------------------------------------------------------------
# restricted unpickling


def test_plain_containers_and_numpy_scalars_load():
    obj = (3, [{'params': [np.int64(7), (1, 2, 3, 4), [True, None], -0.5], 'prob': ([0.1, 0.2], [4, 1])}],
           {'f': np.float32(0.25), 'u': np.uint8(200), 'b': np.bool_(True)})
    for data in (_torch_zip(pickle.dumps(obj, protocol=4)), _legacy_torch_save(obj)):
        out = load_torch_save(data, 'f.pth.tar')
        assert out[1][0]['params'][0] == 7 and type(out[1][0]['params'][0]) is int
        assert out[2] == {'f': 0.25, 'u': 200, 'b': True}


def _legacy_torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False, pickle_protocol=4)
    return buf.getvalue()


def test_any_other_global_is_refused_and_not_executed(tmp_path):
    target = tmp_path / 'pwned'
    data = _torch_zip(pickle.dumps([1, _Evil(str(target))], protocol=4))
    with pytest.raises(MldrFormatError, match=r'17\.pth\.tar: refusing to unpickle global (io|builtins)\.open'):
        load_torch_save(data, '17.pth.tar')
    assert not target.exists()


@pytest.mark.parametrize('obj', [np.arange(3), np.array(['a'], dtype=object)[0:1], torch.zeros(2)])
def test_arrays_tensors_and_object_scalars_are_refused(obj):
    buf = io.BytesIO()
    torch.save([obj], buf)
    with pytest.raises(MldrFormatError, match='5.pth.tar: refusing'):
        load_torch_save(buf.getvalue(), '5.pth.tar')


def test_object_dtype_scalar_is_refused():
    bad = pickle.dumps(np.float64(1.0), protocol=4).replace(b'f8', b'O8')
    with pytest.raises(MldrFormatError, match='not a plain number type'):
        load_torch_save(_torch_zip(bad), '9.pth.tar')


def test_garbage_is_a_clear_error():
    with pytest.raises(MldrFormatError, match='3.pth.tar: not a torch.save file|3.pth.tar: unreadable'):
        load_torch_save(b'\x80\x04garbage', '3.pth.tar')
    with pytest.raises(MldrFormatError, match='4.pth.tar: unreadable'):
        load_torch_save(_torch_zip(pickle.dumps([1, 2], protocol=4))[:60], '4.pth.tar')


@needs_fixture
def test_weights_only_load_refuses_the_published_format():
    """Why a restricted unpickler is needed at all: torch's safe loader cannot read these files."""
    items = list(iter_rdata(os.path.join(FIXTURE, 'rrc_ra_re_mix', 'reinforced_data.tar.gz')))[1:]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(items[0][2]), weights_only=True)
    assert load_torch_save(items[0][2], items[0][1])[1]


# ----------------------------------------------------------------------------------------------------------------------
# reading and converting the fixture


def _read_variant(variant, source=None):
    source = source or os.path.join(FIXTURE, variant, 'reinforced_data.tar.gz')
    it = iter_rdata(source)
    kind, where, data = next(it)
    assert kind == 'config'
    cfg = parse_config(load_torch_save(data, where), where)
    return cfg, [(w, load_torch_save(d, w)) for k, w, d in it]


@needs_fixture
@pytest.mark.parametrize('variant', VARIANTS)
def test_config_maps_to_the_project_spec(variant):
    cfg, items = _read_variant(variant)
    assert cfg.spec.name == {'rrc': 'rrc', 'rrc_ra_re': 'rrc+ra_re', 'rrc_mix': 'rrc+mix',
                             'rrc_ra_re_mix': 'rrc+ra_re+mix'}[variant]
    assert cfg.out_size == (32, 32) and cfg.num_samples == 6 and cfg.topk == 5 and len(items) == 30
    assert cfg.spec.re_fill == 'black' and cfg.spec.mix_group == 0
    if cfg.spec.has_mix:
        assert (cfg.spec.mixup_p, cfg.spec.mixup_div_by, cfg.spec.cutmix_p) == (0.5, 2.0, 0.5)
    if cfg.spec.has_ra_re:
        assert (cfg.spec.ra_num_ops, cfg.spec.ra_magnitude, cfg.spec.re_prob) == (2, 9, 0.25)


@needs_fixture
def test_directory_and_tarball_read_alike(tmp_path):
    with tarfile.open(os.path.join(FIXTURE, 'rrc_mix', 'reinforced_data.tar.gz')) as tar:
        tar.extractall(tmp_path, filter='data')
    a = _read_variant('rrc_mix')
    b = _read_variant('rrc_mix', str(tmp_path))
    assert a[0] == b[0]
    assert sorted((o for _, o in a[1]), key=lambda o: o[0]) == sorted((o for _, o in b[1]), key=lambda o: o[0])


def _convert(variant):
    cfg, items = _read_variant(variant)
    samples, classes = imagefolder_index(os.path.join(FIXTURE, 'images'))
    dtype = record_dtype(cfg.topk, len(classes), cfg.spec.name)
    recs = {}
    for where, obj in items:
        index, rec = convert_image(obj, where, cfg, dtype, len(classes), len(samples), lambda j: j)
        recs[index] = rec
    return cfg, samples, recs


@needs_fixture
@pytest.mark.parametrize('variant', VARIANTS)
def test_probabilities_sorted_descending_with_their_ids(variant):
    cfg, _, recs = _convert(variant)
    with open(os.path.join(FIXTURE, variant, 'expected_params.json')) as f:
        expected = json.load(f)
    for key, entry in expected.items():
        index, k = (int(v) for v in key.split('_'))
        row = recs[index][k]
        probs = row['probs'].astype(np.float32)
        assert (np.diff(probs) <= 0).all()
        ref = dict(zip((int(i) for i in entry['prob'][1]), entry['prob'][0]))
        assert {int(i): p for i, p in zip(row['ids'], probs)} == pytest.approx(ref, rel=1e-3)


@needs_fixture
@pytest.mark.parametrize('variant', VARIANTS)
def test_conversion_replays_the_authors_samples(variant):
    cfg, samples, recs = _convert(variant)
    images = [Image.open(p).convert('RGB') for p, _ in samples]
    expected = np.load(os.path.join(FIXTURE, variant, 'expected.npz'))
    std = torch.tensor(cfg.std).view(3, 1, 1)
    diffs = []
    for key in expected.files:
        index, k = (int(v) for v in key.split('_'))
        row = recs[index][k]
        partner = images[int(row['mix_ref'])] if cfg.spec.has_mix else None
        x = apply_record(images[index], row, cfg.spec, cfg.out_size, cfg.mean, cfg.std, partner=partner)
        diffs.append(float(((x - torch.from_numpy(expected[key])).abs() * std).max()))
    diffs = np.array(diffs)
    assert len(diffs) == 180
    assert diffs.max() <= 1e-5  # exact up to the float32 mixup lambda (target: <= 1/255 for >= 99% of samples)


# ----------------------------------------------------------------------------------------------------------------------
# errors naming the file


@needs_fixture
def test_magnitude_outside_the_table_names_file_and_sample():
    cfg, items = _read_variant('rrc_ra_re')
    where, (index, samples) = items[0]
    samples[2]['params'][2][0] = (5, 3.14159)  # Rotate by an angle not in the magnitude table
    dtype = record_dtype(cfg.topk, 10, cfg.spec.name)
    with pytest.raises(MldrFormatError, match=rf'{where} sample 2: RandAugment Rotate magnitude 3.14159'):
        convert_image((index, samples), where, cfg, dtype, 10, 30, lambda j: j)


@needs_fixture
def test_index_outside_the_folder_and_bad_ids_are_errors():
    cfg, items = _read_variant('rrc')
    where, (index, samples) = items[0]
    dtype = record_dtype(cfg.topk, 10, cfg.spec.name)
    with pytest.raises(MldrFormatError, match=f'{where}: image index {index} outside the image folder'):
        convert_image((index, samples), where, cfg, dtype, 10, index, lambda j: j)
    samples[0]['prob'] = (samples[0]['prob'][0], [1, 1, 2, 3, 4])
    with pytest.raises(MldrFormatError, match=f'{where} sample 0: class ids'):
        convert_image((index, samples), where, cfg, dtype, 10, 30, lambda j: j)


def test_unsupported_configs_are_refused():
    cifar = {'reinforce': {'num_samples': 2, 'topk': 3, 'image_augmentation': {
        'uint8': {'enable': True}, 'resize': {'size': 224}, 'random_crop': {'size': 224, 'padding': 16},
        'to_tensor': {}, 'normalize': {'mean': [0.5] * 3, 'std': [0.2] * 3}}}}
    with pytest.raises(MldrFormatError, match='c.pth.tar: transform.*resize, random_crop'):
        parse_config(cifar, 'c.pth.tar')
    aug = {'random_resized_crop': {'size': 32}, 'rand_augment': {'num_ops': 3},
           'normalize': {'mean': [0.5] * 3, 'std': [0.2] * 3}}
    with pytest.raises(MldrFormatError, match='num_ops=3'):
        parse_config({'reinforce': {'num_samples': 2, 'topk': 3, 'image_augmentation': aug}}, 'c.pth.tar')
    with pytest.raises(MldrFormatError, match='not an ml-dr reinforcement config'):
        parse_config({'teacher': {}}, 'c.pth.tar')


@needs_fixture
def test_archive_without_config_is_an_error(tmp_path):
    src = tmp_path / 'src' / 'reinforced_data'
    with tarfile.open(os.path.join(FIXTURE, 'rrc', 'reinforced_data.tar.gz')) as tar:
        tar.extractall(tmp_path / 'src', filter='data')
    os.unlink(src / 'config.pth.tar')
    with tarfile.open(tmp_path / 'bad.tar.gz', 'w:gz') as tar:
        tar.add(src, arcname='reinforced_data')
    with pytest.raises(MldrFormatError, match='no config.pth.tar'):
        list(iter_rdata(str(tmp_path / 'bad.tar.gz')))
    with pytest.raises(MldrFormatError, match='no config.pth.tar'):
        list(iter_rdata(str(tmp_path / 'src')))
    shutil.rmtree(tmp_path / 'src')


# ----------------------------------------------------------------------------------------------------------------------
# reinforce.py --import-ml-dr and --show end to end


def _import(rdata, out, *extra, images=None):
    import reinforce
    images = images or os.path.join(FIXTURE, 'images')
    return reinforce.main(['--import-ml-dr', str(rdata), '--data-dir', str(images), '--output', str(out),
                           '--shard-size', '8', '-j', '0', '--no-progress', *extra])


@needs_fixture
@pytest.mark.parametrize('variant', VARIANTS)
def test_import_then_show_replays_what_the_authors_students_saw(variant, tmp_path, capsys):
    """Every stored sample, imported from the streamed tarball and replayed by --show (the training loader's code
    path), against ml-dr's own replay. The differences are reported in the test output."""
    import reinforce
    out = tmp_path / 'rd'
    assert _import(os.path.join(FIXTURE, variant, 'reinforced_data.tar.gz'), out) == 0
    npz = tmp_path / 'show.npz'
    assert reinforce.main(['--show', str(out), '--images', *map(str, range(30)), '--samples', *map(str, range(6)),
                           '--save-npz', str(npz)]) == 0
    ours, expected = np.load(npz), np.load(os.path.join(FIXTURE, variant, 'expected.npz'))
    assert sorted(ours.files) == sorted(expected.files)
    std = np.asarray((0.229, 0.224, 0.225), dtype=np.float32).reshape(3, 1, 1)
    diffs = np.array([float((np.abs(ours[k] - expected[k]) * std).max()) for k in expected.files])
    within = float((diffs <= 1 / 255).mean())
    with capsys.disabled():
        print(f'\n[ml-dr replay] {variant}: {len(diffs)} samples, max |diff| {diffs.max():.3g} '
              f'({diffs.max() * 255:.3g}/255) after undoing the normalisation, {within:.1%} within 1/255')
    assert within >= 0.99 and diffs.max() <= 1e-5
    meta = json.loads((out / 'reinforce.json').read_text())
    assert meta['schema_version'] == 2 and meta['augmentation']['re_fill'] == 'black'
    assert meta['imported_from']['format'] == 'ml-dr' and meta['num_images'] == 30
    assert reinforce.main(['--verify', str(out)]) == 0  # checksums, sidecars, config copy: a regular dataset


@needs_fixture
def test_import_directory_equals_tarball_and_reruns_resume(tmp_path, capsys):
    with tarfile.open(os.path.join(FIXTURE, 'rrc_ra_re_mix', 'reinforced_data.tar.gz')) as tar:
        tar.extractall(tmp_path / 'x', filter='data')
    assert _import(os.path.join(FIXTURE, 'rrc_ra_re_mix', 'reinforced_data.tar.gz'), tmp_path / 'a') == 0
    assert _import(tmp_path / 'x' / 'reinforced_data', tmp_path / 'b', '-j', '2') == 0  # converter processes
    shards = sorted(p.name for p in (tmp_path / 'a').glob('*.tar'))
    assert len(shards) == 4 and not (tmp_path / 'a' / '.mldr_import').exists()
    for name in shards:
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    # shards mix classes (ImageFolder order is sorted by class)
    with tarfile.open(tmp_path / 'a' / shards[0]) as tar:
        labels = {int(tar.extractfile(m).read()) for m in tar if m.name.endswith('.cls')}
    assert len(labels) > 3
    before = (tmp_path / 'a' / shards[1]).read_bytes()
    os.unlink(tmp_path / 'a' / shards[1])
    assert _import(os.path.join(FIXTURE, 'rrc_ra_re_mix', 'reinforced_data.tar.gz'), tmp_path / 'a') == 0
    assert (tmp_path / 'a' / shards[1]).read_bytes() == before
    # another configuration into the same output is refused, and nothing there is touched
    assert _import(os.path.join(FIXTURE, 'rrc', 'reinforced_data.tar.gz'), tmp_path / 'a') == 2
    assert (tmp_path / 'a' / shards[1]).read_bytes() == before
    assert 'holds shards from a different configuration' in capsys.readouterr().err


@needs_fixture
def test_import_size_mismatch_and_resized_images_are_clear_errors(tmp_path, capsys):
    images = tmp_path / 'images'
    shutil.copytree(os.path.join(FIXTURE, 'images'), images)
    last = (images / '9' / '0029.png').read_bytes()
    os.unlink(images / '9' / '0029.png')  # the folder's last image (index 29)
    rdata = os.path.join(FIXTURE, 'rrc', 'reinforced_data.tar.gz')
    assert _import(rdata, tmp_path / 'a', images=images) == 2
    assert 'image index 29 outside the image folder (0..28): --data-dir holds 29 images' in capsys.readouterr().err
    (images / '9' / '0029.png').write_bytes(last)
    Image.new('RGB', (40, 40)).save(images / '9' / '0039.png')  # one image more than the reinforcements
    assert _import(rdata, tmp_path / 'b', images=images) == 2
    assert 'holds 30 images but --data-dir holds 31; missing indices [30]' in capsys.readouterr().err
    os.unlink(images / '9' / '0039.png')
    for p in images.glob('*/*.png'):  # a resized copy of the dataset
        Image.open(p).resize((20, 20)).save(p)
    assert _import(rdata, tmp_path / 'c', images=images) == 2
    err = capsys.readouterr().err
    assert 'does not fit the image of size 20x20' in err and '.pth.tar: image' in err


@needs_fixture
def test_import_refuses_a_malicious_file_naming_it(tmp_path, capsys):
    src = tmp_path / 'rdata'
    with tarfile.open(os.path.join(FIXTURE, 'rrc', 'reinforced_data.tar.gz')) as tar:
        tar.extractall(src, filter='data')
    target = tmp_path / 'pwned'
    (src / 'reinforced_data' / '7.pth.tar').write_bytes(_torch_zip(pickle.dumps((7, [_Evil(str(target))]),
                                                                                protocol=4)))
    with tarfile.open(tmp_path / 'evil.tar.gz', 'w:gz') as tar:
        tar.add(src / 'reinforced_data', arcname='reinforced_data')
    assert _import(tmp_path / 'evil.tar.gz', tmp_path / 'out') == 2
    err = capsys.readouterr().err
    assert 'reinforced_data/7.pth.tar: refusing to unpickle global' in err
    assert not target.exists() and not list((tmp_path / 'out').glob('*.tar'))


@needs_fixture
def test_show_png_and_bad_indices(tmp_path, capsys):
    import reinforce
    out = tmp_path / 'rd'
    assert _import(os.path.join(FIXTURE, 'rrc_ra_re_mix', 'reinforced_data.tar.gz'), out) == 0
    png = tmp_path / 'show.png'
    assert reinforce.main(['--show', str(out), '--images', '3', '17', '--samples', '0', '5', '--save-png',
                           str(png)]) == 0
    text = capsys.readouterr().out
    assert '3_0: label 1, top-3' in text and '17_5: label 5, top-3' in text  # ImageFolder: 3 per class
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.width > 200
    assert reinforce.main(['--show', str(out), '--images', '30']) == 2
    assert '--images: 30 outside the dataset (0..29)' in capsys.readouterr().err
    assert reinforce.main(['--show', str(out), '--samples', '6']) == 2
    assert '--samples: 6 outside 0..5' in capsys.readouterr().err
