"""IB-GAN, InfoGAN and GAN at the paper's dSprites setting, side by side on one GPU, within a fixed time.

Paper 2 (Jeon et al., AAAI 2021) trains IB-GAN on dSprites at 64 px for 150,000 iterations (Table 5's networks of width 16,
RMSProp 5e-5 / 1e-6, beta = 0.141) and reports the FactorVAE score in its Table 1 (mean ± std over 10 seeds for IB-GAN): IB-GAN 0.80 ± 0.07, InfoGAN
0.61 ± 0.03, GAN 0.40 ± 0.05. This script runs the three models of `dlatent`'s `dsprites-ibgan`,
`dsprites-infogan` and `dsprites-gan` experiments at that setting with the same number of iterations each, as many as fit
in the time budget, and prints iterations per second, the FactorVAE score, MIG and IB-GAN's bounds beside Table 1.

How the budget is spent: a short calibration run of IB-GAN (the slowest of the three: it also trains the encoder)
measures iterations per second; the training steps per model are then `its * train_budget / 3` (rounded down to a
multiple of 1,000), the noise schedule and the checkpoints scaled to that length. Evaluation (FactorVAE with 10,000
training and 5,000 held-out votes, MIG on 10,000 codes, DCI with extra-trees importances, which take seconds where
gradient boosting takes minutes) runs after each model and is part of the budget's margin.

    python benchmarks/ibgan_paper.py [--budget 480] [--out runs/ibgan-paper] [--models ibgan,infogan,gan] [--seed 0]
    python benchmarks/ibgan_paper.py --tiny    # the CPU smoke test CI runs: 32 px, width 4, a few steps, small evaluation

The default budget of 480 s (calibration, training and evaluation) is sized so that the whole script fits in 9 minutes on
one GPU; rendering dSprites the first time (it is cached afterwards) comes on top, and the script has not yet been timed on a
GPU. Results go to OUT/report.md and OUT/results.json; each model's
run directory (config, history, metrics, checkpoint, figures) is under OUT.
"""
import argparse, json, math, sys, time
from pathlib import Path

import torch

from dlatent.experiments import run_experiment

PAPER = {'ibgan': 0.80, 'infogan': 0.61, 'gan': 0.40}      # Table 1's FactorVAE scores beside which the results are printed
PAPER_NOTE = {'ibgan': '± 0.07', 'infogan': '± 0.03', 'gan': '± 0.05'}

def overrides(steps: int, args) -> dict:
    "The paper setting with `steps` iterations (the instance-noise schedule scaled to 2/3 of them)."
    ov = {'train.steps': steps, 'train.seed': args.seed, 'train.progress': False, 'train.device': args.device,
          'train.log_every': max(1, min(100, steps // 20)), 'train.ckpt_every': steps, 'train.eval_every': steps,
          'model.noise_iters': max(1, 2 * steps // 3), 'eval.n_codes': 10_000, 'eval.dci_model': 'extra_trees'}
    if args.tiny:
        ov.update({'model.ngf': 4, 'model.ndf': 4, 'data.img_size': 32, 'data.n_train': 2_000, 'train.threads': 1,
                   'eval.fv_train': 100, 'eval.fv_eval': 50, 'eval.fv_std': 500, 'eval.fv_subset': 5_000, 'eval.n_codes': 500})
    return ov

def train(model: str, steps: int, out: Path, args) -> dict:
    t0 = time.perf_counter()
    run_dir, metrics = run_experiment(f'dsprites-{model}', overrides(steps, args), out=out / model)
    metrics = dict(metrics, wall_seconds=time.perf_counter() - t0, run_dir=str(run_dir))
    metrics['its'] = steps / metrics['train_seconds'] if metrics.get('train_seconds') else float('nan')
    return metrics

def report(results: dict, steps: int, args, total: float) -> str:
    dev = torch.cuda.get_device_name(torch.device(args.device)) if torch.device(args.device).type == 'cuda' else 'CPU'
    lines = [f"IB-GAN, InfoGAN and GAN on dSprites at the paper's setting{' (--tiny)' if args.tiny else ''}: {steps:,} iterations each "
             f"(the paper: 150,000), seed {args.seed}, on {dev}, torch {torch.__version__}.", '',
             '| model | it/s | train s | FactorVAE | MIG | active dims | I^L | I^U | Table 1 FactorVAE |', '|---|---|---|---|---|---|---|---|---|']
    f = lambda v, fmt='.3f': '-' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    for m, r in results.items():
        if 'error' in r:
            lines.append(f"| {m} | failed: {r['error']} | | | | | | | {PAPER[m]:.2f} {PAPER_NOTE[m]} |"); continue
        lines.append(f"| {m} | {f(r['its'], '.0f')} | {f(r.get('train_seconds'), '.0f')} | {f(r.get('factor_vae'))} | {f(r.get('mig'))} | "
                     f"{r.get('active_dims', '-')} | {f(r.get('I_L'))} | {f(r.get('I_U'))} | {PAPER[m]:.2f} {PAPER_NOTE[m]} |")
    lines += ['', f"One seed: a single run per model measures speed and shows the trend; the comparison the paper makes needs several "
              f"seeds (`dlatent sweep dsprites-ibgan --grid train.seed=0-7 model.name=ibgan,infogan,gan`).", '',
              f"Total time {total:.0f} s."]
    return '\n'.join(lines) + '\n'

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiny', action='store_true', help='32 px, width 4, a few steps on the CPU: the smoke test CI runs')
    ap.add_argument('--budget', type=float, default=480, help='seconds for calibration, training and evaluation of all models (default 480)')
    ap.add_argument('--models', default='ibgan,infogan,gan', help='comma-separated, from ibgan, infogan, gan')
    ap.add_argument('--steps', type=int, default=None, help='iterations per model (default: as many as fit in the budget; 20 with --tiny)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default=None, help="default: 'cuda' when available ('cpu' with --tiny)")
    ap.add_argument('--out', default='runs/ibgan-paper', help='folder for the run directories and the report')
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(',') if m]
    bad = [m for m in models if m not in PAPER]
    if bad: ap.error(f"unknown model {bad}; choose from {', '.join(PAPER)}")
    args.device = args.device or ('cpu' if args.tiny or not torch.cuda.is_available() else 'cuda')
    if torch.device(args.device).type != 'cuda' and not args.tiny:
        print('ibgan_paper: no CUDA device here; running on the CPU will cover only a few thousand iterations', file=sys.stderr)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    steps = args.steps or (20 if args.tiny else None)
    if steps is None:                                   # calibrate on IB-GAN, the slowest of the three
        calib = 20 if args.tiny else 1_000
        r = train('ibgan', calib, out / 'calibration', args)
        spent = time.perf_counter() - t_start
        per_model = (args.budget - spent) / len(models)
        eval_s = r['wall_seconds'] - r['train_seconds']           # data, evaluation and figures of one run
        steps = max(1_000, int((per_model - eval_s) * r['its'] * 0.9) // 1_000 * 1_000)
        print(f"calibration: {r['its']:.0f} it/s for IB-GAN, {eval_s:.0f} s outside training per run; {steps:,} iterations per model", flush=True)
    results = {}
    for m in models:
        try: results[m] = train(m, steps, out, args)
        except Exception as e:                          # a failed model is a finding to report, not the end of the comparison
            results[m] = {'error': f'{type(e).__name__}: {str(e)[:160]}'}
        r = results[m]
        print(f"{m:8s} " + (f"{r['its']:7.0f} it/s  FactorVAE {r.get('factor_vae', float('nan')):.3f}  MIG {r.get('mig', float('nan')):.3f}"
                            if 'error' not in r else r['error']), flush=True)
    text = report(results, steps, args, time.perf_counter() - t_start)
    (out / 'report.md').write_text(text)
    (out / 'results.json').write_text(json.dumps(dict(steps=steps, seed=args.seed, device=args.device, results=results), indent=1, default=str))
    print(text)
    return results

if __name__ == '__main__': main()
