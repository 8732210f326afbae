"""The demo's bookkeeping (aggregation, verdicts, tables, README block, figure) and a reduced end-to-end run."""
import copy
import json
import math
import os

import pytest

from dr import demo


def _run(method, seed, top1, ece=5.0, spe=2.0, bins=None):
    return {'method': method, 'seed': seed, 'epochs': 6, 'batch_size': 64, 'steps': 132, 'images_seen': 8628,
            'top1': top1, 'ece': ece, 'digits_c_top1': top1 - 20, 'fgsm_2': top1 - 10, 'fgsm_4': top1 - 20,
            'fgsm_8': top1 - 40, 'seconds_per_epoch': spe, 'cpu_seconds_per_epoch': 1.5 * spe, 'calibration_bins': bins}


def _results():
    bins = {'count': [0] * 13 + [10, 90], 'conf_sum': [0.0] * 13 + [8.9, 88.0],
            'correct_sum': [0] * 13 + [8, 89]}
    runs = []
    for seed, (p, r, k) in enumerate(((90.0, 92.0, 93.0), (91.0, 93.0, 92.0), (92.0, 94.0, 94.0))):
        runs += [_run('plain', seed, p, ece=6.0, spe=2.0 + seed, bins=bins),
                 _run('plain_2x', seed, p + 1, spe=2.0 + seed), _run('bake', seed, p + 0.5, spe=4.0 + 2 * seed),
                 _run('reinforced', seed, r, ece=3.0, spe=2.2 + 1.1 * seed, bins=bins),
                 _run('online_kd', seed, k, spe=6.0 + 3 * seed)]
    results = {'config': demo.DemoConfig().to_dict(), 'runs': runs, 'seconds': 400.0,
               'machine': {'cpus': 2, 'load_start': [1.0, 1.0, 1.0], 'load_end': [3.5, 2.25, 1.0]},
               'teacher': {'members': [{'model': 'resnet10t', 'top1': 98.5}, {'model': 'resnet10t', 'top1': 98.1}],
                           'ensemble': {'top1': 98.9, 'ece': 1.2},
                           'reinforce': {'teacher_accuracy': 0.955, 'label_agreement': 0.99}}}
    return demo.summarize(results)


def test_mean_std_sample_std_and_missing_values():
    assert demo.mean_std([1.0, 2.0, 3.0]) == {'mean': 2.0, 'std': 1.0, 'n': 3}
    assert demo.mean_std([4.0, None, float('nan')]) == {'mean': 4.0, 'std': None, 'n': 1}
    assert demo.mean_std([]) == {'mean': None, 'std': None, 'n': 0}


def test_aggregate_recomputes_means_from_per_seed_numbers():
    res = _results()
    s = res['summary']
    assert list(s) == list(demo.METHODS)
    assert s['reinforced']['top1']['mean'] == pytest.approx(93.0)
    assert s['reinforced']['top1']['std'] == pytest.approx(1.0)
    assert s['online_kd']['top1']['mean'] == pytest.approx(93.0)
    assert s['online_kd']['top1']['std'] == pytest.approx(1.0)
    assert s['plain']['seeds'] == [0, 1, 2]
    # time ratios are paired per seed: (2.2, 3.3, 4.4) / (2, 3, 4) = 1.1 each; KD 3x each
    assert s['reinforced']['time_ratio']['mean'] == pytest.approx(1.1)
    assert s['reinforced']['time_ratio']['std'] == pytest.approx(0.0, abs=1e-12)
    assert s['online_kd']['time_ratio']['mean'] == pytest.approx(3.0)
    assert s['plain']['time_ratio']['mean'] == pytest.approx(1.0)
    # JSON round trip keeps everything needed to recompute the summary
    again = demo.summarize(json.loads(json.dumps({k: v for k, v in res.items() if k not in ('summary', 'claims')})))
    assert again['summary'] == json.loads(json.dumps(s))


def test_check_claim_verdicts():
    res = _results()
    verdicts = {c['claim']: c['verdict'] for c in res['claims']}
    # reinforced 93 +- 1 vs plain 91 +- 1: difference 2 > sqrt(2)
    assert verdicts['reinforced beats plain top-1 at equal epochs'] == 'reproduces'
    # BAKE 91.5 vs plain_2x 92: -0.5 within sqrt(2)
    assert verdicts['BAKE beats plain at equal images seen'] == 'within seed noise'
    assert verdicts['reinforced matches online KD top-1'] == 'reproduces'
    assert verdicts['reinforced is better calibrated than plain (lower ECE)'] == 'reproduces'
    assert verdicts['online KD costs more per epoch than reinforced (wall time)'] == 'reproduces'
    assert verdicts['reinforced trains at the cost of plain training (CPU time)'] == 'reproduces'  # 1.1x, tol 0.12
    summary = copy.deepcopy(res['summary'])
    summary['reinforced']['top1'] = {'mean': 85.0, 'std': 1.0, 'n': 3}
    claims = {c.name: c for c in demo.CLAIMS}
    claim = claims['reinforced beats plain top-1 at equal epochs']
    assert demo.check_claim(claim, summary)['verdict'] == 'opposite direction'
    assert demo.check_claim(claims['reinforced matches online KD top-1'], summary)['verdict'] == 'does not reproduce'
    summary['reinforced']['cpu_ratio'] = {'mean': 1.2, 'std': 0.05, 'n': 3}
    cpu_claim = claims['reinforced trains at the cost of plain training (CPU time)']
    assert demo.check_claim(cpu_claim, summary)['verdict'] == 'does not reproduce'  # 1.2x: beyond 0.12 and noise
    del summary['reinforced']
    assert demo.check_claim(claim, summary)['verdict'] == 'not measured'


def test_tables_and_readme_block_come_from_the_results():
    res = _results()
    block = demo.render_markdown(res, figure='docs/demo.png')
    assert '![demo' in block and '(docs/demo.png)' in block
    assert '| reinforced (DR) | 93.00 ± 1.00 | 3.00 ± 0.00 |' in block
    assert '| plain 2x epochs | 6 | 64 | 132 | 8628 | 92.00 ± 1.00 |' in block
    assert '98.90' in block and '95.50' in block  # ensemble clean top-1, accuracy on stored augmentations
    assert '**reproduces**' in block and '**within seed noise**' in block
    text = demo.text_table(demo.demo_tables(res)['dr'])
    assert text.splitlines()[1].startswith('------')
    assert 'online KD' in text and '3.00 ± 0.00x' in text

    readme = 'intro\n' + demo.README_BEGIN + '\nold numbers\n' + demo.README_END + '\ntail\n'
    new = demo.replace_block(readme, block)
    assert new.startswith('intro\n' + demo.README_BEGIN + '\n![demo') and new.endswith(demo.README_END + '\ntail\n')
    assert 'old numbers' not in new
    assert demo.replace_block(new, block) == new  # idempotent
    with pytest.raises(ValueError, match='exactly one'):
        demo.replace_block('no markers', block)
    with pytest.raises(ValueError, match='exactly one'):
        demo.replace_block(demo.README_END + demo.README_BEGIN, block)


def test_update_readme_keeps_the_rest_and_names_the_file(tmp_path):
    path = tmp_path / 'README.md'
    path.write_text('# x\n\n' + demo.README_BEGIN + '\n' + demo.README_END + '\n\n## after\n')
    demo.update_readme(str(path), 'generated')
    assert path.read_text() == '# x\n\n' + demo.README_BEGIN + '\ngenerated\n' + demo.README_END + '\n\n## after\n'
    bad = tmp_path / 'BAD.md'
    bad.write_text('nothing')
    with pytest.raises(ValueError, match='BAD.md'):
        demo.update_readme(str(bad), 'generated')
    assert bad.read_text() == 'nothing'


def test_committed_readme_block_matches_committed_results():
    """README.md's generated block is exactly what the committed docs/demo_results.json renders to."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'docs', 'demo_results.json')) as f:
        results = json.load(f)
    with open(os.path.join(root, 'README.md')) as f:
        readme = f.read()
    assert demo.replace_block(readme, demo.render_markdown(results)) == readme
    assert len(results['config']['seeds']) >= 3
    assert all(s['top1']['n'] >= 3 for s in results['summary'].values())
    assert os.path.isfile(os.path.join(root, 'docs', 'demo.png'))


def test_plot_and_write_results(tmp_path):
    res = _results()
    paths = demo.write_results(res, str(tmp_path))
    with open(paths['figure'], 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(paths['figure']) > 20000
    with open(paths['results']) as f:
        saved = json.load(f)
    assert [r['top1'] for r in saved['runs'] if r['method'] == 'plain'] == [90.0, 91.0, 92.0]
    assert 'reinforced (DR)' in open(paths['tables']).read()
    # a results dict without calibration bins still plots (the reliability panels say so)
    for r in res['runs']:
        r['calibration_bins'] = None
    demo.plot_demo(res, str(tmp_path / 'nobins.png'))
    assert os.path.getsize(tmp_path / 'nobins.png') > 10000


def test_student_plan_matches_bake_steps_and_images():
    cfg = demo.DemoConfig(epochs=4, batch_size=32, lr=0.1)
    plan = demo.student_plan(cfg, 'shards', ['resnet10t=a.pth'])
    assert plan['bake']['batch_size'] == 64 and plan['bake']['lr'] == pytest.approx(0.2)
    assert plan['bake']['epochs'] == plan['plain']['epochs'] == 4 and plan['plain_2x']['epochs'] == 8
    # equal images: bake epochs x (1 + M) == plain_2x epochs; equal steps: bake batch / (1 + M) == plain batch
    assert plan['bake']['epochs'] * plan['bake']['images_per_epoch'] == plan['plain_2x']['epochs']
    assert plan['bake']['batch_size'] // plan['bake']['images_per_epoch'] == plan['plain']['batch_size']
    assert plan['reinforced']['extra'][:2] == ['--reinforced', 'shards']
    assert plan['online_kd']['extra'] == ['--kd-teacher', 'resnet10t=a.pth', *demo.KD_FLAGS]


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path):
    """Every stage through the scripts' entry points on a tiny budget: a 1-epoch teacher, 1-epoch students of one
    seed, 2 stored samples per image; then README/docs publishing and a re-render from the saved results."""
    out = tmp_path / 'demo'
    readme = tmp_path / 'README.md'
    readme.write_text(f'top\n{demo.README_BEGIN}\n{demo.README_END}\nbottom\n')
    (out / 'runs' / 'stale').mkdir(parents=True)
    res = demo.main(['--output', str(out), '--epochs', '1', '--seeds', '3', '--teacher', 'test_resnet',
                     '--teacher-epochs', '1', '--num-samples', '2', '--corruptions', 'contrast',
                     '--readme', str(readme), '--docs-dir', str(tmp_path / 'docs')])
    assert not (out / 'runs' / 'stale').exists()  # previous run folders are removed first
    assert [(r['method'], r['seed']) for r in res['runs']] == [(m, 3) for m in demo.METHODS]
    val = json.loads((out / 'validate' / 'digits.json').read_text())
    assert {r['corruption'] for r in val['results'] if r['tag'] == 'plain-s3' and r['set'].startswith('digits-c/')} \
        == {'contrast', ''}  # '': digits-c/clean
    for r in res['runs']:
        assert 0 <= r['top1'] <= 100 and r['ece'] is not None and r['digits_c_top1'] is not None
        assert r['fgsm_2'] is not None and r['seconds_per_epoch'] > 0 and r['calibration_bins']
    assert res['summary']['plain']['top1'] == {'mean': res['runs'][0]['top1'], 'std': None, 'n': 1}
    assert res['summary']['plain_2x']['steps'] == 2 * res['summary']['plain']['steps']
    teacher = res['teacher']
    assert 0 < teacher['reinforce']['teacher_accuracy'] <= 1 and math.isfinite(teacher['ensemble']['top1'])
    assert teacher['reinforce']['num_samples'] == 2
    saved = json.loads((out / 'demo_results.json').read_text())
    assert saved['summary'] == json.loads(json.dumps(res['summary']))
    text = readme.read_text()
    assert text.startswith('top\n') and text.endswith('bottom\n') and '| plain 2x epochs | 2 | 64 |' in text
    assert '(docs/demo.png)' in text
    assert (tmp_path / 'docs' / 'demo.png').is_file() and (tmp_path / 'docs' / 'demo_results.json').is_file()
    # re-rendering from the saved per-seed numbers gives the same README block
    again = demo.main(['--from-results', str(out / 'demo_results.json'), '--output', str(tmp_path / 'again'),
                       '--readme', str(readme), '--docs-dir', str(tmp_path / 'docs')])
    assert again['summary'] == saved['summary'] and readme.read_text() == text


def test_unknown_corruption_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(['--output', str(tmp_path / 'demo'), '--corruptions', 'contrast', 'fog_of_war'])
    assert 'fog_of_war' in capsys.readouterr().err and not (tmp_path / 'demo').exists()
