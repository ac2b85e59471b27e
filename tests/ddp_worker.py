"""Worker for tests/test_train.py: trains a tiny model under torchrun (gloo on CPU) and records what each rank saw."""
import json, sys
from pathlib import Path
import torch
from torch.utils.data import TensorDataset
from dlatent.data.core import three_moons
from dlatent.train import TinyClassifier, TrainConfig, fit, dist_info

class Recording(TinyClassifier):
    "TinyClassifier that also records the indices of the samples it trained on."
    def __init__(self):
        super().__init__(); self.seen = []
    def train_step(self, batch, ctx):
        x, y, idx = batch
        self.seen += idx.tolist()
        return super().train_step((x, y), ctx)

out = Path(sys.argv[1])
x, y = three_moons(600, seed=0)
torch.manual_seed(0)
model = Recording()
res = fit(model, TensorDataset(x, y, torch.arange(len(x))), TrainConfig(steps=12, batch_size=32, progress=False, threads=1, log_every=4), out_dir=out)
rank, world = dist_info()
(out / f'rank{rank}.json').write_text(json.dumps(dict(
    world=world, seen=model.seen, losses=[r['loss'] for r in res.history.rows if 'loss' in r],
    weights=[p.detach().sum().item() for p in model.parameters()])))
