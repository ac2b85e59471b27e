"Paper 1 (DVAE): Algorithm 1's updates, semi-supervised batches, the model protocol, checkpoints, input checks, baselines, the moons experiment."
import tempfile
from pathlib import Path

import pytest
import torch

from dlatent.data.core import three_moons
from dlatent.models.base import supports
from dlatent.models.dvae import dvae_mlp, cvaegan_mlp, cvae_mlp, DVAEConfig
from dlatent.objectives.gm import gm_losses, total_gaussian_lkd
from dlatent.runtime import atomic_save, load_checkpoint
from dlatent.train import StepContext, fit, TrainConfig
from dlatent.experiments import make_config, run_experiment, load_run, UsageError
from dlatent.experiments.moons import load_snapshots

torch.set_num_threads(1)


class RecordingContext(StepContext):
    "Records, for each update, the top-level modules whose parameters changed and those that received gradients."
    def __init__(self, model):
        super().__init__(model.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=10)
        self.model, self.log = model, []

    def update(self, name, loss, retain_graph=False):
        assert torch.isfinite(loss), f'{name} loss is not finite'
        for p in self.model.parameters(): p.grad = None
        before = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        super().update(name, loss, retain_graph)
        params = dict(self.model.named_parameters())
        moved = {k.split('.')[0] for k, p in params.items() if not torch.equal(before[k], p)}
        with_grad = {k for k, p in params.items() if p.grad is not None}
        self.log.append((name, moved, with_grad))


def _batch(n=48, seed=0):
    return three_moons(n, seed=seed)


# what Algorithm 1 assigns to each optimizer
ASSIGNED = dict(gm={'enc_s', 'prior'}, psi={'enc_s'}, phi={'enc_u'}, omega={'adv_cls'}, theta={'dec'}, theta_d={'disc'})


def test_algorithm1_each_optimizer_touches_exactly_its_parameters():
    torch.manual_seed(0)
    model = dvae_mlp(n_gm=3)
    ctx = RecordingContext(model)
    losses = model.train_step(_batch(), ctx)
    assert [n for n, *_ in ctx.log] == ['gm'] * 3 + ['psi', 'phi', 'omega', 'theta', 'theta_d']
    names = dict(model.named_parameters())
    for name, moved, with_grad in ctx.log:
        assert moved == ASSIGNED[name], (name, moved)
        # gradients reached every parameter of the assigned modules and nothing else
        expected = {k for k in names if k.split('.')[0] in ASSIGNED[name]}
        assert with_grad == expected, (name, with_grad ^ expected)
    assert all(torch.isfinite(v) for v in losses.values())
    assert set(losses) == {'L_GM', 'L_rec', 'L_lkd', 'L_kl', 'L_E_adv', 'L_C_adv', 'L_D_adv', 'L_GD_adv'}


def test_second_step_has_no_stale_graph_errors_and_n_gm_zero():
    torch.manual_seed(1)
    model = dvae_mlp(DVAEConfig(n_gm=0))
    ctx = RecordingContext(model)
    for _ in range(3): model.train_step(_batch(), ctx)
    assert 'gm' not in [n for n, *_ in ctx.log]


def test_semi_supervised_step():
    torch.manual_seed(0)
    model = dvae_mlp(semi_supervised=True)
    x, y = _batch()
    y = y.clone(); y[::2] = -1
    ctx = RecordingContext(model)
    losses = model.train_step((x, y), ctx)
    assert all(torch.isfinite(v) for v in losses.values())
    assert [n for n, *_ in ctx.log] == ['gm'] * 3 + ['psi', 'phi', 'omega', 'theta', 'theta_d']
    # a fully unlabeled batch: L_GM, L_C^adv, L_E^adv and the D terms are dropped, so gm, omega and theta_d do not move
    ctx = RecordingContext(model)
    losses = model.train_step((x, torch.full_like(y, -1)), ctx)
    assert [n for n, *_ in ctx.log] == ['psi', 'phi', 'theta']
    for k in ('L_GM', 'L_E_adv', 'L_C_adv', 'L_D_adv', 'L_GD_adv'): assert losses[k] == 0, k
    # and L_lkd is the total-Gaussian likelihood of Eq. 11
    with torch.no_grad():
        z_s = model.encode_s(x)
        expected = total_gaussian_lkd(z_s, model.prior.mu, model.prior.logvar).mean()
    model_copy = dvae_mlp(semi_supervised=True); model_copy.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    out = model_copy.train_step((x, torch.full_like(y, -1)), RecordingContext(model_copy))
    torch.testing.assert_close(out['L_lkd'], expected)


def test_labeled_lkd_matches_gm_losses():
    torch.manual_seed(0)
    model = dvae_mlp(n_gm=0)
    x, y = _batch()
    with torch.no_grad(): expected = gm_losses(model.encode_s(x), y, model.prior.mu, model.prior.logvar)[1].mean()
    out = model.train_step((x, y), RecordingContext(model))
    torch.testing.assert_close(out['L_lkd'], expected)


def test_inpainting_leaves_unmasked_values_untouched():
    torch.manual_seed(0)
    model = dvae_mlp()
    x, _ = _batch(20)
    mask = torch.zeros_like(x); mask[:, 1] = 1          # corrupt (and fill in) the y coordinate only
    out = model.inpaint(x, mask)
    assert torch.equal(out[:, 0], x[:, 0])
    assert not torch.equal(out[:, 1], x[:, 1])
    assert not out.requires_grad and model.training     # inpainting runs in eval mode without gradients, then restores the mode
    out1 = model.inpaint(x, torch.tensor([1., 0.]))     # one mask for every sample
    assert torch.equal(out1[:, 1], x[:, 1])


def test_protocol_of_the_dvae():
    torch.manual_seed(0)
    model = dvae_mlp(z_s_dim=2, z_u_dim=3)
    x, y = _batch(9)
    codes = model.codes(x)
    assert {k: tuple(v.shape) for k, v in codes.items()} == {'z_s': (9, 2), 'z_u': (9, 3)}
    torch.testing.assert_close(model.codes(x, y)['z_u'], codes['z_u'])          # the label is not needed, and not used
    torch.testing.assert_close(model.representation(x), codes['z_s'])             # the label-relevant code
    with torch.no_grad(): torch.testing.assert_close(codes['z_u'], model.encode(x)[1])   # the posterior mean of z_u
    assert all(supports(model, m) for m in ('sample', 'representation', 'codes', 'inpaint'))
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(3, (50,), generator=g)
    # uniform classes when none are given: the generator draws them first, then the codes
    torch.testing.assert_close(model.sample(50, generator=torch.Generator().manual_seed(3)),
                               model.sample(50, labels, generator=g))


def test_save_load_round_trip():
    torch.manual_seed(0)
    model = dvae_mlp()
    model.train_step(_batch(), RecordingContext(model))
    x, _ = _batch(10, seed=3)
    with tempfile.TemporaryDirectory() as d:
        atomic_save({'model': model.state_dict()}, Path(d) / 'ck.pt')
        other = dvae_mlp()
        other.load_state_dict(load_checkpoint(Path(d) / 'ck.pt')['model'])
    model.eval(); other.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), other.reconstruct(x), rtol=0, atol=0)
        torch.testing.assert_close(model.classify(x), other.classify(x), rtol=0, atol=0)
        c = torch.full((5,), 1)
        a = model.sample(5, c, generator=torch.Generator().manual_seed(0))
        b = other.sample(5, c, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs():
    model = dvae_mlp()
    x, y = _batch(12)
    ctx = RecordingContext(model)
    with pytest.raises(ValueError, match=r'\[0, 2\]'): model.train_step((x, torch.full_like(y, 3)), ctx)
    with pytest.raises(ValueError, match='semi_supervised=True'): model.train_step((x, torch.full_like(y, -1)), ctx)
    with pytest.raises(ValueError, match=r'pair \(x, y\)'): model.train_step(x, ctx)
    with pytest.raises(ValueError, match=r'pair \(x, y\)'): model.train_step((x,), ctx)
    with pytest.raises(ValueError, match='integer'): model.train_step((x, y.float()), ctx)
    with pytest.raises(ValueError, match='mask'): model.inpaint(x, torch.ones(3))
    with pytest.raises(ValueError, match='z_u must have shape'): model.decode(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match='z_s must have shape'): model.decode(torch.zeros(4, 1), torch.zeros(4, 2))
    with pytest.raises(ValueError, match='same number of rows'): model.decode(torch.zeros(4, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match='z1'): model.traverse_z_s(0, torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r'labels must hold class indices in \[0, 2\]'): model.sample(3, torch.full((3,), 5))
    with pytest.raises(ValueError, match='one class per sample'): model.sample(3, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match='DVAEConfig.weights'): dvae_mlp(weights='swapped')
    with pytest.raises(ValueError, match='DVAEConfig.d_loss'): dvae_mlp(d_loss='wgan')
    with pytest.raises(ValueError, match='gm_decay_on'): dvae_mlp(gm_decay_on='mu')
    with pytest.raises(TypeError, match='z_dim'): dvae_mlp(z_dim=4)            # a key of the baselines, not of the DVAE
    with pytest.raises(UsageError, match="no model 'vae'"): make_config('moons', ['model.name=vae'])
    with pytest.raises(UsageError, match='models cvaegan, cvae use it'): make_config('moons', ['model.z_dim=4'])
    semi = dvae_mlp(semi_supervised=True)
    with pytest.raises(ValueError, match=r'\[-1, 2\]'): semi.train_step((x, torch.full_like(y, -2)), RecordingContext(semi))


def test_uses_of_the_model_have_the_right_shapes():
    torch.manual_seed(0)
    model = dvae_mlp(z_s_dim=2, z_u_dim=3).eval()
    x, _ = _batch(6)
    assert model.sample(7).shape == (7, 2)
    assert model.sample(3, torch.tensor([0, 1, 2])).shape == (3, 2)
    assert model.traverse_z_s(1, torch.zeros(3), torch.randn(2), torch.randn(2), steps=5).shape == (5, 2)
    assert model.traverse_z_u(torch.zeros(2), torch.randn(3), torch.randn(3), steps=4).shape == (4, 2)
    assert model.cross_synthesis(x[:2], x[2:5]).shape == (2, 3, 2)
    # cross synthesis: entry (i, j) is G(z_s of x_i, z_u of x_j)
    with torch.no_grad():
        z_s, mu_u, _ = model.encode(x)
        torch.testing.assert_close(model.cross_synthesis(x[:2], x[2:5])[1, 2], model.decode(z_s[1:2], mu_u[4:5])[0])
    assert model.z_u_sweep(z_s[0], 2, torch.linspace(-1, 1, 4)).shape == (4, 2)
    assert model.sweep_effects().shape == (3,)


@pytest.mark.parametrize('on', ['sigma', 'all'])
def test_gm_learning_rate_decay(on):
    model = dvae_mlp(gm_decay=0.01, gm_decay_epochs=2, gm_decay_on=on)
    opts = model.configure_optimizers()
    groups = opts['gm'].param_groups
    assert len(groups[1]['params']) == 1 and groups[1]['params'][0] is model.prior.logvar
    assert any(p is model.prior.mu for p in groups[0]['params'])
    sched = model.configure_schedulers(opts, steps_per_epoch=5)['gm']
    lrs = []
    for _ in range(12):
        lrs.append([g['lr'] for g in groups]); opts['gm'].step(); sched.step()
    assert lrs[9] == pytest.approx([5e-4, 5e-4])
    assert lrs[10] == pytest.approx([5e-6 if on == 'all' else 5e-4, 5e-6])
    assert opts['psi'].param_groups[0]['lr'] == pytest.approx(5e-4)


@pytest.mark.parametrize('gan', [True, False])
def test_baseline_steps(gan):
    torch.manual_seed(0)
    model = cvaegan_mlp() if gan else cvae_mlp()
    ctx = RecordingContext(model)
    losses = model.train_step(_batch(), ctx)
    assert [n for n, *_ in ctx.log] == (['enc', 'dec', 'disc'] if gan else ['enc', 'dec'])
    for name, moved, _ in ctx.log: assert moved == {name}
    assert all(torch.isfinite(v) for v in losses.values())
    assert set(losses) == ({'L_rec', 'L_kl', 'L_D_adv', 'L_GD_adv'} if gan else {'L_rec', 'L_kl'})
    x, y = _batch(5)
    assert model.sample(4, torch.tensor([0, 1, 2, 1])).shape == (4, 2)
    assert torch.equal(model.inpaint(x, torch.tensor([0., 1.]), y)[:, 0], x[:, 0])
    assert model.codes(x, y)['z'].shape == (5, 4)
    with pytest.raises(ValueError, match='pass `labels`'): model.codes(x)
    with pytest.raises(ValueError, match='pass `labels`'): model.inpaint(x, torch.tensor([0., 1.]))
    assert not supports(model, 'representation')          # its code is inferred given the label
    with pytest.raises(ValueError, match=r'pair \(x, y\)'): model.train_step(x, ctx)
    with pytest.raises(ValueError, match=r'\[0, 2\]'): model.train_step((x, torch.full_like(y, -1)), ctx)
    with pytest.raises(TypeError, match='d_loss'): cvae_mlp(d_loss='hinge')   # the cVAE has no discriminator


def test_engine_runs_a_few_steps():
    x, y = _batch(256)
    res = fit(dvae_mlp(), torch.utils.data.TensorDataset(x, y), TrainConfig(steps=6, batch_size=32, progress=False, threads=1, log_every=3))
    assert res.step == 6 and len(res.history) == 2


def test_moons_experiment_snapshots_metrics_and_resume(tmp_path):
    small = ['data.n_per_class=64', 'train.batch_size=16', 'eval.snapshots=1,3', 'eval.n_gen=50']
    rd, m = run_experiment('moons', small + ['train.epochs=2'], out=tmp_path / 'dvae')
    assert sorted(load_snapshots(rd)) == [1]
    assert {'gm_posterior_acc', 'zs_probe_acc', 'zu_probe_acc', 'bayes_acc', 'energy', 'y_std_ratio'} <= set(m)
    assert sorted(p.name for p in rd.glob('*.png')) == ['generated_epochs.png', 'losses.png', 'samples.png']
    run_experiment('moons', ['train.epochs=3'], out=rd, resume=True)      # the snapshot of epoch 1 is kept, epoch 3 added
    assert sorted(load_snapshots(rd)) == [1, 3]
    run = load_run(rd)
    assert not run.model.training and run.config.train.epochs == 3 and run.config.eval.n_gen == 50
    _, mc = run_experiment('moons', small + ['train.steps=4', 'model.name=cvaegan'], out=tmp_path / 'cvaegan')
    assert 'gm_posterior_acc' not in mc and 'zu_probe_acc' in mc
