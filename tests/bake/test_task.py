"""BakeModel and BakeTask: plain forward, head modes, soft targets, plain checkpoints/EMA, compile and the
2-process global ensemble."""
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from dr.bake.targets import bake_loss, bake_targets, random_walk_log_probs
from dr.bake.task import BakeModel, BakeTask
from tests.helpers import REPO, free_port

# --- BakeModel -----------------------------------------------------------------------------------------------
MODEL_CFGS = {
    'test_resnet': dict(),
    'test_resnet-drop': dict(drop_rate=0.2),
    'test_efficientnet': dict(drop_rate=0.3),
    'mobilenetv3_small_050': dict(drop_rate=0.2),
    'test_vit': dict(drop_rate=0.1, img_size=32),
    'swin_tiny_patch4_window7_224': dict(
        embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4, drop_rate=0.1),
    'test_convnext': dict(drop_rate=0.1),
}

# --- 2-process global ensemble ---------------------------------------------------------------------------------
_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.distributed as dist
    import timm
    sys.path.insert(0, {repo!r})
    from dr.bake import BakeTask

    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical global batch on every rank
    x_all = torch.randn(4 * world, 3, 32, 32)
    y_all = torch.randint(0, 5, (4 * world,))
    x, y = x_all[rank * 4:(rank + 1) * 4], y_all[rank * 4:(rank + 1) * 4]
    out_dir = sys.argv[1]
    for knowledge in ('preds', 'labels'):
        torch.manual_seed(1)  # identical weights on every rank (a fresh model per DDP wrapper)
        model = timm.create_model('test_resnet', num_classes=5)
        task = BakeTask(model, omega=0.5, temperature=4.0, knowledge=knowledge, global_ensemble=True, verbose=False)
        task.prepare_distributed(device_ids=None)
        task.eval()  # BN running stats: outputs do not depend on how the batch is split
        with torch.no_grad():
            logits, pre = task.trainable_module(x)
            q = task.compute_targets(pre, logits, y)
        out = task(x, y)
        out['loss'].backward()
        grad = model.get_classifier().weight.grad.clone()
        model.zero_grad()
        torch.save(dict(pre=pre, logits=logits, y=y, q=q, loss_bake=out['loss_bake'], grad=grad),
                   os.path.join(out_dir, f'{{knowledge}}_rank{{rank}}.pt'))
    dist.destroy_process_group()
''')


@pytest.mark.parametrize('name', list(MODEL_CFGS))
def test_bake_model_matches_plain_forward(name):
    torch.manual_seed(0)
    model = timm.create_model(name.split('-')[0], num_classes=5, **MODEL_CFGS[name])
    wrapper = BakeModel(model)
    x = torch.randn(3, 3, 32, 32)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        logits, pre = wrapper(x)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert pre.ndim == 2 and pre.shape[0] == 3
        if not train:
            torch.testing.assert_close(pre, model.forward_head(model.forward_features(x), pre_logits=True).flatten(1))
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in model.parameters()]


def test_bake_model_head_modes_and_optimizer_passthrough():
    torch.manual_seed(0)
    vit = timm.create_model('test_vit', num_classes=4, img_size=32)
    wrapper = BakeModel(vit)
    assert wrapper.head_mode == 'split'
    assert wrapper.no_weight_decay() == {'model.' + n for n in vit.no_weight_decay()}
    assert 'model.pos_embed' in wrapper.no_weight_decay()
    opt = create_optimizer_v2(wrapper, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    names = {id(p): n for n, p in wrapper.named_parameters()}
    seen = {id(p) for group in opt.param_groups for p in group['params']}
    assert seen == set(names)
    pos_group = [g for g in opt.param_groups if any(names[id(p)] == 'model.pos_embed' for p in g['params'])][0]
    assert pos_group['weight_decay'] == 0.0
    scales = {g['lr_scale'] for g in opt.param_groups}
    assert len(scales) > 2  # layer-wise decay produced several depths
    # a model with dropout after its pre-logits goes the double way and still matches (see test above)
    mnv3 = timm.create_model('mobilenetv3_small_050', num_classes=4, drop_rate=0.2)
    assert BakeModel(mnv3).head_mode == 'double'
    with pytest.raises(ValueError, match='head_mode'):
        BakeModel(vit, head_mode='nope')
    with pytest.raises(TypeError, match='forward_features'):
        BakeModel(torch.nn.Linear(3, 3))


# --- BakeTask ------------------------------------------------------------------------------------------------
def _task(**kw):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=6)
    return model, BakeTask(model, verbose=False, **kw)


def test_task_forward_backward():
    model, task = _task(omega=0.5, temperature=4.0, weight=0.7)
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = task(x, y)
    assert set(out) == {'loss', 'output', 'loss_ce', 'loss_bake'}
    assert out['output'].shape == (8, 6)
    for k in ('loss', 'loss_ce', 'loss_bake'):
        assert torch.isfinite(out[k]) and out[k].ndim == 0
    assert out['loss_bake'] > 0
    torch.testing.assert_close(out['loss'].detach(), out['loss_ce'] + 0.7 * out['loss_bake'])
    torch.testing.assert_close(out['loss_ce'], F.cross_entropy(out['output'].detach(), y))
    out['loss'].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the BAKE term contributes gradient of its own
    model.zero_grad()
    ce_only = F.cross_entropy(task.trainable_module(x)[0], y)
    ce_only.backward()
    assert not torch.allclose(model.get_classifier().weight.grad, grads[-2])


@pytest.mark.parametrize('knowledge', ['preds', 'labels'])
def test_task_soft_targets(knowledge):
    _, task = _task(knowledge=knowledge)
    x = torch.randn(6, 3, 32, 32)
    soft = torch.softmax(torch.randn(6, 6), dim=1)  # e.g. mixup/cutmix targets
    out = task(x, soft)
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    hard = torch.tensor([0, 1, 2, 3, 4, 5])
    out = task(x, hard)
    assert torch.isfinite(out['loss'])
    if knowledge == 'labels':
        with torch.no_grad():
            logits, pre = task.trainable_module(x)
            q = task.compute_targets(pre, logits, hard)
            torch.testing.assert_close(q, bake_targets(pre, logits, knowledge=F.one_hot(hard, 6).float()))
        with pytest.raises(ValueError, match='--bake-knowledge labels'):
            task(x, torch.zeros(6, 3))


def test_task_validation():
    model = timm.create_model('test_resnet', num_classes=3)
    with pytest.raises(ValueError, match='--bake-one-step'):
        BakeTask(model, omega=1.0, verbose=False)
    BakeTask(model, omega=1.0, one_step=True, verbose=False)
    with pytest.raises(ValueError, match='--bake-knowledge'):
        BakeTask(model, knowledge='teacher', verbose=False)
    with pytest.raises(ValueError, match='--bake-weight'):
        BakeTask(model, weight=-1, verbose=False)


def test_checkpoint_and_ema_state_are_plain():
    model, task = _task()
    plain_keys = list(model.state_dict().keys())
    assert 'conv1.0.weight' in plain_keys or 'conv1.weight' in plain_keys
    assert task.get_eval_model() is model
    state = task.get_checkpoint_state()
    assert list(state['state_dict'].keys()) == plain_keys
    task.setup_ema(decay=0.5)
    ema_state = task.get_checkpoint_state(ema=True)
    assert list(ema_state['state_dict_ema'].keys()) == plain_keys
    ema_model = task.get_eval_model(ema=True)
    assert type(ema_model) is type(model) and ema_model is not model
    # one optimisation step, then the EMA moves half way towards the new weights
    before = {k: v.clone() for k, v in ema_model.state_dict().items()}
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    task(x, y)['loss'].backward()
    opt.step()
    task.update_ema()
    key = 'fc.weight' if 'fc.weight' in plain_keys else plain_keys[0]
    torch.testing.assert_close(ema_model.state_dict()[key], 0.5 * before[key] + 0.5 * model.state_dict()[key])
    # round trip through load_checkpoint_state into a fresh task
    _, fresh = _task()
    fresh.load_checkpoint_state(state['state_dict'])
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, state['state_dict'][k])


class _TinyNet(torch.nn.Module):
    """Smallest timm-style classifier (forward_features / forward_head / get_classifier)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward_features(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_compile_keeps_plain_eval_model():
    torch.manual_seed(0)
    model = _TinyNet()
    task = BakeTask(model, verbose=False)
    eval_model = task.compile(backend='eager')
    assert task.get_eval_model() is eval_model
    assert list(task.get_checkpoint_state()['state_dict'].keys()) == list(model.state_dict().keys())
    out = task(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    assert model.fc.weight.grad is not None
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(eval_model(x), model(x))


def _run_two_process_worker(tmp_path, template: str) -> None:
    """Run a worker script (``template`` formatted with the repo path) under torchrun with 2 CPU processes."""
    script = tmp_path / 'worker.py'
    script.write_text(template.format(repo=REPO))
    env = dict(os.environ, OMP_NUM_THREADS='1', MASTER_ADDR='127.0.0.1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--nnodes=1',
           '--master_addr=127.0.0.1', f'--master_port={free_port()}', str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_global_ensemble_two_processes(tmp_path):
    _run_two_process_worker(tmp_path, _WORKER)
    for knowledge in ('preds', 'labels'):
        ranks = [torch.load(tmp_path / f'{knowledge}_rank{r}.pt', weights_only=True) for r in range(2)]
        pre = torch.cat([r['pre'] for r in ranks])
        logits = torch.cat([r['logits'] for r in ranks])
        y = torch.cat([r['y'] for r in ranks])
        kn = F.one_hot(y, 5).float() if knowledge == 'labels' else None
        q_global = bake_targets(pre, logits, omega=0.5, temperature=4.0, knowledge=kn)
        q_local = bake_targets(ranks[0]['pre'], ranks[0]['logits'], omega=0.5, temperature=4.0,
                               knowledge=kn[:4] if kn is not None else None)
        for r, data in enumerate(ranks):
            torch.testing.assert_close(data['q'], q_global[r * 4:(r + 1) * 4], atol=1e-6, rtol=0)
            expected = bake_loss(data['logits'], q_global[r * 4:(r + 1) * 4], 4.0)
            torch.testing.assert_close(data['loss_bake'], expected, atol=1e-6, rtol=0)
        # the global ensemble differs from a per-rank one, and DDP averaged the gradients
        assert (ranks[0]['q'] - q_local).abs().max() > 1e-4
        torch.testing.assert_close(ranks[0]['grad'], ranks[1]['grad'])


# --- random walk (Table 16) -------------------------------------------------------------------------------------------
def test_random_walk_task_supervises_propagated_predictions():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=5)
    model.eval()  # BN running stats: the forward is per sample
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    task = BakeTask(model, omega=0.5, temperature=4.0, weight=1.0, random_walk=True, verbose=False)
    out = task(x, y)
    logits, pre = task.trainable_module(x)
    log_q = random_walk_log_probs(pre, logits, omega=0.5, temperature=4.0)
    torch.testing.assert_close(out['loss_bake'], F.nll_loss(log_q, y).detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out['loss'], F.cross_entropy(logits, y) + F.nll_loss(log_q, y), atol=1e-6, rtol=0)
    # unlike BAKE's targets, the propagated predictions carry the gradient back into the network
    model.zero_grad()
    F.nll_loss(log_q, y).backward()
    stem = next(model.parameters())
    assert stem.grad is not None and stem.grad.abs().max() > 0
    with pytest.raises(ValueError, match='random walk'):
        BakeTask(model, random_walk=True, knowledge='labels', verbose=False)
    with pytest.raises(ValueError, match='random walk'):
        BakeTask(model, random_walk=True, shuffle_bn=True, verbose=False)


# --- shuffling BN (Table 15) under 2 processes ------------------------------------------------------------------------
_SHUFFLE_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.distributed as dist
    import timm
    sys.path.insert(0, {repo!r})
    from dr.bake import BakeTask, shuffle_batch

    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = sys.argv[1]
    torch.manual_seed(0)  # identical global batch on every rank
    x_all = torch.randn(4 * world, 3, 32, 32)
    y_all = torch.randint(0, 5, (4 * world,))
    x, y = x_all[rank * 4:(rank + 1) * 4], y_all[rank * 4:(rank + 1) * 4]
    torch.manual_seed(100 + rank)  # rank-specific RNG: the permutation must still be rank 0's
    xs, ys, shuffle = shuffle_batch(x, y)
    res = dict(perm=shuffle.perm, xs=xs, ys=ys)
    for mode in ('eval', 'train'):
        for global_ensemble in (True, False):
            for shuffle_bn in (False, True):
                torch.manual_seed(1)  # identical weights on every rank
                model = timm.create_model('test_resnet', num_classes=5)
                with torch.no_grad():  # confident, diverse predictions: the ensembles differ measurably
                    model.get_classifier().weight.mul_(200.0)
                task = BakeTask(model, omega=0.5, temperature=4.0, global_ensemble=global_ensemble,
                                shuffle_bn=shuffle_bn, verbose=False)
                task.prepare_distributed(device_ids=None)
                task.train(mode == 'train')
                torch.manual_seed(7)
                out = task(x, y)
                out['loss'].backward()
                loss = out['loss'].detach().clone()
                dist.all_reduce(loss)
                key = f'{{mode}}_{{"global" if global_ensemble else "local"}}_{{"shuffle" if shuffle_bn else "plain"}}'
                res[key] = dict(output=out['output'].detach(), loss=loss / world,
                                grad=model.get_classifier().weight.grad.clone())
    torch.save(res, os.path.join(out_dir, f'rank{{rank}}.pt'))
    dist.destroy_process_group()
''')


@pytest.mark.slow
@pytest.mark.distributed
def test_shuffle_bn_two_processes(tmp_path):
    _run_two_process_worker(tmp_path, _SHUFFLE_WORKER)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    # one permutation for both ranks (rank 0's, broadcast); each rank forwards its slice of the permuted batch
    perm = ranks[0]['perm']
    assert torch.equal(perm, ranks[1]['perm']) and sorted(perm.tolist()) == list(range(8))
    torch.manual_seed(0)
    x_all = torch.randn(8, 3, 32, 32)
    y_all = torch.randint(0, 5, (8,))
    for r in range(2):
        rows = perm[r * 4:(r + 1) * 4]
        assert torch.equal(ranks[r]['xs'], x_all[rows]) and torch.equal(ranks[r]['ys'], y_all[rows])
    for ensemble in ('global', 'local'):
        # Eval-mode BN (running stats): shuffling must change nothing - the order is restored for the outputs and for
        # the (per-rank) ensembles, and the DDP-averaged gradients and the mean loss are those of the plain run.
        for r in range(2):
            plain, shuf = ranks[r][f'eval_{ensemble}_plain'], ranks[r][f'eval_{ensemble}_shuffle']
            torch.testing.assert_close(shuf['output'], plain['output'], atol=1e-5, rtol=0)
            torch.testing.assert_close(shuf['loss'], plain['loss'], atol=1e-5, rtol=0)
            torch.testing.assert_close(shuf['grad'], plain['grad'], atol=1e-5, rtol=0)
        # Train-mode BN: the statistics now come from the shuffled batches, so the outputs differ from the plain run
        plain, shuf = ranks[0][f'train_{ensemble}_plain'], ranks[0][f'train_{ensemble}_shuffle']
        assert (shuf['output'] - plain['output']).abs().max() > 1e-4
        torch.testing.assert_close(ranks[0][f'train_{ensemble}_shuffle']['grad'],
                                   ranks[1][f'train_{ensemble}_shuffle']['grad'])
    # and the local ensemble really is per rank (differs from the global one)
    assert (ranks[0]['eval_global_plain']['loss'] - ranks[0]['eval_local_plain']['loss']).abs() > 1e-3
