"""timm flags that change training, against timm's own building blocks: BCE and JSD losses, repeated augmentation
(one process and torchrun), AugMix splits, --dist-bn, the scheduler options, --val-interval, --train-num-samples on a
wds/ dataset, and validate.py --real-labels."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import timm
import torch
from PIL import Image
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy
from timm.scheduler import CosineLRScheduler, StepLRScheduler

import train
import validate
from dr.checkpoint import load_checkpoint_file
from tests.helpers import REPO, free_port, subprocess_env

train._import_training_libraries()  # train.main() does this once the flags are parsed

DIGITS = ['--dataset', 'digits', '--model', 'test_resnet', '-j', '0', '--warmup-epochs', '0', '--lr', '0.2',
          '--log-interval', '1000', '--no-progress']

HELPER = '''
import json, sys
import train
mode, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == 'sampler':  # the training sampler train.py builds, on each rank
    args, _ = train.parse_args(argv)
    train._import_training_libraries()
    device = train._setup_process(args)
    _, train_ds, _ = train._prepare_data(args)
    model, data_config = train.create_train_model(args, device)
    loader, _ = train.create_train_eval_loaders(args, train_ds, None, data_config, None, device)
    loader.set_epoch(0)
    with open(f'{out}.{args.rank}.json', 'w') as f:
        json.dump(list(loader.sampler), f)
    if args.distributed:
        train.torch.distributed.destroy_process_group()
else:  # each rank's BatchNorm statistics at the end of training
    finish = train._finish
    def dump(args, run, result):
        state = run.task.get_eval_model().state_dict()
        with open(f'{out}.{args.rank}.json', 'w') as f:
            json.dump({k: v.tolist() for k, v in state.items() if 'running_' in k}, f)
        finish(args, run, result)
    train._finish = dump
    train.main(argv)
'''


def _helper(tmp_path):
    path = tmp_path / 'helper.py'
    path.write_text(HELPER)
    return str(path)


def _args(*argv):
    return train.parse_args([*DIGITS, *argv])[0]


# --- losses ------------------------------------------------------------------------------------------------------

def test_bce_loss_is_timms_binary_cross_entropy():
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    args = _args('--bce-loss', '--smoothing', '0.1', '--bce-target-thresh', '0.3', '--bce-sum', '--bce-pos-weight', '2')
    ours = train.create_criterion(args, mixup_active=False)
    ref = BinaryCrossEntropy(smoothing=0.1, target_threshold=0.3, sum_classes=True, pos_weight=2.0)
    assert isinstance(ours, BinaryCrossEntropy)
    assert torch.allclose(ours(logits, target), ref(logits, target))
    soft = torch.softmax(torch.randn(8, 10), -1)  # mixup/cutmix targets
    mixed = train.create_criterion(args, mixup_active=True)
    ref = BinaryCrossEntropy(target_threshold=0.3, sum_classes=True, pos_weight=2.0)
    assert torch.allclose(mixed(logits, soft), ref(logits, soft))
    # timm's choice without --bce-loss: label smoothing at timm's default 0.1; no smoothing: plain CE
    assert isinstance(train.create_criterion(_args(), False), LabelSmoothingCrossEntropy)
    assert isinstance(train.create_criterion(_args('--bce-loss', '--smoothing', '0'), False), torch.nn.CrossEntropyLoss)


def test_jsd_loss_is_timms_jsd_cross_entropy():
    args = _args('--aug-splits', '3', '--jsd-loss')
    ours = train.create_criterion(args, mixup_active=False)
    logits, target = torch.randn(12, 10), torch.randint(0, 10, (4,)).repeat(3)
    assert isinstance(ours, JsdCrossEntropy)
    assert torch.allclose(ours(logits, target), JsdCrossEntropy(num_splits=3, smoothing=0.1)(logits, target))


def test_augmix_splits_lay_out_the_batch_as_jsd_expects():
    args = _args('--aug-splits', '3', '--jsd-loss', '--aa', 'augmix-m5-w4-d2', '-b', '8')
    args.world_size, args.rank, args.distributed = 1, 0, False
    train._prepare_data(args)
    _, train_ds, _ = train._prepare_data(args)
    model, data_config = train.create_train_model(args, torch.device('cpu'))
    loader, _ = train.create_train_eval_loaders(args, train_ds, None, data_config, None, torch.device('cpu'))
    x, y = next(iter(loader))
    assert x.shape == (24, 3, 32, 32) and y.shape == (24,)
    assert torch.equal(y[:8], y[8:16]) and torch.equal(y[:8], y[16:])  # split k of image i at k * B + i
    assert not torch.equal(x[:8], x[8:16])  # the augmented splits differ from the clean one


@pytest.mark.parametrize('bad, message', [
    (['--jsd-loss'], '--jsd-loss needs --aug-splits >= 2'),
    (['--aug-splits', '1'], '--aug-splits must be 0 or >= 2'),
    (['--aug-repeats', '3', '--bake'], '--aug-repeats cannot be combined with class-aware sampling'),
    (['--aug-splits', '2', '--bake'], '--aug-splits cannot be combined with class-aware sampling'),
    (['--bce-loss', '--reinforced', 'x'], '--bce-loss cannot be combined with --reinforced'),
    (['--naflex-loader', '--reinforced', 'x'], '--naflex-loader cannot be combined with --reinforced'),
    (['--kd-distill-type', 'token'], '--kd-distill-type token needs a teacher'),
    (['--tta', '2'], '--tta: timm'),
])
def test_combinations_that_cannot_work_name_both_flags(bad, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([*DIGITS, *bad])
    assert e.value.code == 2 and message in capsys.readouterr().err


# --- repeated augmentation -------------------------------------------------------------------------------------

def _assert_triples(indices):
    full = len(indices) // 3 * 3
    for k in range(0, full, 3):
        assert indices[k] == indices[k + 1] == indices[k + 2], f'positions {k}..{k + 2}: {indices[k:k + 3]}'


def test_aug_repeats_on_one_process(tmp_path):
    subprocess.run([sys.executable, _helper(tmp_path), 'sampler', str(tmp_path / 's'), *DIGITS, '--aug-repeats', '3'],
                   cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=300)
    with open(tmp_path / 's.0.json') as f:
        indices = json.load(f)
    # timm's RepeatAugSampler: each image 3 times in a row; epochs rounded down to 256 images (1438 -> 1280)
    assert len(indices) == 1280
    _assert_triples(indices)
    assert len(set(indices)) == 427


@pytest.mark.slow
@pytest.mark.distributed
def test_aug_repeats_under_torchrun_spreads_the_copies_over_processes(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           _helper(tmp_path), 'sampler', str(tmp_path / 's'), *DIGITS, '--aug-repeats', '3']
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = []
    for r in range(2):
        with open(tmp_path / f's.{r}.json') as f:
            ranks.append(json.load(f))
    assert len(ranks[0]) == len(ranks[1]) == 640
    interleaved = [i for pair in zip(*ranks) for i in pair]  # position j of the repeated order went to rank j % 2
    _assert_triples(interleaved)
    assert len(set(ranks[0]) & set(ranks[1])) > 200  # the same images, differently augmented, on both processes


# --- --dist-bn -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize('dist_bn', ['reduce', 'broadcast', ''])
def test_dist_bn_makes_the_ranks_batchnorm_statistics_equal(tmp_path, dist_bn):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           _helper(tmp_path), 'bn', str(tmp_path / 'bn'), *DIGITS, '--epochs', '1', '-b', '64', '--dist-bn', dist_bn,
           '--val-split', '', '--output', str(tmp_path), '--experiment', 'run']
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = []
    for r in range(2):
        with open(tmp_path / f'bn.{r}.json') as f:
            stats.append(json.load(f))
    same = all(torch.allclose(torch.tensor(stats[0][k]), torch.tensor(stats[1][k])) for k in stats[0])
    assert same == bool(dist_bn), 'ranks train on different images: only --dist-bn makes their BN statistics equal'


# --- scheduler options -------------------------------------------------------------------------------------------

def _train_lrs(argv, epochs):
    args = _args(*argv)
    args.world_size = 1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    run = train.TrainRun(task=None, optimizer=opt, amp_autocast=None, train_loader=[None] * 5)
    train._setup_schedule(args, run)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]['lr'])
        run.lr_scheduler.step(epoch + 1)
    return lrs, run.num_epochs


def _timm_lrs(sched, epochs):
    lrs = []
    for epoch in range(epochs):
        lrs.append(sched.optimizer.param_groups[0]['lr'])
        sched.step(epoch + 1)
    return lrs


def test_scheduler_options_match_timm_scheduler():
    argv = ['--sched', 'cosine', '--epochs', '10', '--lr-cycle-limit', '2', '--lr-cycle-mul', '1.5',
            '--lr-cycle-decay', '0.3', '--lr-k-decay', '0.7', '--lr-noise', '0.4', '0.8', '--lr-noise-pct', '0.5',
            '--lr-noise-std', '0.8', '--warmup-epochs', '2', '--min-lr', '1e-4', '--cooldown-epochs', '1']
    ours, num_epochs = _train_lrs(argv, 28)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    ref = CosineLRScheduler(opt, t_initial=10, lr_min=1e-4, cycle_mul=1.5, cycle_decay=0.3, cycle_limit=2,
                            warmup_t=2, warmup_lr_init=1e-5, k_decay=0.7, noise_range_t=(4, 8), noise_pct=0.5,
                            noise_std=0.8, noise_seed=42)
    assert num_epochs == ref.get_cycle_length() + 1 == 26
    assert ours == pytest.approx(_timm_lrs(ref, 28))
    ours, _ = _train_lrs(['--sched', 'step', '--decay-epochs', '3', '--decay-rate', '0.5', '--epochs', '9'], 9)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    ref = StepLRScheduler(opt, decay_t=3, decay_rate=0.5, warmup_t=0, warmup_lr_init=1e-5, noise_seed=42)
    assert ours == pytest.approx(_timm_lrs(ref, 9))


def test_lr_base_scale_follows_the_optimizer_as_timm():
    for opt, expected in (('sgd', 0.1 * 512 / 256), ('adamw', 0.1 * (512 / 256) ** 0.5), ('lamb', 0.1 * 2 ** 0.5)):
        args = train.parse_args(['--model', 'test_resnet', '-b', '512', '--opt', opt])[0]
        args.world_size = 1
        train._resolve_lr(args)
        assert args.lr == pytest.approx(expected), opt


# --- --val-interval ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_val_interval_evaluates_every_n_epochs_and_the_last(tmp_path):
    result = train.main([*DIGITS, '-b', '64', '--epochs', '3', '--val-interval', '2', '--output', str(tmp_path),
                         '--experiment', 'vi'])
    with open(os.path.join(result['output_dir'], 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    top1 = [float(r['eval_top1']) for r in rows]
    assert top1[0] != top1[0] and top1[1] >= 0 and top1[2] >= 0  # NaN: not evaluated
    assert result['best_epoch'] in (1, 2)


# --- --train-num-samples with wds/ -------------------------------------------------------------------------------

def _write_wds(root, shards=2, per_shard=8, size=16):
    os.makedirs(root, exist_ok=True)
    for s in range(shards):
        with tarfile.open(os.path.join(root, f'train-{s:04d}.tar'), 'w') as tar:
            for j in range(per_shard):
                img = io.BytesIO()
                Image.new('RGB', (size, size), (200 * (j % 2), 30, 60)).save(img, format='PNG')
                for ext, payload in (('png', img.getvalue()), ('cls', str(j % 2).encode())):
                    info = tarfile.TarInfo(f's{s}_{j}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_train_num_samples_sizes_a_wds_epoch(tmp_path, caplog):
    root = str(tmp_path / 'wds')
    _write_wds(root)
    argv = ['--data-dir', root, '--dataset', 'wds/toy', '--train-split', 'train-{0000..0001}.tar',
            '--val-split', '', '--num-classes', '2', '--model', 'test_resnet', '--img-size', '16', '-j', '0',
            '-b', '4', '--epochs', '1', '--warmup-epochs', '0', '--no-progress', '--output', str(tmp_path)]
    with caplog.at_level('INFO'):
        train.main([*argv, '--train-num-samples', '12', '--experiment', 'twelve'])
    assert 'Scheduled epochs: 1, 3 updates per epoch' in caplog.text  # 12 samples / batch 4
    caplog.clear()
    with caplog.at_level('INFO'):
        train.main([*argv, '--train-num-samples', '16', '--experiment', 'sixteen'])
    assert 'Scheduled epochs: 1, 4 updates per epoch' in caplog.text


# --- validate.py --real-labels -------------------------------------------------------------------------------------

def test_validate_real_labels(tmp_path):
    root = tmp_path / 'val'
    for i in range(6):
        d = root / f'c{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (16, 16), (40 * i, 0, 0)).save(d / f'ILSVRC2012_val_{i + 1:08d}.JPEG')
    real = [[0, 1], [0, 1], [], [0, 1], [1], [0]]  # entry i: the val image i + 1; image 3 has no ReaL label
    (tmp_path / 'real.json').write_text(json.dumps(real))
    torch.manual_seed(0)
    out = validate.main([str(root), '--model', 'test_resnet', '--img-size', '16', '--workers', '0',
                         '--real-labels', str(tmp_path / 'real.json'), '--no-progress'])
    row = out['sets']['imagenet-real']
    assert row['count'] == 5
    preds = out['sets']['folder']
    assert 0 <= preds['top1'] <= 100
    # images 1, 2, 4 accept either class; images 5, 6 one class each
    assert row['top1'] >= 60.0 and row['top1'] in (60.0, 80.0, 100.0)
    assert timm  # (the model is timm's test_resnet)


# --- scheduled resolution (progressive resizing) ----------------------------------------------------------------

def _epoch_shapes(argv, epochs):
    args = _args(*argv)
    args.world_size, args.rank, args.distributed = 1, 0, False
    _, train_ds, _ = train._prepare_data(args)
    model, data_config = train.create_train_model(args, torch.device('cpu'))
    loader, _ = train.create_train_eval_loaders(args, train_ds, None, data_config, None, torch.device('cpu'))
    shapes = []
    for epoch in epochs:
        train.set_loader_epoch(loader, epoch)
        shapes.append([tuple(x.shape) for x, _ in loader])
    return shapes, len(loader)


def test_train_img_sizes_draw_each_batch_size_as_timm_schedules_it():
    sizes = ['--train-img-sizes', '16', '24', '32', '--train-batch-sizes', '64', '32', '16']
    (shapes,), n = _epoch_shapes(sizes, [0])
    assert {s[2] for s in shapes} == {16, 24, 32} and len(shapes) == n
    assert all((s[0], s[2]) in ((64, 16), (32, 24), (16, 32)) for s in shapes)  # each size with its batch
    assert sum(s[0] for s in shapes) <= 1438
    first, last = _epoch_shapes([*sizes, '--train-size-schedule', 'progressive', '--train-size-schedule-epochs', '4',
                                 '--train-size-schedule-random-mix', '0', '--epochs', '4'], [0, 3])[0]
    mean = [sum(s[2] for s in e) / len(e) for e in (first, last)]
    assert mean[0] < 20 < 28 < mean[1]  # progressive: from the first size towards the last


@pytest.mark.slow
def test_progressive_resizing_run(tmp_path):
    result = train.main([*DIGITS, '-b', '32', '--epochs', '2', '--train-img-sizes', '16', '32', '--train-batch-sizes',
                         '64', '16', '--train-size-schedule', 'progressive', '--output', str(tmp_path),
                         '--experiment', 'prog'])
    with open(os.path.join(result['output_dir'], 'summary.csv')) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_validate_valid_labels_restrict_the_logits(tmp_path, capsys):
    root = tmp_path / 'val'
    for i in range(6):
        d = root / f'c{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (16, 16), (40 * i, 0, 0)).save(d / f'{i}.png')
    (tmp_path / 'valid.txt').write_text('3\n7\n')
    common = [str(root), '--model', 'test_resnet', '--img-size', '16', '--workers', '0', '--no-progress',
              '--valid-labels', str(tmp_path / 'valid.txt')]
    with pytest.raises(SystemExit) as e:
        validate.main(common)
    assert e.value.code == 2 and '--valid-labels needs --num-classes' in capsys.readouterr().err
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10).eval()
    ckpt = tmp_path / 'ten.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': 'test_resnet'}, ckpt)
    out = validate.main([*common, '--num-classes', '10', '--checkpoint', str(ckpt), '--crop-pct', '1.0',
                         '--interpolation', 'bilinear', '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5'])
    row = out['sets']['folder']
    # reference: the 10-class model's logits of classes 3 and 7 decide (images are exactly 16 px: no resize)
    hits = 0
    for i in range(6):
        img = torch.tensor(list(Image.open(root / f'c{i % 2}' / f'{i}.png').getdata()), dtype=torch.float32)
        x = (img.view(16, 16, 3).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5
        with torch.no_grad():
            hits += int(model(x)[0, [3, 7]].argmax()) == i % 2
    assert row['count'] == 6 and row['top1'] == pytest.approx(100.0 * hits / 6)


@pytest.mark.slow
def test_model_dtype_trains_in_bfloat16(tmp_path):
    result = train.main([*DIGITS, '-b', '64', '--epochs', '1', '--model-dtype', 'bfloat16', '--output', str(tmp_path),
                         '--experiment', 'bf16'])
    state = load_checkpoint_file(os.path.join(result['output_dir'], 'last.pth.tar'))['state_dict']
    assert state['fc.weight'].dtype == torch.bfloat16 and result['last_eval']['top1'] >= 0
