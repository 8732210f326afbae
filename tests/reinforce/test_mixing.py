"""Mixing variants (+M*: ``--aug rrc+mix`` / ``rrc+ra_re+mix``): the writer's partners and teacher inputs, the
training loader's pair replay, old (schema 1) datasets, and errors."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import reinforce
from dr.reinforce.augment import (
    apply_record,
    create_augment_spec,
    needs_partner,
    replay,
    sample_mix_records,
    sample_records,
)
from dr.reinforce.format import (
    FLAG_CUTMIX,
    FLAG_MIXUP,
    build_shard,
    densify,
    encode_records,
    iter_shard,
    load_meta,
    meta_image_order,
    record_dtype,
    shard_name,
)
from dr.reinforce.loader import ReinforcedDataError, create_reinforced_loader
from dr.reinforce.partners import PartnerImages
from dr.reinforce.sources import create_source
from dr.reinforce.teachers import create_teacher
from dr.reinforce.verify import compare_topk
from dr.reinforce.writer import Reinforcer, ShardPlan

MEAN, STD, SIZE = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 12


def _png(rng, w, h):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


def make_mixing(out_dir, num_images=24, shard_size=10, group=4, aug='rrc+ra_re+mix', num_samples=4, topk=3,
                seed=0, schema_version=2, drop_spec_keys=()):
    """Shards with +mix records (partners drawn as the writer does, within groups of a shard); image i has the
    unique label i. Returns {dir, meta, images (bytes by position), records (by position), spec}."""
    os.makedirs(out_dir, exist_ok=True)
    extra = {'re_prob': 0.5} if 'ra_re' in aug else {}
    if '+mix' in aug:
        extra.update(mix_group=group, re_fill='black')
    spec = create_augment_spec(aug, **extra)
    rng = np.random.default_rng(seed)
    sizes = [(14 + i % 5, 12 + i % 3) for i in range(num_images)]
    images = [_png(rng, w, h) for w, h in sizes]
    plan = ShardPlan(np.arange(num_images), shard_size)
    dtype = record_dtype(topk, num_images, spec.name)
    records, shards = [], []
    for p, (w, h) in enumerate(sizes):
        rec = sample_records(rng, w, h, spec, num_samples, dtype)
        if spec.has_mix:
            mates = plan.mix_partners(p, group)
            sample_mix_records(rng, rec, mates, [sizes[q] for q in mates], spec)
        for r in range(num_samples):
            probs = rng.dirichlet(np.full(num_images, 0.3))
            order = np.argsort(-probs)[:topk]
            rec['ids'][r], rec['probs'][r] = order, probs[order].astype(np.float16)
        records.append(rec)
    for s in range(plan.num_shards):
        lo, hi = plan.shard_range(s)
        data = build_shard([{'key': f'img{p:04d}', 'image_ext': 'png', 'image': images[p], 'label': p,
                             'records': encode_records(records[p]), 'index': p} for p in range(lo, hi)],
                           shard=shard_name(s) if schema_version >= 2 else None)
        with open(os.path.join(out_dir, shard_name(s)), 'wb') as f:
            f.write(data)
        shards.append({'name': shard_name(s), 'count': hi - lo, 'bytes': len(data)})
    aug_dict = spec.to_dict()
    for k in drop_spec_keys:
        aug_dict.pop(k)
    meta = {'schema_version': schema_version, 'augmentation': aug_dict, 'topk': topk, 'num_samples': num_samples,
            'num_classes': num_images, 'num_images': num_images, 'shards': shards, 'class_names': None,
            'teachers': [{'name': 'fake', 'mean': list(MEAN), 'std': list(STD), 'input_size': [3, SIZE, SIZE],
                          'interpolation': 'bilinear'}]}
    with open(os.path.join(out_dir, 'reinforce.json'), 'w') as f:
        json.dump(meta, f)
    return {'dir': out_dir, 'meta': meta, 'images': images, 'records': records, 'spec': spec}


def _loader(path, **kw):
    args = dict(batch_size=8, num_workers=0, input_size=(3, SIZE, SIZE), mean=MEAN, std=STD,
                interpolation='bilinear', rd_p=1.0, seed=3, shuffle_buffer=16, rd_densify='renorm')
    args.update(kw)
    return create_reinforced_loader(path, None, **args)


def _check_batches(rd, batches, spec):
    """Every loader sample is apply_record of one of its image's stored augmentations (with the partner image for
    a mixing one) and its target is that augmentation's stored teacher output."""
    decoded = [Image.open(io.BytesIO(b)).convert('RGB') for b in rd['images']]
    kinds = set()
    for x, target, labels in batches:
        for i, label in enumerate(labels.tolist()):
            rec = rd['records'][label]
            dense = densify(rec['ids'], rec['probs'], len(rd['images']), mode='renorm')
            match = [j for j in range(len(rec)) if torch.equal(dense[j], target[i])]
            assert match, 'the target is not a stored teacher output of this image (a mix of labels?)'
            r = rec[match[0]]
            partner = decoded[int(r['mix_ref'])] if spec.has_mix and needs_partner(r) else None
            expected = apply_record(decoded[label], r, spec, (SIZE, SIZE), MEAN, STD, 'bilinear', partner=partner)
            assert torch.equal(x[i], expected)
            kinds.add(int(r['flags']) & (FLAG_MIXUP | FLAG_CUTMIX))
    return kinds


@pytest.mark.parametrize('aug', ['rrc+mix', 'rrc+ra_re+mix'])
def test_loader_replays_pairs_exactly_with_the_stored_target(aug, tmp_path):
    rd = make_mixing(str(tmp_path / 'rd'), aug=aug)
    kinds = set()
    for epoch in range(3):
        loader = _loader(rd['dir'])
        loader.set_epoch(epoch)
        batches = list(loader)
        assert sum(len(b[2]) for b in batches) == 24
        kinds |= _check_batches(rd, batches, rd['spec'])
    assert kinds == {0, FLAG_MIXUP, FLAG_CUTMIX, FLAG_MIXUP | FLAG_CUTMIX}


def test_loader_mixing_with_workers_matches_in_process(tmp_path):
    rd = make_mixing(str(tmp_path / 'rd'))
    a = {int(lbl): (x, t) for xs, ts, ls in _loader(rd['dir']) for x, t, lbl in zip(xs, ts, ls)}
    b = {int(lbl): (x, t) for xs, ts, ls in _loader(rd['dir'], num_workers=2) for x, t, lbl in zip(xs, ts, ls)}
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def test_schema1_dataset_still_loads(tmp_path):
    """A version-1 reinforce.json (no re_fill / mixing keys) loads and replays as before: mean-colour erasing."""
    keys = ('re_fill', 'mixup_p', 'mixup_alpha', 'mixup_div_by', 'cutmix_p', 'cutmix_alpha', 'mix_group')
    rd = make_mixing(str(tmp_path / 'rd'), aug='rrc+ra_re', schema_version=1, drop_spec_keys=keys)
    assert load_meta(rd['dir'])['schema_version'] == 1
    spec = create_augment_spec('rrc+ra_re', re_prob=0.5)
    assert spec.re_fill == 'mean'
    _check_batches(rd, list(_loader(rd['dir'])), spec)


def test_mixing_needs_random_access_and_valid_partners(tmp_path):
    rd = make_mixing(str(tmp_path / 'rd'))
    meta = dict(load_meta(rd['dir']), _path='pipe:curl -s https://host/rd/reinforce.json')  # no random access
    with pytest.raises(ValueError, match='random access and need the shards on a local filesystem'):
        PartnerImages(meta)
    rec = rd['records'][5]
    rec['mix_ref'] = 99  # no such position
    rec['flags'] |= FLAG_MIXUP
    data = build_shard([{'key': f'img{p:04d}', 'image_ext': 'png', 'image': rd['images'][p], 'label': p,
                         'records': encode_records(rd['records'][p]), 'index': p} for p in range(10)],
                       shard=shard_name(0))  # rewritten consistently (checksums and sizes match)
    with open(os.path.join(rd['dir'], '000000.tar'), 'wb') as f:
        f.write(data)
    meta = json.load(open(os.path.join(rd['dir'], 'reinforce.json')))
    meta['shards'][0]['bytes'] = len(data)
    with open(os.path.join(rd['dir'], 'reinforce.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(ReinforcedDataError, match=r'000000\.tar key img0005: stored augmentation \d: cannot read its '
                                                  r'partner image 99 .*outside the dataset'):
        for epoch in range(4):
            loader = _loader(rd['dir'], shuffle_buffer=0)
            loader.set_epoch(epoch)
            list(loader)


def test_writer_partners_and_exact_teacher_inputs(ckpts, tmp_path):
    """reinforce.py's +mix output: partners are other images of the same group of the same shard, and replay()
    with the partner rebuilds bit for bit what each member saw (two members at different sizes, black erasing);
    the teacher's fresh output on the mixed image matches the stored top-k."""
    teacher = create_teacher(ckpts, num_classes=10, img_size=16)
    teacher.member_cfgs[1]['input_size'] = [3, 20, 20]
    source = create_source('digits', max_images=10)
    spec = create_augment_spec('rrc+ra_re+mix', re_prob=0.5, re_fill='black', mix_group=4)
    writer = Reinforcer(source, teacher, spec, str(tmp_path / 'rd'), num_samples=5, topk=3, seed=3, shard_size=6,
                        num_classes=10, batch_size=7, workers=0, progress=False, samples_per_item=3)
    writer.batcher.captured = []
    writer.run()
    writer.merge(class_names=source.classes)
    meta = load_meta(str(tmp_path / 'rd'))
    assert meta['schema_version'] == 2 and meta['augmentation']['name'] == 'rrc+ra_re+mix'
    seen = [torch.cat([batch[m] for batch in writer.batcher.captured]) for m in range(2)]
    partners = PartnerImages(meta)
    n, kinds = 0, set()
    with torch.no_grad():
        for s in range(2):
            for j, x in enumerate(iter_shard(str(tmp_path / 'rd' / shard_name(s)), shard_name(s))):
                position = s * 6 + j
                rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
                for a in range(len(rec)):
                    partner = None
                    if needs_partner(rec[a]):
                        ref = int(rec['mix_ref'][a])
                        group = (position - s * 6) // 4
                        assert ref != position and ref // 6 == s and (ref - s * 6) // 4 == group
                        partner = partners.get(ref)[2]
                    kinds.add(int(rec['flags'][a]) & (FLAG_MIXUP | FLAG_CUTMIX))
                    inputs = [replay(x['image'], rec[a], meta, member=m, partner=partner) for m in range(2)]
                    for m in range(2):
                        assert torch.equal(inputs[m], seen[m][n])
                    fresh = teacher.forward_members([t.unsqueeze(0) for t in inputs])[0]
                    assert compare_topk(fresh, rec['ids'][a], rec['probs'][a]) is None
                    n += 1
    assert n == 50 and kinds == {0, FLAG_MIXUP, FLAG_CUTMIX, FLAG_MIXUP | FLAG_CUTMIX}


def test_cli_mix_output_loads_and_shows(ckpts, tmp_path, capsys):
    out = tmp_path / 'rd'
    assert reinforce.main(['--dataset', 'digits', '--max-images', '12', '--num-samples', '4', '--topk', '3',
                           '--shard-size', '6', '--teacher', ckpts[0], '--teacher-img-size', '16', '-b', '16',
                           '-j', '0', '--device', 'cpu', '--no-progress', '--aug', 'rrc+mix', '--mix-group', '3',
                           '--output', str(out)]) == 0
    meta = load_meta(str(out))
    assert meta['augmentation']['mix_group'] == 3 and meta['augmentation']['mixup_div_by'] == 2.0
    assert reinforce.main(['--show', str(out), '--images', '0', '7', '--samples', '0', '1', '2', '3',
                           '--save-npz', str(tmp_path / 's.npz')]) == 0
    shown = np.load(tmp_path / 's.npz')
    assert sorted(shown.files) == ['0_0', '0_1', '0_2', '0_3', '7_0', '7_1', '7_2', '7_3']
    partners = PartnerImages(meta)
    spec = create_augment_spec('rrc+mix', mix_group=3)
    t = meta['teachers'][0]
    position = np.argsort(meta_image_order(meta))  # --images are source indices; shards hold a permutation
    for i in (0, 7):
        sample = partners.sample(int(position[i]))
        rec = np.load(io.BytesIO(sample['rd.npy']), allow_pickle=False)
        img = Image.open(io.BytesIO(sample['png'])).convert('RGB')
        for k in range(4):
            partner = None
            if needs_partner(rec[k]):
                partner = Image.open(io.BytesIO(partners.get(int(rec['mix_ref'][k]))[2])).convert('RGB')
            expected = apply_record(img, rec[k], spec, (16, 16), t['mean'], t['std'], t['interpolation'], partner)
            assert np.array_equal(shown[f'{i}_{k}'], expected.numpy())


def test_verify_replays_mixing_samples_through_the_teacher(ckpts, tmp_path, capsys):
    out = tmp_path / 'rd'
    args = ['--dataset', 'digits', '--max-images', '8', '--num-samples', '4', '--topk', '3', '--shard-size', '4',
            '--teacher', ckpts[0], '--teacher-img-size', '16', '-b', '16', '-j', '0', '--device', 'cpu',
            '--no-progress', '--aug', 'rrc+ra_re+mix', '--mix-group', '4']
    assert reinforce.main(args + ['--output', str(out)]) == 0
    assert reinforce.main(['--verify', str(out), '--teacher', ckpts[0], '--teacher-img-size', '16',
                           '--verify-samples', '32', '--device', 'cpu']) == 0
    assert 'OK' in capsys.readouterr().out
