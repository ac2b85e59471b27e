"Tests of the training engine: exact resume, non-finite losses, atomic checkpoints, data parallelism, callbacks, the model protocol, TensorBoard, channels_last."
import json, math, os, subprocess, sys
from pathlib import Path
import pytest, torch
from torch.utils.data import TensorDataset
from dlatent.data.core import three_moons
from dlatent.train import TinyClassifier, TrainConfig, fit, load_checkpoint, NonFiniteLossError, atomic_save

torch.set_num_threads(1)
DATA = TensorDataset(*three_moons(500, seed=0))

def train(steps, out, resume=False, init_seed=0, **kw):
    torch.manual_seed(init_seed)
    cfg = TrainConfig(steps=steps, batch_size=32, progress=False, threads=1, ckpt_every=5, **kw)
    return fit(TinyClassifier(), DATA, cfg, out_dir=out, resume=resume)

@pytest.mark.parametrize('stop', [5, 13, 15, 16])  # mid-epoch and exactly on the epoch boundary (15 steps/epoch)
def test_resume_is_bitwise_exact(tmp_path, stop):
    full = train(40, tmp_path / 'full')
    train(stop, tmp_path / 'part'); resumed = train(40, tmp_path / 'part', resume=True, init_seed=99)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # history rows are means over log intervals; the interrupted run adds a row at the stop, the rest agree
    rows = lambda h, keep: [(r['step'], r['loss']) for r in h.rows if keep(r['step'])]
    aligned = lambda s: s % 10 == 0 and (s <= stop or s >= (stop // 10 + 2) * 10)
    assert rows(full.history, aligned) == rows(resumed.history, aligned)
    assert resumed.history.rows[-1]['step'] == 40

def test_checkpoint_contents_load_safely(tmp_path):
    train(7, tmp_path)
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert set(ck) >= {'model', 'optimizers', 'schedulers', 'scaler', 'rng', 'step', 'history', 'config'}
    assert ck['step'] == 7 and set(ck['rng']) >= {'python', 'numpy', 'torch'}

def test_history_csv_written(tmp_path):
    train(20, tmp_path, log_every=5)
    lines = (tmp_path / 'history.csv').read_text().strip().splitlines()
    assert lines[0].split(',')[:4] == ['step', 'epoch', 'time', 'loss'] and len(lines) == 1 + 4

class NaNAfter(TinyClassifier):
    def train_step(self, batch, ctx):
        out = super().train_step(batch, ctx)
        if ctx.step >= 8: out['loss'] = out['loss'] / 0 * 0
        return out

def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"'loss' became nan at step 9"):
        fit(NaNAfter(), DATA, TrainConfig(steps=30, batch_size=32, progress=False, ckpt_every=4), out_dir=tmp_path)
    ck = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert ck['step'] == 8 and all(torch.isfinite(v).all() for v in ck['model'].values())

def test_atomic_save_survives_a_crash(tmp_path):
    p = tmp_path / 'ck.pt'
    atomic_save({'a': torch.ones(2)}, p)
    class Boom:
        def __reduce__(self): raise RuntimeError('disk full')
    with pytest.raises(RuntimeError): atomic_save({'a': torch.zeros(2), 'b': Boom()}, p)
    assert torch.equal(load_checkpoint(p)['a'], torch.ones(2)) and [f.name for f in tmp_path.iterdir()] == ['ck.pt']

def test_update_touches_only_its_optimizer():
    "ctx.update backpropagates into the named optimizer's parameters only."
    from dlatent.train import Trainable, StepContext
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opts = {'a': torch.optim.SGD(a.parameters(), 0.1), 'b': torch.optim.SGD(b.parameters(), 0.1)}
    ctx = StepContext(opts, torch.device('cpu'), torch.float32, None, 1)
    before_a = [p.clone() for p in a.parameters()]
    ctx.update('b', b(a(torch.randn(4, 2))).pow(2).mean())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before_a)) and all(p.grad is None for p in a.parameters())
    with pytest.raises(KeyError, match='no optimizer named'): ctx.update('c', torch.tensor(0.))

def test_distributed_two_cpu_processes(tmp_path):
    "torchrun with 2 processes under gloo: equal, disjoint shares of data, finite losses, identical replicas, one checkpoint."
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(Path(__file__).parent / 'ddp_worker.py'), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{i}.json').read_text()) for i in range(2)]
    assert all(d['world'] == 2 for d in ranks)
    assert len(ranks[0]['seen']) == len(ranks[1]['seen']) == 12 * 16          # 12 steps of a per-rank batch of 16
    per_epoch = (600 // 2) // 16 * 16
    assert not set(ranks[0]['seen'][:per_epoch]) & set(ranks[1]['seen'][:per_epoch])  # disjoint within an epoch
    assert all(math.isfinite(l) for d in ranks for l in d['losses'])
    assert ranks[0]['weights'] == pytest.approx(ranks[1]['weights'], abs=1e-6)  # replicas stay in sync
    assert [p.name for p in tmp_path.glob('*.pt')] == ['checkpoint.pt'] and len(list(tmp_path.glob('history*.csv'))) == 1

def test_user_dataloader(tmp_path):
    "A DataLoader of the user's own trains with its own batch size, and resumes exactly when its order is fixed."
    from torch.utils.data import DataLoader
    def run(steps, resume=False):
        torch.manual_seed(0)
        loader = DataLoader(DATA, batch_size=50, shuffle=False)
        return fit(TinyClassifier(), loader, TrainConfig(steps=steps, progress=False, threads=1, ckpt_every=5),
                   out_dir=tmp_path / ('b' if steps < 30 or resume else 'a'), resume=resume)
    full = run(30)
    assert full.step == 30
    run(13); resumed = run(30, resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()): assert torch.equal(a, b)

# -- the engine in stages: callbacks, the model protocol, TensorBoard, channels_last -------------------------------
from torch import nn
from dlatent.train import (BatchStream, Callback, SampleGrid, Trainable, Trainer, _EpochSampler, to_channels_last)

def test_loss_history_unchanged_by_the_refactor(tmp_path):
    "The history of a seeded run, recorded with the engine before it was split into stages and callbacks (tolerance 0)."
    losses = train(40, tmp_path).history.column('loss')
    assert losses[:3] == [0.8898151516914368, 0.615574300289154, 0.4747759699821472]
    assert sum(losses) == 3.411241799592972

class Recorder(Callback):
    "Records (hook, step) of every hook it gets."
    def __init__(self): self.events = []
    def before_fit(self, t): self.events.append(('before_fit', t.step))
    def before_step(self, t): self.events.append(('before_step', t.step))
    def after_step(self, t): self.events.append(('after_step', t.step))
    def after_log(self, t, row): self.events.append(('after_log', row['step'], 'eval' if 'eval/n' in row else 'loss'))
    def after_eval(self, t, metrics): self.events.append(('after_eval', t.step, metrics['n']))
    def after_fit(self, t): self.events.append(('after_fit', t.step))
    def cleanup_fit(self, t): self.events.append(('cleanup_fit', t.step))

def test_callbacks_fire_in_order(tmp_path):
    rec = Recorder()
    cfg = TrainConfig(steps=4, batch_size=32, log_every=2, eval_every=2, ckpt_every=2, progress=False, threads=1)
    tr = Trainer(TinyClassifier(), DATA, cfg, out_dir=tmp_path, eval_fn=lambda m, step, d: {'n': step}, callbacks=[rec])
    assert [type(c).__name__ for c in tr.callbacks] == ['HistoryCSV', 'Checkpointer', 'Evaluator', 'Recorder']
    tr.fit()
    assert rec.events == [('before_fit', 0),
                          ('before_step', 0), ('after_step', 1),
                          # the log row comes first, then (built-ins before the user's) the checkpoint and the evaluation
                          ('before_step', 1), ('after_log', 2, 'loss'), ('after_log', 2, 'eval'), ('after_eval', 2, 2), ('after_step', 2),
                          ('before_step', 2), ('after_step', 3),
                          ('before_step', 3), ('after_log', 4, 'loss'), ('after_step', 4),
                          ('after_log', 4, 'eval'), ('after_eval', 4, 4), ('after_fit', 4), ('cleanup_fit', 4)]
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 4

def test_cleanup_runs_when_training_raises(tmp_path):
    rec = Recorder()
    with pytest.raises(NonFiniteLossError):
        fit(NaNAfter(), DATA, TrainConfig(steps=30, batch_size=32, progress=False, threads=1), callbacks=[rec])
    assert rec.events[-1] == ('cleanup_fit', 10) and ('after_fit', 10) not in rec.events

def test_callbacks_must_be_callbacks():
    with pytest.raises(TypeError, match='Callback instances'): fit(TinyClassifier(), DATA, TrainConfig(steps=1), callbacks=[print])

def test_type_error_names_what_a_non_model_lacks():
    cfg = TrainConfig(steps=1, progress=False, threads=1)
    with pytest.raises(TypeError, match=r'no configure_optimizers\(\) and no train_step\(\)'): fit(object(), DATA, cfg)
    class NoStep(nn.Module):
        def configure_optimizers(self): return {'a': torch.optim.SGD([nn.Parameter(torch.zeros(1))], 0.1)}
    with pytest.raises(TypeError, match=r'has no train_step\(\)'): fit(NoStep(), DATA, cfg)
    class NotAModule:
        def configure_optimizers(self): return {}
        def train_step(self, batch, ctx): return {}
    with pytest.raises(TypeError, match='nn.Module'): fit(NotAModule(), DATA, cfg)
    assert isinstance(TinyClassifier(), Trainable) and not isinstance(NoStep(), Trainable)

def test_optional_methods_have_defaults_and_are_used():
    "No configure_schedulers: no schedules; with one, it is stepped every iteration."
    class Scheduled(TinyClassifier):
        def configure_schedulers(self, optimizers, steps_per_epoch):
            return {'net': torch.optim.lr_scheduler.StepLR(optimizers['net'], step_size=1, gamma=0.5)}
    tr = Trainer(Scheduled(lr=1.0), DATA, TrainConfig(steps=3, batch_size=32, progress=False, threads=1)); tr.fit()
    assert tr.optimizers['net'].param_groups[0]['lr'] == 0.125
    assert not hasattr(TinyClassifier(), 'configure_schedulers')

def _tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir), size_guidance={'scalars': 0, 'images': 0}).Reload()
    return ea, [(e.step, e.value) for e in ea.Scalars(tag)]

def _f32(v): return float(torch.tensor(v, dtype=torch.float32))   # TensorBoard stores scalars as float32

def test_tensorboard_read_back(tmp_path):
    pytest.importorskip('tensorboard')
    cfg = TrainConfig(steps=20, batch_size=32, log_every=5, eval_every=10, progress=False, threads=1, tensorboard=True)
    sample = lambda model, step: torch.rand(4, 1, 6, 6)
    res = fit(TinyClassifier(), DATA, cfg, out_dir=tmp_path, eval_fn=lambda m, step, d: {'acc': step / 100},
              callbacks=[SampleGrid(sample, every=10, nrow=2)])
    ea, loss = _tb_scalars(tmp_path / 'tensorboard', 'loss')
    assert loss == [(r['step'], _f32(r['loss'])) for r in res.history.rows if 'loss' in r] and len(loss) == 4
    assert _tb_scalars(tmp_path / 'tensorboard', 'eval/acc')[1] == [(10, _f32(0.1)), (20, _f32(0.2))]
    assert [e.step for e in ea.Images('samples')] == [10, 20]
    assert sorted(p.name for p in tmp_path.glob('samples_*.png')) == ['samples_step000010.png', 'samples_step000020.png']

class CrashAt(Callback):
    "Stops training (as a crash would) after step `at`."
    def __init__(self, at): self.at = at
    def after_step(self, t):
        if t.step == self.at: raise KeyboardInterrupt

def test_tensorboard_resume_drops_events_after_the_checkpoint(tmp_path):
    pytest.importorskip('tensorboard')
    cfg = TrainConfig(steps=12, batch_size=32, log_every=2, ckpt_every=5, progress=False, threads=1, tensorboard=True)
    with pytest.raises(KeyboardInterrupt): fit(TinyClassifier(), DATA, cfg, out_dir=tmp_path, callbacks=[CrashAt(8)])
    res = fit(TinyClassifier(), DATA, cfg, out_dir=tmp_path, resume=True)   # from the checkpoint at step 5
    assert _tb_scalars(tmp_path / 'tensorboard', 'loss')[1] == [(r['step'], _f32(r['loss'])) for r in res.history.rows]

def test_tensorboard_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)   # as if tensorboard were not installed
    with pytest.raises(ImportError, match='pip install tensorboard'):
        fit(TinyClassifier(), DATA, TrainConfig(steps=2, progress=False, threads=1, tensorboard=True))

def test_sample_grid_does_not_change_the_run(tmp_path):
    cfg = TrainConfig(steps=20, batch_size=32, log_every=5, progress=False, threads=1)
    torch.manual_seed(0); plain = fit(TinyClassifier(), DATA, cfg).history.column('loss')
    torch.manual_seed(0)
    snap = fit(TinyClassifier(), DATA, cfg, out_dir=tmp_path, callbacks=[SampleGrid(lambda m, s: torch.rand(2, 3, 4, 4), every=5)])
    assert snap.history.column('loss') == plain and len(list(tmp_path.glob('samples_step*.png'))) == 4
    with pytest.raises(ValueError, match='out_dir'): fit(TinyClassifier(), DATA, cfg, callbacks=[SampleGrid(lambda m, s: None)])

class ConvNet(nn.Module):
    "A small conv classifier of uint8 8x8 images."
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    def configure_optimizers(self): return {'net': torch.optim.Adam(self.net.parameters(), lr=1e-2)}
    def train_step(self, batch, ctx):
        x, y = batch
        with ctx.autocast(): loss = nn.functional.cross_entropy(self.net(x.float() / 255), y)
        ctx.update('net', loss)
        return {'loss': loss}

class LayoutProbe(Callback):
    def __init__(self): self.layouts = []
    def before_step(self, t): self.layouts.append(t.batch[0].is_contiguous(memory_format=torch.channels_last))

def test_channels_last_matches_default_layout():
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 4, (256,), generator=g))
    def run(channels_last):
        torch.manual_seed(0); probe = LayoutProbe()
        cfg = TrainConfig(steps=5, batch_size=32, log_every=1, progress=False, threads=1, channels_last=channels_last)
        return fit(ConvNet(), images, cfg, callbacks=[probe]), probe.layouts
    (nhwc, l1), (nchw, l0) = run(True), run(False)
    assert l1 == [True] * 5 and l0 == [False] * 5
    assert nhwc.model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.history.column('loss') == pytest.approx(nchw.history.column('loss'), rel=1e-5)
    for a, b in zip(nhwc.model.state_dict().values(), nchw.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)

def test_to_channels_last_converts_only_image_tensors():
    x, y, m = torch.rand(2, 3, 4, 5), torch.arange(2), torch.rand(2, 3, 4)
    out = to_channels_last({'x': x, 'pair': (x.to(torch.uint8), y), 'm': m, 'i': torch.zeros(2, 3, 4, 5, dtype=torch.long)})
    assert out['x'].is_contiguous(memory_format=torch.channels_last) and torch.equal(out['x'], x)
    assert out['pair'][0].is_contiguous(memory_format=torch.channels_last) and out['pair'][1] is y
    assert out['m'] is m and out['i'].is_contiguous()   # 3-D and integer (non-uint8) tensors are left alone

def test_index_select_gather_equals_indexing():
    "BatchStream gathers rows with index_select; each batch is exactly the rows that t[j] would give."
    x = torch.randint(0, 256, (100, 1, 5, 5), dtype=torch.uint8)
    y, f = torch.arange(100), torch.randn(100, 3)
    s = BatchStream(TensorDataset(x, y, f), 16, torch.device('cpu'), seed=4)
    it = s.from_step(0)
    for epoch in range(2):
        idx = _EpochSampler(100, 4, epoch, 0, 1, 16).indices()
        for i in range(s.steps_per_epoch):
            j = idx[i * 16:(i + 1) * 16]
            bx, by, bf = next(it)
            assert torch.equal(bx, x[j]) and torch.equal(by, y[j]) and torch.equal(bf, f[j])
    single = BatchStream(TensorDataset(x), 16, torch.device('cpu'), seed=4)
    assert torch.equal(next(single.from_step(0)), x[_EpochSampler(100, 4, 0, 0, 1, 16).indices()[:16]])


def test_plot_history_smoothing_has_no_edge_bend():
    "The running mean is drawn only where its window is full, centred on its steps: a straight line stays straight to its ends."
    import matplotlib; matplotlib.use('Agg')
    import numpy as np
    from dlatent.train import plot_history
    rows = [dict(step=s, L=float(s)) for s in range(1, 21)] + [dict(step=20, ev=1.0)]      # an evaluation row without L
    x, y = plot_history(rows, keys=['L'], smooth=5).lines[0].get_data()
    assert len(x) == 16 and np.allclose(x, y) and (x[0], x[-1]) == (3, 18)
