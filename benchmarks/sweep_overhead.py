"""Sweep overhead: the wall time of a sweep against the same runs launched by hand one after another with the same total threads,
and the start-up cost of Ray.

The runs are the `moons` experiment (paper 1's DVAE on the three moons) at `--runs` seeds, `--epochs` epochs each. With T threads
in all (default: the cores here), in one process, one after another:

* **by hand**: each run as its own `dlatent train moons ... --set train.threads=T`, one after another (what one types without a sweep);
* **in one process**: the same runs through `run_experiment`, one after another in this process (no process start per run: the
  strictest baseline for the executor's own cost);
* **sweep**: `run_sweep` with the local executor, `--workers` workers (default T) x T / workers threads per run;
* **sweep, one worker**: `run_sweep` with one worker of T threads: the same parallelism as by hand, so the ratio is the executor's
  own cost (process pool, manifest, reports) against a fresh process per run;
* **Ray** (when installed and not `--no-ray`): `ray.init` on this machine with T CPUs, timed alone (the start-up cost), then the same
  sweep with the Ray executor, one CPU per run.

Each ratio is the sweep's wall time over the by-hand wall time (below 1: the sweep is faster). The runs' config differs only in
`train.threads`, so every measurement trains the same models. `--tiny` is a smoke test for the tests: one one-epoch run on one
thread, by hand and as a sweep, without the other measurements.

Measured on a shared two-core CPU with one thread in all (`--runs 4 --epochs 80 --threads 1 --workers 1`, runs of 31.5 s): by hand
137.0 s, in one process 130.2 s, the sweep 131.3 s: sweep / by hand 0.959 and sweep / one process 1.008. Ray's start-up
(`ray.init`) took 15.3 s, and the same sweep on Ray 148.9 s: 1.13 times the local sweep, 1.25 with the start-up.

    python benchmarks/sweep_overhead.py [--runs 4] [--epochs 100] [--threads T] [--workers W] [--no-ray] [--tiny]
"""
import argparse, json, logging, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
from dlatent.experiments.sweep import run_sweep, available_cores

def settings(a) -> dict:
    s = {'train.epochs': a.epochs, 'data.n_per_class': a.n_per_class, 'eval.n_gen': 200, 'eval.snapshots': '1'}
    return {**s, 'eval.n_gen': 20} if a.tiny else s

def by_hand(a, root: Path, threads: int) -> float:
    t = time.perf_counter()
    for seed in range(a.runs):
        sets = [f'{k}={v}' for k, v in settings(a).items()] + [f'train.seed={seed}', f'train.threads={threads}', 'train.progress=false']
        subprocess.run([sys.executable, '-c', 'from dlatent.cli import _entry; _entry()', 'train', 'moons', '--out', str(root / f'hand-{seed}'),
                        '--set', *sets], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t

def in_one_process(a, root: Path, threads: int) -> float:
    from dlatent.experiments import run_experiment
    t = time.perf_counter()
    for seed in range(a.runs):
        run_experiment('moons', {**settings(a), 'train.seed': seed, 'train.threads': threads, 'train.progress': False}, out=root / f'proc-{seed}')
    return time.perf_counter() - t

def sweep(a, root: Path, name: str, extra: dict = {}, **kw) -> float:
    t = time.perf_counter()
    table = run_sweep('moons', [f'train.seed=0-{a.runs - 1}'], {**settings(a), **extra}, out=root / name, progress=False, **kw)
    assert table.column('status') == ['done'] * a.runs, table.to_markdown()
    return time.perf_counter() - t

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=4); ap.add_argument('--epochs', type=int, default=100)
    ap.add_argument('--n_per_class', type=int, default=1000)
    ap.add_argument('--threads', type=int, default=available_cores(), help='threads in all (default: the cores here)')
    ap.add_argument('--workers', type=int, default=None, help='local workers of the sweep (default: --threads)')
    ap.add_argument('--no-ray', action='store_true'); ap.add_argument('--tiny', action='store_true')
    a = ap.parse_args()
    if a.tiny: a.runs, a.epochs, a.n_per_class, a.no_ray, a.threads, a.workers = 1, 1, 50, True, 1, 1
    T, W = a.threads, a.workers or a.threads
    root = Path(tempfile.mkdtemp(prefix='sweep_overhead_'))
    try:
        res = {'runs': a.runs, 'threads': T, 'workers': W}
        res['by_hand_s'] = by_hand(a, root, T)
        res['one_process_s'] = None if a.tiny else in_one_process(a, root, T)
        res['sweep_s'] = sweep(a, root, 'sweep', {'train.threads': max(1, T // W)}, workers=W)
        res['sweep_1_worker_s'] = None if a.tiny or W == 1 else sweep(a, root, 'sweep1', {'train.threads': T}, workers=1)
        secs = [json.loads((root / 'sweep' / f'train.seed={s}' / 'metrics.json').read_text())['total_seconds'] for s in range(a.runs)]
        res['run_s_mean'] = sum(secs) / len(secs)
        print(f"{a.runs} run{'s' if a.runs != 1 else ''} of moons, {a.epochs} epochs ({res['run_s_mean']:.1f} s per run in the sweep), {T} threads in all")
        th = lambda n: f"{n} thread{'s' if n != 1 else ''}"
        print(f"  by hand, one after another, {th(T)} each: {res['by_hand_s']:.1f} s")
        if res['one_process_s'] is not None:
            print(f"  in one process, one after another (run_experiment), {th(T)} each: {res['one_process_s']:.1f} s   "
                  f"(the start of a process per run: {(res['by_hand_s'] - res['one_process_s']) / a.runs:.1f} s)")
        print(f"  sweep, {W} worker{'s' if W != 1 else ''} x {th(max(1, T // W))}:   {res['sweep_s']:.1f} s   sweep / by hand = {res['sweep_s'] / res['by_hand_s']:.3f}"
              + (f", sweep / one process = {res['sweep_s'] / res['one_process_s']:.3f}" if res['one_process_s'] else ''))
        if res['sweep_1_worker_s'] is not None:
            print(f"  sweep, 1 worker x {th(T)}:    {res['sweep_1_worker_s']:.1f} s   sweep / by hand = {res['sweep_1_worker_s'] / res['by_hand_s']:.3f}")
        if not a.no_ray:
            try: import ray
            except ImportError: print('  ray: not installed (pip install ray) - not measured')
            else:
                t = time.perf_counter()
                ray.init(num_cpus=T, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
                res['ray_init_s'] = time.perf_counter() - t
                try: res['ray_sweep_s'] = sweep(a, root, 'ray', {'train.threads': 1}, executor='ray')
                finally: ray.shutdown()
                print(f"  ray: start-up (ray.init, {T} CPUs) {res['ray_init_s']:.1f} s; sweep on ray {res['ray_sweep_s']:.1f} s; "
                      f"(start-up + sweep on ray) / local sweep = {(res['ray_init_s'] + res['ray_sweep_s']) / res['sweep_s']:.3f}")
        print(json.dumps(res))
    finally: shutil.rmtree(root, ignore_errors=True)

if __name__ == '__main__': main()
