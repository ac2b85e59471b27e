"""Sweeps: a grid run by the local pool (and by Ray where it is installed), one point forced to fail, the aggregate and the paired
comparison against a hand computation, a rerun that completes only the failed point, a kill -9 mid-way, bad input."""
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

import sweep_helpers  # registers the experiment '_sweep-test' (in a module, so that worker processes can import it)
from dlatent.cli import main
from dlatent.experiments.sweep import run_sweep, load_sweep, aggregate, compare, available_cores

ROOT = Path(__file__).resolve().parent.parent
GRID = ['model.name=mlp,linear', 'train.seed=0-2']

def hand_ci(x, level=0.95, n_boot=10_000, seed=0):
    x = np.asarray(x, float)
    means = x[np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))].mean(1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))

def metrics_of(d: Path, name: str) -> dict:
    return json.loads((d / name / 'metrics.json').read_text())

def snapshot(d: Path) -> dict:
    "(mtime, sha256) of every file of every finished point."
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for m in d.glob('*/metrics.json') for p in m.parent.rglob('*') if p.is_file()}

def check_failure_aggregate_rerun(d: Path, marker: Path, **kw):
    "The sweep with the point (linear, seed 1) failing while `marker` exists; the aggregate and comparison; the rerun."
    fixed = {'model.fail_if_exists': str(marker.parent / 'fail-{seed}'), 'model.lr': 0.05}   # only the MLP has fail_if_exists
    marker.write_text('')
    t = run_sweep('_sweep-test', GRID, fixed, out=d, progress=False, **kw)
    assert len(t) == 6 and t.column('status').count('done') == 5
    failed = t.where({'status': 'failed'})
    assert [r['point'] for r in failed] == ['model.name=mlp_train.seed=1']
    assert failed[0]['reason'] == f"RuntimeError: forced failure: {marker} exists"
    man = json.loads((d / 'sweep.json').read_text())
    assert man['points']['model.name=mlp_train.seed=1']['status'] == 'failed' and 'forced failure' in man['points']['model.name=mlp_train.seed=1']['reason']
    assert 'forced failure' in (d / 'model.name=mlp_train.seed=1' / 'error.txt').read_text()
    assert man['grid'] == {'model.name': ['mlp', 'linear'], 'train.seed': [0, 1, 2]} and man['over'] == ['train.seed']

    # the aggregate over the seeds is the per-point metrics, summarised by hand
    agg = aggregate(t)
    for arm, seeds in (('mlp', (0, 2)), ('linear', (0, 1, 2))):
        x = [metrics_of(d, f'model.name={arm}_train.seed={s}')['test_accuracy'] for s in seeds]
        row = agg.where({'model.name': arm, 'metric': 'test_accuracy'})[0]
        assert row['n'] == len(x) and row['mean'] == pytest.approx(np.mean(x)) and row['std'] == pytest.approx(np.std(x, ddof=1))
        assert (row['ci_low'], row['ci_high']) == pytest.approx(hand_ci(x))
    lines = (d / 'aggregate.csv').read_text().splitlines()
    assert lines[0] == 'model.name,metric,n,mean,std,ci_low,ci_high' and any(l.startswith('linear,test_accuracy,3,') for l in lines)
    # the paired comparison: linear - mlp on the seeds both finished (0 and 2)
    c = compare(t, 'model.name').where({'metric': 'test_accuracy'})[0]
    diff = [metrics_of(d, f'model.name=linear_train.seed={s}')['test_accuracy'] - metrics_of(d, f'model.name=mlp_train.seed={s}')['test_accuracy'] for s in (0, 2)]
    assert (c['a'], c['b'], c['n']) == ('mlp', 'linear', 2) and c['diff'] == pytest.approx(np.mean(diff))
    assert (c['ci_low'], c['ci_high']) == pytest.approx(hand_ci(diff))

    # a rerun completes only the failed point; the finished ones are not touched
    before = snapshot(d)
    marker.unlink()
    t2 = run_sweep('_sweep-test', GRID, fixed, out=d, progress=False, **kw)
    assert t2.column('status') == ['done'] * 6
    assert {k: v for k, v in snapshot(d).items() if k in before} == before
    man = json.loads((d / 'sweep.json').read_text())
    assert {n: p['attempts'] for n, p in man['points'].items()} == {n: 2 if n == 'model.name=mlp_train.seed=1' else 1 for n in man['points']}
    return t2

def test_local_sweep(tmp_path):
    d = tmp_path / 'sweep'
    t = check_failure_aggregate_rerun(d, tmp_path / 'fail-1', workers=2)
    man = json.loads((d / 'sweep.json').read_text())
    assert man['executor'] == {'kind': 'local', 'workers': 2, 'threads': 1}    # the experiment asks for one thread per run
    cfg = json.loads((d / 'model.name=linear_train.seed=2' / 'config.json').read_text())
    assert (cfg['model'], cfg['train']['seed'], cfg['train']['threads']) == ({'name': 'linear', 'lr': 0.05, 'delay': 0.0}, 2, man['executor']['threads'])
    assert t.where({'model.name': 'linear', 'train.seed': 2})[0]['seed_plus_lr'] == pytest.approx(2.05)
    # the report from the command line: paired comparison and figure
    code = main(['sweep-report', str(d), '--compare', 'model.name', '--plot', 'test_accuracy', '--x', 'model.name'])
    assert code == 0 and (d / 'compare.md').exists() and (d / 'test_accuracy_vs_model.name.png').stat().st_size > 1000

def test_worker_death_is_a_failed_point(tmp_path, capsys):
    "A worker process that dies is a failed point with its exit status; the sweep goes on, and the command exits with 1."
    code = main(['sweep', '_sweep-test', '--grid', 'model.crash=true,false', '--out', str(tmp_path / 's'), '--workers', '1'])
    out, err = capsys.readouterr()
    t = load_sweep(tmp_path / 's')
    assert code == 1 and t.column('status') == ['failed', 'done']
    assert t[0]['reason'].startswith('the worker process running this point died (exit code 3)')
    assert 'FAILED model.crash=True' in out and 'failed: model.crash=True: the worker process' in err and '1 of 2 points failed' in err

SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import sweep_helpers
from dlatent.experiments.sweep import run_sweep
if __name__ == '__main__':
    run_sweep('_sweep-test', ['train.seed=0-5'], {{'model.delay': 0.7}}, out={out!r}, workers=1)
"""

def test_kill_mid_way_then_rerun(tmp_path):
    d = tmp_path / 'sweep'
    p = subprocess.Popen([sys.executable, '-c', SCRIPT.format(tests=str(ROOT / 'tests'), out=str(d))], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    t0 = time.time()
    while len(list(d.glob('*/metrics.json'))) < 2:
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() - t0 < 60, 'the sweep did not finish two points in a minute'
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    finished = snapshot(d)
    n_done = len(list(d.glob('*/metrics.json')))
    assert 2 <= n_done < 6
    json.loads((d / 'sweep.json').read_text())                 # the manifest is whole
    time.sleep(1.0)                                              # the orphaned worker is gone by now (it dies with the sweep)
    assert snapshot(d) == finished and len(list(d.glob('*/metrics.json'))) == n_done
    t = run_sweep('_sweep-test', ['train.seed=0-5'], {'model.delay': 0.7}, out=d, workers=2, progress=False)
    assert t.column('status') == ['done'] * 6
    assert {k: v for k, v in snapshot(d).items() if k in finished} == finished
    man = json.loads((d / 'sweep.json').read_text())
    assert sum(p['attempts'] == 0 for p in man['points'].values()) == 0

@pytest.mark.parametrize('argv, msg', [
    (['--grid', 'train.sed=0-3'], "the train section of '_sweep-test' has no setting 'sed'"),
    (['--grid', 'train.seed=3-0'], 'the range 3-0 is empty'),
    (['--grid', 'train.seed=0-x'], "'0-x' is not a range"),
    (['--grid', 'train.seed='], 'a value is empty'),
    (['--grid', 'model.beta=0,0.5'], "model 'mlp' has no setting 'beta'"),
    (['--grid', 'model.name=linear', 'train.seed=0-1', '--set', 'model.hidden=4'], "model 'linear' has no setting 'hidden'"),
    (['--grid', 'train.seed=0-1', '--executor', 'ray', '--address', '127.0.0.1:9'], 'cannot reach a Ray cluster at 127.0.0.1:9'),
    (['--grid', 'train.seed=0-1', '--workers', str(available_cores() + 1)], 'cores here'),
    (['--grid', 'train.seed=0-1', '--over', 'model.lr'], '--over model.lr: not a grid key'),
])
def test_bad_input_starts_nothing(tmp_path, capsys, argv, msg):
    out = tmp_path / 'sweep'
    assert main(['sweep', '_sweep-test', '--out', str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and '\n' not in err and err.startswith('dlatent: error:'), err
    assert not out.exists()

def test_ray_executor(tmp_path, monkeypatch):
    ray = pytest.importorskip('ray')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT / 'tests'), os.environ.get('PYTHONPATH', '')]))
    import logging
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        check_failure_aggregate_rerun(tmp_path / 'sweep', tmp_path / 'fail-1', executor='ray')
        man = json.loads((tmp_path / 'sweep' / 'sweep.json').read_text())
        assert man['executor']['kind'] == 'ray' and man['executor']['cpus_per_run'] == 1
        with pytest.raises(ValueError, match='no machine of the Ray cluster has the 1 CPUs and 0.5 GPUs'):
            run_sweep('_sweep-test', GRID, out=tmp_path / 'gpu', executor='ray', gpus_per_run=0.5, progress=False)
        assert not (tmp_path / 'gpu').exists()
    finally: ray.shutdown()

def test_overhead_benchmark_tiny():
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'sweep_overhead.py'), '--tiny'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'sweep / by hand' in r.stdout, r.stdout
