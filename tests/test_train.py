"Tests of the training engine: exact resume, non-finite losses, atomic checkpoints, data parallelism."
import json, math, os, subprocess, sys
from pathlib import Path
import pytest, torch
from torch.utils.data import TensorDataset
from dlatent.data import three_moons
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
