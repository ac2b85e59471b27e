"""An experiment for tests/test_sweep.py and benchmarks/sweep_overhead.py, in a module of its own so that the sweep's worker
processes (and Ray's) can import it: a small classifier on the three moons, with settings that slow a run down, make it fail
while a file exists, or kill its process."""
import os, time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from dlatent.data.core import moons_dataset, three_moons
from dlatent.experiments import Experiment, register
from dlatent.models.base import GenerativeModel

class Classifier(GenerativeModel):
    def __init__(self, net, lr):
        super().__init__(); self.net, self.lr = net, lr
    def configure_optimizers(self): return {'net': torch.optim.Adam(self.net.parameters(), lr=self.lr)}
    def train_step(self, batch, ctx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y); ctx.update('net', loss)
        return {'loss': loss}

@dataclass
class MLP:
    hidden: int = 8
    lr: float = 0.05
    delay: float = 0.0            # seconds to sleep while building the model
    fail_if_exists: str = ''      # building fails while this file exists ('{seed}' is replaced by train.seed)
    crash: bool = False           # the process dies while building the model

@dataclass
class Linear:
    lr: float = 0.05
    delay: float = 0.0

@dataclass
class Data:
    n: int = 300

def build(cfg, data):
    m = cfg.model
    marker = getattr(m, 'fail_if_exists', '').format(seed=cfg.train.seed)
    if marker and Path(marker).exists(): raise RuntimeError(f'forced failure: {marker} exists')
    if getattr(m, 'crash', False): os._exit(3)
    time.sleep(m.delay)
    net = nn.Sequential(nn.Linear(2, m.hidden), nn.ReLU(), nn.Linear(m.hidden, 3)) if cfg.model_name == 'mlp' else nn.Linear(2, 3)
    return Classifier(net, m.lr)

def evaluate(run):
    x, y = three_moons(300, seed=run.config.train.seed + 1)
    with torch.no_grad(): acc = (run.model.net(x).argmax(1) == y).float().mean().item()
    return {'test_accuracy': acc, 'seed_plus_lr': run.config.train.seed + run.config.model.lr}

register(Experiment('_sweep-test', 'a small classifier on the three moons (for the sweep tests)', models={'mlp': MLP, 'linear': Linear},
                    data=Data, build_data=lambda cfg: SimpleNamespace(train=moons_dataset(cfg.data.n, seed=cfg.train.seed)),
                    build_model=build, evaluate=evaluate, train=dict(steps=5, batch_size=32, threads=1, progress=False)))
