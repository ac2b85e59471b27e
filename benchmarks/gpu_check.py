"""GPU check: training iterations per second of every model family at its paper setting, in fp32, bf16 autocast,
`torch.compile` and compile with CUDA graphs (`mode='reduce-overhead'`), with peak memory and host syncs per step.

Each family is built at its experiment's paper setting (networks, image size, batch size; `dlatent config EXPERIMENT`)
and trained through the engine (`dlatent.train.fit`) on random images of the data's shape, so that no data set is read.
A timing callback starts the clock after the warm-up steps (which include compilation and CUDA-graph recording) and stops
it after the last step, synchronising the device at both ends; the engine's own logging (a host read of the losses every
`log_every` steps) is part of what is timed, as it is in a real run. Peak memory is `torch.cuda.max_memory_allocated`.
The `syncs` column counts the synchronising CUDA calls of one eager fp32 step (`torch.cuda.set_sync_debug_mode('warn')`),
averaged over the measured steps (the engine's read of the logged losses counts 1 per 10 steps). Measurements run cheapest first (eager, then compiled) and stop at the time budget, so
that the whole check finishes within 8 minutes on one GPU; the table says which ones were skipped.

    python benchmarks/gpu_check.py [--out gpu_check.md] [--budget 360] [--families dvae,ibgan,elastic,jointvae]
                                   [--modes fp32,bf16,compile,cudagraphs,syncs] [--steps 200] [--warmup 30]
    python benchmarks/gpu_check.py --tiny     # the CPU smoke test CI runs: tiny networks, a few steps, eager modes only

Expectations to check on a GPU: these small networks are launch-bound, so CUDA graphs should give several times the eager
speed, and IB-GAN at the paper's setting should reach at least 300 iterations per second on a current datacenter GPU.
"""
import argparse, dataclasses, platform, sys, time, warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dlatent.experiments import make_config
from dlatent.models.dvae import image_dvae
from dlatent.models.ibgan import IBGAN
from dlatent.models.elastic import ElasticInfoGAN
from dlatent.models.jointvae import JointVAE
from dlatent.train import Callback, TrainConfig, fit

# family -> (experiment, build(cfg, img_size), labelled batches?, binary images?, tiny overrides)
FAMILIES = {
    'dvae': ('mnist-dvae', lambda cfg, s: image_dvae(cfg.model, s, 1, 10), True, False, {}),
    'ibgan': ('dsprites-ibgan', lambda cfg, s: IBGAN(cfg.model, nc=1, img_size=s), False, True,
              {'model.ngf': 4, 'model.ndf': 4}),
    'elastic': ('mnist-elastic', lambda cfg, s: ElasticInfoGAN(cfg.model, true_probs=torch.full((10,), 0.1), n_classes=10, img_size=s),
                False, False, {'model.z_dim': 8}),
    'jointvae': ('mnist-jointvae', lambda cfg, s: JointVAE(dataclasses.replace(cfg.model, capacity_iters=cfg.model.capacity_iters or 25_000),
                                                           n_classes=10, img_size=s), False, False, {'model.z_dim': 4}),
}
PAPER_SIZE = {'dvae': 28, 'ibgan': None, 'elastic': None, 'jointvae': None}   # None: the experiment's data.img_size
MODES = ('fp32', 'bf16', 'syncs', 'compile', 'cudagraphs')

class Timer(Callback):
    "Wall time of the steps after `warmup`, with the device synchronised at both ends; optional CUDA-graph step marks."
    order = 100
    def __init__(self, warmup: int, mark_steps: bool = False, count_syncs: bool = False):
        self.warmup, self.mark_steps, self.count_syncs = warmup, mark_steps, count_syncs
        self.t0 = self.t1 = None; self.syncs = 0; self._catch = None
    def _sync(self, t):
        if t.device.type == 'cuda': torch.cuda.synchronize(t.device)
    def before_step(self, t):
        if self.mark_steps: torch.compiler.cudagraph_mark_step_begin()
    def after_step(self, t):
        if t.step == self.warmup:
            self._sync(t); self.t0 = time.perf_counter()
            if self.count_syncs:
                self._catch = warnings.catch_warnings(record=True); self.records = self._catch.__enter__()
                warnings.simplefilter('always'); torch.cuda.set_sync_debug_mode('warn')
    def after_fit(self, t):
        if self.count_syncs and self._catch is not None:
            torch.cuda.set_sync_debug_mode('default')
            self.syncs = sum('synchroniz' in str(w.message) for w in self.records); self._catch.__exit__(None, None, None)
        self._sync(t); self.t1 = time.perf_counter()

def family_setup(family: str, tiny: bool):
    "(experiment, model builder, data set, batch size, image size) of a family at its paper setting (or tiny)."
    exp, build, labelled, binary, tiny_ov = FAMILIES[family]
    cfg = make_config(exp, tiny_ov if tiny else {})
    size = 8 if tiny and family != 'ibgan' else 16 if tiny else (PAPER_SIZE[family] or cfg.data.img_size)
    bs = 8 if tiny else cfg.train.batch_size
    n = bs * (4 if tiny else 32)
    g = torch.Generator().manual_seed(0)
    if binary: x = (torch.rand(n, 1, size, size, generator=g) > 0.8).to(torch.uint8) * 255     # dSprites: binary, uint8
    elif labelled: x = torch.rand(n, 1, size, size, generator=g)                               # the DVAE family reads floats in [0, 1]
    else: x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    data = TensorDataset(x, torch.randint(0, 10, (n,), generator=g)) if labelled else TensorDataset(x)
    return exp, (lambda: build(cfg, size)), data, bs, size

def measure(family: str, mode: str, args) -> dict:
    "One measurement: iterations per second after warm-up, peak memory, graphs and graph breaks, host syncs per step."
    exp, build, data, bs, size = family_setup(family, args.tiny)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    if mode in ('compile', 'cudagraphs'): torch._dynamo.reset(); torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = build()
    if mode == 'cudagraphs':
        for name, child in list(model.named_children()): setattr(model, name, torch.compile(child, mode='reduce-overhead'))
    steps = 20 if mode == 'syncs' else args.steps
    timer = Timer(args.warmup, mark_steps=mode == 'cudagraphs', count_syncs=mode == 'syncs' and cuda)
    cfg = TrainConfig(steps=args.warmup + steps, batch_size=bs, device=str(device), precision='bf16' if mode == 'bf16' else 'fp32',
                      compile=mode == 'compile', progress=False, threads=args.threads, log_every=10)
    if cuda: torch.cuda.reset_peak_memory_stats(device)
    fit(model, data, cfg, callbacks=[timer])
    out = dict(family=family, experiment=exp, batch=bs, size=size, mode=mode, its=steps / (timer.t1 - timer.t0),
               peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)
    if mode in ('compile', 'cudagraphs'):
        c = torch._dynamo.utils.counters
        out['graphs'], out['breaks'] = c['stats'].get('unique_graphs', 0), sum(c['graph_break'].values())
    if mode == 'syncs': out['syncs'] = timer.syncs / steps if cuda else None
    return out

def table(rows: list[dict], args) -> str:
    eager = {r['family']: r['its'] for r in rows if r['mode'] == 'fp32' and 'its' in r}
    head = ['family', 'experiment', 'batch', 'image', 'mode', 'it/s', 'x fp32', 'peak MiB', 'graphs / breaks', 'syncs / step', 'note']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    f = lambda v, fmt: '-' if v is None else format(v, fmt)
    for r in rows:
        its = r.get('its')
        ratio = its / eager[r['family']] if its and r['family'] in eager and r['mode'] not in ('syncs',) else None
        gb = f"{r['graphs']} / {r['breaks']}" if 'graphs' in r else '-'
        lines.append(f"| {r['family']} | {r['experiment']} | {r.get('batch', '-')} | {r.get('size', '-')} | {r['mode']} | "
                     f"{f(its if r['mode'] != 'syncs' else None, '.1f')} | {f(ratio, '.2f')} | {f(r.get('peak_mib'), '.0f')} | {gb} | "
                     f"{f(r.get('syncs'), '.2f')} | {r.get('note', '')} |")
    dev = torch.cuda.get_device_name(torch.device(args.device)) if torch.device(args.device).type == 'cuda' else platform.processor() or 'CPU'
    hdr = (f"GPU check on {dev} ({args.device}), torch {torch.__version__}; {args.warmup} warm-up steps, {args.steps} timed "
           f"steps{' (--tiny)' if args.tiny else ''}; it/s through `dlatent.train.fit` (logging every 10 steps included).\n\n")
    return hdr + '\n'.join(lines) + '\n'

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiny', action='store_true', help='tiny networks and images, a few steps on the CPU: the smoke test CI runs')
    ap.add_argument('--families', default=','.join(FAMILIES), help=f'comma-separated, from {",".join(FAMILIES)}')
    ap.add_argument('--modes', default=None, help=f'comma-separated, from {",".join(MODES)} (default: all on CUDA; fp32,bf16 otherwise)')
    ap.add_argument('--device', default=None, help="default: 'cuda' when available ('cpu' with --tiny)")
    ap.add_argument('--steps', type=int, default=None, help='timed steps per measurement (default 200; 3 with --tiny)')
    ap.add_argument('--warmup', type=int, default=None, help='untimed steps first, compilation included (default 30; 2 with --tiny)')
    ap.add_argument('--budget', type=float, default=360, help='seconds; measurements that would start later are skipped (default 360, which leaves room for the last one within 8 minutes)')
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    ap.add_argument('--out', default='gpu_check.md', help='the markdown table is written here (default gpu_check.md)')
    args = ap.parse_args(argv)
    args.device = args.device or ('cpu' if args.tiny or not torch.cuda.is_available() else 'cuda')
    cuda = torch.device(args.device).type == 'cuda'
    args.steps = args.steps or (3 if args.tiny else 200)
    args.warmup = args.warmup or (2 if args.tiny else 30)
    families = [f for f in args.families.split(',') if f]
    modes = [m for m in (args.modes or (','.join(MODES) if cuda else 'fp32,bf16')).split(',') if m]
    for name, allowed in (('family', FAMILIES), ('mode', MODES)):
        bad = [v for v in (families if name == 'family' else modes) if v not in allowed]
        if bad: ap.error(f"unknown {name} {bad}; choose from {', '.join(allowed)}")
    if 'cudagraphs' in modes and not cuda: ap.error("mode 'cudagraphs' (CUDA graphs) needs a CUDA device")
    if not cuda and not args.tiny: print('gpu_check: no CUDA device here; measuring on the CPU', file=sys.stderr)
    t_start, rows = time.perf_counter(), []
    for mode in modes:                         # cheapest first: every family's eager numbers before any compilation
        for family in families:
            if time.perf_counter() - t_start > args.budget:
                rows.append(dict(family=family, experiment=FAMILIES[family][0], mode=mode, note='skipped: time budget spent')); continue
            try: r = measure(family, mode, args)
            except Exception as e:             # a failed mode is a finding to report, not the end of the check
                r = dict(family=family, experiment=FAMILIES[family][0], mode=mode, note=f'failed: {type(e).__name__}: {str(e)[:120]}')
            rows.append(r)
            print(f"{family:9s} {mode:10s} " + (f"{r['its']:9.1f} it/s" if 'its' in r else r['note']), flush=True)
    text = table(rows, args)
    best = max((r['its'] for r in rows if r['family'] == 'ibgan' and r.get('its') and r['mode'] != 'syncs'), default=None)
    if cuda and best is not None and not args.tiny:
        text += f"\nIB-GAN at the paper setting: best {best:.0f} it/s (expected at least 300 on a current datacenter GPU: {'met' if best >= 300 else 'NOT met'}).\n"
    text += f"\nTotal time {time.perf_counter() - t_start:.0f} s.\n"
    Path(args.out).write_text(text)
    print(text)
    return rows

if __name__ == '__main__': main()
