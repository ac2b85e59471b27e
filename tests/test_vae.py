"Fast checks of the VAE baselines (dlatent.objectives.vae, dlatent.networks.vae, dlatent.models.vae and their dSprites experiments): who moves in one step, finite losses, the TC estimators against closed forms, the protocol, saving, bad settings, a seeded tiny run."
import math
import pytest
import torch
from torch import nn

from dlatent.objectives.distributions import gaussian_log_prob, kl_std_normal, reparameterize
from dlatent.objectives.losses import reconstruction_loss
from dlatent.objectives.vae import (gaussian_tc, gaussian_kl_decomposition, log_qz_mws, log_qz_mss, tc_mws, tc_mss, decomposed_kl,
                                    permute_dims, density_ratio_tc, tc_discriminator_loss)
from dlatent.models.base import GenerativeModel, supports
from dlatent.models.vae import (VAE, BetaVAE, BetaTCVAE, FactorVAE, VAEConfig, BetaVAEConfig, BetaTCVAEConfig, FactorVAEConfig,
                                VAE_CONFIGS, build_vae)
from dlatent.experiments import make_config, run_experiment, load_run, UsageError
from dlatent.experiments.dsprites import build_vae_model, evaluate_vae, mig_dci_scores
from dlatent.train import StepContext

torch.set_num_threads(1)
SIZE = 16
TINY = dict(z_dim=4)


def tiny(name, **kw):
    torch.manual_seed(0)
    extra = dict(d_hidden=32, d_layers=2) if name == 'factorvae' else {}
    return build_vae(VAE_CONFIGS[name](**TINY, **extra, **kw), nc=1, img_size=SIZE, dataset_size=1000)


def batch(n=16, nc=1):
    g = torch.Generator().manual_seed(1)
    return ((torch.rand(n, nc, SIZE, SIZE, generator=g) > 0.7).to(torch.uint8) * 255,)


def ctx_for(m, cls=StepContext): return cls(m.configure_optimizers(), torch.device('cpu'), torch.float32, None, 10)
def snapshot(module): return {k: v.detach().clone() for k, v in module.named_parameters()}
def changed_params(before, module): return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


class OnlyVAE(StepContext):
    def update(self, name, loss, retain_graph=False):
        if name == 'vae': super().update(name, loss, retain_graph)


class OnlyD(StepContext):
    def update(self, name, loss, retain_graph=False):
        if name == 'D': super().update(name, loss, retain_graph)


# -- one step ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(VAE_CONFIGS))
def test_one_step_moves_every_parameter_and_losses_are_finite(name):
    m = tiny(name); before = snapshot(m)
    logs = m.train_step(batch(), ctx_for(m))
    assert all(torch.isfinite(v).all() for v in logs.values()), logs
    assert changed_params(before, m) == set(before)
    assert set(m.configure_optimizers()) == ({'vae', 'D'} if name == 'factorvae' else {'vae'})
    assert {'loss', 'L_rec', 'KL', 'KL_1', 'KL_4'} <= set(logs) and ('TC' in logs) == (name in ('factorvae', 'betatcvae'))


def test_factorvae_optimizers_move_only_their_own_parameters():
    m = tiny('factorvae')
    d_names = {k for k, _ in m.named_parameters() if k.startswith('discriminator.')}
    before = snapshot(m); m.train_step(batch(), ctx_for(m, OnlyVAE))
    assert changed_params(before, m) == set(before) - d_names            # the TC's gradient reaches the encoder, not D
    before = snapshot(m); m.train_step(batch(), ctx_for(m, OnlyD))
    assert changed_params(before, m) == d_names
    with pytest.raises(ValueError, match='even and at least 4'): m.train_step(batch(7), ctx_for(m))


def test_losses_are_the_papers_objectives():
    torch.manual_seed(0)
    base = VAE(VAEConfig(**TINY), img_size=SIZE)
    with torch.no_grad(): base.encoder.mu.weight.mul_(30); base.encoder.logvar.bias.fill_(-2.)
    x = batch()[0].float() / 255
    torch.manual_seed(1); out_vae = base.losses(x)
    torch.manual_seed(1)
    with torch.no_grad():
        mu, lv = base.encode(x); z = reparameterize(mu, lv)
        rec, kl = reconstruction_loss(x, base.decoder(z), 'bernoulli_logits').mean(), kl_std_normal(mu, lv).mean()
        tc = tc_mws(z, mu, lv)
    for cls, cfg, expect in ((BetaVAE, BetaVAEConfig(beta=3., **TINY), rec + 3 * kl),
                             (BetaTCVAE, BetaTCVAEConfig(beta=5., **TINY), rec + kl + 4 * tc)):
        m = cls(cfg, img_size=SIZE); m.load_state_dict(base.state_dict())
        torch.manual_seed(1); assert torch.allclose(m.losses(x)['loss'], expect, atol=1e-3)
    assert torch.allclose(out_vae['loss'], rec + kl, atol=1e-3) and kl > 1


def test_bernoulli_logits_equal_the_shared_loss():
    g = torch.Generator().manual_seed(0)
    x, l = torch.rand(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g) * 3
    assert torch.allclose(reconstruction_loss(x, l, 'bernoulli_logits'), reconstruction_loss(x, torch.sigmoid(l), 'bernoulli'), atol=1e-3)


# -- the TC estimators against closed forms -----------------------------------------------------------------------------------

def _gaussian_data(N=1024, seed=0):
    "The chapter's case: posterior means A u of Gaussian u, one posterior variance per dimension; q(z) is nearly N(0, A A^T + S)."
    g = torch.Generator().manual_seed(seed)
    logvar = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64).log()
    A = 0.8 * torch.randn(len(logvar), 3, generator=g, dtype=torch.float64)
    mu = torch.randn(N, 3, generator=g, dtype=torch.float64) @ A.T
    return g, A, logvar, mu, logvar.expand(N, len(logvar))


def test_gaussian_tc_and_decomposition_closed_forms():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = L @ L.T + 0.2 * torch.eye(4, dtype=torch.float64)
    H_marg = 0.5 * (1 + math.log(2 * math.pi) + torch.diagonal(cov).log()).sum()
    H_joint = 0.5 * (4 * (1 + math.log(2 * math.pi)) + torch.logdet(cov))
    assert torch.allclose(gaussian_tc(cov), H_marg - H_joint) and gaussian_tc(torch.diag(torch.diagonal(cov))).abs() < 1e-9
    t = gaussian_kl_decomposition(cov, torch.tensor([-1., 0., 0.5, -2.], dtype=torch.float64), torch.tensor([0.3, 0., -1., 2.], dtype=torch.float64))
    assert torch.allclose(t['mi'] + t['tc'] + t['dim_kl'], t['kl']) and min(t['mi'], t['tc'], t['dim_kl']) > 0


def test_tc_estimators_against_the_gaussian_closed_form():
    g, A, logvar, mu, lv = _gaussian_data()
    N, d = mu.shape
    tc_gauss = float(gaussian_tc(A @ A.T + torch.diag(logvar.exp())))
    # with the whole data set as the batch, the stratified estimator is the exact mixture density and MWS is log N below it
    z = reparameterize(mu, lv, generator=g)
    exact = torch.logsumexp(gaussian_log_prob(z[:, None], mu[None], lv[None]), 1) - math.log(N)
    assert torch.allclose(log_qz_mss(z, mu, lv, N)[0], exact) and torch.allclose(log_qz_mws(z, mu, lv, N)[0], exact - math.log(N))
    # averaged over draws, both estimate the TC of the (nearly Gaussian) aggregate posterior; the full batch is exact
    full = sum(float(tc_mss(z_, mu, lv, N)) for z_ in (reparameterize(mu, lv, generator=g) for _ in range(3))) / 3
    assert abs(full - tc_gauss) < 0.1, (full, tc_gauss)
    full_mws = sum(float(tc_mws(z_, mu, lv)) for z_ in (reparameterize(mu, lv, generator=g) for _ in range(3))) / 3
    assert abs(full_mws - full) < 0.05
    # MWS over-estimates the TC on small batches; both biases shrink as the batch grows
    def mean_tc(M, reps):
        out = {'mws': 0., 'mss': 0.}
        for _ in range(reps):
            i = torch.randperm(N, generator=g)[:M]
            zb = reparameterize(mu[i], lv[i], generator=g)
            out['mws'] += float(tc_mws(zb, mu[i], lv[i])) / reps; out['mss'] += float(tc_mss(zb, mu[i], lv[i], N)) / reps
        return out, i, zb
    small, _, _ = mean_tc(8, 64)
    large, i, zb = mean_tc(256, 4)
    assert small['mws'] > tc_gauss + 0.2, (small, tc_gauss)
    for k in ('mws', 'mss'): assert abs(large[k] - tc_gauss) < 0.5 * abs(small[k] - tc_gauss), (k, small, large, tc_gauss)
    parts = decomposed_kl(zb, mu[i], lv[i], N)
    ref = (gaussian_log_prob(zb, mu[i], lv[i]) - gaussian_log_prob(zb, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))).mean()
    assert torch.allclose(sum(parts.values()), ref)


def test_density_ratio_tc_of_a_correlated_gaussian():
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 1.0]])
    L, tc = torch.linalg.cholesky(cov), float(gaussian_tc(cov.double()))
    z = torch.randn(20_000, 3) @ L.T
    zp = permute_dims(z)
    assert torch.equal(zp.sort(0).values, z.sort(0).values) and torch.corrcoef(zp.T)[0, 1].abs() < 0.03
    disc = nn.Sequential(nn.Linear(3, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 2))
    opt = torch.optim.Adam(disc.parameters(), 2e-3, betas=(0.5, 0.9))
    est = []
    for step in range(800):
        loss = tc_discriminator_loss(disc(torch.randn(512, 3) @ L.T), disc(permute_dims(torch.randn(512, 3) @ L.T)))
        opt.zero_grad(); loss.backward(); opt.step()
        if step >= 600 and step % 20 == 0:
            with torch.no_grad(): est.append(float(density_ratio_tc(disc(torch.randn(4096, 3) @ L.T))))
    assert abs(sum(est) / len(est) - tc) < 0.25 * tc + 0.05, (est, tc)


# -- the protocol, saving ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(VAE_CONFIGS))
def test_protocol_and_save_load_round_trip(name, tmp_path):
    m = tiny(name, **({'estimator': 'mss'} if name == 'betatcvae' else {})).train()
    x = m.sample(5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1 and m.training
    assert torch.equal(x, m.sample(5, generator=torch.Generator().manual_seed(0)))
    rep = m.representation(x)
    with torch.no_grad(): assert torch.equal(rep, m.eval().encode(x)[0]) and set(m.codes(x)) == {'z'}
    assert supports(m, 'inpaint') and not rep.requires_grad
    with pytest.raises(ValueError, match='no classes'): m.sample(2, labels=torch.tensor([0, 1]))
    m.save_pretrained(tmp_path / name)
    back = GenerativeModel.from_pretrained(tmp_path / name)
    assert type(back) is type(m) and back.cfg == m.cfg and torch.equal(back.representation(x), rep)


# -- settings and errors ---------------------------------------------------------------------------------------------------------

def test_experiment_defaults():
    c = make_config('dsprites-betavae')
    assert (c.model.beta, c.model.lr, c.model.z_dim, c.train.batch_size, c.train.steps, c.data.img_size) == (4.0, 1e-4, 10, 64, 300_000, 64)
    c = make_config('color-dsprites-factorvae')
    assert (c.model.gamma, c.model.lr_d, c.model.beta1_d, c.train.batch_size, c.data.dataset) == (40.0, 1e-4, 0.5, 128, 'color-dsprites')
    assert make_config('dsprites-betatcvae').model.beta == 6.0 and make_config('dsprites-vae', preset='quick').train.steps == 3000
    assert build_vae_model(make_config('dsprites-betatcvae', ['data.n_train=500'])).dataset_size == 500


def test_bad_settings_are_one_line_errors():
    for exp, setting, match in (('dsprites-betavae', 'model.gamma=1', 'model factorvae uses it'), ('dsprites-vae', 'model.beta=2', 'use it'),
                                ('dsprites-factorvae', 'model.gamma=-1', 'gamma must be >= 0'),
                                ('dsprites-betatcvae', 'model.estimator=iwae', "'mws'"), ('dsprites-vae', 'model.name=gan', 'no model'),
                                ('dsprites-vae', 'eval.n_codes=5', 'n_codes must be 0')):
        with pytest.raises(UsageError, match=match) as e: make_config(exp, [setting])
        assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='needs dataset_size'): BetaTCVAE(BetaTCVAEConfig(estimator='mss'))
    with pytest.raises(TypeError, match='takes a FactorVAEConfig'): FactorVAE(BetaVAEConfig())
    with pytest.raises(TypeError, match='cfg must be one of'): build_vae(object())
    with pytest.raises(ValueError, match='multiple of 16'): VAE(img_size=24)
    with pytest.raises(ValueError, match='built for'): tiny('vae').train_step((torch.zeros(4, 3, SIZE, SIZE),), ctx_for(tiny('vae')))
    with pytest.raises(ValueError, match="'mss'"): decomposed_kl(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), 10, 'iwae')
    with pytest.raises(ValueError, match='dataset_size must be'): tc_mss(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match=r'\(B, d\)'): permute_dims(torch.zeros(5))


def test_mig_dci_on_known_codes():
    import numpy as np
    rng = np.random.default_rng(0)
    f = np.stack([rng.integers(0, k, 1200) for k in (3, 6, 40, 32, 32)], 1)
    good, bad = (mig_dci_scores(c, f, model='extra_trees') for c in (f + 0.1 * rng.standard_normal(f.shape), rng.standard_normal(f.shape)))
    assert good['mig'] > 0.5 and good['dci_disentanglement'] > 0.8 and bad['mig'] < 0.05 and bad['dci_disentanglement'] < 0.2


# -- a seeded tiny run ------------------------------------------------------------------------------------------------------------

def test_seeded_tiny_runs(tmp_path):
    ov = {'train.steps': 4, 'train.batch_size': 16, 'data.img_size': SIZE, 'data.n_train': 200, 'model.z_dim': 4, 'train.log_every': 1,
          'eval.fv_train': 5, 'eval.fv_eval': 5, 'eval.fv_std': 50, 'eval.fv_batch': 4, 'eval.fv_subset': 300, 'eval.n_codes': 60,
          'train.threads': 1, 'train.progress': False, 'train.device': 'cpu'}
    rd, metrics = run_experiment('dsprites-factorvae', {**ov, 'model.d_hidden': 16, 'model.d_layers': 2}, out=tmp_path / 'fv', preset='quick')
    assert {'factor_vae', 'active_dims', 'mig', 'dci_disentanglement', 'dci_completeness', 'dci_informativeness'} <= set(metrics)
    assert {'traversals.png', 'reconstructions.png', 'kl.png'} <= {p.name for p in rd.iterdir()}
    run = load_run(rd)
    fresh = build_vae_model(run.config)
    fresh.load_state_dict(torch.load(rd / 'checkpoint.pt', weights_only=True)['model']); fresh.eval()
    x = batch(5)[0]
    assert torch.equal(run.model.representation(x), fresh.representation(x)) and 'train' not in vars(run.data)
    # the same seed gives the same run
    a = run_experiment('dsprites-betatcvae', ov, out=tmp_path / 'a', preset='quick')[0]
    b = run_experiment('dsprites-betatcvae', ov, out=tmp_path / 'b', preset='quick')[0]
    assert (a / 'history.csv').read_text() .splitlines()[1:] != [] and [l.split(',')[3:] for l in (a / 'history.csv').read_text().splitlines()] == \
           [l.split(',')[3:] for l in (b / 'history.csv').read_text().splitlines()]
