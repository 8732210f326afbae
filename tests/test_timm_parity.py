"""Every flag of timm's train.py and validate.py (tests/timm_flags/timm_flags.json, extracted from timm's scripts
by tests/timm_flags/extract_timm_flags.py) parses here with timm's name, dest, default and type."""
import argparse
import json
import os

import pytest

import train
import validate

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, 'timm_flags', 'timm_flags.json')) as f:
    TIMM = json.load(f)

# The only deliberate differences, each with its reason (also listed in docs/train.md, "Coming from timm").
DIFFERENCES = {
    ('train.py', 'device'): 'None = cuda if available, else cpu (timm: cuda, which fails on a CPU-only machine)',
    ('train.py', 'sync_bn'): 'None = decided at run time (on for the BAKE paper\'s class-aware sampling under '
                             'torchrun on CUDA); --sync-bn/--no-sync-bn force it; timm args.yaml false loads',
    ('validate.py', 'device'): 'None = cuda if available, else cpu (timm: cuda)',
    ('validate.py', 'model'): "None = the arch stored in the checkpoint (timm: dpn92)",
    ('validate.py', 'checkpoint'): 'several checkpoints or run folders give one table (nargs *; timm: one path)',
    ('validate.py', 'results_format'): "dr (this project's JSON + CSV) or timm (also timm's per-set files); timm: "
                                       'csv/json',
    ('validate.py', 'workers'): 'default 2 (the machines this project is tested on have 2 cores; timm: 4)',
}
PARSERS = {'train.py': train.create_parser()[1], 'validate.py': validate.create_parser()[1]}
CASES = [(script, flag) for script in ('train.py', 'validate.py') for flag in TIMM[script]]


def _id(case):
    return f'{case[0]}:{case[1]["options"][-1]}'


def test_the_list_is_timms_of_the_installed_version():
    import timm
    assert TIMM['timm_version'] == timm.__version__, 'regenerate tests/timm_flags/timm_flags.json (see its README)'
    assert len(TIMM['train.py']) > 150 and len(TIMM['validate.py']) > 50


@pytest.mark.parametrize('case', CASES, ids=[_id(c) for c in CASES])
def test_timm_flag_parses_with_timms_default_and_type(case):
    script, flag = case
    parser = PARSERS[script]
    if flag['positional']:
        actions = [a for a in parser._actions if not a.option_strings and a.dest == flag['dest']]
        assert actions, f'{script}: no positional {flag["dest"]}'
        action = actions[0]
        assert action.nargs == flag['nargs']
    else:
        for opt in flag['options']:
            assert opt in parser._option_string_actions, f'{script} does not accept timm\'s {opt}'
        action = parser._option_string_actions[flag['options'][0]]
    assert action.dest == flag['dest'], f'{script} {flag["options"]}: dest {action.dest}, timm {flag["dest"]}'
    if (script, flag['dest']) in DIFFERENCES:
        return
    default = action.default
    assert default == flag['default'] or (isinstance(default, dict) and flag['default'] == {}), \
        f'{script} {flag["options"][-1]}: default {default!r}, timm {flag["default"]!r}'
    # parsed from the command line (all other flags at their defaults), a value has timm's type
    if flag['action'] == 'store' and not flag['positional'] and flag['type'] in ('int', 'float', 'str'):
        choices = action.choices or flag['choices']  # (this project checks choices where timm takes any string)
        value = str(choices[0]) if choices else '0'
        n = flag['nargs'] if isinstance(flag['nargs'], int) else 1
        args = parser.parse_args([flag['options'][-1], *[value] * n])
        got = getattr(args, flag['dest'])
        got = got[0] if isinstance(got, list) else got
        assert type(got).__name__ == flag['type'], f'{flag["options"][-1]}: parsed as {type(got).__name__}'
    elif flag['action'] in ('store_true', 'store_false'):
        args = parser.parse_args([flag['options'][-1]])
        assert getattr(args, flag['dest']) is (flag['action'] == 'store_true')
    elif flag['action'] == 'ParseKwargs':
        args = parser.parse_args([flag['options'][-1], 'a=1', 'b=x'])
        assert getattr(args, flag['dest']) == {'a': 1, 'b': 'x'}


def test_deliberate_differences_are_timm_flags():
    dests = {(s, f['dest']) for s in ('train.py', 'validate.py') for f in TIMM[s]}
    assert set(DIFFERENCES) <= dests


def test_a_timm_args_yaml_loads_as_config(tmp_path):
    """The keys timm's train.py writes into args.yaml (its dests, at timm's defaults) load with --config."""
    cfg = {f['dest']: f['default'] for f in TIMM['train.py']}
    cfg.update(data=None, data_dir=str(tmp_path), model='resnet50', sync_bn=False, device='cuda')
    path = tmp_path / 'args.yaml'
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    args, _ = train.parse_args(['--config', str(path)])
    assert args.data_dir == str(tmp_path) and args.dataset == '' and args.model == 'resnet50'
    assert args.smoothing == 0.1 and args.weight_decay == 2e-5 and args.epochs == 300 and args.lr_base_scale == ''
    assert isinstance(args.model_kwargs, dict)


def test_project_aliases_of_timm_flags():
    args = PARSERS['train.py'].parse_args(['--kd-temp', '2', '--kd-weight', '0.5', '--kd-task-weight', '0.25'])
    assert (args.kd_temperature, args.distill_loss_weight, args.task_loss_weight) == (2.0, 0.5, 0.25)


def test_old_args_yaml_keys_of_renamed_flags_load(tmp_path):
    path = tmp_path / 'old.yaml'
    path.write_text('kd_temp: 2.0\nkd_weight: 1.0\nkd_task_weight: 0.0\nmodel_kwargs: [drop_rate=0.1]\n')
    args, _ = train.parse_args(['--config', str(path)])
    assert args.kd_temperature == 2.0 and args.distill_loss_weight == 1.0 and args.task_loss_weight == 0.0
    assert args.model_kwargs == {'drop_rate': 0.1}


assert argparse  # the parsers are argparse parsers; this module reads their actions
