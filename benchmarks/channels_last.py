"""channels_last: seconds per training iteration of a conv GAN with `TrainConfig(channels_last=True)` against the default layout.

Both layouts train the same model (IB-GAN, `dlatent.models.ibgan.IBGAN`), from the same seed, on the same random uint8 images, through
`dlatent.train.fit`, whose `seconds` times the loop alone (the one-off set-up is not a per-step cost). Runs come in pairs
in one process and the order within a pair alternates (default first, then channels-last first), because whichever runs
second in a pair is favoured on a busy machine; the reported figure is the median over pairs of the ratio of seconds per
iteration, channels-last / default (below 1: channels-last is faster). NHWC is the layout of cuDNN's fastest
convolutions on GPUs; on CPUs the gain depends on oneDNN's kernels (on one CPU thread, IB-GAN at 64x64 measured 0.78).

    python benchmarks/channels_last.py [--tiny] [--steps 20] [--pairs 5] [--device auto]
"""
import argparse, gc, statistics, sys
import torch
from torch.utils.data import TensorDataset
from dlatent.train import TrainConfig, fit
from dlatent.models.ibgan import IBGAN, IBGANConfig

def make_model(size: int, width: int, nc: int):
    "A builder of IB-GAN's networks (paper 2, Table 4) at this image size and width."
    return lambda: IBGAN(IBGANConfig(ngf=width, ndf=width), nc=nc, img_size=size)

def seconds_per_step(build, data, steps, bs, device, precision, threads, channels_last):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=bs, log_every=steps, progress=False, threads=threads, device=device,
                      precision=precision, channels_last=channels_last)
    return fit(build(), data, cfg).seconds / steps

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiny', action='store_true', help='16x16 images, small networks, a few steps: runs in seconds (a smoke test)')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--width', type=int, default=16, help="network width (16: the paper's)")
    ap.add_argument('--nc', type=int, default=1); ap.add_argument('--batch_size', type=int, default=64)
    ap.add_argument('--steps', type=int, default=20); ap.add_argument('--pairs', type=int, default=5)
    ap.add_argument('--device', default='auto'); ap.add_argument('--precision', default='auto')
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    if a.tiny: a.size, a.width, a.batch_size, a.steps, a.pairs = 16, 8, 8, 3, 2
    torch.set_num_threads(a.threads)
    name, build = 'IB-GAN', make_model(a.size, a.width, a.nc)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (4 * a.batch_size, a.nc, a.size, a.size), dtype=torch.uint8, generator=g))
    run = lambda cl, steps: seconds_per_step(build, data, steps, a.batch_size, a.device, a.precision, a.threads, cl)
    run(False, 2); run(True, 2)   # warm up both layouts (kernel selection, allocator)
    print(f'{name} {a.size}x{a.size}x{a.nc}, width {a.width}, batch {a.batch_size}, {a.steps} steps a run, device {a.device}, '
          f'precision {a.precision}, torch {torch.__version__}', flush=True)
    ratios = []
    for p in range(a.pairs):
        t = {}
        for cl in ((False, True) if p % 2 == 0 else (True, False)):
            gc.collect()
            t[cl] = run(cl, a.steps)
        ratios.append(t[True] / t[False])
        print(f'default {1e3 * t[False]:.2f} ms/it   channels_last {1e3 * t[True]:.2f} ms/it   ratio {ratios[-1]:.3f}', flush=True)
    print(f'median channels_last/default seconds-per-iteration ratio over {a.pairs} pairs: {statistics.median(ratios):.3f}')

if __name__ == '__main__': main()
