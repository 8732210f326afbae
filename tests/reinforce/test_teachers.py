"""Teacher specs and ensembles: local checkpoints, per-member input configs, mean of softmaxes, the KD forward."""
import pytest
import timm
import torch

from dr.reinforce.teachers import TeacherEnsemble, create_teacher, parse_teacher_spec


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp('teachers')
    paths = {}
    for seed, name in ((1, 'test_resnet'), (2, 'test_efficientnet')):
        torch.manual_seed(seed)
        model = timm.create_model(name, num_classes=10)
        path = d / f'{name}.pth.tar'
        torch.save({'state_dict': model.state_dict(), 'epoch': 3}, path)
        paths[name] = (str(path), model.eval())
    return paths


def test_parse_teacher_spec():
    assert parse_teacher_spec('resnet18') == ('resnet18', None)
    assert parse_teacher_spec('resnet18=/x/model_best.pth.tar') == ('resnet18', '/x/model_best.pth.tar')
    assert parse_teacher_spec('resnext101_32x8d.fb_wsl_ig1b_ft_in1k')[0] == 'resnext101_32x8d.fb_wsl_ig1b_ft_in1k'
    with pytest.raises(ValueError, match="--teacher: unknown timm model 'resnet_does_not_exist'"):
        parse_teacher_spec('resnet_does_not_exist')
    with pytest.raises(ValueError, match='empty checkpoint path'):
        parse_teacher_spec('resnet18=')
    with pytest.raises(ValueError, match='--kd-teacher: empty model name'):
        parse_teacher_spec('=ckpt', flag='--kd-teacher')


def test_ensemble_loads_checkpoints_and_averages_softmax(checkpoints):
    specs = [f'{n}={p}' for n, (p, _) in checkpoints.items()]
    ens = create_teacher(specs, num_classes=10, img_size=24)
    assert isinstance(ens, TeacherEnsemble) and ens.names == ['test_resnet', 'test_efficientnet']
    assert ens.origins == [p for p, _ in checkpoints.values()]
    assert all(s and len(s) == 64 for s in ens.weights_sha256)
    cfg_r, cfg_e = ens.member_cfgs
    assert cfg_r['mean'] == [0.5, 0.5, 0.5] and cfg_r['interpolation'] == 'bilinear'
    assert cfg_e['mean'] == pytest.approx([0.485, 0.456, 0.406]) and cfg_e['interpolation'] == 'bicubic'
    assert cfg_r['input_size'] == [3, 24, 24] == cfg_e['input_size']
    x = [torch.randn(4, 3, 24, 24), torch.randn(4, 3, 24, 24)]
    with torch.no_grad():
        probs = ens.forward_members(x)
        ref = sum(m(xi).softmax(-1) for (_, m), xi in zip(checkpoints.values(), x)) / 2
    assert torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    info = ens.info()
    assert info[0]['weights'] == checkpoints['test_resnet'][0] and 'weights_sha256' in info[0]
    with pytest.raises(ValueError, match='2 members'):
        ens.forward_members(x[:1])


def test_member_resolution_from_pretrained_cfg(checkpoints):
    ens = create_teacher([f'test_resnet={checkpoints["test_resnet"][0]}'], num_classes=10)
    assert ens.member_cfgs[0]['input_size'] == [3, 160, 160]


def test_kd_forward_renormalises_per_member(checkpoints):
    specs = [f'{n}={p}' for n, (p, _) in checkpoints.items()]
    ens = create_teacher(specs, num_classes=10, img_size=16)
    student_mean, student_std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    ens.set_input_norm(student_mean, student_std, (3, 32, 32))
    assert ens.pretrained_cfg['mean'] == student_mean and ens.pretrained_cfg['std'] == student_std
    raw = torch.rand(2, 3, 32, 32)
    x = (raw - torch.tensor(student_mean).view(1, 3, 1, 1)) / torch.tensor(student_std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = ens(x)
        small = torch.nn.functional.interpolate(raw, size=(16, 16), mode='bilinear', antialias=True)
        small_bc = torch.nn.functional.interpolate(raw, size=(16, 16), mode='bicubic', antialias=True)
        inputs = [(small - 0.5) / 0.5,
                  (small_bc - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                  / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)]
        ref = ens.forward_members(inputs)
    assert torch.allclose(out.exp(), ref, atol=1e-5)
    assert torch.allclose(out.softmax(-1), ref, atol=1e-5)  # logits for timm's KD task = log of the ensemble


def test_bad_teachers(checkpoints, tmp_path):
    with pytest.raises(ValueError, match='unknown timm model'):
        create_teacher(['not_a_model_xyz'], num_classes=10)
    with pytest.raises(ValueError, match=r'has 10 classes but the model has 5'):
        create_teacher([f'test_resnet={checkpoints["test_resnet"][0]}'], num_classes=5)
    with pytest.raises(ValueError, match='Checkpoint not found'):
        create_teacher([f'test_resnet={tmp_path / "missing.pth"}'], num_classes=10)
    with pytest.raises(ValueError, match='--teacher test_resnet=.*'):
        create_teacher([f'test_resnet={checkpoints["test_efficientnet"][0]}'], num_classes=10)


def test_fixed_size_models_follow_img_size():
    torch.manual_seed(0)
    ens = create_teacher(['test_vit'], num_classes=10, img_size=32)
    assert ens.member_cfgs[0]['input_size'] == [3, 32, 32] and ens.origins == ['random']
    with torch.no_grad():
        assert ens.forward_members([torch.randn(2, 3, 32, 32)]).shape == (2, 10)


def test_ig_resnext_ensemble_names_resolve():
    """The paper's four IG-1B ResNeXt teachers are distinct timm models (incl. the 32x48d we register)."""
    names = [f'resnext101_32x{w}d.fb_wsl_ig1b_ft_in1k' for w in (8, 16, 32, 48)]
    assert [parse_teacher_spec(n)[0] for n in names] == names
    from timm.models import get_pretrained_cfg
    cfgs = [get_pretrained_cfg(n) for n in names]
    assert len({c.url for c in cfgs}) == 4 and all(c.input_size == (3, 224, 224) for c in cfgs)
    assert cfgs[3].hf_hub_id == 'timm/resnext101_32x48d.fb_wsl_ig1b_ft_in1k'
    with torch.device('meta'):
        model = timm.create_model('resnext101_32x48d')
    assert 825e6 < sum(p.numel() for p in model.parameters()) < 835e6  # ResNeXt-101 32x48d: 829M parameters


def test_member_uses_data_config_stored_by_train_py(tmp_path):
    """A train.py checkpoint carries its data config; the teacher must see inputs at that size, not the hub cfg's."""
    import argparse

    import timm
    import torch

    from dr.reinforce.teachers import create_teacher
    model = timm.create_model('test_resnet', num_classes=10)
    data_config = {'input_size': [3, 24, 24], 'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25],
                   'interpolation': 'bicubic', 'crop_pct': 1.0}
    torch.save({'state_dict': model.state_dict(), 'args': argparse.Namespace(model='test_resnet',
                                                                             data_config=data_config)},
               tmp_path / 'trained.pth.tar')
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'bare.pth.tar')
    specs = [f'test_resnet={tmp_path / "trained.pth.tar"}', f'test_resnet={tmp_path / "bare.pth.tar"}']
    teacher = create_teacher(specs, num_classes=10)
    stored, bare = teacher.member_cfgs
    assert stored['input_size'] == [3, 24, 24] and stored['std'] == [0.25, 0.25, 0.25]
    assert stored['interpolation'] == 'bicubic'
    assert bare['input_size'] == list(timm.data.resolve_data_config({}, model=model)['input_size'])
    override = create_teacher([f'test_resnet={tmp_path / "trained.pth.tar"}'], num_classes=10, img_size=16)
    assert override.member_cfgs[0]['input_size'] == [3, 16, 16]
