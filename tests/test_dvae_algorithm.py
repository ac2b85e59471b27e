"""Paper 1's Algorithm 1 in the DVAE's training step: a fresh batch for each GM step (line 3) and for stage 2 (line 10),
and the loss weights of each update as `dvae_weights` documents them ('paper' as printed, 'code' as the authors' code)."""
import pytest
import torch

from dlatent.data.core import three_moons
from dlatent.models.dvae import dvae_mlp, cvae_mlp, cvaegan_mlp, image_dvae, dvae_weights
from dlatent.train import StepContext, TrainConfig, fit


class LossContext(StepContext):
    "A StepContext that keeps the loss of every update, by optimizer name (a list: the GM stage updates n_gm times)."
    def __init__(self, model):
        super().__init__(model.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=10)
        self.losses = []

    def update(self, name, loss, retain_graph=False):
        self.losses.append((name, loss.detach().clone()))
        super().update(name, loss, retain_graph)

    def of(self, name):
        return [l for n, l in self.losses if n == name]


def _inputs_seen(model, module_name):
    "Record the inputs of `model.<module_name>` (a list that grows with each call)."
    seen = []
    getattr(model, module_name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def _batches(k, n=24, seed=0):
    x, y = three_moons(k * n, seed=seed)
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(k)]


def test_each_gm_step_and_stage_2_see_their_own_batch():
    torch.manual_seed(0)
    model = dvae_mlp(n_gm=3)
    assert model.batches_per_step == 4
    batches = _batches(4)
    enc_s, enc_u, disc = (_inputs_seen(model, m) for m in ('enc_s', 'enc_u', 'disc'))
    ctx = LossContext(model)
    model.train_step(batches, ctx)
    assert [n for n, _ in ctx.losses] == ['gm'] * 3 + ['psi', 'phi', 'omega', 'theta', 'theta_d']
    # Encoder^s: once per GM step on batches 0, 1, 2, then once in stage 2 on batch 3
    assert len(enc_s) == 4
    for seen, (x, _) in zip(enc_s, batches): torch.testing.assert_close(seen, x)
    # Encoder^u and the discriminator's real half only in stage 2, on batch 3
    assert len(enc_u) == 1 and torch.equal(enc_u[0], batches[3][0])
    assert torch.equal(disc[0][:24], batches[3][0])
    # four different batches
    assert all(not torch.equal(enc_s[i], enc_s[j]) for i in range(4) for j in range(i + 1, 4))


def test_one_batch_given_directly_serves_every_step():
    "Called with one pair (a loop of one's own), train_step cannot draw more data: that batch serves every step."
    torch.manual_seed(0)
    model = dvae_mlp(n_gm=3)
    x, y = three_moons(64, seed=1)
    enc_s = _inputs_seen(model, 'enc_s')
    model.train_step((x, y), LossContext(model))
    assert len(enc_s) == 4 and all(torch.equal(t, x) for t in enc_s)


def test_fresh_batches_false_reuses_one_batch_and_n_gm_zero():
    torch.manual_seed(0)
    model = dvae_mlp(n_gm=2, fresh_batches=False)
    assert model.batches_per_step == 1
    x, y = three_moons(30, seed=2)
    enc_s = _inputs_seen(model, 'enc_s')
    model.train_step((x, y), LossContext(model))
    assert len(enc_s) == 3 and all(torch.equal(t, x) for t in enc_s)
    model0 = dvae_mlp(n_gm=0)
    assert model0.batches_per_step == 1
    ctx = LossContext(model0)
    model0.train_step((x, y), ctx)
    assert 'gm' not in [n for n, _ in ctx.losses]


def test_bad_batches_are_refused_clearly():
    model = dvae_mlp(n_gm=3)
    with pytest.raises(ValueError, match='batches_per_step=4'):
        model.train_step(_batches(2), LossContext(model))


def test_semi_supervised_gm_steps_use_the_labeled_rows_of_their_own_batch():
    torch.manual_seed(0)
    model = dvae_mlp(n_gm=3, semi_supervised=True)
    batches = _batches(4)
    batches[1] = (batches[1][0], torch.full_like(batches[1][1], -1))        # the second GM batch has no label
    batches[2][1][::2] = -1
    enc_s = _inputs_seen(model, 'enc_s')
    ctx = LossContext(model)
    model.train_step(batches, ctx)
    assert [n for n, _ in ctx.losses].count('gm') == 2                       # the unlabeled GM batch is skipped
    torch.testing.assert_close(enc_s[0], batches[0][0])
    torch.testing.assert_close(enc_s[1], batches[2][0][1::2])               # its labeled rows only
    torch.testing.assert_close(enc_s[2], batches[3][0])                      # stage 2 on the whole last batch


def test_engine_hands_each_iteration_its_own_consecutive_batches():
    "fit gives the DVAE n_gm + 1 fresh batches per iteration (GroupedStream), of train.batch_size rows each, and resumes exactly."
    from dlatent.train import BatchStream, GroupedStream
    torch.manual_seed(0)
    model = dvae_mlp()
    x, y = three_moons(256, seed=0)
    enc_s = _inputs_seen(model, 'enc_s')
    res = fit(model, torch.utils.data.TensorDataset(x, y), TrainConfig(steps=2, batch_size=16, threads=1, progress=False, log_every=1))
    assert res.step == 2 and all(torch.isfinite(torch.tensor(v)) for r in res.history.rows for k, v in r.items() if k.startswith('L_'))
    assert len(enc_s) == 8 and all(len(t) == 16 for t in enc_s)
    seen = torch.cat(enc_s)                                   # 8 batches of 16 distinct rows: one epoch's order, none repeated
    assert len(torch.unique(seen, dim=0)) == 128
    base = BatchStream(torch.utils.data.TensorDataset(x, y), 16, torch.device('cpu'), seed=0)
    first = next(base.from_step(0))[0]
    assert torch.equal(enc_s[0], first)                       # the first GM step on the stream's first batch
    grouped = GroupedStream(base, 4)
    assert grouped.steps_per_epoch == 4
    whole = grouped.from_step(0)
    run = [next(whole) for _ in range(9)]                     # two epochs and one step: 16 batches, each epoch one pass
    for s in (1, 4, 5, 8):                                    # resuming at any step gives what the uninterrupted stream gives
        assert all(torch.equal(a[0], b[0]) for a, b in zip(run[s], next(grouped.from_step(s))))
    assert len(torch.unique(torch.cat([b[0] for g in run[4:8] for b in g]), dim=0)) == 256     # epoch 1: every row once
    odd = GroupedStream(BatchStream(torch.utils.data.TensorDataset(*three_moons(300, seed=3)), 16, torch.device('cpu')), 4)
    assert (odd.stream.steps_per_epoch, odd.steps_per_epoch) == (18, 4)          # two batches of each epoch are skipped
    whole = odd.from_step(0); run = [next(whole) for _ in range(9)]
    for s in (3, 4, 7, 8): assert all(torch.equal(a[0], b[0]) for a, b in zip(run[s], next(odd.from_step(s))))
    assert torch.equal(run[4][0][0], next(odd.stream.from_step(18))[0])           # epoch 1 starts at the base stream's epoch 1
    with pytest.raises(ValueError, match='lower train.batch_size'):
        GroupedStream(BatchStream(torch.utils.data.TensorDataset(x, y), 128, torch.device('cpu')), 4)


# -- the loss weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize('weights', ['code', 'paper'])
def test_dvae_update_losses_have_the_documented_weights(weights):
    torch.manual_seed(0)
    model = dvae_mlp(weights=weights)                                       # N_pixel = 2, N_zu = 2
    ctx = LossContext(model)
    out = model.train_step(_batches(4), ctx)
    if weights == 'code':     # 10 x mean squared error = 10 L_rec here; KL averaged over 2 dims; 10 x 0.1 L_lkd
        psi, phi, theta = 10 * out['L_rec'] + 1.0 * out['L_lkd'], out['L_E_adv'] + 0.5 * out['L_kl'] + 10 * out['L_rec'], 10 * out['L_rec'] + out['L_GD_adv']
    else:                     # as printed: L_rec + 0.1 L_lkd; lambda_kl = 10/N_pixel = 5, lambda_rec = 1/N_zu = 0.5; L_rec + L_GD
        psi, phi, theta = out['L_rec'] + 0.1 * out['L_lkd'], out['L_E_adv'] + 5 * out['L_kl'] + 0.5 * out['L_rec'], out['L_rec'] + out['L_GD_adv']
    torch.testing.assert_close(ctx.of('psi')[0], psi)
    torch.testing.assert_close(ctx.of('phi')[0], phi)
    torch.testing.assert_close(ctx.of('theta')[0], theta)
    torch.testing.assert_close(ctx.of('omega')[0], out['L_C_adv'])
    torch.testing.assert_close(ctx.of('theta_d')[0], out['L_D_adv'])
    torch.testing.assert_close(ctx.of('gm')[-1], out['L_GM'])


def test_code_weights_are_ten_times_the_mean_squared_error_on_images():
    torch.manual_seed(0)
    model = image_dvae(None, 8, 1, 3, z_s_dim=2, z_u_dim=4)                 # N_pixel = 64, N_zu = 4
    assert model.loss_weights == dict(kl=1 / 4, rec=20 / 64, rec_psi=20 / 64, lkd_psi=1.0, rec_theta=20 / 64)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 3
    with torch.no_grad():
        z_s, mu, _ = model.encode(x)
        x_f = model.decode(z_s, mu)
        L_rec = 0.5 * ((x - x_f) ** 2).flatten(1).sum(1).mean()
        torch.testing.assert_close(model.loss_weights['rec'] * L_rec, 10 * ((x - x_f) ** 2).mean())
    # explicit weights override the convention, one by one
    m = image_dvae(None, 8, 1, 3, lambda_rec_psi=2.0, lambda_lkd_psi=0.5, lambda_rec_theta=3.0, lambda_kl=0.1, lambda_rec=0.2)
    assert m.loss_weights == dict(kl=0.1, rec=0.2, rec_psi=2.0, lkd_psi=0.5, rec_theta=3.0)


@pytest.mark.parametrize('build', [cvae_mlp, cvaegan_mlp])
@pytest.mark.parametrize('weights', ['code', 'paper'])
def test_baseline_update_losses_have_the_documented_weights(build, weights):
    torch.manual_seed(0)
    model = build(weights=weights)                                          # N_pixel = 2, N_z = 4
    w = dvae_weights(weights, 2, 4)
    ctx = LossContext(model)
    out = model.train_step(_batches(1)[0], ctx)
    torch.testing.assert_close(ctx.of('enc')[0], w['kl'] * out['L_kl'] + w['rec'] * out['L_rec'])
    torch.testing.assert_close(ctx.of('dec')[0], w['rec_theta'] * out['L_rec'] + out.get('L_GD_adv', 0))
    assert w['rec_theta'] == (10.0 if weights == 'code' else 1.0)
