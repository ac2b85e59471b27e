"""The package's architecture: layers whose imports point down only, one model protocol used without `isinstance`, no exported name
defined twice, and a new model added from one file (this one) through the public API and the command line."""
import ast, importlib, json, pkgutil, re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlatent
from dlatent.cli import main
from dlatent.experiments import EXPERIMENTS, Experiment, register, load_run
from dlatent.models.base import GenerativeModel, batch_images, eval_mode
from dlatent.objectives.distributions import reparameterize, kl_std_normal
from dlatent.objectives.losses import reconstruction_loss
from dlatent.networks.mlp import mlp
from dlatent.data.core import digits_dataset

PKG = Path(dlatent.__file__).parent
# lower rank = lower layer; a module may import only from its own rank or below (the engine, rank 5, knows no model)
RANKS = {'runtime': 0, 'objectives': 1, 'data': 1, 'networks': 2, 'models': 3, 'metrics': 4, 'train': 5, 'experiments': 6, 'cli': 7}

def layer(module: str) -> str:
    return module.split('.')[1]

def package_modules():
    return sorted(m.name for m in pkgutil.walk_packages([str(PKG)], 'dlatent.') if not m.name.endswith('_modidx'))

def imports_of(module: str) -> set[str]:
    path = Path(importlib.util.find_spec(module).origin)
    out, pkg = set(), module.rsplit('.', 1)[0] if not path.name == '__init__.py' else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split('.')[:len(pkg.split('.')) - node.level + 1]
                out.add('.'.join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith('dlatent'): out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith('dlatent')}
    return {m for m in out if m.count('.') >= 1}

def test_every_module_is_in_a_layer():
    for m in package_modules():
        assert layer(m) in RANKS, f"{m} is in no layer; the layers are {sorted(RANKS, key=RANKS.get)}"

def test_imports_point_down():
    bad = []
    for m in package_modules():
        for imp in imports_of(m):
            if RANKS[layer(imp)] > RANKS[layer(m)]: bad.append(f'{m} imports {imp}')
    assert not bad, 'imports that point up a layer: ' + '; '.join(bad)

def test_no_exported_name_is_defined_twice():
    seen, dup = {}, []
    for m in package_modules():
        for name in getattr(importlib.import_module(m), '__all__', []) if not m.endswith('__init__') else []:
            if m.count('.') >= 2 or m in ('dlatent.train', 'dlatent.cli', 'dlatent.runtime'):
                if name in seen and seen[name] != m: dup.append(f'{name} ({seen[name]}, {m})')
                seen.setdefault(name, m)
    assert not dup, 'names exported by two modules: ' + ', '.join(dup)

def test_nothing_asks_a_model_its_class():
    models = {n for m in package_modules() if layer(m) == 'models'
              for n, v in vars(importlib.import_module(m)).items() if isinstance(v, type) and issubclass(v, nn.Module)}
    pat = re.compile(r'isinstance\([^)]*\b(' + '|'.join(sorted(models)) + r')\b')
    root = PKG.parent
    files = list(PKG.rglob('*.py')) + list((root / 'nbs').rglob('*.ipynb'))
    hits = [f'{p.relative_to(root)}' for p in files if pat.search(p.read_text())]
    assert not hits, f'isinstance on a model class in: {hits}; use the model protocol (sample, representation, codes, inpaint, supports)'

# -- a new model from this file alone -----------------------------------------------------------------------------------------

class VAE(GenerativeModel):
    "A plain VAE on 8x8 digits: Gaussian encoder, Bernoulli decoder, N(0, I) prior. representation(x) = the posterior mean."
    def __init__(self, z_dim: int, hidden: int, lr: float, beta: float):
        super().__init__()
        self.enc, self.dec = mlp([64, hidden, 2 * z_dim]), mlp([z_dim, hidden, 64])
        self.z_dim, self.lr, self.beta = z_dim, lr, beta
    def configure_optimizers(self): return {'vae': torch.optim.Adam(self.parameters(), lr=self.lr)}
    def train_step(self, batch, ctx):
        x = batch_images(batch).flatten(1)
        mu, logvar = self.enc(x).chunk(2, 1)
        rec = reconstruction_loss(x, torch.sigmoid(self.dec(reparameterize(mu, logvar))), 'bernoulli').mean()
        kl = kl_std_normal(mu, logvar).mean()
        ctx.update('vae', rec + self.beta * kl)
        return {'rec': rec, 'kl': kl}
    def sample(self, n, labels=None, generator=None):
        if labels is not None: raise ValueError('the VAE is unconditional: pass labels=None')
        z = torch.randn(n, self.z_dim, generator=generator)
        return torch.sigmoid(self.dec(z)).view(n, 1, 8, 8)
    def representation(self, x): return self.enc(x.flatten(1)).chunk(2, 1)[0]

@dataclass
class VAEConfig:
    z_dim: int = 4
    hidden: int = 64
    lr: float = 3e-3
    beta: float = 1.0
    def __post_init__(self):
        if self.z_dim < 1: raise ValueError(f"z_dim must be >= 1, got {self.z_dim}")

@dataclass
class DigitsEval:
    n_samples: int = 16

def vae_eval(run):
    test = digits_dataset('test')
    x = batch_images(test.tensors)
    with eval_mode(run.model):
        mu = run.model.representation(x)
        rec = reconstruction_loss(x.flatten(1), torch.sigmoid(run.model.dec(mu)), 'bernoulli').mean().item()
        samples = run.model.sample(run.config.eval.n_samples, generator=torch.Generator().manual_seed(0))
    return {'test_rec': rec, 'sample_mean': samples.mean().item()}

@pytest.fixture
def vae_experiment():
    register(Experiment('test-digits-vae', 'a plain VAE on the digits', models={'vae': VAEConfig}, eval=DigitsEval,
                        build_data=lambda cfg: SimpleNamespace(train=digits_dataset('train')),
                        build_model=lambda cfg, data: VAE(**vars(cfg.model)), evaluate=vae_eval,
                        train=dict(steps=60, batch_size=64, progress=False, threads=1), presets={'quick': {'train.steps': 30}}))
    yield
    EXPERIMENTS.pop('test-digits-vae')

def test_a_new_model_in_one_file(vae_experiment, tmp_path, capsys):
    run_dir = tmp_path / 'vae'
    assert main(['train', 'test-digits-vae', '--preset', 'quick', '--set', 'model.z_dim=3', '--out', str(run_dir)]) == 0
    saved = json.loads((run_dir / 'config.json').read_text())
    assert saved['model'] == {'name': 'vae', 'z_dim': 3, 'hidden': 64, 'lr': 3e-3, 'beta': 1.0} and saved['train']['steps'] == 30
    first = json.loads((run_dir / 'metrics.json').read_text())
    assert main(['train', 'test-digits-vae', '--resume', '--out', str(run_dir), '--set', 'train.steps=120']) == 0
    assert main(['eval', str(run_dir)]) == 0
    later = json.loads((run_dir / 'metrics.json').read_text())
    assert later['steps'] == 120 and later['test_rec'] < first['test_rec']        # more training, better reconstructions
    run = load_run(run_dir)
    assert run.model.representation(torch.rand(5, 1, 8, 8)).shape == (5, 3) and not run.model.training
    assert run.model.sample(4).shape == (4, 1, 8, 8)
    assert main(['train', 'test-digits-vae', '--set', 'model.tau=1', '--out', str(tmp_path / 'x')]) == 2
    assert "model 'vae' has no setting 'tau'; valid keys: model.z_dim, model.hidden, model.lr, model.beta" in capsys.readouterr().err
