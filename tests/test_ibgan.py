"Fast checks of IB-GAN, InfoGAN and GAN (dlatent.ibgan): one step of each, who moves, bounds, checkpoints, errors."
import math
import pytest
import torch
import torch.nn.functional as F

from dlatent.ibgan import (IBGAN, MODELS, IBGANConfig, build_model, load_run_model, instance_noise_sigma,
                           estimate_bounds, representation_fn, changed_params, _snapshot, _images)
from dlatent.ib import ib_lower_bound, ib_upper_bound, gaussian_entropy
from dlatent.distributions import gaussian_log_prob, reparameterize
from dlatent.train import StepContext, TrainConfig, fit

torch.set_num_threads(1)
SIZE = 16


def tiny(model='ibgan', **kw):
    torch.manual_seed(0)
    return IBGAN(model, z_dim=6, r_dim=4, ngf=4, ndf=4, img_size=SIZE, lr_g=1e-3, lr_d=1e-3, **kw)


def batch(n=8, nc=1):
    g = torch.Generator().manual_seed(1)
    return ((torch.rand(n, nc, SIZE, SIZE, generator=g) > 0.7).to(torch.uint8) * 255,)


def ctx_for(m, cls=StepContext):
    return cls(m.configure_optimizers(), torch.device('cpu'), torch.float32, None, 10)


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
    m = tiny(model); before = _snapshot(m)
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
    before = _snapshot(m); m.train_step(batch(), ctx_for(m, OnlyD))
    moved = changed_params(before, m)
    assert moved and moved <= dn
    before = _snapshot(m); m.train_step(batch(), ctx_for(m, OnlyG))
    moved = changed_params(before, m)
    assert moved and not (moved & dn)


def test_gan_generator_gets_no_information_gradient():
    "In 'gan' mode G's gradient is the GAN loss only: with gamma=0 a G/E/Q step moves q but not G."
    m = tiny('gan', gamma=0.0); before = _snapshot(m)
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
    opts = m.configure_optimizers(); x = _images(batch()[0])
    x_g = m.G(reparameterize(*m.encode(m.sample_z(len(x)))))
    d_fake = m.discriminate(x_g)
    L_D = F.binary_cross_entropy_with_logits(m.discriminate(x), torch.ones(len(x))) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros(len(x)))
    opts['D'].zero_grad(); L_D.backward(retain_graph=True); opts['D'].step()
    with pytest.raises(RuntimeError, match='inplace'):
        F.binary_cross_entropy_with_logits(d_fake, torch.ones(len(x))).backward()
    ctx = ctx_for(m)
    for s in range(2):   # D step then G step, twice, through the engine's context
        ctx.step = s; logs = m.train_step(batch(), ctx)
        assert torch.isfinite(logs['L_G'])


def test_instance_noise_schedule():
    assert instance_noise_sigma(0) == 1.0 and abs(instance_noise_sigma(25_000) - 0.75) < 1e-12
    assert instance_noise_sigma(100_000) == 0.0 and instance_noise_sigma(10, iters=0) == 0.0


def test_checkpoint_round_trip(tmp_path):
    cfg = IBGANConfig(steps=3, batch_size=8, img_size=SIZE, ngf=4, ndf=4, z_dim=6, r_dim=4, progress=False, threads=1,
                      log_every=1, lr_g=1e-3, lr_d=1e-3)
    data = torch.utils.data.TensorDataset(batch(32)[0])
    torch.manual_seed(0)
    res = fit(build_model(cfg), data, cfg, out_dir=tmp_path)
    assert (tmp_path / 'checkpoint.pt').exists() and len(res.history) == 3
    loaded = load_run_model(cfg, tmp_path)
    res.model.eval()
    x = _images(batch(5)[0])
    with torch.no_grad():
        assert torch.equal(loaded.representation(x), res.model.representation(x))
        z = torch.randn(3, 6); assert torch.equal(loaded(z), res.model(z))
    rep = representation_fn(loaded)(torch.rand(4, 1, 64, 64))   # 64 px images are pooled to the model's size
    assert rep.shape == (4, 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match='model must be one of'): IBGAN('vae')
    with pytest.raises(ValueError, match='img_size'): IBGAN(img_size=20)
    with pytest.raises(ValueError, match='beta'): IBGAN(beta=-0.1)
    with pytest.raises(ValueError, match='lr_d'): IBGAN(lr_d=0)
    with pytest.raises(ValueError, match='enc_hidden'): IBGAN(enc_hidden='64,x')
    with pytest.raises(ValueError, match='no representation encoder'): tiny('infogan').encode(torch.zeros(2, 4))
    m = tiny()
    with pytest.raises(ValueError, match='nc/img_size'): m.train_step((torch.zeros(4, 3, SIZE, SIZE),), ctx_for(m))
    with pytest.raises(ValueError, match='batch must hold images'): m.train_step(torch.zeros(4, SIZE, SIZE), ctx_for(m))
    with pytest.raises(ValueError, match='dataset must be one of'): IBGANConfig(dataset='mnist')
    with pytest.raises(ValueError, match='model must be one of'): IBGANConfig(model='vae')


def test_score_on_rendered_sprites():
    from dlatent.dsprites import DSprites
    from dlatent.ibgan import score_model
    m = tiny()
    sc = score_model(m, DSprites(subset=1000, use_cache=False, verbose=False), n_train=20, n_eval=10, n_votes_batch=8, n_std=200, n_bounds=100)
    assert 0 <= sc['factor_vae'] <= 1 and 0 <= sc['active_dims'] <= 4 and math.isfinite(sc['I_L']) and sc['I_U'] >= 0

def test_recalibrated_batchnorm_matches_training_mode_and_leaves_model_alone():
    import copy
    from torch import nn
    from dlatent.ibgan import recalibrate_batchnorm, estimate_bounds
    torch.manual_seed(0)
    m = IBGAN('infogan', z_dim=6, r_dim=6, ngf=4, ndf=4, img_size=16).eval()
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
    from torch import nn
    from dlatent.ibgan import recalibrate_batchnorm
    m = IBGAN('gan', z_dim=4, r_dim=4, ngf=4, ndf=4, img_size=16)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    bns[0].momentum = 0.3
    r = recalibrate_batchnorm(m, n=64, batch_size=32)
    assert [b.momentum for b in r.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)] == [b.momentum for b in bns]
