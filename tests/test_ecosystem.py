"""What users of generative-model libraries expect: models saved, shared and loaded in one call (safetensors, config.json,
a model card; runs exported), metrics as torchmetrics classes equal to the functional versions and synchronised across
processes, a GPU check that cannot rot (its --tiny mode on the CPU), training steps that read no tensor value on the host,
and the README's library example run as written."""
import contextlib, inspect, json, runpy, shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

import dlatent.models.base as base
from dlatent.models.base import GenerativeModel, buildable, rebuild
from dlatent.models.dvae import dvae_mlp, image_dvae, image_cvae, image_cvaegan, image_cgan, cvae_mlp, DVAE
from dlatent.models.ibgan import IBGAN, IBGANConfig, InfoGANConfig, GANConfig
from dlatent.models.elastic import ElasticInfoGAN, ElasticInfoGANConfig, TruePriorInfoGANConfig
from dlatent.models.jointvae import JointVAE, JointVAEConfig
from dlatent.metrics.classes import (FactorVAEScore, MIG, DCI, CategoricalCodeScores, IntraClassDiversity,
                                     ClassifierInceptionScore)
from dlatent.metrics.disentanglement import (FactorTable, factor_vae_score, mig, dci_disentanglement, count_matrix, ent_score,
                                             nmi_score, prior_rmse, match_codes_to_classes)
from dlatent.metrics.quality import ImageClassifier, inception_score_of, intra_class_diversity

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# -- one tiny model of every family and variant ---------------------------------------------------------------------------
FAMILIES = {
    'dvae': lambda: dvae_mlp(x_dim=2, n_classes=3, z_s_dim=3),
    'image-dvae': lambda: image_dvae(None, 8, 1, 3),
    'cvae': lambda: image_cvae(None, 8, 1, 3),
    'cvaegan': lambda: image_cvaegan(None, 8, 1, 3),
    'cgan': lambda: image_cgan(None, 8, 1, 3, z_dim=4),
    'ibgan': lambda: IBGAN(IBGANConfig(z_dim=6, r_dim=4, ngf=4, ndf=4), nc=1, img_size=16),
    'infogan': lambda: IBGAN(InfoGANConfig(r_dim=4, ngf=4, ndf=4), nc=3, img_size=16),
    'gan': lambda: IBGAN(GANConfig(r_dim=4, ngf=4, ndf=4, share_trunk=False), nc=1, img_size=16),
    'elastic': lambda: ElasticInfoGAN(ElasticInfoGANConfig(z_dim=4), n_classes=3, img_size=8),
    'infogan-trueprior': lambda: ElasticInfoGAN(TruePriorInfoGANConfig(z_dim=4), true_probs=torch.tensor([.2, .3, .5]), n_classes=3, img_size=8),
    'jointvae': lambda: JointVAE(JointVAEConfig(z_dim=3, capacity_iters=10), n_classes=3, img_size=8),
}

def _images(c=1, s=8, n=6): return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(1))
_y = torch.tensor([0, 1, 2, 0, 1, 2])
BATCHES = {'dvae': (torch.randn(6, 2), _y), 'image-dvae': (_images(), _y), 'cvae': (_images(), _y), 'cvaegan': (_images(), _y),
           'cgan': (_images(), _y), 'ibgan': (_images(s=16),), 'infogan': (_images(3, 16),), 'gan': (_images(s=16),),
           'elastic': (_images(),), 'infogan-trueprior': (_images(),), 'jointvae': (_images(),)}

def _seed(): return torch.Generator().manual_seed(3)

# -- save_pretrained / from_pretrained -----------------------------------------------------------------------------------
@pytest.mark.parametrize('family', FAMILIES)
def test_saved_model_loads_and_samples_identically(family, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.save_pretrained(tmp_path / family)
    files = sorted(p.name for p in (tmp_path / family).iterdir())
    assert files == ['README.md', 'config.json', 'model.safetensors']
    raw = (tmp_path / family / 'model.safetensors').read_bytes()
    header = int.from_bytes(raw[:8], 'little')
    assert raw[8:9] == b'{' and json.loads(raw[8:8 + header])['__metadata__'] == {'format': 'pt'}   # safetensors, not a pickle
    config = json.loads((tmp_path / family / 'config.json').read_text())
    assert set(config) == {'dlatent_version', 'model_class', 'builder', 'arguments', 'run'}
    rng = torch.random.get_rng_state()
    loaded = GenerativeModel.from_pretrained(tmp_path / family)
    assert torch.equal(torch.random.get_rng_state(), rng), 'loading must leave the global random state alone'
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(loaded.sample(7, generator=_seed()), model.sample(7, generator=_seed()))
    assert type(model).from_pretrained(tmp_path / family).__class__ is type(model)
    card = (tmp_path / family / 'README.md').read_text()
    assert card.startswith('---\n') and 'library_name: dlatent' in card and f'# {type(model).__name__}' in card
    assert 'GenerativeModel.from_pretrained' in card and '## Settings' in card

def test_load_errors_speak_to_the_user(tmp_path):
    model = FAMILIES['dvae']()
    model.save_pretrained(tmp_path / 'm')
    with pytest.raises(FileNotFoundError, match='has no config.json'): GenerativeModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match='is a file'): GenerativeModel.from_pretrained(tmp_path / 'm' / 'config.json')
    with pytest.raises(FileNotFoundError, match='neither a local directory nor a model on the Hugging Face Hub'):
        GenerativeModel.from_pretrained(tmp_path / 'missing', local_files_only=True)
    with pytest.raises(TypeError, match='holds a DVAE, not a IBGAN'): IBGAN.from_pretrained(tmp_path / 'm')
    from safetensors.torch import save_file
    save_file({'prior.mu': torch.zeros(3, 3)}, str(tmp_path / 'm' / 'model.safetensors'))
    with pytest.raises(ValueError, match='do not fit the DVAE'): GenerativeModel.from_pretrained(tmp_path / 'm')
    assert GenerativeModel.from_pretrained(tmp_path / 'm', strict=False).__class__ is DVAE
    cfg = json.loads((tmp_path / 'm' / 'config.json').read_text())
    cfg['builder'] = 'os:system'
    (tmp_path / 'm' / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='not a model class or @buildable function'): GenerativeModel.from_pretrained(tmp_path / 'm')

class FromNetworks(GenerativeModel):
    def __init__(self, net: nn.Module): super().__init__(); self.net = net

def test_a_model_built_from_networks_says_how_to_make_it_saveable(tmp_path):
    with pytest.raises(ValueError, match='@buildable'): FromNetworks(nn.Linear(2, 2)).save_pretrained(tmp_path / 'x')

@buildable
def small_mlp_model(width: int = 4, hidden=(3,)) -> FromNetworks:
    "A user's builder: its arguments are settings, so the model it returns can be saved and rebuilt."
    return FromNetworks(nn.Sequential(nn.Linear(2, width), nn.Linear(width, hidden[0])))

def test_a_users_buildable_function(tmp_path):
    m = small_mlp_model(5)
    assert m._recipe == {'builder': f'{__name__}:small_mlp_model', 'arguments': {'width': 5, 'hidden': {'__tuple__': [3]}}}
    m.save_pretrained(tmp_path / 'u')
    loaded = GenerativeModel.from_pretrained(tmp_path / 'u')
    assert torch.equal(loaded.net[1].weight, m.net[1].weight)

def test_compiled_networks_save_plain_keys(tmp_path):
    torch.manual_seed(0)
    model = FAMILIES['ibgan']()
    model.compile_networks()                                   # lazily compiled: nothing runs until a forward pass
    assert any('_orig_mod' in k for k in model.state_dict())
    model.save_pretrained(tmp_path / 'c')
    loaded = GenerativeModel.from_pretrained(tmp_path / 'c')
    assert not any('_orig_mod' in k for k in loaded.state_dict())
    plain = {k.replace('_orig_mod.', ''): v for k, v in model.state_dict().items()}
    assert all(torch.equal(v, plain[k]) for k, v in loaded.state_dict().items())

def test_hub_calls_without_a_network(tmp_path, monkeypatch):
    "push_to_hub uploads what save_pretrained writes; from_pretrained('user/name') reads the files hf_hub_download returns."
    uploaded = {}
    class FakeApi:
        def __init__(self, token=None): pass
        def create_repo(self, repo_id, private=None, exist_ok=False): return type('R', (), {'repo_id': repo_id})()
        def upload_folder(self, repo_id, folder_path, **kw):
            uploaded['files'] = sorted(p.name for p in Path(folder_path).iterdir())
            shutil.copytree(folder_path, tmp_path / 'hub' / repo_id)
            return f'https://huggingface.co/{repo_id}/commit/0'
    import huggingface_hub.hub_mixin as hub_mixin
    monkeypatch.setattr(hub_mixin, 'HfApi', FakeApi)
    model = FAMILIES['jointvae']()
    model.push_to_hub('someone/tiny-jointvae')
    assert uploaded['files'] == ['README.md', 'config.json', 'model.safetensors']
    assert "from_pretrained('someone/tiny-jointvae')" in (tmp_path / 'hub' / 'someone/tiny-jointvae' / 'README.md').read_text()
    calls = []
    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename)); return str(tmp_path / 'hub' / repo_id / filename)
    monkeypatch.setattr(base, 'hf_hub_download', fake_download)
    loaded = GenerativeModel.from_pretrained('someone/tiny-jointvae', revision='main')
    assert calls == [('someone/tiny-jointvae', 'config.json'), ('someone/tiny-jointvae', 'model.safetensors')]
    assert torch.equal(loaded.sample(5, generator=_seed()), model.sample(5, generator=_seed()))

def test_export_run(tmp_path):
    from dlatent.experiments.core import run_experiment, load_run
    from dlatent.experiments.export import export_run
    run_dir, metrics = run_experiment('moons', {'model.name': 'cvae', 'train.steps': 20, 'eval.snapshots': '', 'eval.n_gen': 200},
                                      out=tmp_path / 'run')
    out = export_run(run_dir, tmp_path / 'export')
    loaded = GenerativeModel.from_pretrained(out)
    labels = torch.arange(3).repeat(3)
    assert torch.equal(loaded.sample(9, labels, generator=_seed()), load_run(run_dir).model.sample(9, labels, generator=_seed()))
    info = json.loads((out / 'config.json').read_text())['run']
    assert info['experiment'] == 'moons' and info['model'] == 'cvae' and info['config']['train']['steps'] == 20
    assert info['command'] == "dlatent train moons --set model.name=cvae train.steps=20 eval.snapshots= eval.n_gen=200"
    card = (out / 'README.md').read_text()
    assert '# moons: CVAE' in card and '## Metrics' in card and 'zs_probe_acc' not in card and '`train.steps` | 20' in card
    assert all(f'`{k}`' in card for k, v in metrics.items() if not isinstance(v, (list, dict)))

# -- the training steps read no tensor value on the host ------------------------------------------------------------------
class HostReads(TorchDispatchMode):
    "Records the operators that make the host wait for the device: reading a value, or copying host memory to the device."
    def __init__(self): super().__init__(); self.reads = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ('_local_scalar_dense', 'nonzero', 'masked_select', 'is_nonzero', 'equal'): self.reads.append(name)
        if name in ('_to_copy', 'copy_') and any(isinstance(a, torch.Tensor) and a.device.type == 'cpu' for a in args) \
                and any(isinstance(t, torch.Tensor) and t.device.type == 'meta' for t in (*args, out)):
            self.reads.append(f'{name} from the host')
        return out

class BackwardOnly:
    "A step context that back-propagates into each optimizer's parameters and leaves the optimizers (the engine's part) alone."
    def __init__(self, model, step=1): self.step, self.opts = step, model.configure_optimizers()
    def autocast(self): return contextlib.nullcontext()
    def update(self, name, loss, retain_graph=False):
        loss.backward(inputs=[p for g in self.opts[name].param_groups for p in g['params']], retain_graph=retain_graph)

@pytest.mark.parametrize('family', FAMILIES)
def test_train_step_reads_nothing_on_the_host(family):
    """On the 'meta' device a tensor has no values: any read of one (.item(), bool(t), int(t.max()), boolean-mask indexing)
    raises, and a copy from host memory is recorded. A model's train_step after the first step must do neither, as on a GPU,
    where each would be a synchronisation; every logged value must be on the step's device."""
    torch.manual_seed(0)
    model = FAMILIES[family]().to('meta')
    batch = tuple(t.to('meta') for t in BATCHES[family])
    mode = HostReads()
    with mock.patch('torch.autocast', lambda *a, **k: contextlib.nullcontext()), mode:   # meta has no autocast
        out = model.train_step(batch, BackwardOnly(model))
    assert mode.reads == []
    assert all(v.device.type == 'meta' for v in out.values()), {k: v.device for k, v in out.items()}

def test_train_step_keeps_its_checks_on_the_cpu():
    model = FAMILIES['dvae']()
    with pytest.raises(ValueError, match=r'class indices in \[0, 2\]'):
        model.train_step((torch.randn(4, 2), torch.tensor([0, 1, 5, 1])), BackwardOnly(model))

# -- metrics as torchmetrics classes ---------------------------------------------------------------------------------------
SIZES = [3, 4, 5, 2]

def _rotated(f):
    g = f / (np.array(SIZES) - 1); a = np.pi / 8
    return np.stack([np.cos(a) * g[:, 0] - np.sin(a) * g[:, 1], np.sin(a) * g[:, 0] + np.cos(a) * g[:, 1], g[:, 2],
                     0.1 * np.sin(7.0 * f.sum(1))], 1)

def metric_data() -> dict:
    "Deterministic data for every metric class (the same in every process)."
    g = torch.Generator().manual_seed(0)
    table = FactorTable.from_function(SIZES, _rotated)
    grid_codes = table.codes.reshape(-1, 4)
    grid_factors = torch.as_tensor(np.indices(SIZES).reshape(len(SIZES), -1).T)
    perm = torch.randperm(len(grid_codes), generator=g)
    rng = np.random.default_rng(0)
    f = np.stack([rng.integers(0, s, 800) for s in SIZES], 1)
    z = torch.as_tensor(_rotated(f), dtype=torch.float32) + 0.01 * torch.randn(800, 4, generator=g)
    codes = torch.arange(4).repeat_interleave(60)
    classes = torch.where(torch.rand(240, generator=g) < 0.8, (codes + 1) % 4, codes % 3)
    images, labels = torch.rand(48, 1, 16, 16, generator=g), torch.arange(3).repeat(16)
    return dict(table=table, grid_codes=grid_codes[perm], grid_factors=grid_factors[perm], z=z, f=torch.as_tensor(f),
                codes=codes, classes=classes, images=images, labels=labels)

FV = dict(L=8, n_train=100, n_eval=60, n_std=200)

def make_metrics() -> dict:
    torch.manual_seed(0)
    clf = ImageClassifier(1, 3, 16, width=4, num_features=8).eval()
    return dict(fv=FactorVAEScore(SIZES, **FV), mig=MIG(), dci=DCI(model='extra_trees'),
                cat=CategoricalCodeScores(4, 4, learned_prior=torch.full((4,), .25), true_class_dist=torch.tensor([.1, .2, .3, .4])),
                div=IntraClassDiversity(n_pairs=10), isc=ClassifierInceptionScore(clf, splits=2))

def update_metrics(m: dict, d: dict, rank: int = 0, world: int = 1):
    "Each metric updated with this process's contiguous share of every kind of row, in batches."
    def share(*ts):
        n = len(ts[0]); lo, hi = rank * n // world, (rank + 1) * n // world
        return [t[lo:hi] for t in ts]
    gc, gf = share(d['grid_codes'], d['grid_factors'])
    for i in range(0, len(gc), 16): m['fv'].update(gc[i:i + 16], gf[i:i + 16])
    z, f = share(d['z'][:600], d['f'][:600]); zt, ft = share(d['z'][600:], d['f'][600:])
    for i in range(0, len(z), 50):
        m['mig'].update(z[i:i + 50], f[i:i + 50]); m['dci'].update(z[i:i + 50], f[i:i + 50], split='train')
    m['mig'].update(zt, ft); m['dci'].update(zt, ft, split='test')
    c, y = share(d['codes'], d['classes'])
    for i in range(0, len(c), 32): m['cat'].update(c[i:i + 32], y[i:i + 32])
    x, lb = share(d['images'], d['labels'])
    for i in range(0, len(x), 8): m['div'].update(x[i:i + 8], lb[i:i + 8]); m['isc'].update(x[i:i + 8])

def summary(m: dict) -> dict:
    "The numbers each metric computes, as floats."
    fv, mg, dci, cat = m['fv'].compute(), m['mig'].compute(), m['dci'].compute(), m['cat'].compute()
    return dict(fv=fv['eval_accuracy'], fv_train=fv['train_accuracy'], mig=mg['mig'], dci_d=dci['disentanglement'],
                dci_c=dci['completeness'], dci_i=dci['informativeness_test'], ent=cat['ent'], nmi=cat['nmi'], rmse=cat['rmse'],
                div=m['div'].compute()[0], is_mean=m['isc'].compute()[0], is_std=m['isc'].compute()[1])

def test_metric_classes_compute_what_the_functions_compute():
    d, m = metric_data(), make_metrics()
    update_metrics(m, d)
    fv = factor_vae_score(d['table'], None, **FV)
    got = m['fv'].compute()
    for k in ('eval_accuracy', 'train_accuracy', 'num_active_dims'): assert got[k] == fv[k]
    assert (got['eval_votes'] == fv['eval_votes']).all()
    z, f = d['z'], d['f']
    assert m['mig'].compute()['mig'] == mig(z, f)['mig']
    e = dci_disentanglement(z[:600], f[:600], z[600:], f[600:], model='extra_trees')
    assert all(m['dci'].compute()[k] == e[k] for k in ('disentanglement', 'completeness', 'informativeness_train', 'informativeness_test'))
    N = count_matrix(d['codes'], d['classes'], 4, 4)
    cat = m['cat'].compute()
    assert (cat['counts'] == N).all() and cat['match'] == match_codes_to_classes(N).tolist()
    assert (cat['ent'], cat['nmi'], cat['rmse']) == (ent_score(N), nmi_score(d['codes'], d['classes']),
                                                     prior_rmse(m['cat'].learned_prior, m['cat'].true_class_dist, N))
    assert m['div'].compute() == intra_class_diversity(d['images'], d['labels'], n_pairs=10)
    isc = m['isc'].compute()
    assert np.allclose(isc, inception_score_of(d['images'], m['isc'].classifier, splits=2), atol=1e-6)

def test_dci_default_follows_the_function():
    "DCI() without `model` uses dci_disentanglement's default importance model, whatever it is."
    d = metric_data()
    dci = DCI()
    dci.update(d['z'][:300], d['f'][:300]); dci.update(d['z'][300:400], d['f'][300:400], split='test')
    assert dci.compute()['disentanglement'] == dci_disentanglement(d['z'][:300], d['f'][:300], d['z'][300:400], d['f'][300:400])['disentanglement']

@pytest.mark.filterwarnings('ignore:The ``compute`` method')   # torchmetrics' warning before our error
def test_metric_classes_errors():
    with pytest.raises(ValueError, match='no data'): MIG().compute()
    m = FactorVAEScore(SIZES)
    m.update(torch.randn(4, 2), torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [0, 1, 0, 0]]))
    with pytest.raises(ValueError, match='cover 4 of the 120'): m.compute()
    if 'prune' in inspect.signature(factor_vae_score).parameters: FactorVAEScore(prune='relative')   # passed on once it exists
    else:
        with pytest.raises(ValueError, match="factor_vae_score in this version of dlatent has no option 'prune'"): FactorVAEScore(prune='relative')
    with pytest.raises(ValueError, match='one code per sample'): DCI().update(torch.randn(3, 2), torch.zeros(2, 1))
    with pytest.raises(ValueError, match='torch.nn.Module'): ClassifierInceptionScore(lambda x: x)

def sync_worker(rank: int, world: int, init_file: str, out_dir: str):
    "One process of the synchronisation test: its share of the rows, then compute() (which gathers every process's states)."
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        m = make_metrics()
        update_metrics(m, metric_data(), rank, world)
        Path(out_dir, f'rank{rank}.json').write_text(json.dumps(summary(m)))
    finally: dist.destroy_process_group()

def test_metric_states_synchronise_across_two_processes(tmp_path):
    tmp_mp.spawn(sync_worker, args=(2, str(tmp_path / 'pg'), str(tmp_path)), nprocs=2, join=True)
    m = make_metrics()
    d = metric_data()
    update_metrics(m, d, 0, 2); update_metrics(m, d, 1, 2)      # one process, the same rows in the same order
    one = summary(m)
    for rank in (0, 1):
        two = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert two.keys() == one.keys()
        for k in one: assert two[k] == pytest.approx(one[k], abs=1e-9), (rank, k, two[k], one[k])

# -- the GPU check's CPU smoke test, and the README's example ----------------------------------------------------------------
def test_gpu_check_tiny_runs_on_the_cpu(tmp_path):
    check = runpy.run_path(str(ROOT / 'benchmarks' / 'gpu_check.py'))
    rows = check['main'](['--tiny', '--out', str(tmp_path / 'table.md')])
    assert {(r['family'], r['mode']) for r in rows} == {(f, m) for f in ('dvae', 'ibgan', 'elastic', 'jointvae') for m in ('fp32', 'bf16')}
    assert all(r.get('its', 0) > 0 for r in rows), [r.get('note') for r in rows]
    table = (tmp_path / 'table.md').read_text()
    assert table.count('\n| ') == 9 and '| ibgan | dsprites-ibgan | 8 | 16 | fp32 |' in table

def test_readme_library_example(tmp_path, monkeypatch):
    "tests/readme_example.py is the README's library example; it runs as written (on one CPU thread here)."
    src = (ROOT / 'tests' / 'readme_example.py').read_text()
    assert src.count('progress=False)') == 1
    assert src.strip() in (ROOT / 'README.md').read_text(), "README.md must show tests/readme_example.py verbatim (edit nbs/index.ipynb)"
    monkeypatch.chdir(tmp_path)
    exec(compile(src.replace('progress=False)', 'progress=False, threads=1)'), 'readme_example.py', 'exec'), {'__name__': '__main__'})
    assert sorted(p.name for p in (tmp_path / 'my-dvae').iterdir()) == ['README.md', 'config.json', 'model.safetensors']

def test_saving_needs_only_the_runtime_requirements():
    "save_pretrained / from_pretrained are core (the wheel CI installs has no dev extra): their packages are requirements."
    import configparser, re
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    reqs = {re.split(r'[<>=!~ ]', r)[0] for r in cfg['DEFAULT']['requirements'].split()}
    assert {'huggingface_hub', 'safetensors', 'torchmetrics'} <= reqs
