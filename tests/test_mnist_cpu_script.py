"benchmarks/mnist_cpu.py, which makes the MNIST section of the images tutorial, in its --tiny CPU mode."
import json, runpy
from pathlib import Path

import numpy as np
import pytest


def test_mnist_cpu_script_tiny_makes_every_result(tmp_path):
    """A stand-in MNIST (scikit-learn's digits at 28 px), the four models and the default-weights DVAE trained a few steps, the
    semi-supervised DVAE, and every array the tutorial loads; a second call resumes the sweeps instead of training again."""
    script = runpy.run_path(str(Path(__file__).parents[1] / 'benchmarks' / 'mnist_cpu.py'))
    res = script['main'](['--tiny', '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'images_mnist_cpu.json').read_text())
    assert saved['settings']['model.weights'] == 'paper' and saved['settings']['train.steps'] == 3
    assert sorted(r['model.name'] for r in saved['sweep']) == ['cgan', 'cvae', 'cvaegan', 'dvae']
    assert all(r['status'] == 'done' and r['steps'] == 3 for r in saved['sweep'] + saved['weights'])
    from dlatent.experiments.core import read_config
    (w,) = saved['weights']
    cfg = read_config(tmp_path / 'runs' / 'weights' / w['point'])
    assert cfg.model_name == 'dvae' and cfg.model.weights == 'code' and 'last_L_kl' in w
    dvae = next(r for r in saved['sweep'] if r['model.name'] == 'dvae')
    assert {'IS', 'FID', 'diversity', 'gen_acc', 'zs_acc', 'zu_acc', 'mse_right', 'last_L_kl', 'last_L_rec'} <= set(dvae)
    assert {'IS', 'FID', 'diversity', 'gen_acc'} <= set(saved['real']) and 1 <= saved['real']['IS'] <= 10
    semi = saved['semi']
    assert semi['supervised_steps'] == 3 and semi['finetune_steps'] == 2 and 0 <= semi['follows_zs'] <= 1 and 0 <= semi['follows_zu'] <= 1
    spread = saved['prior_spread']
    assert [r['seed'] for r in spread] == [0] and spread[0]['code_spread'] > 0
    assert {'acc_scale0', 'acc_scale0.5', 'acc_scale1', 'IS_scale1', 'acc_codes', 'IS_codes', 'logvar_mean'} <= set(spread[0])
    figs = np.load(tmp_path / 'images_mnist_cpu.npz')
    for m in ('dvae', 'dvae_code', 'cvaegan', 'cgan', 'cvae'): assert figs[f'samples_{m}'].shape == (80, 1, 28, 28)
    assert figs['traverse_zs'].shape == figs['traverse_zu'].shape == (100, 1, 28, 28) and figs['traverse_zs'].dtype == np.uint8
    assert len([k for k in figs.files if k.startswith('zu_sweep_')]) == 3 and figs['zu_effects'].shape == (16,)
    assert figs['cross_synthesis'].shape == (36, 1, 28, 28)
    for kind in ('right', 'centre', 'bottom'):
        x = figs[f'inpaint_{kind}']
        assert x.shape == (48, 1, 28, 28)
        assert np.array_equal(x[24:36][x[12:24] > 0], x[12:24][x[12:24] > 0])   # the DVAE keeps the pixels it was given
    with pytest.raises(SystemExit, match='run --stages sweep first'):             # figures with no sweep to draw from
        script['main'](['--tiny', '--out', str(tmp_path / 'other'), '--stages', 'figures'])
    with pytest.raises(SystemExit, match='unknown'): script['main'](['--tiny', '--out', str(tmp_path), '--stages', 'sweeps'])
    again = script['main'](['--tiny', '--out', str(tmp_path), '--stages', 'sweep'])
    assert [r['FID'] for r in again['sweep']] == [r['FID'] for r in saved['sweep']]   # resumed: the same finished runs
