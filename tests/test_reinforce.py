"""reinforce.py end to end on digits: layout, exact replay, determinism, resume after a kill, torchrun coverage,
--verify, --stats, bad inputs, recipes and image sources."""
import glob
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import reinforce
from dr.augment import create_augment_spec
from dr.data import DigitsDataset
from dr.rd_format import build_shard, densify, encode_records, iter_shard, load_meta, record_dtype
from dr.reinforced import (
    CRASH_ENV,
    PILSource,
    Reinforcer,
    compare_topk,
    create_source,
    rank_shards,
    replay,
    smooth_entropy,
)
from dr.teachers import create_teacher, parse_teacher_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES, N_SAMPLES, TOPK, SHARD = 24, 6, 3, 6


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    out = []
    for seed, name in ((0, 'test_resnet'), (1, 'test_efficientnet')):
        torch.manual_seed(seed)
        model = timm.create_model(name, num_classes=10)
        path = d / f'{name}.pth.tar'
        torch.save({'state_dict': model.state_dict()}, path)
        out.append(f'{name}={path}')
    return out


def _args(out, ckpts, *extra):
    return ['--dataset', 'digits', '--max-images', str(N_IMAGES), '--num-samples', str(N_SAMPLES),
            '--topk', str(TOPK), '--shard-size', str(SHARD), '--teacher', *ckpts, '--teacher-img-size', '16',
            '-b', '16', '-j', '0', '--device', 'cpu', '--no-progress', '--output', str(out), *extra]


def _shards(d):
    return {os.path.basename(p): open(p, 'rb').read() for p in sorted(glob.glob(os.path.join(d, '*.tar')))}


@pytest.fixture(scope='module')
def ref(tmp_path_factory, ckpts):
    out = tmp_path_factory.mktemp('ref') / 'rd'
    assert reinforce.main(_args(out, ckpts)) == 0
    return str(out)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    env.pop(CRASH_ENV, None)
    return env


def test_layout_and_metadata(ref):
    meta = load_meta(ref)
    assert sorted(_shards(ref)) == [f'{i:06d}.tar' for i in range(4)]
    assert meta['num_images'] == N_IMAGES and meta['num_samples'] == N_SAMPLES and meta['topk'] == TOPK
    assert meta['num_classes'] == 10 and meta['class_names'] == [str(i) for i in range(10)]
    assert [t['name'] for t in meta['teachers']] == ['test_resnet', 'test_efficientnet']
    assert meta['teachers'][0]['mean'] != meta['teachers'][1]['mean']  # each member keeps its own normalisation
    assert all(t['input_size'] == [3, 16, 16] for t in meta['teachers'])
    assert meta['augmentation']['name'] == 'rrc+ra_re' and len(meta['augmentation']['ra_ops']) == 14
    assert set(meta['versions']) >= {'torch', 'timm', 'numpy'}
    assert 0.0 <= meta['teacher_label_agreement'] <= 1.0
    ds = DigitsDataset('train')
    keys = []
    for s, entry in enumerate(meta['shards']):
        assert entry['count'] == SHARD
        samples = list(iter_shard(os.path.join(ref, entry['name']), entry['name']))
        keys += [x['key'] for x in samples]
        for j, x in enumerate(samples):
            i = s * SHARD + j  # shard s holds images [s * shard_size, (s + 1) * shard_size)
            assert x['image'] == ds.image_bytes(i) and x['image_ext'] == 'png' and x['label'] == ds.targets[i]
            rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
            assert rec.shape == (N_SAMPLES,)
            p = rec['probs'].astype(np.float32)
            assert (np.diff(p, axis=1) <= 0).all()  # sorted by descending probability
    assert keys == [ds.key(i) for i in range(N_IMAGES)]
    # the saved args reload through the real parser
    args, _ = reinforce.parse_args(['-c', os.path.join(ref, 'args.yaml')])
    assert args.num_samples == N_SAMPLES and args.teacher_img_size == 16


def test_exact_replay(ckpts, tmp_path):
    """replay() rebuilds bit for bit what each member saw (members at different resolutions and normalisations), and
    the teacher's fresh output on it matches the stored top-k within float16 tolerance."""
    teacher = create_teacher(ckpts, num_classes=10, img_size=16)
    teacher.member_cfgs[1]['input_size'] = [3, 20, 20]
    source = create_source('digits', max_images=8)
    writer = Reinforcer(source, teacher, create_augment_spec('rrc+ra_re', re_prob=0.5), str(tmp_path / 'rd'),
                        num_samples=5, topk=TOPK, seed=3, shard_size=8, num_classes=10, batch_size=7, workers=0,
                        progress=False, samples_per_item=3)
    writer.captured = []
    writer.run()
    meta = writer.merge(class_names=source.classes)
    seen = [torch.cat([batch[m] for batch in writer.captured]) for m in range(2)]
    assert seen[0].shape[-2:] == (16, 16) and seen[1].shape[-2:] == (20, 20)
    samples = list(iter_shard(str(tmp_path / 'rd' / '000000.tar'), 'shard 000000.tar'))
    erased = 0
    with torch.no_grad():
        for i, x in enumerate(samples):
            rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
            for a in range(len(rec)):
                inputs = [replay(x['image'], rec[a], meta, member=m) for m in range(2)]
                for m in range(2):
                    assert torch.equal(inputs[m], seen[m][i * 5 + a])
                erased += int(rec['flags'][a]) & 2 > 0
                fresh = teacher.forward_members([t.unsqueeze(0) for t in inputs])[0]
                assert compare_topk(fresh, rec['ids'][a], rec['probs'][a]) is None
                assert torch.equal(replay(Image.open(io.BytesIO(x['image'])), rec[a], meta, 1), inputs[1])
    assert erased > 0


def test_output_independent_of_loader_chunking(ref, ckpts, tmp_path):
    """Splitting an image's samples over several loader items (and a batch size that straddles them) gives the
    same shards as the CLI run."""
    teacher = create_teacher(ckpts, num_classes=10, img_size=16)
    writer = Reinforcer(create_source('digits', max_images=N_IMAGES), teacher, create_augment_spec('rrc+ra_re'),
                        str(tmp_path / 'rd'), num_samples=N_SAMPLES, topk=TOPK, seed=0, shard_size=SHARD,
                        num_classes=10, batch_size=16, workers=0, progress=False, samples_per_item=4)
    result = writer.run()
    assert result['shards_written'] == 4 and result['images'] == N_IMAGES
    assert _shards(tmp_path / 'rd') == _shards(ref)


def test_compare_topk_tolerance():
    fresh = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids, probs = np.array([0, 1], dtype=np.uint16), np.array([0.5, 0.3], dtype=np.float16)
    assert compare_topk(fresh, ids, probs) is None
    assert 'class 1' in compare_topk(fresh, ids, np.array([0.5, 0.25], dtype=np.float16))
    tie = torch.tensor([0.4, 0.4, 0.2])  # swapped ids of tied classes are fine
    assert compare_topk(tie, np.array([1, 0]), np.array([0.4, 0.4], dtype=np.float16)) is None


def test_determinism_workers_and_seed(ref, ckpts, tmp_path):
    assert reinforce.main(_args(tmp_path / 'j2', ckpts, '-j', '2')) == 0
    assert _shards(tmp_path / 'j2') == _shards(ref)  # same bytes with data-loader workers
    assert reinforce.main(_args(tmp_path / 's1', ckpts, '--seed', '1')) == 0
    other = _shards(tmp_path / 's1')
    assert sorted(other) == sorted(_shards(ref))
    assert all(other[n] != b for n, b in _shards(ref).items())
    a = np.load(io.BytesIO(next(iter_shard(str(tmp_path / 's1' / '000000.tar'), 'x'))['records']))
    b = np.load(io.BytesIO(next(iter_shard(os.path.join(ref, '000000.tar'), 'x'))['records']))
    assert not np.array_equal(a['crop'], b['crop'])


@pytest.mark.slow
def test_resume_after_kill(ref, ckpts, tmp_path):
    out = tmp_path / 'rd'
    env = dict(_env(), **{CRASH_ENV: '1'})  # die while writing the second shard (file renamed, sidecar not yet)
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'reinforce.py'), *_args(out, ckpts)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert (out / '000000.tar').exists() and (out / '.000000.json').exists()
    assert (out / '000001.tar').exists() and not (out / '.000001.json').exists()
    assert glob.glob(str(out / '.*.tmp')) and not (out / 'reinforce.json').exists()
    data = bytearray((out / '000000.tar').read_bytes())  # and a complete shard gets corrupted meanwhile
    data[len(data) // 2] ^= 0xFF
    (out / '000000.tar').write_bytes(bytes(data))
    assert reinforce.main(_args(out, ckpts)) == 0
    assert _shards(out) == _shards(ref)
    assert not glob.glob(str(out / '.*.tmp'))
    assert [s['sha256'] for s in load_meta(str(out))['shards']] == [s['sha256'] for s in load_meta(ref)['shards']]
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / '*.tar'))}
    assert reinforce.main(_args(out, ckpts)) == 0  # complete: nothing is rewritten
    assert stamps == {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / '*.tar'))}


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_cover_every_image_once(ref, ckpts, tmp_path):
    out = tmp_path / 'rd'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'reinforce.py'), *_args(out, ckpts)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [x['key'] for p in sorted(glob.glob(str(out / '*.tar'))) for x in iter_shard(p, p)]
    ds = DigitsDataset('train')
    assert sorted(keys) == sorted(ds.key(i) for i in range(N_IMAGES)) and len(set(keys)) == N_IMAGES
    assert _shards(out) == _shards(ref)  # identical to the single-process output
    assert load_meta(str(out))['num_images'] == N_IMAGES


def test_rank_assignment_covers_all_shards():
    for num_shards in (1, 5, 12):
        for world in (1, 2, 3, 8):
            parts = [rank_shards(num_shards, r, world) for r in range(world)]
            flat = sorted(s for p in parts for s in p)
            assert flat == list(range(num_shards))


def _rewrite_shard(d, name, mutate):
    """Rewrite a shard with mutated records and make reinforce.json agree (checksums consistent)."""
    path = os.path.join(d, name)
    samples = []
    for x in iter_shard(path, name):
        rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
        mutate(rec)
        samples.append({'key': x['key'], 'image_ext': x['image_ext'], 'image': x['image'], 'label': x['label'],
                        'records': encode_records(rec)})
    data = build_shard(samples)
    with open(path, 'wb') as f:
        f.write(data)
    meta_path = os.path.join(d, 'reinforce.json')
    meta = json.load(open(meta_path))
    import hashlib
    for s in meta['shards']:
        if s['name'] == name:
            s['sha256'], s['bytes'] = hashlib.sha256(data).hexdigest(), len(data)
    json.dump(meta, open(meta_path, 'w'))


def test_verify_reports_bad_shards_by_name(ref, tmp_path, capsys):
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    assert reinforce.main(['--verify', d]) == 0
    assert 'OK' in capsys.readouterr().out
    data = open(os.path.join(d, '000001.tar'), 'rb').read()
    open(os.path.join(d, '000001.tar'), 'wb').write(data[:len(data) // 3])  # truncated
    data = bytearray(open(os.path.join(d, '000002.tar'), 'rb').read())
    data[700] ^= 0x01  # tampered
    open(os.path.join(d, '000002.tar'), 'wb').write(bytes(data))

    def nan(rec):
        rec['probs'][2, 0] = np.nan

    _rewrite_shard(d, '000003.tar', nan)  # consistent checksum, invalid content
    assert reinforce.main(['--verify', d]) == 1
    out = capsys.readouterr().out
    bad = {line.split()[1].rstrip(':') for line in out.splitlines() if line.startswith('BAD')}
    assert bad == {'000001.tar', '000002.tar', '000003.tar'}
    assert 'non-finite' in out and 'sha256' in out and 'truncated' in out
    assert 'FAILED' in out and '000000.tar' not in out.split('FAILED')[1]


def test_verify_replays_through_the_teacher(ref, ckpts, tmp_path, capsys):
    assert reinforce.main(['--verify', ref, '--teacher', *ckpts, '--verify-samples', '10']) == 0
    assert '10 replays' in capsys.readouterr().out
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)

    def halve(rec):  # still a valid record, but not what the teacher said
        rec['probs'] = (rec['probs'].astype(np.float32) * 0.5).astype(np.float16)

    for n in ('000000.tar', '000001.tar', '000002.tar', '000003.tar'):
        _rewrite_shard(d, n, halve)
    assert reinforce.main(['--verify', d]) == 0  # integrity alone cannot see it
    capsys.readouterr()
    assert reinforce.main(['--verify', d, '--teacher', *ckpts, '--verify-samples', '4']) == 1
    assert 'replay mismatch' in capsys.readouterr().out
    assert reinforce.main(['--verify', ref, '--teacher', *ckpts[::-1]]) == 2
    assert 'does not match' in capsys.readouterr().err


def test_stats_and_bytes_per_augmentation(ref, capsys):
    assert reinforce.main(['--stats', ref]) == 0
    printed = capsys.readouterr().out
    stats = json.load(open(os.path.join(ref, 'stats.json')))
    assert 'bytes_per_augmentation' in printed
    correct = images = agree = 0
    mass, ent, image_bytes = [], [], 0
    for p in sorted(glob.glob(os.path.join(ref, '*.tar'))):
        with tarfile.open(p) as tar:
            members = tar.getmembers()
            for m in members:
                if m.name.endswith('.png'):
                    image_bytes += m.size
        for x in iter_shard(p, p):
            rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
            correct += int((rec['ids'][:, 0] == x['label']).sum())
            mass += rec['probs'].astype(np.float64).sum(1).tolist()
            dense = densify(rec['ids'], rec['probs'], 10, 'smooth').double()
            ent += (-(dense * dense.clamp_min(1e-300).log()).sum(1)).tolist()
            agree += int(dense.mean(0).argmax()) == x['label']
            images += 1
    n_aug = images * N_SAMPLES
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ref, '*.tar')))
    assert stats['augmentations'] == n_aug and stats['num_images'] == N_IMAGES
    assert stats['teacher_accuracy'] == pytest.approx(correct / n_aug)
    assert stats['mean_topk_mass'] == pytest.approx(np.mean(mass))
    assert stats['mean_entropy'] == pytest.approx(np.mean(ent), rel=1e-5)
    assert stats['label_agreement'] == pytest.approx(agree / images)
    bpa = (total - image_bytes) / (N_IMAGES * N_SAMPLES)
    assert stats['bytes_per_augmentation'] == pytest.approx(bpa)
    assert load_meta(ref)['bytes_per_augmentation'] == pytest.approx(bpa)
    # the figure is the record payload plus the per-image tar/npy overhead amortised over the stored samples:
    # 3 member headers + padding of the cls/npy members + the npy header, and the end-of-archive blocks per shard
    item = record_dtype(TOPK, 10, 'rrc+ra_re').itemsize
    assert stats['record_bytes_per_augmentation'] == item
    per_image_max = 3 * 512 + 2 * 511 + 512 + 511  # headers, cls + npy padding, npy header, image padding
    per_shard_max = 10240 + 1024
    assert item < bpa <= item + (per_image_max + per_shard_max / SHARD) / N_SAMPLES


def test_smooth_entropy_matches_densify():
    rng = np.random.default_rng(0)
    p = np.sort(rng.dirichlet(np.ones(7), size=20)[:, :3], axis=1)[:, ::-1].astype(np.float16)
    ids = np.tile(np.arange(3), (20, 1))
    dense = densify(ids, p, 7).double()
    ref = -(dense * dense.clamp_min(1e-300).log()).sum(1)
    assert np.allclose(smooth_entropy(p, 7), ref.numpy(), rtol=1e-5)


def test_bad_inputs(ref, ckpts, tmp_path, capsys):
    assert reinforce.main(_args(tmp_path / 'a', ['resnet_nope_xyz'])) == 2
    err = capsys.readouterr().err
    assert '--teacher' in err and 'resnet_nope_xyz' in err
    assert reinforce.main(_args(tmp_path / 'b', ckpts, '--topk', '11')) == 2
    assert '--topk 11' in capsys.readouterr().err
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    assert reinforce.main(_args(d, ckpts, '--seed', '5')) == 2
    err = capsys.readouterr().err
    assert '--output' in err and 'different configuration' in err and 'seed: 0 != 5' in err
    assert 'reinforce.json' in err or '.000000.json' in err
    assert _shards(d) == _shards(ref)  # nothing was touched
    path = ckpts[0].split('=', 1)[1]
    assert reinforce.main(_args(tmp_path / 'c', [f'test_resnet={path}'], '--num-classes', '12')) == 2
    err = capsys.readouterr().err
    assert path in err and '10 classes' in err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('num_samples: 3\nnum_sample: 4\n')
    with pytest.raises(SystemExit):
        reinforce.parse_args(['-c', str(bad)])
    assert 'num_sample' in capsys.readouterr().err
    assert reinforce.main(['--dataset', 'digits', '--teacher', *ckpts]) == 2
    assert '--output is required' in capsys.readouterr().err


RECIPES = {
    'imagenet_plus.yaml': (400, 10, 'rrc+ra_re'),
    'imagenet_plus_rrc.yaml': (400, 10, 'rrc'),
    'imagenet_plus_small.yaml': (100, 5, 'rrc+ra_re'),
    'cifar100_plus.yaml': (800, 10, 'rrc+ra_re'),
    'flowers102_plus.yaml': (8000, 10, 'rrc+ra_re'),
    'food101_plus.yaml': (800, 10, 'rrc+ra_re'),
}
IG_ENSEMBLE = [f'resnext101_32x{w}d.fb_wsl_ig1b_ft_in1k' for w in (8, 16, 32, 48)]


def test_recipes_load_through_the_parser():
    folder = os.path.join(REPO, 'hparams', 'dr', 'reinforce')
    assert sorted(os.listdir(folder)) == sorted(RECIPES)
    for name, (num_samples, topk, aug) in RECIPES.items():
        path = os.path.join(folder, name)
        args, _ = reinforce.parse_args(['-c', path])
        assert (args.num_samples, args.topk, args.aug) == (num_samples, topk, aug), name
        assert open(path).readline().startswith('#')  # commented with what it reproduces
        names = [parse_teacher_spec(t)[0] for t in args.teacher]
        assert len(names) == 4
        if name.startswith('imagenet'):
            assert names == IG_ENSEMBLE and args.pretrained and args.num_classes == 1000
        else:
            assert all(parse_teacher_spec(t)[1] for t in args.teacher)  # fine-tuned local checkpoints


def _folder_dataset(root):
    rng = np.random.default_rng(0)
    files = []
    for c, cls in enumerate(('cat', 'dog')):
        os.makedirs(os.path.join(root, cls))
        for j, ext in enumerate(('png', 'JPEG')):
            arr = rng.integers(0, 255, size=(20 + 3 * j, 24, 3), dtype=np.uint8)
            path = os.path.join(root, cls, f'img.{j}.{ext}')
            Image.fromarray(arr).save(path, format='PNG' if ext == 'png' else 'JPEG')
            files.append((path, c))
    return files


def test_folder_source_keeps_original_bytes(ckpts, tmp_path):
    root = str(tmp_path / 'folder')
    files = _folder_dataset(root)
    source = create_source('', root=root)
    assert source.classes == ['cat', 'dog'] and len(source) == 4 and not source.stores_png
    got = {source.get(i).data: source.get(i) for i in range(4)}
    for path, label in files:
        item = got[open(path, 'rb').read()]
        assert item.label == label and item.ext == os.path.splitext(path)[1][1:].lower()
        assert '.' not in item.key
    out = tmp_path / 'rd'
    args = ['' if a == 'digits' else a
            for a in _args(out, ckpts, '--num-samples', '2', '--max-images', '0', '--num-classes', '10')]
    assert reinforce.main([root, *args]) == 0
    stored = [x for p in sorted(glob.glob(str(out / '*.tar'))) for x in iter_shard(p, p)]
    assert sorted(x['image'] for x in stored) == sorted(open(p, 'rb').read() for p, _ in files)
    assert sorted(x['image_ext'] for x in stored) == ['jpeg', 'jpeg', 'png', 'png']


def test_wds_source_reads_existing_shards(tmp_path):
    root = tmp_path / 'wds'
    root.mkdir()
    expected = []
    for s in range(2):
        with tarfile.open(root / f'data-{s:04d}.tar', 'w') as tar:
            for j in range(3):
                img = io.BytesIO()
                Image.new('RGB', (9 + j, 7), (s * 40, j * 30, 5)).save(img, format='PNG')
                for ext, payload in (('png', img.getvalue()), ('cls', str(s + j).encode())):
                    info = tarfile.TarInfo(f'k{s}_{j}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                expected.append((img.getvalue(), s + j))
    source = create_source('wds/mine', root=str(root), split='data-{0000..0001}.tar|6')
    assert len(source) == 6
    got = [source.get(i) for i in range(6)]
    assert [(g.data, g.label) for g in got] == expected and all(g.ext == 'png' for g in got)


def test_pil_source_encodes_png():
    class Tiny(torch.utils.data.Dataset):
        classes = ['a', 'b']

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Image.new('RGB', (5, 4), (i * 100, 3, 7)), i

    source = PILSource(Tiny(), 'torch/tiny')
    item = source.get(1)
    assert item.ext == 'png' and item.label == 1 and source.stores_png
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(item.data))), np.asarray(Tiny()[1][0]))


def test_num_shards_and_ranges(ckpts):
    teacher = create_teacher(ckpts[:1], num_classes=10, img_size=16)
    w = Reinforcer(create_source('digits', max_images=13), teacher, create_augment_spec('rrc'), '/nonexistent',
                   num_samples=2, topk=2, seed=0, shard_size=5, num_classes=10, progress=False)
    assert w.num_shards == math.ceil(13 / 5) and [w.shard_range(s) for s in range(3)] == [(0, 5), (5, 10), (10, 13)]
    with pytest.raises(ValueError, match='--topk 11'):
        Reinforcer(create_source('digits', max_images=3), teacher, create_augment_spec('rrc'), '/x',
                   num_samples=2, topk=11, seed=0, shard_size=5, num_classes=10)
    assert yaml.safe_load(yaml.safe_dump(w.content_config()))['topk'] == 2
