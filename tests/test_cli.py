"The `dlatent` command line: listing, bad input (one line on stderr, exit 2), a full train/eval/resume cycle."
import json, subprocess, sys
from dataclasses import dataclass, asdict
import pytest
from dlatent.cli import main
from dlatent.experiments import EXPERIMENTS, ExperimentConfig, register, load_experiments
from dlatent.train import fit, TinyClassifier, load_checkpoint
from dlatent.data import moons_dataset, three_moons

@dataclass
class TinyConfig(ExperimentConfig):
    n: int = 300
    lr: float = 1e-2
    epochs: int = 2
    progress: bool = False

def tiny_eval(cfg, run_dir):
    m = TinyClassifier(lr=cfg.lr); m.load_state_dict(load_checkpoint(run_dir / 'checkpoint.pt')['model'])
    x, y = three_moons(300, seed=cfg.seed + 1)
    return {'test_accuracy': (m.net(x).argmax(1) == y).float().mean().item()}

@pytest.fixture
def tiny_experiment():
    @register('test-tiny', 'tiny classifier', TinyConfig, evaluate=tiny_eval)
    def run(cfg, run_dir):
        fit(TinyClassifier(lr=cfg.lr), moons_dataset(cfg.n), cfg, out_dir=run_dir, resume=cfg.resume, config=asdict(cfg))
        return tiny_eval(cfg, run_dir)
    yield
    EXPERIMENTS.pop('test-tiny')

def err_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    return err

@pytest.mark.parametrize('argv, expect', [
    (['train', 'no-such-experiment'], "unknown experiment 'no-such-experiment'"),
    (['train', 'test-tiny', '--set', 'lrr=1'], "unknown setting 'lrr'"),
    (['train', 'test-tiny', '--set', 'lr=fast'], 'expected a value of type float'),
    (['train', 'test-tiny', '--set', 'batch_size=0'], 'batch_size'),
    (['train', 'test-tiny', '--set', 'lr'], 'key=value'),
    (['eval', '/no/such/run'], 'does not exist'),
    (['train', 'test-tiny', '--set', 'batch_size=100000'], 'batch_size=100000 is larger than'),   # met by the engine
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
    assert json.loads((run / 'config.json').read_text())['config']['device'] == 'cpu'
    assert main(['train', 'test-tiny', '--resume', '--set', 'epochs=3']) == 0
    assert load_checkpoint(run / 'checkpoint.pt')['step'] == 3 * (300 // 64)
    assert main(['eval', str(run)]) == 0
    assert 'test_accuracy' in json.loads((run / 'metrics.json').read_text())
    assert main(['train', 'test-tiny', '--out', str(run)]) == 2 and '--resume' in err_line(capsys)

def test_list_names_every_experiment(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    for name in load_experiments(): assert name in out

def test_console_script_installed():
    r = subprocess.run([sys.executable, '-c', 'from dlatent.cli import _entry; import sys; sys.argv=["dlatent","list"]; _entry()'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_missing_device_is_one_line(tiny_experiment, capsys, tmp_path):
    import torch
    if torch.cuda.is_available(): pytest.skip('CUDA is available here')
    assert main(['train', 'test-tiny', '--device', 'cuda', '--out', str(tmp_path / 'r')]) == 2
    assert 'CUDA is not available' in err_line(capsys)
    assert not (tmp_path / 'r').exists()          # a run that failed at set-up leaves no directory behind
