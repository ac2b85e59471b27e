"Paper 1 (DVAE): Algorithm 1's updates, semi-supervised batches, inpainting, checkpoints, input checks, baselines."
import tempfile
from pathlib import Path

import pytest
import torch

from dlatent.data import three_moons
from dlatent.dvae import DVAE, CVAE, CVAEGAN, dvae_mlp, cvaegan_mlp, MoonsConfig
from dlatent.gm import gm_losses, total_gaussian_lkd
from dlatent.train import StepContext, atomic_save, load_checkpoint, fit, TrainConfig

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
    model = dvae_mlp(n_gm=0)
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
    with torch.no_grad(): out = model.inpaint(x, mask)
    assert torch.equal(out[:, 0], x[:, 0])
    assert not torch.equal(out[:, 1], x[:, 1])
    with torch.no_grad(): out1 = model.inpaint(x, torch.tensor([1., 0.]))   # one mask for every sample
    assert torch.equal(out1[:, 1], x[:, 1])


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
        a = model.sample(1, 5, generator=torch.Generator().manual_seed(0))
        b = other.sample(1, 5, generator=torch.Generator().manual_seed(0))
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
    with pytest.raises(ValueError, match='c must'): model.sample(5, 3)
    with pytest.raises(ValueError, match='weights'): dvae_mlp(weights='swapped')
    with pytest.raises(ValueError, match='d_loss'): dvae_mlp(d_loss='wgan')
    with pytest.raises(ValueError, match='gm_decay_on'): dvae_mlp(gm_decay_on='mu')
    with pytest.raises(ValueError, match="model must be"): MoonsConfig(model='vae')
    semi = dvae_mlp(semi_supervised=True)
    with pytest.raises(ValueError, match=r'\[-1, 2\]'): semi.train_step((x, torch.full_like(y, -2)), RecordingContext(semi))


def test_uses_of_the_model_have_the_right_shapes():
    torch.manual_seed(0)
    model = dvae_mlp(z_s_dim=2, z_u_dim=3).eval()
    x, _ = _batch(6)
    with torch.no_grad():
        assert model.sample(2, 7).shape == (7, 2)
        assert model.sample(torch.tensor([0, 1, 2])).shape == (3, 2)
        assert model.traverse_z_s(1, torch.zeros(3), torch.randn(2), torch.randn(2), steps=5).shape == (5, 2)
        assert model.traverse_z_u(torch.zeros(2), torch.randn(3), torch.randn(3), steps=4).shape == (4, 2)
        assert model.cross_synthesis(x[:2], x[2:5]).shape == (2, 3, 2)
        # cross synthesis: entry (i, j) is G(z_s of x_i, z_u of x_j)
        z_s, mu_u, _ = model.encode(x)
        torch.testing.assert_close(model.cross_synthesis(x[:2], x[2:5])[1, 2], model.decode(z_s[1:2], mu_u[4:5])[0])


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
    model = cvaegan_mlp(gan=gan)
    assert isinstance(model, CVAEGAN) and isinstance(model, CVAE) != gan
    ctx = RecordingContext(model)
    losses = model.train_step(_batch(), ctx)
    assert [n for n, *_ in ctx.log] == (['enc', 'dec', 'disc'] if gan else ['enc', 'dec'])
    for name, moved, _ in ctx.log: assert moved == {name}
    assert all(torch.isfinite(v) for v in losses.values())
    x, y = _batch(5)
    with torch.no_grad():
        assert model.sample(1, 4).shape == (4, 2)
        mask = torch.tensor([0., 1.])
        assert torch.equal(model.inpaint(x, mask, y)[:, 0], x[:, 0])
    with pytest.raises(ValueError, match=r'pair \(x, y\)'): model.train_step(x, ctx)
    with pytest.raises(ValueError, match=r'\[0, 2\]'): model.train_step((x, torch.full_like(y, -1)), ctx)


def test_engine_runs_a_few_steps():
    x, y = _batch(256)
    res = fit(dvae_mlp(), torch.utils.data.TensorDataset(x, y), TrainConfig(steps=6, batch_size=32, progress=False, threads=1, log_every=3))
    assert res.step == 6 and len(res.history) == 2
