"Property tests of the densities, divergences and losses of chapters 00-04 on random inputs."
import math
import pytest
import torch
import torch.distributions as D
from dlatent.objectives.distributions import (gaussian_log_prob, reparameterize, kl_std_normal, kl_gaussians, GaussianMixturePrior,
                                   total_gaussian, set_validation)
from dlatent.objectives.gm import gm_losses, gm_loss, class_posterior, total_gaussian_lkd
from dlatent.objectives.ib import ib_lower_bound, ib_upper_bound, gaussian_entropy
from dlatent.objectives.gumbel import gumbel_softmax, LearnablePrior
from dlatent.objectives.elbo import LinearGaussianModel, elbo_split_terms

torch.set_num_threads(1)
SEEDS = range(5)

def _normal(mu, logvar): return D.Independent(D.Normal(mu, (0.5 * logvar).exp()), 1)

def _gm_inputs(seed, n=7, C=4, d=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, C, (n,), generator=g),
            torch.randn(C, d, generator=g, dtype=dtype), 0.5 * torch.randn(C, d, generator=g, dtype=dtype))

@pytest.mark.parametrize('seed', SEEDS)
def test_kl_nonnegative_and_zero_iff_equal(seed):
    g = torch.Generator().manual_seed(seed)
    mu1, lv1, mu2, lv2 = (torch.randn(20, 5, generator=g, dtype=torch.float64) for _ in range(4))
    kl = kl_gaussians(mu1, lv1, mu2, lv2)
    assert (kl > 0).all()
    assert torch.allclose(kl_gaussians(mu1, lv1, mu1, lv1), torch.zeros(20, dtype=torch.float64), atol=1e-12)
    assert (kl_std_normal(mu1, lv1) > 0).all()
    assert kl_std_normal(torch.zeros(3), torch.zeros(3)).abs() < 1e-7
    # a perturbation of one coordinate only still gives a strictly positive KL
    assert (kl_gaussians(mu1, lv1, mu1 + 1e-3 * torch.eye(5, dtype=torch.float64)[seed % 5], lv1) > 0).all()

@pytest.mark.parametrize('seed', SEEDS)
def test_closed_forms_match_torch_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    x, mu1, lv1, mu2, lv2 = (torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(5))
    assert torch.allclose(gaussian_log_prob(x, mu1, lv1), _normal(mu1, lv1).log_prob(x))
    assert torch.allclose(kl_gaussians(mu1, lv1, mu2, lv2), D.kl_divergence(_normal(mu1, lv1), _normal(mu2, lv2)))
    std = _normal(torch.zeros_like(mu1), torch.zeros_like(lv1))
    assert torch.allclose(kl_std_normal(mu1, lv1), D.kl_divergence(_normal(mu1, lv1), std))
    assert torch.allclose(gaussian_entropy(lv1), _normal(mu1, lv1).entropy())
    prior = GaussianMixturePrior(3, 4).double()
    mix = D.MixtureSameFamily(D.Categorical(torch.ones(3, dtype=torch.float64) / 3), _normal(prior.mu, prior.logvar))
    assert torch.allclose(prior.log_prob(x), mix.log_prob(x))

def test_reparameterize_moments():
    N = 40_000
    z = reparameterize(torch.full((N, 2), 1.5), torch.full((N, 2), math.log(4.0)), generator=torch.Generator().manual_seed(0))
    assert (z.mean(0) - 1.5).abs().max() < 4 * 2 / N ** 0.5
    assert (z.var(0) - 4).abs().max() < 4 * 4 * (2 / N) ** 0.5

@pytest.mark.parametrize('seed', SEEDS)
def test_gm_losses_match_naive_formula(seed):
    z_s, y, mu, logvar = _gm_inputs(seed)
    L_cls, L_lkd = gm_losses(z_s, y, mu, logvar)
    logN = _normal(mu, logvar).log_prob(z_s[:, None])
    assert torch.allclose(L_lkd, -logN[torch.arange(len(y)), y])
    assert torch.allclose(L_cls, -(logN.exp()[torch.arange(len(y)), y] / logN.exp().sum(1)).log())
    assert torch.allclose(class_posterior(z_s, mu, logvar).exp().sum(1), torch.ones(len(y), dtype=torch.float64))
    assert (gm_losses(z_s, y, mu, logvar, alpha=1.0)[0] >= L_cls - 1e-12).all()

@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_gradcheck_losses(alpha):
    z_s, y, mu, logvar = _gm_inputs(0, n=4, C=3, d=2)
    args = [t.clone().requires_grad_() for t in (z_s, mu, logvar)]
    assert torch.autograd.gradcheck(lambda z, m, lv: gm_losses(z, y, m, lv, alpha), args)
    assert torch.autograd.gradcheck(lambda z, m, lv: gm_loss(z, y, m, lv, 0.1, alpha), args)
    assert torch.autograd.gradcheck(lambda z, m, lv: total_gaussian_lkd(z, m, lv), args)
    assert torch.autograd.gradcheck(lambda m, lv: kl_std_normal(m, lv), args[1:])
    mu2 = args[1].detach().flip(0).requires_grad_()
    assert torch.autograd.gradcheck(lambda m1, lv1, m2: kl_gaussians(m1, lv1, m2, lv1.flip(0)), [args[1], args[2], mu2])
    assert torch.autograd.gradcheck(lambda m, lv: ib_upper_bound(m, lv)[0], args[1:])

def test_gm_loss_finite_far_from_means():
    "Codes 1e3 standard deviations from every mean: float32 loss and gradients finite and equal to a float64 reference."
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(5, 4, generator=g), torch.zeros(5, 4)
    y = torch.randint(0, 5, (8,), generator=g)
    z_s = 1e3 * torch.randn(8, 4, generator=g)
    results = []
    for dtype in (torch.float32, torch.float64):
        z, m, lv = (t.detach().to(dtype).clone().requires_grad_() for t in (z_s, mu, logvar))
        loss = gm_loss(z, y, m, lv, lambda_lkd=0.1, alpha=0.2)
        loss.backward()
        results.append((loss.detach(), z.grad, m.grad, lv.grad))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())

def test_total_gaussian_moments():
    prior = GaussianMixturePrior(4, 2, init_scale=3.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        prior.logvar.normal_(generator=torch.Generator().manual_seed(3))
        c = torch.randint(0, 4, (100_000,), generator=torch.Generator().manual_seed(4))
        z = prior.sample(c, generator=torch.Generator().manual_seed(5))
        mu_t, logvar_t = prior.total_gaussian()
    assert torch.allclose(z.mean(0), mu_t, atol=4 * z.std(0).max().item() / 100_000 ** 0.5)
    assert torch.allclose(z.var(0), logvar_t.exp(), rtol=0.03)

def test_elbo_bound_and_tightness():
    model = LinearGaussianModel.random(generator=torch.Generator().manual_seed(0))
    x = model.sample(32, generator=torch.Generator().manual_seed(1))[0]
    q = model.true_posterior(x)
    assert torch.allclose(elbo_split_terms(model, x, *q)['elbo'], model.log_px(x), atol=1e-8)
    g = torch.Generator().manual_seed(2)
    bad = [q[0].roll(1, -1)] + [t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in q[1:]]
    assert (elbo_split_terms(model, x, *bad)['elbo'] < model.log_px(x)).all()

def test_ib_bounds_values():
    assert torch.isclose(gaussian_entropy(torch.zeros(16)), torch.tensor(8 * (1 + math.log(2 * math.pi))))
    I_U, kl = ib_upper_bound(torch.zeros(5, 3), torch.zeros(5, 3))
    assert I_U == 0 and kl.shape == (3,)
    assert torch.isclose(ib_lower_bound(torch.tensor([-1., -3.]), 2.0), torch.tensor(0.))

def test_gumbel_softmax_properties():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    c = gumbel_softmax(logits.expand(20_000, 3), tau=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(c.sum(-1), torch.ones(20_000))
    assert (c.max(-1).values > 0.99).float().mean() > 0.98
    freq = c.argmax(-1).bincount(minlength=3) / 20_000.
    assert (freq - logits.exp()).abs().max() < 4 * (0.25 / 20_000) ** 0.5
    prior = LearnablePrior(3)
    h = prior.sample(6, tau=0.5, hard=True)
    assert set(h.flatten().tolist()) <= {0., 1.} and torch.all(h.sum(-1) == 1)
    h.pow(2).sum().backward()
    assert prior.logits.grad is not None and torch.isfinite(prior.logits.grad).all()

@pytest.mark.parametrize('call, match', [
    (lambda: gaussian_log_prob(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(4, 2)), 'do not broadcast'),
    (lambda: kl_std_normal(torch.zeros(2), torch.tensor([0., float('nan')])), 'logvar contains NaN'),
    (lambda: kl_gaussians(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(3)), 'do not broadcast'),
    (lambda: gm_losses(torch.zeros(3, 2), torch.tensor([0, 1, 5]), torch.zeros(4, 2), torch.zeros(4, 2)), 'outside'),
    (lambda: gm_losses(torch.zeros(3, 2), torch.tensor([0, 1, -1]), torch.zeros(4, 2), torch.zeros(4, 2)), 'outside'),
    (lambda: gm_losses(torch.zeros(3, 2), torch.tensor([0., 1., 1.]), torch.zeros(4, 2), torch.zeros(4, 2)), 'integer'),
    (lambda: gm_loss(torch.full((3, 2), float('nan')), torch.tensor([0, 1, 1]), torch.zeros(4, 2), torch.zeros(4, 2)), 'z_s contains NaN'),
    (lambda: gm_loss(torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.zeros(4, 2), torch.zeros(4, 2), lambda_lkd=-1), 'lambda_lkd'),
    (lambda: gm_losses(torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.zeros(4, 2), torch.zeros(4, 2), alpha=-0.5), 'alpha'),
    (lambda: class_posterior(torch.zeros(3, 3), torch.zeros(4, 2), torch.zeros(4, 2)), 'z_s must have shape'),
    (lambda: total_gaussian(torch.zeros(4, 2), torch.zeros(4, 2), probs=torch.tensor([0.5, 0.5, 0.5, -0.5])), 'probs'),
    (lambda: GaussianMixturePrior(0, 2), 'n_classes'),
    (lambda: GaussianMixturePrior(3, 2).sample(torch.tensor([3])), 'outside'),
    (lambda: ib_upper_bound(torch.zeros(4, 2), torch.full((4, 2), float('inf'))), 'logvar contains NaN or inf'),
    (lambda: gumbel_softmax(torch.zeros(3), tau=0), 'tau'),
    (lambda: gumbel_softmax(torch.zeros(3), tau=-1.0), 'tau'),
    (lambda: LearnablePrior(3).sample(4, tau=float('nan')), 'tau'),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match): call()

def test_validation_can_be_switched_off():
    set_validation(False)
    try: assert torch.isnan(kl_std_normal(torch.zeros(2), torch.tensor([0., float('nan')])))
    finally: set_validation(True)
