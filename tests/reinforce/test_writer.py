"""reinforce.py end to end on digits: layout, exact replay, determinism, resume after a kill, torchrun coverage,
bad inputs and recipes."""
import glob
import io
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import reinforce
from dr.data import DigitsDataset
from dr.reinforce.augment import create_augment_spec, replay
from dr.reinforce.format import image_order, iter_shard, load_meta, meta_image_order, sample_checksum
from dr.reinforce.sources import create_source
from dr.reinforce.teachers import create_teacher, parse_teacher_spec
from dr.reinforce.verify import compare_topk
from dr.reinforce.writer import CRASH_ENV, Reinforcer, rank_shards
from tests.helpers import REPO
from tests.reinforce.common import N_IMAGES, N_SAMPLES, SHARD, TOPK, reinforce_args, shard_bytes, subprocess_env

pytestmark = pytest.mark.usefixtures('one_thread')

RECIPES = {
    'imagenet_plus.yaml': (400, 10, 'rrc+ra_re'),
    'imagenet_plus_rrc.yaml': (400, 10, 'rrc'),
    'imagenet_plus_small.yaml': (100, 5, 'rrc+ra_re'),
    'imagenet_plus_mixing.yaml': (400, 10, 'rrc+mix'),
    'imagenet_plus_mixing_randaug.yaml': (400, 10, 'rrc+ra_re+mix'),
    'cifar100_plus.yaml': (800, 10, 'rrc+ra_re'),
    'flowers102_plus.yaml': (8000, 10, 'rrc+ra_re'),
    'food101_plus.yaml': (800, 10, 'rrc+ra_re'),
}

IG_ENSEMBLE = [f'resnext101_32x{w}d.fb_wsl_ig1b_ft_in1k' for w in (8, 16, 32, 48)]


def test_layout_and_metadata(ref):
    meta = load_meta(ref)
    assert sorted(shard_bytes(ref)) == [f'{i:06d}.tar' for i in range(4)]
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
    # the images are written in a seeded permutation of the dataset order, recorded in reinforce.json
    assert meta['image_order'] == {'kind': 'permutation', 'seed': 0} == meta['config']['image_order']
    order = image_order(N_IMAGES, 0)
    assert sorted(order.tolist()) == list(range(N_IMAGES)) and order.tolist() != list(range(N_IMAGES))
    assert np.array_equal(meta_image_order(meta), order)
    for s, entry in enumerate(meta['shards']):
        assert entry['count'] == SHARD
        samples = list(iter_shard(os.path.join(ref, entry['name']), entry['name']))
        keys += [x['key'] for x in samples]
        for j, x in enumerate(samples):
            i = int(order[s * SHARD + j])  # shard s holds positions [s * shard_size, (s + 1) * shard_size)
            assert x['info']['index'] == i  # each sample names its dataset index (schema 2)
            assert x['image'] == ds.image_bytes(i) and x['image_ext'] == 'png' and x['label'] == ds.targets[i]
            assert x['info']['xxh3'] == sample_checksum(entry['name'], j, x['key'], i, {
                'png': x['image'], 'cls': str(x['label']).encode(), 'rd.npy': x['records']})
            rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
            assert rec.shape == (N_SAMPLES,)
            p = rec['probs'].astype(np.float32)
            assert (np.diff(p, axis=1) <= 0).all()  # sorted by descending probability
    assert keys == [ds.key(int(i)) for i in order]
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
    writer.batcher.captured = []
    writer.run()
    meta = writer.merge(class_names=source.classes)
    seen = [torch.cat([batch[m] for batch in writer.batcher.captured]) for m in range(2)]
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
    assert shard_bytes(tmp_path / 'rd') == shard_bytes(ref)


def test_determinism_workers_and_seed(ref, ckpts, tmp_path):
    assert reinforce.main(reinforce_args(tmp_path / 'j2', ckpts, '-j', '2')) == 0
    assert shard_bytes(tmp_path / 'j2') == shard_bytes(ref)  # same bytes with data-loader workers
    assert reinforce.main(reinforce_args(tmp_path / 's1', ckpts, '--seed', '1')) == 0
    other = shard_bytes(tmp_path / 's1')
    assert sorted(other) == sorted(shard_bytes(ref))
    assert all(other[n] != b for n, b in shard_bytes(ref).items())
    a = np.load(io.BytesIO(next(iter_shard(str(tmp_path / 's1' / '000000.tar'), 'x'))['records']))
    b = np.load(io.BytesIO(next(iter_shard(os.path.join(ref, '000000.tar'), 'x'))['records']))
    assert not np.array_equal(a['crop'], b['crop'])


@pytest.mark.slow
def test_resume_after_kill(ref, ckpts, tmp_path):
    out = tmp_path / 'rd'
    env = dict(subprocess_env(), **{CRASH_ENV: '1'})  # die writing shard 2 (renamed, no sidecar yet)
    cmd = [sys.executable, os.path.join(REPO, 'reinforce.py'), *reinforce_args(out, ckpts)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert (out / '000000.tar').exists() and (out / '.000000.json').exists()
    assert (out / '000001.tar').exists() and not (out / '.000001.json').exists()
    assert glob.glob(str(out / '.*.tmp')) and not (out / 'reinforce.json').exists()
    data = bytearray((out / '000000.tar').read_bytes())  # and a complete shard gets corrupted meanwhile
    data[len(data) // 2] ^= 0xFF
    (out / '000000.tar').write_bytes(bytes(data))
    assert reinforce.main(reinforce_args(out, ckpts)) == 0
    assert shard_bytes(out) == shard_bytes(ref)
    assert not glob.glob(str(out / '.*.tmp'))
    assert [s['sha256'] for s in load_meta(str(out))['shards']] == [s['sha256'] for s in load_meta(ref)['shards']]
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / '*.tar'))}
    assert reinforce.main(reinforce_args(out, ckpts)) == 0  # complete: nothing is rewritten
    assert stamps == {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / '*.tar'))}


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_cover_every_image_once(ref, ckpts, tmp_path):
    out = tmp_path / 'rd'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'reinforce.py'), *reinforce_args(out, ckpts)]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [x['key'] for p in sorted(glob.glob(str(out / '*.tar'))) for x in iter_shard(p, p)]
    ds = DigitsDataset('train')
    assert sorted(keys) == sorted(ds.key(i) for i in range(N_IMAGES)) and len(set(keys)) == N_IMAGES
    assert shard_bytes(out) == shard_bytes(ref)  # identical to the single-process output
    assert load_meta(str(out))['num_images'] == N_IMAGES


def test_rank_assignment_covers_all_shards():
    for num_shards in (1, 5, 12):
        for world in (1, 2, 3, 8):
            parts = [rank_shards(num_shards, r, world) for r in range(world)]
            flat = sorted(s for p in parts for s in p)
            assert flat == list(range(num_shards))


def test_bad_inputs(ref, ckpts, tmp_path, capsys):
    assert reinforce.main(reinforce_args(tmp_path / 'a', ['resnet_nope_xyz'])) == 2
    err = capsys.readouterr().err
    assert '--teacher' in err and 'resnet_nope_xyz' in err
    assert reinforce.main(reinforce_args(tmp_path / 'b', ckpts, '--topk', '11')) == 2
    assert '--topk 11' in capsys.readouterr().err
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    assert reinforce.main(reinforce_args(d, ckpts, '--seed', '5')) == 2
    err = capsys.readouterr().err
    assert '--output' in err and 'different configuration' in err and 'seed: 0 != 5' in err
    assert 'reinforce.json' in err or '.000000.json' in err
    assert shard_bytes(d) == shard_bytes(ref)  # nothing was touched
    path = ckpts[0].split('=', 1)[1]
    assert reinforce.main(reinforce_args(tmp_path / 'c', [f'test_resnet={path}'], '--num-classes', '12')) == 2
    err = capsys.readouterr().err
    assert path in err and '10 classes' in err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('num_samples: 3\nnum_sample: 4\n')
    with pytest.raises(SystemExit):
        reinforce.parse_args(['-c', str(bad)])
    assert 'num_sample' in capsys.readouterr().err
    assert reinforce.main(['--dataset', 'digits', '--teacher', *ckpts]) == 2
    assert '--output is required' in capsys.readouterr().err


LABEL_MAP_RECIPES = {'relabel_effnet_l2.yaml': 'tf_efficientnet_l2.ns_jft_in1k_475'}  # DR Table 9 row ReLabel, top-5


def test_recipes_load_through_the_parser():
    folder = os.path.join(REPO, 'hparams', 'dr', 'reinforce')
    assert sorted(os.listdir(folder)) == sorted([*RECIPES, *LABEL_MAP_RECIPES])
    for name, teacher in LABEL_MAP_RECIPES.items():
        path = os.path.join(folder, name)
        args, _ = reinforce.parse_args(['-c', path])
        assert args.label_maps and args.topk == 5 and args.pretrained and args.num_classes == 1000, name
        assert [parse_teacher_spec(t)[0] for t in args.teacher] == [teacher], name
        assert open(path).readline().startswith('#')
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


def test_num_shards_and_ranges(ckpts):
    teacher = create_teacher(ckpts[:1], num_classes=10, img_size=16)
    w = Reinforcer(create_source('digits', max_images=13), teacher, create_augment_spec('rrc'), '/nonexistent',
                   num_samples=2, topk=2, seed=0, shard_size=5, num_classes=10, progress=False)
    assert w.num_shards == math.ceil(13 / 5) and [w.shard_range(s) for s in range(3)] == [(0, 5), (5, 10), (10, 13)]
    with pytest.raises(ValueError, match='--topk 11'):
        Reinforcer(create_source('digits', max_images=3), teacher, create_augment_spec('rrc'), '/x',
                   num_samples=2, topk=11, seed=0, shard_size=5, num_classes=10)
    assert yaml.safe_load(yaml.safe_dump(w.content_config()))['topk'] == 2
