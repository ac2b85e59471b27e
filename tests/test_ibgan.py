"Fast checks of IB-GAN, InfoGAN and GAN (dlatent.models.ibgan, dlatent.experiments.dsprites): one step of each, who moves, bounds, the model protocol, configs and presets, runs, errors."
import copy, math
import pytest
import torch
from torch import nn

from dlatent.models.ibgan import (IBGAN, IBGANConfig, InfoGANConfig, GANConfig, IBGAN_CONFIGS, instance_noise_sigma,
                                  estimate_bounds, recalibrate_batchnorm)
from dlatent.models.base import batch_images, supports
from dlatent.objectives.ib import ib_lower_bound, ib_upper_bound, gaussian_entropy
from dlatent.objectives.distributions import gaussian_log_prob, reparameterize
from dlatent.objectives.losses import d_loss, g_loss
from dlatent.experiments import make_config, run_experiment, load_run, UsageError
from dlatent.experiments.dsprites import (DSpritesData, DSpritesDataConfig, DSpritesEvalConfig, build_ibgan_model, dsprites_representation_fn,
                                          score_ibgan, DSPRITES_QUICK)
from dlatent.train import StepContext

torch.set_num_threads(1)
SIZE = 16
MODELS = list(IBGAN_CONFIGS)


def tiny(model='ibgan', nc=1, **kw):
    torch.manual_seed(0)
    extra = dict(z_dim=6) if model == 'ibgan' else {}
    return IBGAN(IBGAN_CONFIGS[model](r_dim=4, ngf=4, ndf=4, lr_g=1e-3, lr_d=1e-3, **extra, **kw), nc=nc, img_size=SIZE)


def batch(n=8, nc=1):
    g = torch.Generator().manual_seed(1)
    return ((torch.rand(n, nc, SIZE, SIZE, generator=g) > 0.7).to(torch.uint8) * 255,)


def ctx_for(m, cls=StepContext):
    return cls(m.configure_optimizers(), torch.device('cpu'), torch.float32, None, 10)


def snapshot(module): return {k: v.detach().clone() for k, v in module.named_parameters()}
def changed_params(before, module): return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def d_param_names(m):
    return {f'trunk.{k}' for k, _ in m.trunk.named_parameters()} | {f'd_head.{k}' for k, _ in m.d_head.named_parameters()}


class OnlyD(StepContext):
    def update(self, name, loss, retain_graph=False):
        if name == 'D': super().update(name, loss, retain_graph)


class OnlyG(StepContext):
    def update(self, name, loss, retain_graph=False):
        if name == 'GEQ': super().update(name, loss, retain_graph)


@pytest.mark.parametrize('model', MODELS)
def test_one_step_finite_and_everything_moves(model):
    m = tiny(model); before = snapshot(m)
    logs = m.train_step(batch(), ctx_for(m))
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values()), logs
    moved = changed_params(before, m)
    assert d_param_names(m) <= moved
    assert any(k.startswith('G.') for k in moved) and any(k.startswith('q_head.') for k in moved)
    if model == 'ibgan':
        assert any(k.startswith('e.') for k in moved)
        assert {'I_U', 'KL_1', 'KL_4'} <= set(logs) and logs['I_U'] >= 0
    else: assert 'I_U' not in logs and m.e is None


@pytest.mark.parametrize('model', MODELS)
def test_d_step_and_g_step_touch_only_their_params(model):
    m = tiny(model); dn = d_param_names(m)
    before = snapshot(m); m.train_step(batch(), ctx_for(m, OnlyD))
    moved = changed_params(before, m)
    assert moved and moved <= dn
    before = snapshot(m); m.train_step(batch(), ctx_for(m, OnlyG))
    moved = changed_params(before, m)
    assert moved and not (moved & dn)


def test_gan_generator_gets_no_information_gradient():
    "In 'gan' mode G's gradient is the GAN loss only: with gamma=0 a G/E/Q step moves q but not G."
    m = tiny('gan', gamma=0.0); before = snapshot(m)
    m.train_step(batch(), ctx_for(m, OnlyG))
    moved = changed_params(before, m)
    assert any(k.startswith('q_head.') for k in moved) and not any(k.startswith('G.') for k in moved)


def test_bounds_equal_the_chapter_functions():
    m = tiny().eval()
    with torch.no_grad():
        z = m.sample_z(64); mu, logvar = m.encode(z); z_hat = m.reconstruct(m.G(reparameterize(mu, logvar)))
        b = m.bounds(z, z_hat, mu, logvar)
        I_L = ib_lower_bound(gaussian_log_prob(z, z_hat, torch.zeros_like(z_hat)), gaussian_entropy(torch.zeros(6)))
        I_U, kl = ib_upper_bound(mu, logvar)
    assert torch.allclose(b['I_L'], I_L) and torch.allclose(b['I_U'], I_U) and torch.allclose(b['KL'], kl)
    # the closed forms: unit-variance q and the official code's 0.5 (z^2 - (z - z_hat)^2) average
    assert torch.allclose(I_L, (0.5 * (z ** 2 - (z - z_hat) ** 2)).sum(1).mean() + (gaussian_entropy(torch.zeros(6)) + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)).mean()), atol=1e-4)
    assert kl.shape == (4,) and torch.allclose(I_U, kl.sum())
    est = estimate_bounds(m, n=100, batch_size=40)
    assert set(est) == {'I_L', 'I_U', 'KL_1', 'KL_2', 'KL_3', 'KL_4'} and all(math.isfinite(v) for v in est.values())


def test_stale_graph_pitfall_is_avoided():
    m = tiny()
    opts = m.configure_optimizers(); x = batch_images(batch()) * 2 - 1
    x_g = m.G(reparameterize(*m.encode(m.sample_z(len(x)))))
    d_fake = m.discriminate(x_g)
    L_D = d_loss(m.discriminate(x), d_fake)
    opts['D'].zero_grad(); L_D.backward(retain_graph=True); opts['D'].step()
    with pytest.raises(RuntimeError, match='inplace'):
        g_loss(d_fake).backward()
    ctx = ctx_for(m)
    for s in range(2):   # D step then G step, twice, through the engine's context
        ctx.step = s; logs = m.train_step(batch(), ctx)
        assert torch.isfinite(logs['L_G'])


def test_instance_noise_schedule():
    assert instance_noise_sigma(0) == 1.0 and abs(instance_noise_sigma(25_000) - 0.75) < 1e-12
    assert instance_noise_sigma(100_000) == 0.0 and instance_noise_sigma(10, iters=0) == 0.0


@pytest.mark.parametrize('model', MODELS)
def test_sample_and_representation_follow_the_protocol(model):
    m = tiny(model, nc=3).train()
    g = lambda: torch.Generator().manual_seed(0)
    x = m.sample(5, generator=g())
    assert x.shape == (5, 3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1 and m.training   # [0, 1]; the mode is restored
    assert torch.equal(x, m.sample(5, generator=g()))
    rep = m.representation(x)
    assert rep.shape == (5, 4) and not rep.requires_grad
    codes = m.codes(x)
    assert torch.equal(rep, codes['r'] if model == 'ibgan' else codes['z'])
    assert set(codes) == ({'z', 'r'} if model == 'ibgan' else {'z'}) and codes['z'].shape[1] == (6 if model == 'ibgan' else 4)
    # the representation takes images in [0, 1]: it is mu_psi(z_hat(2x - 1)) (IB-GAN) or z_hat(2x - 1)
    with torch.no_grad():
        m.eval(); z_hat = m.reconstruct(x * 2 - 1)
        assert torch.allclose(rep, m.encode(z_hat)[0] if model == 'ibgan' else z_hat)
    with pytest.raises(ValueError, match='no classes'): m.sample(2, labels=torch.tensor([0, 1]))
    assert supports(m, 'sample') and supports(m, 'representation') and not supports(m, 'inpaint')


def test_representation_fn_pools_and_batches():
    m = tiny().eval()
    imgs = torch.rand(7, 1, 64, 64)
    rep = dsprites_representation_fn(m, SIZE, batch_size=3)(imgs)
    expect = m.representation(torch.nn.functional.avg_pool2d(imgs, 4)).numpy()
    assert rep.shape == (7, 4) and abs(rep - expect).max() < 1e-5
    u8 = (imgs * 255).round().to(torch.uint8)
    assert abs(dsprites_representation_fn(m, SIZE)(u8[:, 0].numpy()) - dsprites_representation_fn(m, SIZE)(u8.float() / 255)).max() < 1e-5


def test_typed_value_beats_the_preset():
    "The old flat config's `quick=True` replaced every value equal to its default: IBGANConfig(quick=True, steps=150000) ran 3000 steps."
    c = make_config('dsprites-ibgan', {'train.steps': 150000}, preset='quick')
    assert c.train.steps == 150000 and c.data.img_size == 32 and c.model.ngf == 8      # the rest of the preset still applies
    assert make_config('dsprites-ibgan', preset='quick').train.steps == 3000
    c = make_config('color-dsprites-ibgan', ['model.noise_iters=400000', 'data.img_size=64'], preset='quick')
    assert (c.model.noise_iters, c.data.img_size, c.model.beta, c.train.steps) == (400000, 64, 0.071, 3000)
    assert set(DSPRITES_QUICK) == {'train.steps', 'train.eval_every', 'train.ckpt_every', 'train.log_every', 'model.ngf', 'model.ndf',
                          'model.lr_g', 'model.lr_d', 'model.noise_iters', 'data.img_size', 'data.n_train',
                          'eval.fv_train', 'eval.fv_eval', 'eval.fv_std'}


def test_experiment_defaults_and_model_sections():
    c = make_config('dsprites-ibgan')
    assert (c.train.steps, c.train.batch_size, c.train.eval_every, c.model.beta, c.model.z_dim) == (150_000, 64, 10_000, 0.141, 16)
    c = make_config('color-dsprites-infogan')
    assert (c.model_name, c.data.dataset, c.train.steps, c.model.noise_iters) == ('infogan', 'color-dsprites', 500_000, 400_000)
    assert 'beta' not in c.to_dict()['model'] and 'z_dim' not in make_config('dsprites-gan').to_dict()['model']
    with pytest.raises(UsageError, match='model ibgan uses it'): make_config('dsprites-gan', ['model.beta=0.1'])
    assert make_config('dsprites-gan', ['model.name=ibgan']).model.beta == 0.141


def test_run_load_and_evaluate(tmp_path):
    ov = {'train.steps': 3, 'train.batch_size': 8, 'data.img_size': SIZE, 'data.n_train': 64, 'model.ngf': 4, 'model.ndf': 4,
          'model.r_dim': 4, 'model.z_dim': 6, 'train.log_every': 1, 'eval.fv_train': 5, 'eval.fv_eval': 5, 'eval.fv_std': 50,
          'eval.fv_batch': 4, 'eval.fv_subset': 300, 'train.threads': 1, 'train.progress': False}
    rd, metrics = run_experiment('dsprites-ibgan', ov, out=tmp_path / 'run', preset='quick')
    assert {'factor_vae', 'active_dims', 'I_L', 'I_U', 'KL_4'} <= set(metrics)
    assert (rd / 'traversals.png').exists() and (rd / 'bounds.png').exists()
    run = load_run(rd)
    assert not run.model.training and 'train' not in vars(run.data)
    fresh = build_ibgan_model(run.config)
    fresh.load_state_dict(torch.load(rd / 'checkpoint.pt', weights_only=True)['model']); fresh.eval()
    x = batch(5)[0]
    assert torch.equal(run.model.representation(x), fresh.representation(x))
    z = torch.randn(3, 6)
    with torch.no_grad(): assert torch.equal(run.model(z), fresh(z))
    assert dsprites_representation_fn(run.model, SIZE)(torch.rand(4, 1, 64, 64)).shape == (4, 4)   # 64 px images are pooled
    assert 'train' not in vars(run.data)                                                  # evaluation data only


def test_bad_inputs():
    with pytest.raises(TypeError, match='cfg must be one of'): IBGAN(object())
    with pytest.raises(ValueError, match='img_size'): IBGAN(img_size=20)
    with pytest.raises(ValueError, match='nc'): IBGAN(nc=0)
    with pytest.raises(ValueError, match='beta'): IBGANConfig(beta=-0.1)
    with pytest.raises(ValueError, match='lr_d'): GANConfig(lr_d=0)
    with pytest.raises(ValueError, match='enc_hidden'): IBGANConfig(enc_hidden='64,x')
    with pytest.raises(ValueError, match='no representation encoder'): tiny('infogan').encode(torch.zeros(2, 4))
    m = tiny()
    with pytest.raises(ValueError, match='built for'): m.train_step((torch.zeros(4, 3, SIZE, SIZE),), ctx_for(m))
    with pytest.raises(ValueError, match='batch must hold images'): m.train_step(torch.zeros(4, SIZE, SIZE), ctx_for(m))
    with pytest.raises(ValueError, match='dataset must be one of'): DSpritesDataConfig(dataset='mnist')
    with pytest.raises(ValueError, match='fv_batch'): DSpritesEvalConfig(fv_batch=1)
    with pytest.raises(UsageError, match='no model'): make_config('dsprites-ibgan', ['model.name=vae'])


def test_score_on_rendered_sprites():
    from dlatent.data.dsprites import DSprites
    m = tiny()
    sc = score_ibgan(m, DSprites(subset=1000, use_cache=False, verbose=False), SIZE, n_train=20, n_eval=10, n_votes_batch=8, n_std=200, n_bounds=100)
    assert 0 <= sc['factor_vae'] <= 1 and 0 <= sc['active_dims'] <= 4 and math.isfinite(sc['I_L']) and sc['I_U'] >= 0


def test_data_is_lazy():
    d = DSpritesData('dsprites', n_train=50, img_size=SIZE, seed=0, fv_subset=100)
    assert not {'train', 'factors'} & set(vars(d)) and d.nc == 1
    assert len(d.factors) == 100 and 'train' not in vars(d)
    x, f = d.train.tensors
    assert x.shape == (50, 1, SIZE, SIZE) and x.dtype == torch.uint8 and f.shape == (50, 5)


def test_recalibrated_batchnorm_matches_training_mode_and_leaves_model_alone():
    torch.manual_seed(0)
    m = IBGAN(InfoGANConfig(r_dim=6, ngf=4, ndf=4), img_size=16).eval()
    for b in m.trunk.modules():                                  # stale running statistics, as after a GAN's training
        if isinstance(b, nn.BatchNorm2d): b.running_mean.fill_(-3.); b.running_var.fill_(50.)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        mt = copy.deepcopy(m).train()
        z = mt.sample_z(2000)
        train_IL = float(mt.bounds(z, mt.reconstruct(mt.G(z)), None, None)['I_L'])
    stale, fresh = estimate_bounds(m, 2000)['I_L'], estimate_bounds(recalibrate_batchnorm(m), 2000)['I_L']
    assert abs(fresh - train_IL) < 0.1 < abs(stale - train_IL)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_recalibration_keeps_each_layers_momentum():
    m = IBGAN(GANConfig(r_dim=4, ngf=4, ndf=4), img_size=16)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    bns[0].momentum = 0.3
    r = recalibrate_batchnorm(m, n=64, batch_size=32)
    assert [b.momentum for b in r.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)] == [b.momentum for b in bns]

def test_paper_setting_gpu_script_tiny_runs_on_the_cpu(tmp_path):
    "benchmarks/ibgan_paper.py (the paper's setting on a GPU) in its --tiny CPU mode: three runs, scores, a report beside Table 1."
    import json, runpy
    from pathlib import Path
    script = runpy.run_path(str(Path(__file__).parents[1] / 'benchmarks' / 'ibgan_paper.py'))
    res = script['main'](['--tiny', '--out', str(tmp_path)])
    assert set(res) == {'ibgan', 'infogan', 'gan'} and not [m for m, r in res.items() if 'error' in r], res
    for m, r in res.items():
        assert r['steps'] == 20 and r['its'] > 0 and 0 <= r['factor_vae'] <= 1 and 0 <= r['mig'] <= 1, (m, r)
        assert (tmp_path / m / 'checkpoint.pt').exists()
    assert all(f'KL_{i}' in res['ibgan'] for i in range(1, 11)) and 'KL_1' not in res['gan']
    report = (tmp_path / 'report.md').read_text()
    assert '20 iterations each' in report and '| ibgan |' in report and '0.80 ± 0.07' in report
    assert json.loads((tmp_path / 'results.json').read_text())['steps'] == 20
