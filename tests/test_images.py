"Convolutional bodies, the four image models, codes, semi-supervised training, inpainting and the digits/MNIST experiments."
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from dlatent.networks.conv import ConvEncoder, ConvDecoder, conv_discriminator, image_arch
from dlatent.models.base import supports
from dlatent.models.dvae import IMAGE_MODELS, image_dvae, image_cvae
from dlatent.metrics.probes import model_codes
from dlatent.experiments.images import (inpaint_mask, inpaint_images, masked_mse, split_seen, MASKS, sample_per_class,
                                        ImageSplits, build_image_model)
from dlatent.objectives.gm import total_gaussian_lkd
from dlatent.train import StepContext

torch.set_num_threads(1)
SMALL = dict(dvae=dict(z_s_dim=4, z_u_dim=4), cvaegan=dict(z_dim=8), cvae=dict(z_dim=8), cgan=dict(z_dim=8))


def _ctx(model):
    return StepContext(model.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=10)


def _model(name, n_classes=10, **kw):
    return IMAGE_MODELS[name](None, 8, 1, n_classes, **{**SMALL[name], **kw})


@pytest.mark.parametrize('size', [8, 28, 32])
@pytest.mark.parametrize('channels', [1, 3])
def test_conv_shapes(size, channels):
    x = torch.rand(3, channels, size, size)
    enc, dec = ConvEncoder(size, channels, 6), ConvDecoder(size, channels, 6)
    assert enc(x).shape == (3, 6)
    out = dec(torch.randn(3, 6))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert conv_discriminator(size, channels, 10)(x, torch.tensor([0, 5, 9])).shape == (3,)


def test_arch_and_errors():
    from dlatent.experiments import make_config, UsageError
    assert image_arch(28).sizes == [28, 14, 7, 4, 2]
    assert image_arch(32).enc_widths == (32, 64, 128, 256) and image_arch(32).enc_fc == 1024   # Table 3
    with pytest.raises(ValueError, match='size must be'): image_arch(3)
    with pytest.raises(ValueError, match='channels'): ConvEncoder(8, 0, 4)
    with pytest.raises(ValueError, match=r'\(N, 1, 8, 8\)'): ConvEncoder(8, 1, 4)(torch.rand(2, 1, 28, 28))
    with pytest.raises(UsageError, match="no model 'vae'"): make_config('digits-dvae', ['model.name=vae'])


@pytest.mark.parametrize('name', list(IMAGE_MODELS))
def test_one_step_each_model(name):
    torch.manual_seed(0)
    m = _model(name)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    losses = m.train_step((x, y), _ctx(m))
    assert losses and all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values())
    assert m.sample(3, torch.full((3,), 2)).shape == (3, 1, 8, 8)
    xs, cs = sample_per_class(m, 2, 10)
    assert xs.shape == (20, 1, 8, 8) and cs.tolist() == [c for c in range(10) for _ in range(2)]
    assert m.training                                  # sampling runs in eval mode and restores the training mode


def test_cgan_updates_only_its_own_nets():
    torch.manual_seed(0)
    m = _model('cgan')
    ctx = _ctx(m)
    assert sorted(ctx.optimizers) == ['D', 'G'] and not supports(m, 'codes') and not supports(m, 'inpaint')
    d0 = [p.detach().clone() for p in m.D.parameters()]
    g0 = [p.detach().clone() for p in m.G.parameters()]
    m.train_step((torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), ctx)
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.D.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.G.parameters()))
    with pytest.raises(ValueError, match='class indices'): m.train_step((torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 10])), ctx)


def test_semi_supervised_step():
    torch.manual_seed(0)
    m = image_dvae(None, 8, 1, 5, z_s_dim=4, z_u_dim=4, semi_supervised=True)
    x = torch.rand(12, 1, 8, 8)
    # an all-unlabelled batch: L_GM, the adversaries and the discriminator are skipped; L_lkd uses the total Gaussian (Eq. 11)
    expected_lkd = total_gaussian_lkd(m.encode_s(x), m.prior.mu, m.prior.logvar).mean()
    disc0 = [p.detach().clone() for p in m.disc.parameters()]
    losses = m.train_step((x, torch.full((12,), -1)), _ctx(m))
    assert all(float(losses[k].detach()) == 0 for k in ('L_GM', 'L_D_adv', 'L_C_adv'))
    assert torch.allclose(losses['L_lkd'], expected_lkd, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(disc0, m.disc.parameters()))
    # a mixed batch trains every term
    y = torch.tensor([0, 1, 2, 3, 4, 0, -1, -1, -1, -1, -1, -1])
    losses = m.train_step((x, y), _ctx(m))
    assert all(torch.isfinite(v) for v in losses.values()) and losses['L_GM'].item() > 0 and losses['L_D_adv'].detach().item() > 0


def test_split_seen():
    x, y = torch.rand(10, 1, 8, 8), torch.arange(10)
    lab, unl = split_seen(TensorDataset(x, y), seen=(0, 1, 2, 3, 4))
    assert lab.tensors[1].tolist() == [0, 1, 2, 3, 4] and unl.tensors[1].tolist() == [-1] * 5
    assert torch.equal(unl.tensors[0], x[5:])
    with pytest.raises(ValueError, match='seen'): split_seen(TensorDataset(x, y), seen=range(10))


@pytest.mark.parametrize('name', ['dvae', 'cvaegan', 'cvae'])
def test_inpainting_leaves_unmasked_pixels(name):
    torch.manual_seed(0)
    m = _model(name)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    for kind in MASKS:
        M = inpaint_mask(8, kind)
        out = inpaint_images(m, x, M, None if name == 'dvae' else y)
        assert torch.equal(out * (1 - M), x * (1 - M))
        assert masked_mse(out, x, M) >= 0
    assert masked_mse(x, x, inpaint_mask(8, 'right')) == 0
    assert inpaint_mask(8, 'centre', 3).shape == (3, 8, 8)
    if name != 'dvae':
        with pytest.raises(ValueError, match='pass `labels`'): inpaint_images(m, x, inpaint_mask(8, 'right'))


def test_inpainting_needs_an_encoder():
    with pytest.raises(ValueError, match='has none'): inpaint_images(_model('cgan'), torch.rand(2, 1, 8, 8), inpaint_mask(8, 'right'))


def test_codes():
    m = _model('dvae', z_s_dim=4, z_u_dim=3)
    x = torch.rand(7, 1, 8, 8)
    c = model_codes(m, x, batch_size=3)
    assert c['z_s'].shape == (7, 4) and c['z_u'].shape == (7, 3)
    torch.testing.assert_close(c['z_s'], m.representation(x))
    assert set(model_codes(image_cvae(None, 8, 1, 10, z_dim=7), x, torch.zeros(7, dtype=torch.long))) == {'z'}
    with pytest.raises(ValueError, match='pass `labels`'): model_codes(image_cvae(None, 8, 1, 10, z_dim=7), x)
    assert model_codes(_model('cgan'), x) == {}


def test_models_are_sized_by_the_data():
    from dlatent.experiments import make_config
    data = ImageSplits('toy', lambda split: TensorDataset(torch.rand(40, 3, 12, 12), torch.arange(40) % 4))
    for name in IMAGE_MODELS:
        m = build_image_model(make_config('digits-dvae', [f'model.name={name}']), data)
        assert m.sample(2, torch.tensor([0, 3])).shape == (2, 3, 12, 12)
        assert m.n_classes == 4


def test_experiments_registered_and_run(tmp_path):
    from dlatent.experiments import load_experiments, run_experiment, evaluate_run, load_run
    names = set(load_experiments())
    assert {f'{d}-{m}' for d in ('digits', 'mnist') for m in IMAGE_MODELS} <= names
    small = ['train.steps=3', 'eval.classifier_epochs=1', 'eval.n_per_class=13', 'eval.n_pairs=5', 'train.batch_size=32']
    rd, metrics = run_experiment('digits-dvae', small, out=tmp_path / 'dvae')
    for k in ('IS', 'diversity', 'FID', 'zs_acc', 'zu_acc', 'mse_right'): assert k in metrics
    assert (rd / 'samples.png').exists() and (rd / 'samples_class9.png').exists()
    assert (tmp_path / 'classifiers').is_dir()
    again = evaluate_run(rd)
    assert abs(again['IS'] - metrics['IS']) < 1e-6
    assert json.loads((rd / 'config.json').read_text())['experiment'] == 'digits-dvae'
    run = load_run(rd)
    assert run.config.model_name == 'dvae' and run.model.x_shape == (1, 8, 8) and not run.model.training
    _, m2 = run_experiment('digits-dvae', small + ['model.name=cvae'], out=tmp_path / 'cvae')
    assert 'z_acc' in m2 and 'zs_acc' not in m2 and 'mse_right' in m2


def test_mnist_experiments_configure_without_data():
    from dlatent.experiments import make_config, build_run
    cfg = make_config('mnist-cgan', ['data.mnist_root=/nowhere'])
    assert (cfg.model_name, cfg.model.z_dim, cfg.train.epochs, cfg.eval.classifier_epochs) == ('cgan', 32, 20, 5)
    with pytest.raises(FileNotFoundError, match='MNIST'): build_run(cfg)


def test_inception_score_of_class_ordered_samples():
    from dlatent.metrics.quality import inception_score
    perfect = torch.nn.functional.one_hot(torch.arange(10).repeat_interleave(100), 10).float() * 0.999 + 0.0001
    assert 9 < inception_score(perfect)[0] <= 10       # class-ordered samples are shuffled before the splits
    assert inception_score(torch.full((100, 10), 0.1))[0] == pytest.approx(1.0)


def test_real_scores_split_size_sets_the_inception_score_splits():
    "The reference row's IS in one split equals exp(H(p(y)) - E H(p(y|x))) over all held-out images; split_size sets the parts."
    from dlatent.data.core import digits_dataset
    from dlatent.metrics.quality import train_classifier, class_probs
    from dlatent.experiments.images import real_scores
    train, test = digits_dataset('train'), digits_dataset('test')
    clf = train_classifier(train, 10, epochs=1, seed=0)
    p = class_probs(clf, test.tensors[0]).double()
    H = lambda q: -(q * q.clamp_min(1e-300).log()).sum(-1)
    one = real_scores(train, test, clf, n_pairs=20, split_size=len(test))
    assert one['IS'] == pytest.approx(float(torch.exp(H(p.mean(0)) - H(p).mean())), rel=1e-6) and one['IS_std'] == 0
    ten = real_scores(train, test, clf, n_pairs=20)                       # the default: 10 splits of about 36
    three = real_scores(train, test, clf, n_pairs=20, split_size=100)     # 3 splits of about 120, the models' split size
    assert ten['IS'] < three['IS'] < one['IS'] + 1e-9, "smaller splits estimate p(y) worse and lower the score"
