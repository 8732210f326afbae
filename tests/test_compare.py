"""make compare's bookkeeping: the method table, the papers' directions, flag expansion, and a reduced run."""
import json
import os

import pytest

from dr import compare, demo


def test_every_method_names_a_paper_cell_that_exists():
    tables = compare.load_paper_tables()
    names = {m.name for m in compare.COMPARE_METHODS}
    assert len(names) == len(compare.COMPARE_METHODS)
    for m in compare.COMPARE_METHODS:
        if m.paper:
            table, row, col = m.paper
            assert col in tables[table]['rows'][row]['values'], m
        if m.versus:
            assert m.paper and m.versus[1] in names, m
            assert m.paper[2] in tables[m.paper[0]]['rows'][m.versus[0]]['values'], m


def test_paper_claims_follow_the_tables_direction():
    tables = {
        'bake/table4': {'metric': 'top-1 accuracy (%)', 'rows': {
            'bake': {'label': 'BAKE', 'values': {'top1': 78.0}}, 'x': {'label': 'X', 'values': {'top1': 77.0}},
            'y': {'label': 'Y', 'values': {'top1': 79.0}}, 'z': {'label': 'Z', 'values': {'top1': 78.0}}}},
        'bake/table8': {'metric': 'Top-1 error (%)', 'rows': {
            'bake': {'label': 'BAKE', 'values': {'c': 21.0}}, 'x': {'label': 'X', 'values': {'c': 23.0}}}}}
    M = compare.CompareMethod
    methods = [M('bake', 'BAKE'), M('x', 'X', paper=('bake/table4', 'x', 'top1'), versus=('bake', 'bake')),
               M('y', 'Y', paper=('bake/table4', 'y', 'top1'), versus=('bake', 'bake')),
               M('z', 'Z', paper=('bake/table4', 'z', 'top1'), versus=('bake', 'bake')),
               M('e', 'E', paper=('bake/table8', 'x', 'c'), versus=('bake', 'bake')),
               M('lone', 'L', paper=('bake/table4', 'x', 'top1'), versus=('bake', 'absent'))]
    claims = {c.b: c for c in compare.paper_claims(methods, tables)}
    assert set(claims) == {'x', 'y', 'z', 'e'}  # no claim against a method that is not run
    assert (claims['x'].sign, claims['x'].name) == (1, 'BAKE beats X')
    assert (claims['y'].sign, claims['y'].name) == (-1, 'BAKE trails Y')
    assert claims['z'].sign == 0
    assert claims['e'].sign == 1 and 'lower is better' in claims['e'].source  # 21 % error beats 23 %
    assert all(c.a == 'bake' and c.metric == 'top1' for c in claims.values())


def test_the_real_tables_give_the_papers_directions():
    claims = {c.b: c for c in compare.paper_claims(compare.COMPARE_METHODS, compare.load_paper_tables())}
    assert claims['label_smoothing'].sign == 1 and '78.0' in claims['label_smoothing'].source  # BAKE Table 4
    assert claims['plain'].name == 'BAKE beats plain'


def test_expand_flags_and_method_selection():
    values = {'teachers': ['a=1.pth', 'b=2.pth'], 'shards': '/s'}
    assert compare.expand_flags(['--kd-teacher', '{teachers}', '--reinforced', '{shards}', '-x'], values) == [
        '--kd-teacher', 'a=1.pth', 'b=2.pth', '--reinforced', '/s', '-x']
    with pytest.raises(ValueError, match='plain_checkpoint'):
        compare.expand_flags(['{plain_checkpoint}'], values)
    assert [m.name for m in compare.method_table(['bake'])] == ['plain', 'bake']
    with pytest.raises(ValueError, match='nope'):
        compare.method_table(['nope'])


@pytest.mark.slow
def test_reduced_compare_run_writes_results_table_figure_and_docs(tmp_path):
    cfg = demo.DemoConfig(epochs=2, seeds=(0, 1))
    out = str(tmp_path / 'cmp')
    res = compare.run_compare(out, cfg, ['label_smoothing'])
    assert [r['method'] for r in res['runs']] == ['plain', 'label_smoothing'] * 2
    assert all(0.0 <= r['top1'] <= 100.0 for r in res['runs'])
    assert res['summary']['plain']['time_ratio']['mean'] == pytest.approx(1.0)
    assert res['summary']['label_smoothing']['top1']['n'] == 2
    assert {c['b'] for c in res['claims']} == set()  # BAKE was not run: no verdict against it
    with open(os.path.join(out, 'compare_results.json')) as f:
        again = compare.summarize(json.load(f))
    assert again['summary']['plain']['top1'] == res['summary']['plain']['top1']
    assert os.path.getsize(os.path.join(out, 'compare.png')) > 1000
    docs = tmp_path / 'compare.md'
    docs.write_text(f'intro\n{compare.DOCS_BEGIN}\nold\n{compare.DOCS_END}\ntail\n')
    compare.publish(res, out, str(docs))
    text = docs.read_text()
    assert 'old' not in text and text.startswith('intro') and text.endswith('tail\n')
    assert '`--smoothing 0.1`' in text and (tmp_path / 'compare.png').exists()
