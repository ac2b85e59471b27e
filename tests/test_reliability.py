"""Fault injection, as a careful user would try it: damaged and wrong run files, resuming with new settings, one path for a
diverging run, bad command-line and library input, the dSprites cache damaged on disk, file permissions, and `kill -9` during
checkpoint writes. Each case must end in the right behaviour: a clear line naming the file or argument (exit 2), a clean stop
naming what diverged and when (exit 1), a one-line warning and a fallback, or correct results."""
import contextlib, io, json, math, os, random, signal, subprocess, sys, textwrap, time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dlatent.cli import main
from dlatent.data.core import moons_dataset, three_moons
from dlatent.data.dsprites import N_IMAGES, packed_cache, render_packed, save_packed, load_packed, digest_path, PackedFileError
from dlatent.experiments import EXPERIMENTS, Experiment, register, run_experiment, load_run
from sweep_helpers import Classifier    # the tests' small classifier on the protocol
from dlatent.runtime import (atomic_save, write_json, load_checkpoint, remove_stale_temps, pick_device, CheckpointError, _HOST)
from dlatent.train import TinyClassifier, TrainConfig, Trainer, fit, NonFiniteLossError, Callback, find_nonfinite
from dlatent.objectives.distributions import total_gaussian, kl_std_normal, set_validation
import dlatent.objectives.distributions as distributions
from dlatent.objectives.gm import gm_loss, gm_losses
from dlatent.metrics.quality import frechet_distance, intra_class_diversity
from dlatent.metrics.disentanglement import mig, dci_disentanglement, ent_score, match_codes_to_classes, nmi_score

torch.set_num_threads(1)
ROOT = os.geteuid() == 0 if hasattr(os, 'geteuid') else False

# -- a tiny experiment: trains in a fraction of a second, checkpoints at steps 4, 8 and 12 ------------------------------------


@dataclass
class TinyModel:
    hidden: int = 16
    lr: float = 1e-2

@dataclass
class TinyData:
    n: int = 300
    noise: float = 0.15

@dataclass
class TinyEval:
    n_test: int = 300

def tiny_eval(run):
    x, y = three_moons(run.config.eval.n_test, seed=run.config.train.seed + 1)
    with torch.no_grad(): return {'test_accuracy': (run.model.net(x).argmax(1) == y).float().mean().item()}

@pytest.fixture
def tiny():
    register(Experiment('rel-tiny', 'tiny classifier', models={'mlp': TinyModel}, data=TinyData, eval=TinyEval,
                        build_data=lambda cfg: SimpleNamespace(train=moons_dataset(cfg.data.n, cfg.data.noise, seed=cfg.train.seed)),
                        build_model=lambda cfg, data: Classifier(nn.Sequential(nn.Linear(2, cfg.model.hidden), nn.ReLU(), nn.Linear(cfg.model.hidden, 3)), cfg.model.lr), evaluate=tiny_eval,
                        train=dict(steps=12, batch_size=32, log_every=4, ckpt_every=4, progress=False, threads=1)))
    yield 'rel-tiny'
    EXPERIMENTS.pop('rel-tiny')

@pytest.fixture
def run_dir(tiny, tmp_path, capsys):
    "A trained run of the tiny experiment: checkpoint.pt at step 12, checkpoint.prev.pt at step 8."
    d = tmp_path / 'run'
    assert main(['train', tiny, '--out', str(d)]) == 0
    capsys.readouterr()
    assert load_checkpoint(d / 'checkpoint.pt')['step'] == 12 and load_checkpoint(d / 'checkpoint.prev.pt')['step'] == 8
    return d

def one_line(capsys) -> str:
    "What went to stderr: exactly one line, no traceback."
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    return err

def stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err.strip()
    assert 'Traceback' not in err, err
    return err.splitlines()

# -- 1. a damaged checkpoint is detected; the previous one is used, with a warning -----------------------------------------------

def _record_offset(path: Path, suffix: str) -> tuple[int, int]:
    "(offset, size) of the bytes of the zip record whose name ends with `suffix` (the stored tensor data)."
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(suffix) or f'/data/' in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], 'little'), \
                          int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')
    return info.header_offset + 30 + name_len + extra_len, info.file_size

def damage(path: Path, kind: str, other: Path | None = None):
    "Damage a checkpoint file as `kind` says."
    if kind == 'flip64':                                      # 64 bytes inside the largest stored tensor, flipped
        off, size = _record_offset(path, '/data/0')
        raw = bytearray(path.read_bytes()); at = off + min(64, size // 2)
        raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64]); path.write_bytes(raw)
    elif kind == 'truncated': path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif kind == 'garbage': path.write_bytes(os.urandom(4096))
    elif kind == 'empty': path.write_bytes(b'')
    elif kind == 'empty-dict': torch.save({}, path)
    elif kind == 'list': torch.save([1, 2, 3], path)
    elif kind == 'no-optimizers':
        ck = torch.load(path, weights_only=True); del ck['optimizers']; torch.save(ck, path)
    elif kind == 'bad-step':
        ck = torch.load(path, weights_only=True); ck['step'] = 'twelve'; torch.save(ck, path)
    elif kind == 'directory': path.unlink(); path.mkdir()
    elif kind == 'evil-pickle':
        class Evil:
            def __reduce__(self): return (os.system, (f'touch {path.parent / "PWNED"}',))
        torch.save({'model': Evil()}, path)
    else: raise ValueError(kind)

DAMAGE = ['flip64', 'truncated', 'garbage', 'empty', 'empty-dict', 'list', 'no-optimizers', 'bad-step', 'directory', 'evil-pickle']

@pytest.mark.parametrize('kind', DAMAGE)
def test_damaged_checkpoint_eval_falls_back_to_the_previous(run_dir, capsys, kind):
    damage(run_dir / 'checkpoint.pt', kind)
    assert main(['eval', str(run_dir)]) == 0
    warn = [l for l in stderr_lines(capsys) if 'warning' in l]
    assert len(warn) == 1 and 'checkpoint.pt' in warn[0] and 'checkpoint.prev.pt (step 8)' in warn[0]
    assert not (run_dir / 'PWNED').exists()                  # the pickle's code never ran

@pytest.mark.parametrize('kind', DAMAGE)
def test_damaged_checkpoint_without_a_previous_one_is_one_line(run_dir, capsys, kind, tiny):
    (run_dir / 'checkpoint.prev.pt').unlink()
    damage(run_dir / 'checkpoint.pt', kind)
    assert main(['eval', str(run_dir)]) == 2
    assert 'checkpoint.pt' in one_line(capsys)
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=16']) == 2
    err = one_line(capsys)
    assert 'checkpoint.pt' in err and ('backup' in err or 'is a directory' in err)
    assert not (run_dir / 'PWNED').exists()

@pytest.mark.parametrize('kind', ['flip64', 'truncated', 'empty-dict'])
def test_damaged_checkpoint_resume_falls_back_and_finishes(run_dir, capsys, kind, tiny):
    damage(run_dir / 'checkpoint.pt', kind)
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=16']) == 0
    warn = [l for l in stderr_lines(capsys) if 'warning' in l]
    assert len(warn) == 1 and 'resuming from the previous checkpoint checkpoint.prev.pt (step 8)' in warn[0]
    assert load_checkpoint(run_dir / 'checkpoint.pt')['step'] == 16
    assert load_checkpoint(run_dir / 'checkpoint.prev.pt')['step'] == 12   # checkpoints written by the resumed run

def test_both_checkpoints_damaged_names_both(run_dir, capsys):
    damage(run_dir / 'checkpoint.pt', 'flip64'); damage(run_dir / 'checkpoint.prev.pt', 'truncated')
    assert main(['eval', str(run_dir)]) == 2
    err = one_line(capsys)
    assert 'checkpoint.pt is damaged' in err and 'checkpoint.prev.pt' in err and 'cannot be used either' in err

def test_wrong_shaped_checkpoint_is_one_line(run_dir, capsys, tiny, tmp_path):
    other = tmp_path / 'other'
    assert main(['train', tiny, '--out', str(other), '--set', 'model.hidden=8']) == 0
    capsys.readouterr()
    (other / 'checkpoint.pt').replace(run_dir / 'checkpoint.pt')
    assert main(['eval', str(run_dir)]) == 2
    assert 'does not fit the model that config.json describes (net.0.weight is (8, 2) where the model has (16, 2)' in one_line(capsys)

def test_damaged_weights_are_never_loaded():
    "A checkpoint whose stored weights were changed after writing is refused by load_checkpoint itself."
    with pytest.raises(CheckpointError, match='do not match their CRC'):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / 'ck.pt'
            atomic_save({'w': torch.arange(4096.)}, p)
            damage(p, 'flip64')
            load_checkpoint(p)

# -- 2. every other damaged or wrong run file: one line naming it --------------------------------------------------------------

CONFIGS = {
    'a list': ('[1, 2]', 'holds a list'),
    'not JSON': ('{"experiment": ', 'is not valid JSON'),
    'empty': ('', 'is not valid JSON'),
    'no experiment': ('{"train": {}, "model": {}, "data": {}, "eval": {}}', 'names no experiment'),
    'a null section': (None, "'model' section is null"),
    'a missing section': ('drop-data', 'lacks the section data'),
    'a string for a number': ('steps-abc', "train.steps='abc': expected a value of type int"),
    'an unknown setting': ('unknown-key', "has no setting 'colour'"),
    'an unknown experiment': ('unknown-exp', "unknown experiment 'no-such-experiment'"),
    'the old layout': ('{"experiment": "rel-tiny", "config": null}', 'not a sectioned config'),
}

@pytest.mark.parametrize('case', list(CONFIGS))
def test_damaged_config_json_is_one_line(run_dir, capsys, case, tiny):
    text, expect = CONFIGS[case]
    p = run_dir / 'config.json'
    saved = json.loads(p.read_text())
    if text is None: saved['model'] = None; text = json.dumps(saved)
    elif text == 'drop-data': del saved['data']; text = json.dumps(saved)
    elif text == 'steps-abc': saved['train']['steps'] = 'abc'; text = json.dumps(saved)
    elif text == 'unknown-key': saved['data']['colour'] = 'red'; text = json.dumps(saved)
    elif text == 'unknown-exp': saved['experiment'] = 'no-such-experiment'; text = json.dumps(saved)
    p.write_text(text)
    for argv in (['eval', str(run_dir)], ['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=16']):
        assert main(argv) == 2
        err = one_line(capsys)
        assert 'config.json' in err and expect in err, err

def test_config_json_as_a_directory(run_dir, capsys):
    (run_dir / 'config.json').unlink(); (run_dir / 'config.json').mkdir()
    assert main(['eval', str(run_dir)]) == 2
    assert 'config.json is a directory' in one_line(capsys)

@pytest.mark.parametrize('content', ['list', 'directory', 'garbage'])
def test_damaged_metrics_json_is_one_line(run_dir, capsys, content):
    p = run_dir / 'metrics.json'
    if content == 'list': p.write_text('[1, 2]')
    elif content == 'garbage': p.write_bytes(os.urandom(64))
    else: p.unlink(); p.mkdir()
    assert main(['eval', str(run_dir)]) == 2
    err = one_line(capsys)
    assert 'metrics.json' in err and 'eval writes a new one' in err

def test_history_csv_as_a_directory_is_one_line(run_dir, capsys, tiny):
    (run_dir / 'history.csv').unlink(); (run_dir / 'history.csv').mkdir()
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=16']) == 2
    assert 'history.csv is a directory' in one_line(capsys)

def test_garbage_history_csv_is_rewritten_on_resume(run_dir, capsys, tiny):
    (run_dir / 'history.csv').write_text('[1, 2, 3]\n')
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=16']) == 0
    assert (run_dir / 'history.csv').read_text().splitlines()[0].startswith('step,epoch,time,loss')

def test_damaged_snapshots_file_is_one_line(tmp_path, capsys):
    "A run file read by an experiment's figures (moons' snapshots.pt) is verified too."
    d = tmp_path / 'moons'
    argv = ['train', 'moons', '--out', str(d), '--set', 'train.steps=3', 'data.n_per_class=20', 'eval.n_gen=4',
            'eval.snapshots=1', 'train.batch_size=8']
    assert main(argv) == 0
    capsys.readouterr()
    damage(d / 'snapshots.pt', 'truncated')
    assert main(['eval', str(d)]) == 2
    assert 'snapshots.pt' in one_line(capsys)

# -- 3. resume: the settings that may change apply, those that cannot are refused ------------------------------------------------

def test_resume_applies_a_new_learning_rate(run_dir, capsys, tiny):
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'model.lr=0.001', 'train.steps=20']) == 0
    assert 'resuming with new optimizer settings: lr 0.01 -> 0.001 (net)' in capsys.readouterr().err
    ck = load_checkpoint(run_dir / 'checkpoint.pt')
    assert ck['step'] == 20 and ck['optimizers']['net']['param_groups'][0]['lr'] == 0.001
    assert json.loads((run_dir / 'config.json').read_text())['model']['lr'] == 0.001
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=24']) == 0   # and keeps it
    assert 'new optimizer settings' not in capsys.readouterr().err
    assert load_checkpoint(run_dir / 'checkpoint.pt')['optimizers']['net']['param_groups'][0]['lr'] == 0.001

def test_resume_applies_steps_cadences_and_evaluation(run_dir, capsys, tiny):
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', 'train.steps=30', 'train.log_every=3',
                 'train.ckpt_every=6', 'eval.n_test=30']) == 0
    ck = load_checkpoint(run_dir / 'checkpoint.pt')
    assert ck['step'] == 30 and load_checkpoint(run_dir / 'checkpoint.prev.pt')['step'] == 24
    assert [r['step'] for r in ck['history'] if 'loss' in r][-3:] == [24, 27, 30]
    assert json.loads((run_dir / 'config.json').read_text())['eval']['n_test'] == 30

@pytest.mark.parametrize('setting, named', [
    ('data.noise=0.3', 'data.noise 0.15 -> 0.3'), ('data.n=600', 'data.n 300 -> 600'),
    ('train.seed=1', 'train.seed 0 -> 1'), ('train.batch_size=16', 'train.batch_size 32 -> 16'),
    ('model.hidden=8', 'model.hidden 16 -> 8')])
def test_resume_refuses_settings_that_fix_the_data_and_networks(run_dir, capsys, tiny, setting, named):
    before = (run_dir / 'config.json').read_text()
    assert main(['train', tiny, '--resume', '--out', str(run_dir), '--set', setting, 'train.steps=16']) == 2
    err = one_line(capsys)
    assert f'cannot resume' in err and named in err
    assert (run_dir / 'config.json').read_text() == before and load_checkpoint(run_dir / 'checkpoint.pt')['step'] == 12

def test_resume_refuses_another_model(tmp_path, capsys):
    d = tmp_path / 'moons'
    assert main(['train', 'moons', '--out', str(d), '--set', 'train.steps=2', 'data.n_per_class=20', 'eval.n_gen=4',
                 'eval.snapshots=1', 'train.batch_size=8']) == 0
    capsys.readouterr()
    assert main(['train', 'moons', '--resume', '--out', str(d), '--set', 'model.name=cvae']) == 2
    assert "model.name 'dvae' -> 'cvae'" in one_line(capsys)

class Scheduled(TinyClassifier):
    "A learning rate halved every 5 steps."
    def configure_schedulers(self, optimizers, steps_per_epoch):
        return {'net': torch.optim.lr_scheduler.LambdaLR(optimizers['net'], lambda s: 0.5 ** (s // 5))}

def test_resume_rescales_a_scheduled_learning_rate(tmp_path):
    data = TensorDataset(*three_moons(300, seed=0))
    cfg = lambda steps: TrainConfig(steps=steps, batch_size=32, progress=False, threads=1, ckpt_every=4)
    fit(Scheduled(lr=0.1), data, cfg(12), out_dir=tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err): tr = Trainer(Scheduled(lr=0.01), data, cfg(17), out_dir=tmp_path); tr.fit(resume=True)
    assert 'lr 0.1 -> 0.01' in err.getvalue()
    assert tr.optimizers['net'].param_groups[0]['lr'] == pytest.approx(0.01 * 0.5 ** 3)     # the schedule goes on from the new rate
    assert tr.schedulers['net'].base_lrs == [0.01]

def test_unchanged_resume_stays_bitwise_exact(tmp_path):
    data = TensorDataset(*three_moons(300, seed=0))
    cfg = lambda steps: TrainConfig(steps=steps, batch_size=32, progress=False, threads=1, ckpt_every=4)
    torch.manual_seed(0); full = fit(Scheduled(lr=0.05), data, cfg(20), out_dir=tmp_path / 'a').model
    torch.manual_seed(0); fit(Scheduled(lr=0.05), data, cfg(9), out_dir=tmp_path / 'b')
    resumed = fit(Scheduled(lr=0.05), data, cfg(20), out_dir=tmp_path / 'b', resume=True).model
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))

# -- 4. one divergence path ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('lr', ['1e6', '1e3', '50', '10', '0.3'])
def test_moons_divergence_stops_with_the_loss_and_step(tmp_path, capsys, lr):
    d = tmp_path / 'run'
    assert main(['train', 'moons', '--out', str(d), '--set', f'model.lr={lr}', 'train.steps=40', 'train.ckpt_every=1',
                 'data.n_per_class=50', 'train.batch_size=8', 'eval.n_gen=4', 'eval.snapshots=1']) == 1
    err = one_line(capsys)
    assert err.startswith('dlatent: training stopped: ') and ' became ' in err and (' at step ' in err or ' by step ' in err)
    if (d / 'checkpoint.pt').exists():                          # the kept checkpoint holds only finite numbers
        ck = load_checkpoint(d / 'checkpoint.pt')
        tensors = list(ck['model'].values()) + [v for o in ck['optimizers'].values() for s in o['state'].values()
                                                 for v in s.values() if isinstance(v, torch.Tensor)]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
        assert f"at step {ck['step']}" in err

DATA = TensorDataset(*three_moons(500, seed=0))

class MomentOverflow(TinyClassifier):
    "Finite losses, but a gradient so large at step 12 that Adam's second moment overflows to inf."
    def train_step(self, batch, ctx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        ctx.update('net', loss * (1e30 if ctx.step == 11 else 1.0))
        return {'loss': loss}

def test_an_optimizer_moment_overflow_stops_training(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"optimizer 'net' state 'exp_avg_sq' of parameter 'net\.\d\.weight' became inf by step 12"):
        fit(MomentOverflow(), DATA, TrainConfig(steps=40, batch_size=32, progress=False, threads=1, log_every=4, ckpt_every=8), out_dir=tmp_path)
    ck = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert ck['step'] == 8 and find_nonfinite(TinyClassifier(), {}) is None
    assert all(torch.isfinite(v).all() for s in ck['optimizers']['net']['state'].values() for v in s.values())

class ParameterNaN(TinyClassifier):
    "A parameter set to NaN at step 6 while the losses of the steps logged so far stay finite."
    def train_step(self, batch, ctx):
        out = super().train_step(batch, ctx)
        if ctx.step == 5:
            with torch.no_grad(): self.net[0].bias[0] = float('nan')
        return {'loss': torch.zeros(())}              # a loss that hides it
def test_a_nonfinite_parameter_stops_training(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"parameter 'net\.0\.(weight|bias)' became nan by step 8"):
        fit(ParameterNaN(), DATA, TrainConfig(steps=20, batch_size=32, progress=False, threads=1, log_every=4, ckpt_every=4), out_dir=tmp_path)
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 4

class RaisesOnNaN(TinyClassifier):
    "A model whose own code fails on NaN values (as torch.multinomial does): the divergence is reported, not the symptom."
    def train_step(self, batch, ctx):
        if ctx.step == 7:
            with torch.no_grad(): self.net[2].weight.fill_(float('nan'))
        if not torch.isfinite(self.net[2].weight).all(): raise RuntimeError('probability tensor contains either inf, nan or element < 0')
        return super().train_step(batch, ctx)

def test_a_model_that_raises_on_nan_is_reported_as_divergence(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"parameter 'net\.2\.weight' became nan by step 7 \(the model then raised RuntimeError"):
        fit(RaisesOnNaN(), DATA, TrainConfig(steps=20, batch_size=32, progress=False, threads=1, log_every=4), out_dir=tmp_path)

class UsesTheLosses(TinyClassifier):
    "Calls a checked density on the network's outputs: inside the loop the engine's check is the only one."
    def train_step(self, batch, ctx):
        x, y = batch
        h = self.net(x)
        if ctx.step >= 5: h = h * float('nan')
        loss = nn.functional.cross_entropy(h, y) + 0 * kl_std_normal(h, h).mean()
        ctx.update('net', loss)
        return {'loss': loss}

def test_the_losses_input_checks_do_not_preempt_the_engine(tmp_path):
    with pytest.raises(NonFiniteLossError, match="loss 'loss' became nan at step 6"):
        fit(UsesTheLosses(), DATA, TrainConfig(steps=20, batch_size=32, progress=False, threads=1, log_every=4, ckpt_every=4), out_dir=tmp_path)
    assert distributions._VALIDATE                              # on again after the loop, for direct calls
    with pytest.raises(ValueError, match='mu contains NaN'): kl_std_normal(torch.tensor([[float('nan')]]), torch.zeros(1, 1))

# -- 5. the dSprites cache: verified, rebuilt when damaged, no stale temporary files ---------------------------------------------

SMALL = np.arange(0, N_IMAGES, 2459)[:300]

def _render(out): out[:] = render_packed(SMALL)

def _cache(path, capsys=None):
    return packed_cache(path, 300, _render, chunk=64, verbose=False)

CACHE_DAMAGE = {
    'random bytes': lambda p: _overwrite(p, 100 * 512, os.urandom(4096)),
    'zeros': lambda p: _overwrite(p, 250 * 512, bytes(4096)),
    'truncated': lambda p: os.truncate(p, p.stat().st_size // 2),
    'zero bytes': lambda p: os.truncate(p, 0),
    'a changed header': lambda p: _overwrite(p, 10, b"{'descr': '<f8'"),
    'no digest file': lambda p: digest_path(p).unlink(),
    'a damaged digest file': lambda p: digest_path(p).write_text('[]'),
    'a digest of another file': lambda p: write_json(dict(json.loads(digest_path(p).read_text()), shape=[10, 64, 8]), digest_path(p)),
}

def _overwrite(p, at, data):
    with open(p, 'r+b') as f: f.seek(at); f.write(data)

@pytest.mark.parametrize('case', list(CACHE_DAMAGE))
def test_damaged_dsprites_cache_is_rebuilt_with_a_notice(tmp_path, capsys, case):
    path = tmp_path / 'cache.npy'
    good = np.array(_cache(path))
    capsys.readouterr()
    CACHE_DAMAGE[case](path)
    again = _cache(path)
    err = one_line(capsys)
    assert err.startswith('dlatent: warning: ') and 'cache.npy' in err and err.endswith('rendering it again')
    assert np.array_equal(np.array(again), good) and np.array_equal(good, render_packed(SMALL))
    assert _cache(path) is not None and capsys.readouterr().err == ''   # verified and served from now on

def test_load_packed_refuses_a_damaged_file(tmp_path):
    p = save_packed(tmp_path / 'sub.npy', render_packed(SMALL), chunk=100)
    _overwrite(p, 128 + 150 * 512, os.urandom(512))
    with pytest.raises(PackedFileError, match='images 100 to 199 do not match their digest'): load_packed(p)

@pytest.mark.skipif(os.name == 'nt', reason='temporary files there go by age only')
def test_stale_temporary_files_are_removed(tmp_path):
    path = tmp_path / 'cache.npy'
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    stale = tmp_path / f'.cache.npy.{_HOST}-{dead.pid}-0123abcd.tmp'
    live = tmp_path / f'.cache.npy.{_HOST}-{os.getppid()}-0123abcd.tmp'     # a writer that is still running
    old = tmp_path / '.cache.npy.k2j4h5g6.tmp'                              # an unnamed writer's, untouched for two hours
    for p in (stale, live, old): p.write_bytes(b'half a file')
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    _cache(path)
    assert not stale.exists() and not old.exists() and live.exists()
    assert remove_stale_temps(path) == []

# -- 6. permissions: files are written with the user's umask -----------------------------------------------------------------

@pytest.mark.skipif(os.name == 'nt', reason='POSIX permissions')
@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_save({'a': torch.ones(1)}, tmp_path / 'ck.pt')
        write_json({'a': 1}, tmp_path / 'm.json')
        _cache(tmp_path / 'cache.npy')
        fit(TinyClassifier(), DATA, TrainConfig(steps=2, batch_size=32, progress=False, threads=1), out_dir=tmp_path / 'run')
    finally: os.umask(before)
    for p in ('ck.pt', 'm.json', 'cache.npy', 'cache.npy.sha256.json', 'run/checkpoint.pt'):
        assert (tmp_path / p).stat().st_mode & 0o777 == mode, p

# -- 7. kill -9 during checkpoint writes, then resume: bitwise the run that was never interrupted -----------------------------------

CHILD = textwrap.dedent('''
    import io, os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from torch.utils.data import TensorDataset
    from dlatent.data.core import three_moons
    from dlatent.train import TinyClassifier, TrainConfig, fit, Callback
    import dlatent.runtime as rt
    out, point, at, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    marker, count = out.parent / 'paused', [0]
    def pause():
        marker.write_text('paused'); time.sleep(600)
    if point == 'write':            # half of the new checkpoint written to its temporary file
        real = torch.save
        def save(obj, f, *a, **k):
            if '.checkpoint.pt.' in str(f):
                count[0] += 1
                if count[0] == at:
                    buf = io.BytesIO(); real(obj, buf)
                    with open(f, 'wb') as fh: fh.write(buf.getvalue()[:len(buf.getvalue()) // 2]); fh.flush(); os.fsync(fh.fileno())
                    pause()
            return real(obj, f, *a, **k)
        torch.save = save
    elif point == 'rename':         # the new checkpoint complete and fsynced, not yet renamed over the old one
        real_replace = os.replace
        def replace(a, b):
            if Path(b).name == 'checkpoint.pt':
                count[0] += 1
                if count[0] == at: pause()
            return real_replace(a, b)
        os.replace = replace
    elif point == 'keep':           # the old checkpoint kept as checkpoint.prev.pt, the new one not yet renamed
        real_keep = rt._keep_as
        def keep(path, previous):
            real_keep(path, previous); count[0] += 1
            if count[0] == at: pause()
        rt._keep_as = keep
    class Started(Callback):
        def before_fit(self, t): (out.parent / 'started').write_text('started')
    torch.manual_seed(0)
    data = TensorDataset(*three_moons(500, seed=0))
    fit(TinyClassifier(), data, TrainConfig(steps=steps, batch_size=32, progress=False, threads=1, ckpt_every=1, log_every=5),
        out_dir=out, callbacks=[Started()])
''')

def _reference(steps):
    torch.manual_seed(0)
    return fit(TinyClassifier(), DATA, TrainConfig(steps=steps, batch_size=32, progress=False, threads=1, ckpt_every=1, log_every=5)).model

def _wait_for(p: Path, proc, timeout=120):
    t0 = time.time()
    while not p.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout, f'{p.name} never appeared'
        time.sleep(0.01)

@pytest.mark.skipif(os.name == 'nt', reason='SIGKILL and process probes are POSIX')
@pytest.mark.parametrize('point, at', [('write', 7), ('rename', 11), ('keep', 5), ('random', 0)])
def test_kill_9_during_checkpoint_writes_then_resume_is_exact(tmp_path, point, at):
    steps = 30 if point != 'random' else 200
    out = tmp_path / 'run'
    script = tmp_path / 'child.py'; script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, str(script), str(out), point, str(at), str(steps)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if point == 'random':
            _wait_for(tmp_path / 'started', proc)
            time.sleep(random.Random(at).uniform(0.05, 0.5))          # somewhere in the run, most likely inside a write
        else: _wait_for(tmp_path / 'paused', proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if not (out / 'checkpoint.pt').exists(): pytest.skip('killed before the first checkpoint')
    kept = load_checkpoint(out / 'checkpoint.pt')['step']            # verified: the kill never leaves a torn checkpoint
    if point in ('write', 'rename'): assert kept == at - 1      # the checkpoint before the one being written
    if point == 'keep': assert kept == at and load_checkpoint(out / 'checkpoint.prev.pt')['step'] == at
    if point == 'rename': assert load_checkpoint(out / 'checkpoint.prev.pt')['step'] == at - 1
    resumed = fit(TinyClassifier(), DATA, TrainConfig(steps=steps, batch_size=32, progress=False, threads=1, ckpt_every=1, log_every=5),
                  out_dir=out, resume=True)
    ref = _reference(steps)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.model.state_dict().values()))
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint.prev.pt', 'checkpoint.pt', 'history.csv']   # no stale temporary file

# -- 8. command-line input that used to crash or be accepted: one line naming the argument, exit 2 -----------------------------------

MOONS = ['train', 'moons', '--set', 'train.steps=2', 'eval.n_gen=4', 'eval.snapshots=1']

@pytest.mark.parametrize('argv, expect', [
    (['--device', 'meta'], "device 'meta' is not one dlatent trains on"),
    (['--device', 'xla'], "device 'xla' is not one dlatent trains on"),
    (['--device', 'hpu'], "device 'hpu' is not one dlatent trains on"),
    (['--device', 'cpu:7'], "there is one CPU device, it has no index 7; use 'cpu'"),
    (['--device', 'cpu', '--set', 'train.device=cuda'], 'disagree'),
    (['--set', 'train.log_every=3', 'train.log_every=5'], 'train.log_every is set twice (train.log_every=3 and train.log_every=5)'),
    (['--set', 'model.gm_decay_epochs=inf'], 'model.gm_decay_epochs=inf: expected a finite number'),
    (['--set', 'model.lr=nan'], 'model.lr=nan: expected a finite number'),
    (['--set', 'data.noise=0'], 'MoonsData.noise must be a finite number > 0'),
    (['--set', 'model.lambda_lkd=-1'], 'DVAEConfig.lambda_lkd must be a finite number >= 0'),
    (['--set', 'train.seed=99999999999999999999'], 'train.seed=99999999999999999999: expected an integer that fits in 64 bits'),
    (['--set', 'train.seed=4294967296'], 'TrainConfig.seed must be an integer in 0..4294967295'),
    (['--set', 'train.threads=99999999999999999999'], 'expected an integer that fits in 64 bits'),
    (['--set', 'train.threads=100000'], 'TrainConfig.threads must be at most 1024'),
    (['--set', 'data.n_per_class=1000000000000000000000'], 'data.n_per_class=1000000000000000000000: expected an integer that fits in 64 bits'),
    (['--set', 'train.log_every=\u0663'], "train.log_every='\u0663': expected a number written with the digits 0-9"),
    (['--set', 'model.lr=\uff10.1'], "expected a number written with the digits 0-9"),
])
def test_bad_command_line_input_is_one_line(tmp_path, capsys, argv, expect):
    assert main(MOONS + argv + ['--out', str(tmp_path / 'run')]) == 2
    assert expect in one_line(capsys)
    assert not (tmp_path / 'run').exists()                     # nothing was written

def test_bad_out_is_one_line(tmp_path, capsys, tiny):
    f = tmp_path / 'file'; f.write_text('x')
    cases = [(str(f), 'is a file, not a directory'), (str(f / 'run'), 'which is a file, not a directory'),
             ('', '--out is empty'), (str(tmp_path / ('x' * 300)), 'at most 255 bytes per name'),
             ('/proc/dlatent-test/run' if Path('/proc').is_dir() else str(f / 'x'), '')]
    for out, expect in cases:
        assert main(['train', tiny, '--out', out]) == 2, out
        assert expect in one_line(capsys)
    assert f.read_text() == 'x' and not any(p.name.startswith('config') for p in Path.cwd().iterdir())

@pytest.mark.skipif(ROOT, reason='the superuser can write anywhere')
def test_unwritable_out_is_one_line(tmp_path, capsys, tiny):
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o500)
    try:
        assert main(['train', tiny, '--out', str(ro / 'run')]) == 2
        assert 'is not writable by you' in one_line(capsys)
    finally: ro.chmod(0o700)

def test_library_argument_checks():
    with pytest.raises(ValueError, match='not one dlatent trains on'): pick_device('meta')
    with pytest.raises(ValueError, match='has no index 7'): pick_device('cpu:7')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'): pick_device('cuda:0')
    with pytest.raises(ValueError, match='--out is empty'): run_experiment('moons', out='')

# -- 9. library functions that returned wrong numbers or passed on other libraries' messages ---------------------------------------

def test_library_functions_refuse_bad_input():
    mu, logvar = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match='probability vector'): total_gaussian(mu, logvar, torch.tensor([0.5, float('nan'), 0.5]))
    with pytest.raises(ValueError, match='NaN'): ent_score([[1, np.nan], [2, 3]])
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 4)); S = A @ A.T + np.eye(4)
    with pytest.raises(ValueError, match='sigma1 is not positive semi-definite'): frechet_distance(np.zeros(4), -S, np.zeros(4), S)
    with pytest.raises(ValueError, match='sigma2 is not symmetric'): frechet_distance(np.zeros(4), S, np.zeros(4), S + np.triu(np.ones((4, 4)), 1))
    z, y = torch.randn(0, 2), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match='z_s has no rows'): gm_loss(z, y, mu, logvar)
    with pytest.raises(ValueError, match='got 0.7'): intra_class_diversity(torch.rand(4, 1, 8, 8), torch.tensor([0., 0.7, 1., 1.]))
    codes, factors = rng.normal(size=(50, 3)), rng.integers(0, 3, (50, 2))
    with pytest.raises(ValueError, match='codes is empty'): mig(codes[:0], factors[:0])
    with pytest.raises(ValueError, match='factors must hold finite numbers'): mig(codes, np.where(factors == 0, np.nan, factors))
    with pytest.raises(ValueError, match='codes contains NaN'): mig(np.full_like(codes, np.nan), factors)
    with pytest.raises(ValueError, match='codes_train is empty'): dci_disentanglement(codes[:0], factors[:0], codes, factors)
    with pytest.raises(ValueError, match='codes_test contains NaN'): dci_disentanglement(codes, factors, codes * np.nan, factors)
    with pytest.raises(ValueError, match='non-empty'): match_codes_to_classes(np.zeros((0, 3)))
    with pytest.raises(ValueError, match='NaN'): match_codes_to_classes([[1, np.nan], [2, 3]])
    with pytest.raises(ValueError, match='empty'): nmi_score([], [])

def test_margins_may_be_numpy_or_tensor_scalars():
    g = torch.Generator().manual_seed(0)
    z, y, mu, logvar = torch.randn(8, 2, generator=g), torch.arange(8) % 3, torch.randn(3, 2, generator=g), torch.zeros(3, 2)
    ref = gm_loss(z, y, mu, logvar, lambda_lkd=0.25, alpha=0.5)
    for a, l in [(np.float32(0.5), np.float64(0.25)), (torch.tensor(0.5), torch.tensor(0.25)), (np.array(0.5), 0.25)]:
        assert torch.equal(gm_loss(z, y, mu, logvar, lambda_lkd=l, alpha=a), ref)
    with pytest.raises(ValueError, match='alpha'): gm_losses(z, y, mu, logvar, alpha='0.5')
