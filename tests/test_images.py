"Convolutional bodies, the four image models, semi-supervised training and inpainting (dlatent.images)."
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dlatent.images import (ConvEncoder, ConvDecoder, conv_discriminator, image_arch, image_model, MODELS, inpaint_mask,
                            inpaint_images, masked_mse, split_seen, CGAN, MASKS, sample_per_class, codes)
from dlatent.dvae import DVAE
from dlatent.gm import total_gaussian_lkd
from dlatent.train import StepContext

torch.set_num_threads(1)


def _ctx(model):
    return StepContext(model.configure_optimizers(), torch.device('cpu'), torch.float32, None, steps_per_epoch=10)


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
    assert image_arch(28).sizes == [28, 14, 7, 4, 2]
    assert image_arch(32).enc_widths == (32, 64, 128, 256) and image_arch(32).enc_fc == 1024   # Table 3
    with pytest.raises(ValueError, match='size must be'): image_arch(3)
    with pytest.raises(ValueError, match='channels'): ConvEncoder(8, 0, 4)
    with pytest.raises(ValueError, match=r'\(N, 1, 8, 8\)'): ConvEncoder(8, 1, 4)(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match='model must be one of'): image_model('vae', 8, 1, 10)


@pytest.mark.parametrize('name', MODELS)
def test_one_step_each_model(name):
    torch.manual_seed(0)
    m = image_model(name, 8, 1, 10, 4, 4)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    losses = m.train_step((x, y), _ctx(m))
    assert losses and all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values())
    assert m.sample(2, 3).shape == (3, 1, 8, 8)
    xs, cs = sample_per_class(m, 2, 10)
    assert xs.shape == (20, 1, 8, 8) and cs.tolist() == [c for c in range(10) for _ in range(2)]


def test_cgan_updates_only_its_own_nets():
    torch.manual_seed(0)
    m = image_model('cgan', 8, 1, 10, 4, 4)
    assert isinstance(m, CGAN)
    ctx = _ctx(m)
    d0 = [p.detach().clone() for p in m.D.parameters()]
    g0 = [p.detach().clone() for p in m.G.parameters()]
    m.train_step((torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), ctx)
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.D.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.G.parameters()))
    with pytest.raises(ValueError, match='class indices'): m.train_step((torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 10])), ctx)


def test_semi_supervised_step():
    torch.manual_seed(0)
    m = image_model('dvae', 8, 1, 5, 4, 4, semi_supervised=True)
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
    m = image_model(name, 8, 1, 10, 4, 4)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    for kind in MASKS:
        M = inpaint_mask(8, kind)
        out = inpaint_images(m, x, M, None if name == 'dvae' else y)
        assert torch.equal(out * (1 - M), x * (1 - M))
        assert masked_mse(out, x, M) >= 0
    assert masked_mse(x, x, inpaint_mask(8, 'right')) == 0
    assert inpaint_mask(8, 'centre', 3).shape == (3, 8, 8)


def test_codes():
    m = image_model('dvae', 8, 1, 10, 4, 3)
    c = codes(m, torch.rand(7, 1, 8, 8), torch.zeros(7, dtype=torch.long))
    assert c['z_s'].shape == (7, 4) and c['z_u'].shape == (7, 3)
    assert set(codes(image_model('cvae', 8, 1, 10, 4, 3), torch.rand(7, 1, 8, 8), torch.zeros(7, dtype=torch.long))) == {'z'}


def test_experiments_registered_and_run(tmp_path):
    from dlatent.experiments import load_experiments, run_experiment, evaluate_run
    names = set(load_experiments())
    assert {f'{d}-{m}' for d in ('digits', 'mnist') for m in MODELS} <= names
    rd, metrics = run_experiment('digits-dvae', ['steps=3', 'classifier_epochs=1', 'n_per_class=13', 'n_pairs=5', 'batch_size=32'],
                                 out=tmp_path / 'dvae')
    for k in ('IS', 'diversity', 'FID', 'zs_acc', 'zu_acc', 'mse_right'): assert k in metrics
    assert (rd / 'samples.png').exists() and (rd / 'samples_class9.png').exists()
    assert (tmp_path / 'classifiers').is_dir()
    again = evaluate_run(rd)
    assert abs(again['IS'] - metrics['IS']) < 1e-6
    assert json.loads((rd / 'config.json').read_text())['experiment'] == 'digits-dvae'


def test_inception_score_of_class_ordered_samples():
    from dlatent.metrics import inception_score
    perfect = torch.nn.functional.one_hot(torch.arange(10).repeat_interleave(100), 10).float() * 0.999 + 0.0001
    assert 9 < inception_score(perfect)[0] <= 10       # class-ordered samples are shuffled before the splits
    assert inception_score(torch.full((100, 10), 0.1))[0] == pytest.approx(1.0)
