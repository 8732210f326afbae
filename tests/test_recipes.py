"""Every recipe under hparams/ against hparams/paper_tables.yaml (the papers' tables) and against its script's parser.

* each recipe names the table cells it reproduces in ``# paper: <paper>/<table>/<row> <column>=<value>`` lines; the
  named row and column exist, the stated number equals the paper's, and the table lists the recipe for that cell;
* every baseline/result cell of every table has a recipe or a ``not_expressible`` reason, and every recipe a table
  lists exists and names that cell;
* every recipe loads through its script's real parser (train.py, reinforce.py, validate.py) with the file's values;
* the BAKE recipes' ``--no-bake`` gives their Vanilla twin, and the ablation recipes set what their row varies.
"""
import functools
import glob
import os
import re
from typing import Dict, List, Tuple

import pytest
import timm
import torch
import yaml

import reinforce
import train
import validate
from dr.config import parse_key_values
from tests.helpers import REPO

TABLES_FILE = os.path.join(REPO, 'hparams', 'paper_tables.yaml')
ROLES = ('baseline', 'result', 'info')
PAPER_RE = re.compile(r'^# paper: (?P<ref>\S+) (?P<cells>.+)$')
CELL_RE = re.compile(r'^(?P<col>[A-Za-z0-9_.]+)=(?P<value>null|-?\d+(\.\d+)?)$')


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def _load_tables() -> Dict[str, dict]:
    with open(TABLES_FILE) as f:
        return yaml.safe_load(f)['tables']


TABLES = _load_tables()
RECIPES = sorted(_rel(p) for p in glob.glob(os.path.join(REPO, 'hparams', '**', '*.yaml'), recursive=True)
                 if os.path.abspath(p) != TABLES_FILE)


def parse_paper_lines(text: str) -> List[Tuple[str, str, str, object]]:
    """``(table, row, column, value)`` of every ``# paper:`` header line (value ``None`` for ``null``).

    Raises ``ValueError`` naming the line when it does not follow the format.
    """
    cells = []
    for line in text.splitlines():
        if not line.startswith('# paper:'):
            continue
        m = PAPER_RE.match(line)
        if not m or '/' not in m['ref']:
            raise ValueError(f'malformed paper line {line!r}: expected "# paper: <paper>/<table>/<row> col=value ..."')
        table, row = m['ref'].rsplit('/', 1)
        for token in m['cells'].split():
            c = CELL_RE.match(token)
            if not c:
                raise ValueError(f'malformed cell {token!r} in {line!r}: expected column=number or column=null')
            cells.append((table, row, c['col'], None if c['value'] == 'null' else float(c['value'])))
    return cells


def check_recipe_against_tables(path: str, text: str, tables: Dict[str, dict]) -> List[str]:
    """Problems of one recipe's paper lines against ``tables`` (empty when consistent)."""
    try:
        cells = parse_paper_lines(text)
    except ValueError as e:
        return [f'{path}: {e}']
    if not cells:
        return [f'{path}: no "# paper: <paper>/<table>/<row> col=value" header line']
    problems = []
    for table, row, col, value in cells:
        where = f'{path}: paper line {table}/{row} {col}'
        if table not in tables:
            problems.append(f'{where}: table {table!r} is not in paper_tables.yaml')
            continue
        rows = tables[table]['rows']
        if row not in rows:
            problems.append(f'{where}: row {row!r} does not exist in {table}')
            continue
        values = rows[row].get('values') or {}
        if col not in values:
            problems.append(f'{where}: column {col!r} does not exist in {table}/{row}')
            continue
        paper = values[col]
        if (paper is None) != (value is None) or (paper is not None and float(paper) != value):
            problems.append(f'{where}: the recipe states {value}, the paper (paper_tables.yaml) {paper}')
        if path not in ((rows[row].get('recipes') or {}).get(col) or []):
            problems.append(f'{where}: paper_tables.yaml does not list this recipe for the cell')
    return problems


def check_tables(tables: Dict[str, dict], recipe_texts: Dict[str, str]) -> List[str]:
    """Problems of the tables: cells without recipe or reason, listed recipes missing or not naming the cell."""
    problems = []
    for tid, table in tables.items():
        columns = table.get('columns') or {}
        for col, role in columns.items():
            if role not in ROLES:
                problems.append(f'{tid}: column {col!r} has role {role!r}, expected one of {ROLES}')
        for rid, row in table['rows'].items():
            where = f'{tid}/{rid}'
            values = row.get('values') or {}
            if set(values) != set(columns):
                problems.append(f'{where}: values {sorted(values)} do not match the table columns {sorted(columns)}')
            recipes = row.get('recipes') or {}
            reason = row.get('not_expressible')
            for col, role in columns.items():
                if role == 'info':
                    continue
                v = values.get(col)
                if v is not None and not isinstance(v, (int, float)):
                    problems.append(f'{where}: {col} = {v!r} is not a number')
                has_reason = isinstance(reason, str) or (isinstance(reason, dict) and col in reason)
                if not recipes.get(col) and not has_reason:
                    problems.append(f'{where}: column {col!r} has neither a recipe nor a not_expressible reason')
                if recipes.get(col) and isinstance(reason, dict) and col in reason:
                    problems.append(f'{where}: column {col!r} has both recipes and a not_expressible reason')
            for col, files in recipes.items():
                if columns.get(col) in (None, 'info'):
                    problems.append(f'{where}: recipes listed for {col!r}, which is not a baseline/result column')
                for f in files:
                    if f not in recipe_texts:
                        problems.append(f'{where}: listed recipe {f} does not exist')
                        continue
                    named = {(t, r, c) for t, r, c, _ in parse_paper_lines(recipe_texts[f])}
                    if (tid, rid, col) not in named:
                        problems.append(f'{where}: listed recipe {f} has no paper line for column {col!r}')
    return problems


def _texts() -> Dict[str, str]:
    out = {}
    for rel in RECIPES:
        with open(os.path.join(REPO, rel)) as f:
            out[rel] = f.read()
    return out


TEXTS = _texts()


# --- the tables and the recipes' paper lines --------------------------------------------------------------------------
def test_tables_cover_the_papers():
    expected = {f'bake/table{n}' for n in (2, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16)} | {'bake/fig4'}
    expected |= {f'dr/table{n}' for n in (1, 3, 4, 5, 7, 8, 9, 10)}
    assert expected <= set(TABLES), sorted(expected - set(TABLES))


def test_every_table_cell_has_a_recipe_or_a_reason():
    problems = check_tables(TABLES, TEXTS)
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('path', RECIPES)
def test_recipe_numbers_match_the_paper(path):
    problems = check_recipe_against_tables(path, TEXTS[path], TABLES)
    assert not problems, '\n'.join(problems)


def test_checks_catch_wrong_numbers_and_rows():
    # The checks themselves: a wrong number, an unknown row or column, a cell without recipe or reason.
    path = 'hparams/bake/in1k/resnet50_bake.yaml'
    text = TEXTS[path]
    assert not check_recipe_against_tables(path, text, TABLES)
    wrong = text.replace('# paper: bake/table2/resnet50 bake=78.0', '# paper: bake/table2/resnet50 bake=78.1')
    assert any('states 78.1, the paper (paper_tables.yaml) 78.0' in p
               for p in check_recipe_against_tables(path, wrong, TABLES))
    missing_row = text.replace('bake/table2/resnet50 ', 'bake/table2/resnet51 ')
    assert any("row 'resnet51' does not exist" in p for p in check_recipe_against_tables(path, missing_row, TABLES))
    bad_col = text.replace('bake/table2/resnet50 bake=', 'bake/table2/resnet50 bak=')
    assert any("column 'bak' does not exist" in p for p in check_recipe_against_tables(path, bad_col, TABLES))
    assert check_recipe_against_tables(path, '# no paper line\nmodel: resnet50\n', TABLES)
    tables = yaml.safe_load(yaml.safe_dump(TABLES))
    del tables['bake/table2']['rows']['resnet50']['recipes']['vanilla']
    assert any("bake/table2/resnet50: column 'vanilla' has neither" in p for p in check_tables(tables, TEXTS))


# --- recipes load through their scripts ----------------------------------------------------------------------------
def _script(path: str):
    if path.startswith('hparams/eval/'):
        return validate
    if path.startswith('hparams/dr/reinforce/'):
        return reinforce
    return train


@pytest.mark.parametrize('path', RECIPES)
def test_recipe_parses_with_its_script(path):
    script = _script(path)
    with open(os.path.join(REPO, path)) as f:
        raw = yaml.safe_load(f)
    image_folder = script is train and raw.get('dataset') == '' and not raw.get('data_dir')
    root = ['/data/root'] if image_folder else []  # an ImageFolder recipe reads DIR
    args, args_text = script.parse_args(['--config', os.path.join(REPO, path), *root])
    for key, value in raw.items():
        if key == 'batch_size' and script is train and raw.get('batch_anchors'):
            continue
        got = getattr(args, key)
        if key in ('model_kwargs', 'opt_kwargs') and isinstance(value, list):  # KEY=VALUE items give a mapping
            value = parse_key_values(value, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert '.py' in ''.join(line for line in TEXTS[path].splitlines() if line.startswith('#')), \
        'the header shows the command line'
    if script is train:
        assert args.model in timm.list_models(), f'{args.model} is not a timm model name'
        assert args.lr is None and args.lr_base > 0
        if args.model_kwargs:
            kwargs = dict(args.model_kwargs)
            with torch.device('meta'):  # builds the architecture without allocating weights
                timm.create_model(args.model, num_classes=args.num_classes, **kwargs)
        loaded = yaml.safe_load(args_text)  # the resolved args (args.yaml of a run) load again
        assert train.parse_args(['--config', os.path.join(REPO, path), '-b', str(loaded['batch_size']), *root])
    if script is reinforce:
        assert args.amp is False, 'reinforcement recipes run the teacher in float32 by default'


# --- BAKE ------------------------------------------------------------------------------------------------------------
BAKE_RECIPES = [p for p in RECIPES if p.startswith('hparams/bake/')]
ALLOWED_NO_BAKE_DIFF = {'bake', 'bake_omega', 'bake_temp', 'bake_weight', 'bake_intra', 'bake_knowledge',
                        'bake_global', 'experiment', 'config', 'warmup_lr'}


@functools.cache
def _parsed(path: str, extra: Tuple[str, ...]) -> Dict[str, object]:
    args = vars(train.parse_args(['--config', os.path.join(REPO, path), *extra])[0])
    args.pop('_parser', None)
    return args


def _args(path, *extra):
    return dict(_parsed(path, tuple(extra)))


@pytest.mark.parametrize('path', [p for p in BAKE_RECIPES if p.endswith('_bake.yaml')])
def test_no_bake_on_a_bake_recipe_gives_its_vanilla_twin(path):
    bake, off = _args(path), _args(path, '--no-bake')
    vanilla = _args(path.replace('_bake.yaml', '_vanilla.yaml'))
    assert bake['bake'] and bake['sampler_intra'] == bake['bake_intra'] >= 1
    assert not off['bake'] and off['sampler_intra'] == 0
    diff = {k for k in vanilla if k != '_parser' and off.get(k) != vanilla[k]} - ALLOWED_NO_BAKE_DIFF
    if '_384_' in path:  # the 384 px fine-tune starts from the BAKE (resp. Vanilla) 224 px run
        assert diff == {'pretrained_path'} and 'swin_base_bake/' in bake['pretrained_path']
        diff = set()
    assert not diff, {k: (off.get(k), vanilla[k]) for k in diff}
    if '/in1k/' in path:  # the paper doubles the batch with the class mates; the anchors stay 256
        assert bake['batch_size'] == 2 * vanilla['batch_size'] and bake['batch_anchors'] == vanilla['batch_anchors']
        assert bake['warmup_lr'] == pytest.approx(2 * vanilla['warmup_lr'])  # pycls: 0.1 x lr
        assert off['sync_bn'] is None and vanilla['sync_bn'] is None  # SyncBN follows the sampler (auto)
    else:  # Swin and the small-scale code keep the number of images (the authors' -n / Swin's 1024)
        assert bake['batch_size'] == vanilla['batch_size']
        assert bake['warmup_lr'] == vanilla['warmup_lr']


@pytest.mark.parametrize('path', BAKE_RECIPES)
def test_bake_recipe_settings(path):
    args = _args(path)
    name = os.path.basename(path)
    if args['bake']:
        assert args['batch_size'] % (1 + args['bake_intra']) == 0
        assert 0.0 <= args['bake_omega'] <= 1.0 and args['bake_global']
        assert args['bake_one_step'] == (args['bake_omega'] == 1.0 or 'onestep' in name)
    if '/in1k/' in path or '/ablations/' in path:
        assert args['opt'] == 'sgd' and args['sched'] == 'cosine' and args['lr_base_size'] == 256
        assert args['epochs'] in (100, 300) and args['warmup_epochs'] == 5 and args['num_classes'] == 1000
        world = 4 if 'mobilenetv2' in name else 8
        lr = args['lr_base'] * args['batch_size'] * world / 256
        assert args['warmup_lr'] == pytest.approx(0.1 * lr)  # pycls warm-up factor 0.1
        assert args['batch_anchors'] * world == 256  # N-hat = 256 (Sec. 3.3, Table 10)
    if '/swin/' in path:
        assert args['opt'] == 'adamw' and args['batch_size'] * 8 == 1024  # Appendix A.1: 1024 = 512 x (1 + 1)
        assert args['lr_base_size'] == 512
    if '/small/' in path:
        assert args['epochs'] == 200 and args['sched'] == 'multistep' and args['decay_milestones'] == [100, 150]
        assert args['interpolation'] == args['train_interpolation'] == 'bilinear'
        if name.startswith(('cifar100', 'tinyimagenet')):
            assert args['img_size'] == 32  # the authors' code trains TinyImageNet at 32 px too


ABLATIONS = {
    # file: {arg: value} that the row varies (besides the base resnet50_bake recipe)
    'resnet50_bake_m0.yaml': {'bake_intra': 0, 'sampler_intra': 0, 'batch_size': 32},
    'resnet50_vanilla_m1.yaml': {'bake': False, 'sampler_intra': 1, 'batch_size': 64},
    'resnet50_vanilla_m3.yaml': {'bake': False, 'sampler_intra': 3, 'batch_size': 128},
    'resnet50_bake_m3.yaml': {'bake_intra': 3, 'sampler_intra': 3, 'batch_size': 128},
    'resnet50_bake_omega0.0.yaml': {'bake_omega': 0.0},
    'resnet50_bake_omega1.0.yaml': {'bake_omega': 1.0, 'bake_one_step': True},
    'resnet50_bake_onestep_omega0.3.yaml': {'bake_omega': 0.3, 'bake_one_step': True},
    'resnet50_bake_tau8.yaml': {'bake_temp': 8.0},
    'resnet50_bake_lambda0.5.yaml': {'bake_weight': 0.5},
    'resnet50_bake_knowledge_labels.yaml': {'bake_knowledge': 'labels'},
    'resnet50_vanilla_syncbn.yaml': {'bake': False, 'sync_bn': True, 'batch_size': 32},
    'resnet50_bake_normalbn.yaml': {'sync_bn': False, 'shuffle_bn': False},
    'resnet50_bake_shufflebn.yaml': {'sync_bn': False, 'shuffle_bn': True},
    'resnet50_bake_cutmix_e300.yaml': {'cutmix': 1.0, 'epochs': 300, 'mixup_off_epoch': 295},
    'resnet50_label_smoothing.yaml': {'bake': False, 'smoothing': 0.1},
}


@pytest.mark.parametrize('name', sorted(ABLATIONS))
def test_ablation_recipes_vary_their_row(name):
    args = _args(f'hparams/bake/ablations/{name}')
    base = _args('hparams/bake/in1k/resnet50_bake.yaml')
    for key, value in ABLATIONS[name].items():
        assert args[key] == value, key
    diff = {k for k in base if k != '_parser' and args[k] != base[k]}
    derived = {'experiment', 'config', 'batch_size', 'warmup_lr', 'sampler_intra', 'mixup_prob', 'mixup_off_epoch'}
    if not args['bake']:
        derived |= {'bake', 'class_aware_intra'} | {k for k in base if k.startswith('bake_')}
    assert diff - derived <= set(ABLATIONS[name]), diff - derived


def test_small_scale_random_walk_recipes():
    for ds in ('cifar100', 'cub200'):
        rw = _args(f'hparams/bake/small/{ds}_resnet18_random_walk.yaml')
        bk = _args(f'hparams/bake/small/{ds}_resnet18_bake.yaml')
        assert rw['bake_random_walk'] and not bk['bake_random_walk']
        diff = {k for k in bk if k != '_parser' and rw[k] != bk[k]}
        assert diff == {'bake_random_walk', 'experiment', 'config'}


# --- DR --------------------------------------------------------------------------------------------------------------
DR_TRAIN = [p for p in RECIPES if p.startswith('hparams/dr/train/')]
DR_NAME_RE = re.compile(
    r'^(?P<arch>[a-z0-9_]+?)_e(?P<epochs>\d+)_(?P<data>imagenet(_plus(_rrc|_small)?)?|relabel)\.yaml$')


@pytest.mark.parametrize('path', DR_TRAIN)
def test_dr_train_recipe(path):
    args = _args(path)
    m = DR_NAME_RE.match(os.path.basename(path))
    assert m and int(m['epochs']) == args['epochs'] and args['num_classes'] == 1000
    plus = m['data'] != 'imagenet'
    assert args['experiment'] == os.path.basename(path)[:-5]
    if plus:
        assert args['reinforced'] and args['rd_loss'] == 'kl' and args['rd_densify'] == 'smooth'
        assert args['mixup'] == 0 and args['cutmix'] == 0 and args['smoothing'] == 0
    else:
        assert args['reinforced'] is None and args['smoothing'] == pytest.approx(0.1)


def test_dr_recipe_pairs_differ_only_in_data_and_its_regularisers():
    # MobileNetV3's ImageNet recipe trains without RandAugment / random erasing (no augmentation in the paper's
    # baseline); its ImageNet+ twin turns them on for the rd_p = 1% of samples that use the plain transform.
    allowed = {'reinforced', 'rd_densify', 'rd_loss', 'rd_p', 'rd_gt_weight', 'rd_shuffle_buffer', 'mixup', 'cutmix',
               'smoothing', 'experiment', 'config', '_parser'}
    for path in DR_TRAIN:
        if not path.endswith('_imagenet.yaml'):
            continue
        base = _args(path)
        plus = _args(path.replace('_imagenet.yaml', '_imagenet_plus.yaml'))
        diff = {k for k in base if base[k] != plus[k]} - allowed
        if os.path.basename(path).startswith('mobilenetv3'):
            assert diff == {'aa', 'reprob', 'remode'}, diff
        else:
            assert not diff, f'{path}: ImageNet and ImageNet+ recipes also differ in {sorted(diff)}'


def test_transfer_chain_points_at_existing_recipes():
    # every checkpoint, reinforcement and teacher a transfer recipe reads is produced by a recipe of the repository
    outputs = {}
    for path in RECIPES:
        if _script(path) is train:
            a = _args(path)
            outputs[os.path.join(a['output'], a['experiment'])] = path
    for path in [p for p in RECIPES if p.startswith('hparams/dr/transfer/')]:
        a = _args(path)
        if a['pretrained_path']:
            run = os.path.dirname(a['pretrained_path'])
            assert run in outputs, f'{path}: no recipe writes {run}'
        if a['reinforced']:
            name = os.path.basename(a['reinforced'])
            assert f'hparams/dr/reinforce/{name}.yaml' in RECIPES
    for ds in ('cifar100', 'flowers102', 'food101'):
        rd = vars(reinforce.parse_args(['--config', os.path.join(REPO, f'hparams/dr/reinforce/{ds}_plus.yaml')])[0])
        assert len(rd['teacher']) == 4 and all(t.startswith('resnet152=') for t in rd['teacher'])
        teacher = _args(f'hparams/dr/transfer/teacher_resnet152_{ds}.yaml')
        assert os.path.dirname(teacher['pretrained_path']) in outputs
        for t in rd['teacher']:
            assert t.split('=', 1)[1].startswith(os.path.join(teacher['output'], teacher['experiment']) + '_s')


@pytest.mark.parametrize('path', [p for p in RECIPES if p.startswith('hparams/eval/')])
def test_eval_recipe_evaluates_a_recipe_checkpoint(path):
    args = vars(validate.parse_args(['--config', os.path.join(REPO, path)])[0])
    produced = set()
    for p in RECIPES:
        if _script(p) is train:
            a = _args(p)
            produced.add(os.path.join(a['output'], a['experiment']))
    for ckpt in args['checkpoint']:
        assert ckpt in produced, f'{path}: no training recipe writes {ckpt}'
        assert f'({ckpt};' in TEXTS[path]  # the header names the run it evaluates
    assert args['sets']


def test_docs_index_lists_every_recipe():
    with open(os.path.join(REPO, 'docs', 'recipes.md')) as f:
        doc = f.read()
    missing = [p for p in RECIPES if f'`{p[len("hparams/"):]}`' not in doc]
    assert not missing, f'docs/recipes.md does not list {missing}'
