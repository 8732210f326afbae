"""Fixtures of the reinforce.py tests: two small random teachers and one reference reinforcement of digits."""
import pytest
import timm
import torch

import reinforce
from tests.reinforce.common import reinforce_args


@pytest.fixture(scope='package')
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


@pytest.fixture(scope='package')
def ref(tmp_path_factory, ckpts):
    out = tmp_path_factory.mktemp('ref') / 'rd'
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert reinforce.main(reinforce_args(out, ckpts)) == 0
    finally:
        torch.set_num_threads(prev)
    return str(out)
