"Tests of Elastic-InfoGAN and JointVAE on imbalanced data: the learned prior's gradient, the losses, the imbalanced splits, each variant's update, the protocol methods, checkpoints, the experiments' configs."
import math
import numpy as np
import pytest, torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dlatent.data.imbalanced import (identity_preserving, imbalanced_indices, imbalanced_split, load_split_counts, fit_counts,
                                     parse_counts, split_counts)
from dlatent.models.base import supports
from dlatent.models.elastic import (ElasticInfoGAN, ELASTIC_VARIANTS, ElasticBaseConfig, ElasticInfoGANConfig, GumbelInfoGANConfig,
                                    TruePriorInfoGANConfig, info_loss, trans_loss_kl, entropy_loss, nt_xent)
from dlatent.models.jointvae import JointVAE, JointVAEConfig
from dlatent.objectives.losses import g_loss
from dlatent.objectives.distributions import kl_std_normal
from dlatent.experiments.core import UsageError, make_config, run_experiment, evaluate_run, load_run
from dlatent.experiments.imbalanced import (capacity_ramp, build_imbalanced_model, imbalanced_data, parse_splits, parse_settings,
                                            IMBALANCED_EXPERIMENTS)
from dlatent.train import StepContext, TrainConfig, fit, load_checkpoint

torch.set_num_threads(1)
TRUE = torch.linspace(1, 3, 10) / torch.linspace(1, 3, 10).sum()

def tiny(variant='elastic', **kw):
    torch.manual_seed(0)
    return ElasticInfoGAN(ELASTIC_VARIANTS[variant](**kw), true_probs=TRUE, img_size=8)

def ctx_for(m):
    return StepContext(m.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=1)

# -- the learned prior -----------------------------------------------------------------------------
def test_gumbel_prior_gradient_reaches_logits_through_generator_loss():
    m = tiny('gumbel')
    c = m.sample_code(32)
    h = m.trunk(m.G(torch.randn(32, m.cfg.z_dim), c))
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
    torch.testing.assert_close(tiny('infogan-trueprior').sample_code(20000).mean(0), TRUE, atol=0.01, rtol=0)

# -- the losses --------------------------------------------------------------------------------------
def test_trans_loss_zero_when_q_invariant_and_positive_otherwise():
    lg = torch.randn(32, 10)
    assert trans_loss_kl(lg, lg).abs() < 1e-6
    assert trans_loss_kl(lg, lg + 5.).abs() < 1e-5                     # same posterior, shifted logits
    assert trans_loss_kl(lg, torch.randn(32, 10)) > 0.1
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

def test_identity_preserving_transform():
    x = torch.rand(6, 1, 16, 16)
    torch.testing.assert_close(identity_preserving(x, 0., 0., 0.), x, atol=1e-5, rtol=0)
    a = identity_preserving(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and not torch.allclose(a, x)
    torch.testing.assert_close(a, identity_preserving(x, generator=torch.Generator().manual_seed(0)))
    # independent per image: the same image twice in a batch gets two different transformations
    same = identity_preserving(x[:1].repeat(2, 1, 1, 1), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(same[0], same[1])

# -- the splits --------------------------------------------------------------------------------------
def test_split_counts_table():
    t = load_split_counts()
    assert t.shape == (50, 10) and (t.max(1) == 6300).all() and t.min() >= 684

def test_split_reproducible_with_correct_counts():
    labels = np.random.default_rng(0).integers(0, 10, 70000)
    a, b = imbalanced_split(labels, 3), imbalanced_split(labels, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=10), load_split_counts()[3])
    assert len(np.unique(a)) == len(a)                                  # without replacement
    assert not np.array_equal(a, imbalanced_split(labels, 3, seed=1))
    assert not np.array_equal(np.sort(a), np.sort(imbalanced_split(labels, 4)))
    np.testing.assert_array_equal(np.bincount(labels[imbalanced_split(labels, 0, counts=[5] * 10)]), [5] * 10)

def test_digits_counts_keep_the_split_ratios():
    want, got = load_split_counts()[2], split_counts('digits', 2)
    assert got.sum() < want.sum() and np.abs(got / got.sum() - want / want.sum()).max() < 0.01

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
@pytest.mark.parametrize('variant', list(ELASTIC_VARIANTS))
def test_one_step_each_variant(variant):
    m = tiny(variant)
    ctx = ctx_for(m)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    losses = m.train_step((torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)), ctx)
    assert all(torch.isfinite(v) for v in losses.values())
    assert ('L_trans' in losses) == (m.cfg.lambda_2 > 0 or m.cfg.lambda_3 > 0)
    moved = {k.split('.')[0] for k, v in m.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {'G', 'trunk', 'D', 'Q'} | ({'prior'} if m.cfg.prior == 'gumbel' else set())

def test_d_step_touches_only_discriminator_and_gq_step_not_trunk():
    m = tiny('elastic')
    opts = m.configure_optimizers()
    d_params = {id(p) for g in opts['D'].param_groups for p in g['params']}
    gq_params = {id(p) for g in opts['GQ'].param_groups for p in g['params']}
    assert not d_params & gq_params
    assert {id(p) for p in m.trunk.parameters()} <= d_params and id(m.prior.logits) in gq_params

def test_ntxent_variant_step():
    m = tiny('elastic', trans_loss='ntxent')
    assert torch.isfinite(m.train_step((torch.rand(16, 1, 8, 8),), ctx_for(m))['L_trans'])

def test_batch_of_wrong_image_size_is_a_clear_error():
    m = tiny('infogan')
    with pytest.raises(ValueError, match=r'built for \(1, 8, 8\)'): m.train_step((torch.rand(4, 1, 28, 28),), ctx_for(m))

# -- the model protocol ---------------------------------------------------------------------------------
def test_elastic_sample_and_representation():
    m = tiny('infogan-trueprior')
    g = lambda: torch.Generator().manual_seed(3)
    a, b = m.sample(8, torch.full((8,), 2), generator=g()), m.sample(8, torch.full((8,), 2), generator=g())
    assert a.shape == (8, 1, 8, 8) and 0 <= a.min() and a.max() <= 1 and torch.equal(a, b) and m.training
    assert not torch.allclose(a, m.sample(8, torch.full((8,), 5), generator=g()))      # same z, another code
    q = m.representation(a)
    assert q.shape == (8, 10) and torch.allclose(q.sum(1), torch.ones(8))
    assert torch.equal(m.codes(a)['c'], q) and supports(m, 'sample') and not supports(m, 'inpaint')
    with pytest.raises(ValueError, match='one class per sample'): m.sample(3, torch.tensor([0, 1]))

def test_elastic_sample_draws_codes_from_the_prior():
    "With labels=None, sample draws z, then codes from the prior p, from the generator: the same images as drawing them by hand."
    m = tiny('infogan-trueprior')
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, m.cfg.z_dim, generator=g)
    codes = torch.multinomial(m.prior_probs, 4000, replacement=True, generator=g)
    with torch.no_grad():
        want = m.eval().G(z, F.one_hot(codes, 10).float()); m.train()
    torch.testing.assert_close(m.sample(4000, generator=torch.Generator().manual_seed(0)), want)
    torch.testing.assert_close(torch.bincount(codes, minlength=10) / 4000., TRUE, atol=0.02, rtol=0)

def test_jointvae_sample_and_representation():
    torch.manual_seed(0); jv = JointVAE(img_size=8)
    x = jv.sample(5, torch.arange(5), generator=torch.Generator().manual_seed(0))
    r = jv.representation(x)
    assert x.shape == (5, 1, 8, 8) and r.shape == (5, 10 + 10)
    c = jv.codes(x)
    torch.testing.assert_close(r, torch.cat([c['z'], c['c']], 1)); torch.testing.assert_close(c['c'].sum(1), torch.ones(5))
    assert jv.sample(4).shape == (4, 1, 8, 8)

# -- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_learned_prior(tmp_path):
    cfg = make_config('mnist-gumbel', ['data.data=digits', 'data.img_size=8', 'model.lr_prior=0.05'])
    data = imbalanced_data(cfg)
    m = build_imbalanced_model(cfg, data)
    ds = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    res = fit(m, ds, TrainConfig(steps=3, batch_size=16, progress=False, threads=1), out_dir=tmp_path)
    learned = res.model.prior_probs.clone()
    assert not torch.allclose(learned, torch.full((10,), 0.1))        # the prior moved
    ck = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert 'prior.logits' in ck['model']
    m2 = build_imbalanced_model(cfg, data); m2.load_state_dict(ck['model'])
    torch.testing.assert_close(m2.prior_probs, learned)
    for (k, a), b in zip(res.model.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k

# -- bad input -------------------------------------------------------------------------------------------
def test_bad_model_inputs():
    with pytest.raises(ValueError, match='prior must be'): ElasticBaseConfig(prior='beta')
    with pytest.raises(ValueError, match='true_probs'): ElasticInfoGAN(TruePriorInfoGANConfig())
    with pytest.raises(ValueError, match='trans_loss'): GumbelInfoGANConfig(trans_loss='l2')
    with pytest.raises(ValueError, match='multiple of 4'): ElasticInfoGAN(img_size=10)
    with pytest.raises(ValueError, match='tau'): ElasticInfoGANConfig(tau=0.)
    with pytest.raises(ValueError, match='same shape'): info_loss(torch.zeros(4, 10), torch.zeros(4, 3))
    with pytest.raises(ValueError, match='B, C, H, W'): identity_preserving(torch.zeros(8, 8))
    with pytest.raises(UsageError, match='split must be'): make_config('mnist-elastic', ['data.split=-1'])
    with pytest.raises(UsageError, match='data must be'): make_config('mnist-elastic', ['data.data=cifar'])

# -- the experiments' configs -----------------------------------------------------------------------------
def test_each_experiment_defaults_to_its_model_and_keeps_the_old_keys():
    for name in IMBALANCED_EXPERIMENTS:
        cfg = make_config(name)
        assert cfg.model_name == name[len('mnist-'):] and cfg.train.epochs == 200 and cfg.train.batch_size == 64
    cfg = make_config('mnist-infogan-trueprior-trans', ['model.lambda_2=3', 'data.counts=' + ','.join(['100'] * 10), 'eval.eval_seed=2'])
    assert (cfg.model.prior, cfg.model.lambda_2, cfg.model.lambda_3, cfg.eval.eval_seed) == ('true', 3., 0., 2)

def test_jointvae_section_rejects_elastic_only_keys():
    "JointVAEConfig once accepted tau, rotation, lambda_1 and trans_loss and ignored them; now each is an error listing the valid keys."
    with pytest.raises(UsageError) as e: make_config('mnist-jointvae', ['model.tau=0.5'])
    msg = str(e.value)
    assert "model 'jointvae' has no setting 'tau'" in msg
    assert 'valid keys: model.z_dim, model.lr, model.beta1, model.beta2, model.temperature, model.capacity_z, model.capacity_c, ' \
           'model.capacity_iters, model.gamma, model.freq_momentum' in msg
    for key in ('rotation', 'lambda_1', 'trans_loss', 'prior', 'lambda_2'):
        with pytest.raises(UsageError, match='valid keys'): make_config('mnist-jointvae', [f'model.{key}=1'])

def test_protocol_settings_reach_only_the_models_that_have_them():
    assert parse_settings('lr_prior=1e-3,gamma=2') == {'lr_prior': '1e-3', 'gamma': '2'}
    with pytest.raises(ValueError, match='none of the models'): parse_settings('beta=2')
    with pytest.raises(UsageError, match="\\['vae'\\]"): make_config('mnist-protocol', ['model.models=mnist-elastic,vae'])
    with pytest.raises(UsageError, match="\\['mnist-protocol'\\]"): make_config('mnist-protocol', ['model.models=mnist-protocol'])

# -- the JointVAE baseline -----------------------------------------------------------------------------
def test_jointvae_kl_terms_on_constructed_posteriors():
    jv = JointVAE(img_size=8)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad(): jv.to_c.weight.zero_(); jv.to_c.bias.zero_()
    assert abs(float(jv.losses(x, 0)['KL_c'].detach())) < 1e-6                      # uniform q(c|x): no information
    with torch.no_grad(): jv.to_c.bias[3] = 80.
    assert abs(float(jv.losses(x, 0)['KL_c'].detach()) - math.log(10)) < 1e-4        # one-hot q(c|x): log k nats
    mu, logvar, _ = jv.encode(x)
    torch.testing.assert_close(jv.losses(x, 0)['KL_z'], kl_std_normal(mu, logvar).mean())

def test_jointvae_capacities_and_loss_value():
    jv = JointVAE(JointVAEConfig(capacity_iters=10, capacity_z=4., capacity_c=4., gamma=2.), img_size=8)
    assert jv.capacities(0) == (0., 0.) and jv.capacities(5) == (2., 2.)
    assert jv.capacities(10**6) == (4., math.log(10))                       # the categorical capacity stops at log k
    torch.manual_seed(0); out = jv.losses(torch.rand(8, 1, 8, 8), 5)
    torch.testing.assert_close(out['loss'], out['L_rec'] + 2. * ((out['KL_z'] - 2.).abs() + (out['KL_c'] - 2.).abs()))

def test_jointvae_bf16_autocast_keeps_the_reconstruction_in_float32():
    torch.manual_seed(0); jv = JointVAE(img_size=8)
    x = torch.rand(8, 1, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16): out = jv.losses(x, 0)
    assert out['L_rec'].dtype == torch.float32 and torch.isfinite(out['loss'])

def test_jointvae_step_moves_every_network_and_tracks_class_frequencies():
    torch.manual_seed(0); jv = JointVAE(img_size=8)
    ctx = ctx_for(jv)
    before = {k: v.detach().clone() for k, v in jv.named_parameters()}
    x = torch.rand(16, 1, 8, 8)
    _, _, logits = jv.encode(x)
    out = jv.train_step((x,), ctx)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert {k.split('.')[0] for k, v in jv.named_parameters() if not torch.equal(v, before[k])} == {'encoder', 'to_z', 'to_c', 'G'}
    want = 0.99 * torch.full((10,), 0.1) + 0.01 * F.softmax(logits.detach(), -1).mean(0)
    torch.testing.assert_close(jv.class_freq, want, atol=1e-6, rtol=0)     # running mean of the batch's q(c|x)

def test_jointvae_capacity_ramp_and_checkpoint_round_trip(tmp_path):
    cfg = make_config('mnist-jointvae', ['data.data=digits', 'data.img_size=8', 'train.steps=3', 'train.batch_size=16'])
    assert capacity_ramp(cfg.train, 1000) == 1 and capacity_ramp(TrainConfig(steps=93_750), 1000) == 25_000
    data = imbalanced_data(cfg)
    m = build_imbalanced_model(cfg, data)
    assert m.cfg.capacity_iters == 1 and m.cfg.z_dim == 10 and m.cfg.lr == 5e-4 and cfg.model.capacity_iters == 0
    ds = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    res = fit(m, ds, TrainConfig(steps=3, batch_size=16, progress=False, threads=1), out_dir=tmp_path)
    m2 = build_imbalanced_model(cfg, data); m2.load_state_dict(load_checkpoint(tmp_path / 'checkpoint.pt')['model'])
    torch.testing.assert_close(m2.prior_probs, res.model.prior_probs)      # the inferred class distribution is saved
    with pytest.raises(ValueError, match='temperature'): JointVAEConfig(temperature=0.)
    with pytest.raises(ValueError, match='capacity_iters'): JointVAE(JointVAEConfig(capacity_iters=0))

def test_jointvae_experiment_run_eval_and_load(tmp_path):
    tiny = ['data.data=digits', 'data.img_size=8', 'train.steps=6', 'train.batch_size=32', 'train.progress=false', 'train.threads=1',
            'eval.n_eval_per_code=10', 'eval.classifier_epochs=1', 'eval.classifier_width=8']
    rd, m = run_experiment('mnist-jointvae', tiny, out=tmp_path / 'jv')
    assert {'codes.png', 'prior.png', 'count_matrix.csv', 'checkpoint.pt'} <= {p.name for p in rd.iterdir()}
    assert 0 <= m['nmi'] <= 1 and abs(sum(m['prior']) - 1) < 1e-4 and m['steps'] == 6
    np.testing.assert_allclose(evaluate_run(rd)['prior'], m['prior'], atol=1e-6)   # `dlatent eval` rebuilds the JointVAE
    run = load_run(rd)
    assert run.model.representation(run.model.sample(2)).shape == (2, 20) and not run.model.training

def test_jointvae_config_rejects_bad_settings():
    with pytest.raises(ValueError, match='temperature'): JointVAEConfig(temperature=-1.)
    with pytest.raises(ValueError, match='capacity_iters'): JointVAEConfig(capacity_iters=-5)
    with pytest.raises(ValueError, match='gamma'): JointVAEConfig(gamma=-1.)
