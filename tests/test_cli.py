"The `dlatent` command line: listing, bad input (one line on stderr, exit 2), a full train/eval/resume cycle."
import json, subprocess, sys
from dataclasses import dataclass
from types import SimpleNamespace
import pytest
import torch
from torch import nn
from dlatent.cli import main
from dlatent.experiments import EXPERIMENTS, Experiment, register, load_experiments
from sweep_helpers import Classifier    # the tests' small classifier on the protocol
from dlatent.train import load_checkpoint
from dlatent.data.core import moons_dataset, three_moons


@dataclass
class TinyModel:
    lr: float = 1e-2

@dataclass
class TinyData:
    n: int = 300

def tiny_eval(run):
    x, y = three_moons(300, seed=run.config.train.seed + 1)
    with torch.no_grad(): return {'test_accuracy': (run.model.net(x).argmax(1) == y).float().mean().item()}

@pytest.fixture
def tiny_experiment():
    register(Experiment('test-tiny', 'tiny classifier', models={'mlp': TinyModel}, data=TinyData,
                        build_data=lambda cfg: SimpleNamespace(train=moons_dataset(cfg.data.n)),
                        build_model=lambda cfg, data: Classifier(nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3)), cfg.model.lr), evaluate=tiny_eval,
                        train=dict(epochs=2, progress=False, threads=1)))
    yield
    EXPERIMENTS.pop('test-tiny')

def err_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    return err

@pytest.mark.parametrize('argv, expect', [
    (['train', 'no-such-experiment'], "unknown experiment 'no-such-experiment'"),
    (['train', 'test-tiny', '--set', 'model.lrr=1'], "model 'mlp' has no setting 'lrr'; valid keys: model.lr"),
    (['train', 'test-tiny', '--set', 'lr=1'], 'must name its section'),
    (['train', 'test-tiny', '--set', 'model.lr=fast'], 'expected a value of type float'),
    (['train', 'test-tiny', '--set', 'train.batch_size=0'], 'batch_size'),
    (['train', 'test-tiny', '--set', 'model.lr'], 'section.key=value'),
    (['train', 'test-tiny', '--preset', 'quick'], "no preset 'quick'"),
    (['eval', '/no/such/run'], 'does not exist'),
    (['train', 'test-tiny', '--set', 'train.batch_size=100000'], 'batch_size=100000 is larger than'),   # met by the engine
])
def test_bad_input_one_line_exit_2(tiny_experiment, capsys, argv, expect):
    assert main(argv) == 2
    assert expect in err_line(capsys)

def test_train_eval_resume(tiny_experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(['train', 'test-tiny', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    run = tmp_path / 'runs' / 'test-tiny'
    assert f'run directory: runs/test-tiny' in out and 'test_accuracy' in out
    assert {p.name for p in run.iterdir()} >= {'config.json', 'history.csv', 'metrics.json', 'checkpoint.pt'}
    saved = json.loads((run / 'config.json').read_text())
    assert saved['train']['device'] == 'cpu' and saved['model'] == {'name': 'mlp', 'lr': 0.01} and saved['data'] == {'n': 300}
    assert main(['train', 'test-tiny', '--resume', '--set', 'train.epochs=3']) == 0
    assert load_checkpoint(run / 'checkpoint.pt')['step'] == 3 * (300 // 64)
    assert main(['eval', str(run)]) == 0
    assert 'test_accuracy' in json.loads((run / 'metrics.json').read_text())
    assert main(['train', 'test-tiny', '--out', str(run)]) == 2 and '--resume' in err_line(capsys)

def test_config_prints_the_resolved_settings(tiny_experiment, capsys):
    assert main(['config', 'test-tiny', '--set', 'model.lr=0.5']) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg['model'] == {'name': 'mlp', 'lr': 0.5} and cfg['train']['epochs'] == 2

def test_list_names_every_experiment(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    for name in load_experiments():
        if not name.startswith('_'): assert name in out

def test_console_script_installed():
    r = subprocess.run([sys.executable, '-c', 'from dlatent.cli import _entry; import sys; sys.argv=["dlatent","list"]; _entry()'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_missing_device_is_one_line(tiny_experiment, capsys, tmp_path):
    if torch.cuda.is_available(): pytest.skip('CUDA is available here')
    assert main(['train', 'test-tiny', '--device', 'cuda', '--out', str(tmp_path / 'r')]) == 2
    assert 'CUDA is not available' in err_line(capsys)
    assert not (tmp_path / 'r').exists()          # a run that failed at set-up leaves no directory behind

def test_export_writes_a_loadable_model(tmp_path, capsys, monkeypatch):
    "`dlatent export RUN_DIR OUT_DIR` writes config.json, the weights as safetensors and a model card; the class loads it back."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    run, out = tmp_path / 'run', tmp_path / 'shared'
    assert main(['train', 'moons', '--set', 'train.steps=5', 'train.progress=false', 'train.threads=1', '--out', str(run)]) == 0
    capsys.readouterr()
    assert main(['export', str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'checksum.json', 'config.json', 'model.safetensors']
    assert 'DVAE.from_pretrained' in printed and 'moons' in (out / 'README.md').read_text()
    from dlatent.models.dvae import DVAE
    from dlatent.experiments import load_run
    a, b = load_run(run).model, DVAE.from_pretrained(out)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()): assert ka == kb and torch.equal(va, vb), ka
    # into the run itself, or from a directory that holds no run: one line, exit code 2
    assert main(['export', str(run), str(run)]) == 2 and 'holds a run' in capsys.readouterr().err
    assert main(['export', str(tmp_path / 'none'), str(tmp_path / 'x')]) == 2 and 'does not exist' in capsys.readouterr().err
