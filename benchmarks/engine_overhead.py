"""Engine overhead: time per training step through `dlatent.train.fit` against a bare hand-written loop.

Both train the same network with the same loss, optimizer, batch size and data (a TensorDataset in
memory, shuffled each epoch); the bare loop is what one would write by hand. Both time the loop alone
(the engine's one-off setup is not a per-step cost). Runs come in pairs in one process, and the order
within a pair alternates (engine first, then bare first), because whichever runs second in a pair is
measurably favoured on a busy machine; the reported figure is the median of the per-pair ratios.

    python benchmarks/engine_overhead.py [--steps 300] [--repeats 7] [--width 256]
"""
import argparse, gc, statistics, time
import torch
from torch import nn
from torch.utils.data import TensorDataset
from dlatent.train import TrainConfig, fit

def make_net(d_in, width, n_out):
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_out))

class Classifier(nn.Module):
    def __init__(self, net): super().__init__(); self.net = net
    def configure_optimizers(self): return {'net': torch.optim.Adam(self.net.parameters(), lr=1e-3)}
    def train_step(self, batch, ctx):
        x, y = batch
        with ctx.autocast(): loss = nn.functional.cross_entropy(self.net(x), y)
        ctx.update('net', loss)
        return {'loss': loss}

def engine_run(data, steps, bs, width):
    torch.manual_seed(0)
    model = Classifier(make_net(data.tensors[0].shape[1], width, 10))
    # `seconds` times the loop alone, as the bare loop below is timed; the one-off setup is reported apart
    return fit(model, data, TrainConfig(steps=steps, batch_size=bs, progress=True, threads=1, log_every=10)).seconds

def bare_run(data, steps, bs, width):
    torch.manual_seed(0)
    x, y = data.tensors
    net = make_net(x.shape[1], width, 10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t = time.perf_counter()
    step, losses = 0, []
    while step < steps:
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - bs + 1, bs):
            j = perm[i:i + bs]
            loss = nn.functional.cross_entropy(net(x[j]), y[j])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            losses.append(loss.item())
            step += 1
            if step == steps: break
    return time.perf_counter() - t

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=300); ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--width', type=int, default=256); ap.add_argument('--batch_size', type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits
    d = load_digits()
    data = TensorDataset(torch.tensor(d.data / 16, dtype=torch.float32), torch.tensor(d.target))
    engine_run(data, 20, a.batch_size, a.width); bare_run(data, 20, a.batch_size, a.width)  # warm up
    ratios = []
    for r in range(a.repeats):
        runs = {}
        for name in (('engine', 'bare') if r % 2 == 0 else ('bare', 'engine')):
            gc.collect()
            runs[name] = (engine_run if name == 'engine' else bare_run)(data, a.steps, a.batch_size, a.width)
        e, b = runs['engine'], runs['bare']
        ratios.append(e / b)
        print(f'engine {1e3 * e / a.steps:.3f} ms/step   bare {1e3 * b / a.steps:.3f} ms/step   ratio {e / b:.3f}', flush=True)
    print(f'median engine/bare step-time ratio over {a.repeats} pairs: {statistics.median(ratios):.3f}')

if __name__ == '__main__': main()
