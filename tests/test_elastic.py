"Tests of Elastic-InfoGAN: the learned prior's gradient, the losses, the imbalanced splits, each variant's update, checkpoints."
import math
import numpy as np
import pytest, torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dlatent.elastic import (ElasticInfoGAN, VARIANTS, info_loss, trans_loss_kl, entropy_loss, nt_xent, d_loss, g_loss,
                             identity_preserving, imbalanced_indices, imbalanced_split, load_split_counts, fit_counts,
                             parse_counts, parse_splits, ElasticConfig, build_model)
from dlatent.train import StepContext, TrainConfig, fit, load_checkpoint

torch.set_num_threads(1)
TRUE = torch.linspace(1, 3, 10) / torch.linspace(1, 3, 10).sum()

def tiny(variant='elastic', **kw):
    torch.manual_seed(0)
    return ElasticInfoGAN(img_size=8, true_probs=TRUE, **{**VARIANTS[variant], **kw})

# -- the learned prior -----------------------------------------------------------------------------
def test_gumbel_prior_gradient_reaches_logits_through_generator_loss():
    m = tiny('gumbel')
    c = m.sample_code(32)
    x_fake = m.G(torch.randn(32, m.z_dim), c)
    h = m.trunk(x_fake)
    loss = g_loss(m.D(h)) + info_loss(m.Q(h)[1], c)
    (g,) = torch.autograd.grad(loss, m.prior.logits)
    assert torch.isfinite(g).all() and g.abs().sum() > 0

def test_fixed_priors_are_one_hot_and_not_trained():
    for v in ('infogan', 'infogan-trueprior'):
        m = tiny(v)
        c = m.sample_code(500)
        assert set(c.unique().tolist()) == {0., 1.} and torch.equal(c.sum(1), torch.ones(500))
        assert not m.prior.logits.requires_grad
    torch.testing.assert_close(tiny('infogan-trueprior').prior_probs, TRUE)
    torch.manual_seed(0)
    freq = tiny('infogan-trueprior').sample_code(20000).mean(0)
    torch.testing.assert_close(freq, TRUE, atol=0.01, rtol=0)

# -- the losses --------------------------------------------------------------------------------------
def test_trans_loss_zero_when_q_invariant_and_positive_otherwise():
    lg = torch.randn(32, 10)
    assert trans_loss_kl(lg, lg).abs() < 1e-6
    assert trans_loss_kl(lg, lg + 5.) .abs() < 1e-5                    # same posterior, shifted logits
    assert trans_loss_kl(lg, torch.randn(32, 10)) > 0.1
    # KL(p || q) by hand for one pair
    p, q = torch.tensor([[0.7, 0.3]]), torch.tensor([[0.4, 0.6]])
    want = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert abs(trans_loss_kl(p.log(), q.log()).item() - want) < 1e-6

def test_entropy_loss_zero_for_one_hot_and_2logk_for_uniform():
    one_hot = torch.eye(10) * 1e4
    assert entropy_loss(one_hot, one_hot).abs() < 1e-6
    assert abs(entropy_loss(torch.zeros(5, 10), torch.zeros(5, 10)).item() - 2 * math.log(10)) < 1e-5

def test_info_loss_values():
    c = F.one_hot(torch.arange(10)).float()
    assert abs(info_loss(torch.zeros(10, 10), c).item() - math.log(10)) < 1e-5
    assert info_loss(c * 1e4, c) < 1e-5
    relaxed = torch.softmax(torch.randn(10, 10) / 0.1, 1)          # a relaxed code: its argmax is the target
    assert torch.isclose(info_loss(relaxed.log(), relaxed), F.cross_entropy(relaxed.log(), relaxed.argmax(1)))

def test_nt_xent_value_and_sign():
    e = torch.eye(4)                         # orthogonal pairs: positive similarity 1, six negatives 0
    assert abs(nt_xent(e, e).item() - (math.log(math.e + 6) - 1)) < 1e-5
    f = torch.randn(16, 8)
    assert nt_xent(f, f + 0.01 * torch.randn(16, 8)) < nt_xent(f, torch.randn(16, 8))

def test_gan_losses_signs():
    assert abs(d_loss(torch.zeros(4, 1), torch.zeros(4, 1)).item() - 2 * math.log(2)) < 1e-6
    assert d_loss(torch.full((4, 1), 5.), torch.full((4, 1), -5.)) < 0.02       # a confident, correct D
    assert g_loss(torch.full((4, 1), 5.)) < g_loss(torch.full((4, 1), -5.))       # G wants D(G(z)) -> 1

def test_identity_preserving_transform():
    x = torch.rand(6, 1, 16, 16)
    torch.testing.assert_close(identity_preserving(x, 0., 0., 0.), x, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    a = identity_preserving(x, generator=g)
    assert a.shape == x.shape and not torch.allclose(a, x)
    a2 = identity_preserving(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, a2)
    # independent per image: the same image twice in a batch gets two different transformations
    same = identity_preserving(x[:1].repeat(2, 1, 1, 1), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(same[0], same[1])

# -- the splits --------------------------------------------------------------------------------------
def test_split_counts_table():
    t = load_split_counts()
    assert t.shape == (50, 10) and (t.max(1) == 6300).all() and t.min() >= 684

def test_split_reproducible_with_correct_counts():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 70000)
    a, b = imbalanced_split(labels, 3), imbalanced_split(labels, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=10), load_split_counts()[3])
    assert len(np.unique(a)) == len(a)                                  # without replacement
    assert not np.array_equal(a, imbalanced_split(labels, 3, seed=1))
    assert not np.array_equal(np.sort(a), np.sort(imbalanced_split(labels, 4)))
    custom = imbalanced_split(labels, 0, counts=[5] * 10)
    np.testing.assert_array_equal(np.bincount(labels[custom]), [5] * 10)

def test_split_bad_inputs():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(ValueError, match='class 2 has 10 images'): imbalanced_indices(labels, [1, 1, 11])
    with pytest.raises(ValueError, match='non-negative integers'): imbalanced_indices(labels, [1, -1, 1])
    with pytest.raises(ValueError, match='non-negative integers'): imbalanced_indices(labels, [1.5, 1, 1])
    with pytest.raises(ValueError, match='labels must lie'): imbalanced_indices(labels, [1, 1])
    with pytest.raises(ValueError, match='split number'): imbalanced_split(labels, 50)
    with pytest.raises(ValueError, match='comma-separated'): parse_counts('1,a', 2)
    with pytest.raises(ValueError, match='one number per class'): parse_counts('1,2', 10)
    with pytest.raises(ValueError, match='0..49'): parse_splits('0-50')
    assert fit_counts([600, 300, 100], [50, 40, 30]).tolist() == [50, 25, 8]

# -- one training step of each variant ----------------------------------------------------------------
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_one_step_each_variant(variant):
    m = tiny(variant)
    ctx = StepContext(m.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=1)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    losses = m.train_step((torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)), ctx)
    assert all(torch.isfinite(v) for v in losses.values())
    assert ('L_trans' in losses) == (VARIANTS[variant]['lambda_2'] > 0 or VARIANTS[variant]['lambda_3'] > 0)
    moved = {k.split('.')[0] for k, v in m.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {'G', 'trunk', 'D', 'Q'} | ({'prior'} if VARIANTS[variant]['prior'] == 'gumbel' else set())

def test_d_step_touches_only_discriminator_and_gq_step_not_trunk():
    "The D update moves trunk + D head; the GQ update (after it) leaves the trunk as the D step left it."
    m = tiny('elastic')
    opts = m.configure_optimizers()
    d_params = {id(p) for g in opts['D'].param_groups for p in g['params']}
    gq_params = {id(p) for g in opts['GQ'].param_groups for p in g['params']}
    assert not d_params & gq_params
    assert {id(p) for p in m.trunk.parameters()} <= d_params and id(m.prior.logits) in gq_params

def test_ntxent_variant_step():
    m = tiny('elastic', trans_loss='ntxent')
    ctx = StepContext(m.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=1)
    assert torch.isfinite(m.train_step((torch.rand(16, 1, 8, 8),), ctx)['L_trans'])

# -- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_learned_prior(tmp_path):
    cfg = ElasticConfig(data='digits', img_size=8, steps=3, batch_size=16, progress=False, threads=1, lr_prior=0.05)
    m = build_model(cfg, TRUE)
    ds = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    res = fit(m, ds, TrainConfig(steps=3, batch_size=16, progress=False, threads=1), out_dir=tmp_path)
    learned = res.model.prior_probs.clone()
    assert not torch.allclose(learned, torch.full((10,), 0.1))        # the prior moved
    ck = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert 'prior.logits' in ck['model']
    m2 = build_model(cfg, TRUE); m2.load_state_dict(ck['model'])
    torch.testing.assert_close(m2.prior_probs, learned)
    for (k, a), b in zip(res.model.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k

# -- bad input -------------------------------------------------------------------------------------------
def test_bad_model_inputs():
    with pytest.raises(ValueError, match='prior must be'): ElasticInfoGAN(prior='beta')
    with pytest.raises(ValueError, match='true_probs'): ElasticInfoGAN(prior='true')
    with pytest.raises(ValueError, match='trans_loss'): ElasticInfoGAN(trans_loss='l2')
    with pytest.raises(ValueError, match='multiple of 4'): ElasticInfoGAN(img_size=10)
    with pytest.raises(ValueError, match='tau'): ElasticInfoGAN(tau=0.)
    with pytest.raises(ValueError, match='same shape'): info_loss(torch.zeros(4, 10), torch.zeros(4, 3))
    with pytest.raises(ValueError, match='B, C, H, W'): identity_preserving(torch.zeros(8, 8))
    with pytest.raises(ValueError, match='split must be'): ElasticConfig(split=-1)
    with pytest.raises(ValueError, match="data must be"): ElasticConfig(data='cifar')

# -- the JointVAE baseline -----------------------------------------------------------------------------
from dlatent.elastic import JointVAE, JointVAEConfig, capacity_ramp
from dlatent.distributions import kl_std_normal

def test_jointvae_kl_terms_on_constructed_posteriors():
    jv = JointVAE(img_size=8)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad(): jv.to_c.weight.zero_(); jv.to_c.bias.zero_()
    assert abs(float(jv.losses(x, 0)['KL_c'])) < 1e-6                      # uniform q(c|x): no information
    with torch.no_grad(): jv.to_c.bias[3] = 80.
    assert abs(float(jv.losses(x, 0)['KL_c']) - math.log(10)) < 1e-4        # one-hot q(c|x): log k nats
    mu, logvar, _ = jv.encode(x)
    torch.testing.assert_close(jv.losses(x, 0)['KL_z'], kl_std_normal(mu, logvar).mean())

def test_jointvae_capacities_and_loss_value():
    jv = JointVAE(img_size=8, capacity_iters=10, capacity_z=4., capacity_c=4., gamma=2.)
    assert jv.capacities(0) == (0., 0.) and jv.capacities(5) == (2., 2.)
    assert jv.capacities(10**6) == (4., math.log(10))                       # the categorical capacity stops at log k
    torch.manual_seed(0); out = jv.losses(torch.rand(8, 1, 8, 8), 5)
    want = out['L_rec'] + 2. * ((out['KL_z'] - 2.).abs() + (out["KL_c"] - 2.).abs())
    torch.testing.assert_close(out['loss'], want)

def test_jointvae_step_moves_every_network_and_tracks_class_frequencies():
    torch.manual_seed(0); jv = JointVAE(img_size=8)
    ctx = StepContext(jv.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=1)
    before = {k: v.detach().clone() for k, v in jv.named_parameters()}
    x = torch.rand(16, 1, 8, 8)
    _, _, logits = jv.encode(x)
    out = jv.train_step((x,), ctx)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert {k.split('.')[0] for k, v in jv.named_parameters() if not torch.equal(v, before[k])} == {'encoder', 'to_z', 'to_c', 'G'}
    want = 0.99 * torch.full((10,), 0.1) + 0.01 * F.softmax(logits.detach(), -1).mean(0)
    torch.testing.assert_close(jv.class_freq, want, atol=1e-6, rtol=0)     # running mean of the batch's q(c|x)

def test_jointvae_config_checkpoint_round_trip(tmp_path):
    cfg = JointVAEConfig(data='digits', img_size=8, steps=3, batch_size=16, progress=False, threads=1)
    assert capacity_ramp(cfg) == 1 and capacity_ramp(JointVAEConfig(data='digits', steps=93_750)) == 25_000
    m = build_model(cfg, TRUE)
    assert isinstance(m, JointVAE) and m.z_dim == 10 and m.lr == 5e-4
    ds = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    res = fit(m, ds, TrainConfig(steps=3, batch_size=16, progress=False, threads=1), out_dir=tmp_path)
    m2 = build_model(cfg, TRUE); m2.load_state_dict(load_checkpoint(tmp_path / 'checkpoint.pt')['model'])
    torch.testing.assert_close(m2.prior_probs, res.model.prior_probs)      # the inferred class distribution is saved
    with pytest.raises(ValueError, match='uniform prior'): JointVAEConfig(prior='gumbel')
    with pytest.raises(ValueError, match='temperature'): JointVAE(temperature=0.)
    with pytest.raises(ValueError, match='capacity_iters'): JointVAE(capacity_iters=0)

def test_jointvae_experiment_run_and_eval(tmp_path):
    from dlatent.experiments import run_experiment, evaluate_run
    tiny = ['data=digits', 'img_size=8', 'steps=6', 'batch_size=32', 'progress=false', 'threads=1', 'n_eval_per_code=10',
            'classifier_epochs=1', 'classifier_width=8']
    rd, m = run_experiment('mnist-jointvae', tiny, out=tmp_path / 'jv')
    assert {'codes.png', 'prior.png', 'count_matrix.csv', 'checkpoint.pt'} <= {p.name for p in rd.iterdir()}
    assert 0 <= m['nmi'] <= 1 and abs(sum(m['prior']) - 1) < 1e-4
    np.testing.assert_allclose(evaluate_run(rd)['prior'], m['prior'], atol=1e-6)   # `dlatent eval` rebuilds the JointVAE

def test_jointvae_config_rejects_bad_settings():
    with pytest.raises(ValueError, match='temperature'): JointVAEConfig(temperature=-1.)
    with pytest.raises(ValueError, match='capacity_iters'): JointVAEConfig(capacity_iters=-5)
    with pytest.raises(ValueError, match='gamma'): JointVAEConfig(gamma=-1.)
