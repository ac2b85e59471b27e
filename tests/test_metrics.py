"Known-answer tests of the generative-model, disentanglement and categorical-code measures."
import math
import numpy as np
import pytest, scipy.linalg, torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dlatent.metrics.quality import (inception_score, inception_score_of, ImageClassifier, train_classifier, accuracy, frechet_distance,
                             fid, fid_of, torchmetrics_fid, intra_class_diversity, pairwise_ms_ssim, ms_ssim_settings)
from dlatent.metrics.disentanglement import (FactorDataset, SyntheticFactors, FactorTable, all_factors, factor_vae_score, mig,
                                     dci_disentanglement, discretize, count_matrix, ent_score, nmi_score,
                                     match_codes_to_classes, prior_rmse)

torch.set_num_threads(1)

# ---------------------------------------------------------------- Inception Score
def test_inception_score_known_answers():
    C = 7
    one_hot = F.one_hot(torch.arange(700) % C, C).double()
    assert inception_score(one_hot, shuffle=False)[0] == pytest.approx(C, abs=1e-9)  # confident + balanced -> C
    ordered = F.one_hot(torch.arange(C).repeat_interleave(100), C).double()
    assert inception_score(ordered, splits=C, shuffle=False)[0] == pytest.approx(1.0, abs=1e-9)  # single-class parts
    assert C - 0.5 < inception_score(ordered)[0] <= C                               # shuffled before the split
    assert inception_score(ordered, seed=1) == inception_score(ordered, seed=1)
    same = torch.softmax(torch.randn(1, C, dtype=torch.float64), 1).expand(300, C)
    assert inception_score(same, splits=3)[0] == pytest.approx(1.0, abs=1e-9)     # identical -> 1
    q = 0.9
    two = torch.tensor([[q, 1 - q], [1 - q, q]], dtype=torch.float64).repeat(20, 1)
    H = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert inception_score(two, splits=1)[0] == pytest.approx(math.exp(math.log(2) - H), abs=1e-9)
    assert inception_score(two.log() - 1.5, splits=1, from_logits=True)[0] == pytest.approx(math.exp(math.log(2) - H), abs=1e-9)
    # unbalanced confident classifier: IS = exp(H(p(y)))
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    p = torch.tensor([.6, .3, .1], dtype=torch.float64)
    assert inception_score(F.one_hot(labels, 3).double(), splits=1)[0] == pytest.approx(math.exp(-(p * p.log()).sum().item()), abs=1e-9)

def test_inception_score_bad_input():
    with pytest.raises(ValueError, match='rows summing to 1'): inception_score(torch.rand(10, 3) + 0.5)
    with pytest.raises(ValueError, match='splits'): inception_score(torch.eye(3), splits=4)
    with pytest.raises(ValueError, match='NaN'): inception_score(torch.full((4, 3), float('nan')))
    with pytest.raises(ValueError, match=r'\(N, C\)'): inception_score(torch.ones(5))

# ---------------------------------------------------------------- FID
def test_frechet_distance_closed_forms():
    assert frechet_distance([1.], [[9.]], [-1.], [[4.]]) == pytest.approx(4 + 1, abs=1e-12)
    s1, s2 = np.array([2., 5., 1.]), np.array([1., 1., 7.])
    assert frechet_distance(np.zeros(3), np.diag(s1), np.zeros(3), np.diag(s2)) == pytest.approx(((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum(), abs=1e-10)
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    S1, S2, m1, m2 = A @ A.T + 0.1 * np.eye(6), B @ B.T + 0.1 * np.eye(6), rng.normal(size=6), rng.normal(size=6)
    textbook = ((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(S1 @ S2).real)
    assert frechet_distance(m1, S1, m2, S2) == pytest.approx(textbook, rel=1e-8)
    assert frechet_distance(m2, S2, m1, S1) == pytest.approx(textbook, rel=1e-8)                 # symmetric

def test_fid_on_samples():
    rng = np.random.default_rng(0)
    m1, m2 = np.zeros(3), np.array([1., 0., -1.])
    S1, S2 = np.diag([1., 2., 3.]), np.array([[2., .5, 0.], [.5, 1., 0.], [0., 0., .5]])
    a, b = rng.multivariate_normal(m1, S1, 20000), rng.multivariate_normal(m2, S2, 20000)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)
    assert fid(a, b) == pytest.approx(frechet_distance(m1, S1, m2, S2), rel=0.05)
    assert fid(torch.tensor(a), torch.tensor(b)) == pytest.approx(fid(a, b))

def test_fid_bad_input():
    x = np.random.default_rng(0).normal(size=(50, 8))
    with pytest.raises(ValueError, match='more samples than features'): fid(x[:8], x)
    with pytest.raises(ValueError, match='same network'): fid(x, x[:, :4])
    bad = x.copy(); bad[0, 0] = np.nan
    with pytest.raises(ValueError, match='NaN'): fid(x, bad)
    with pytest.raises(ValueError, match='different dimensions'): frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))

# ---------------------------------------------------------------- classifier, IS and FID of images
def _blobs(n=400, size=8, seed=0):
    "Four classes of images: a bright quadrant plus noise."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.2 * torch.rand(n, 1, size, size, generator=g)
    h = size // 2
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 0.8
    return x.clamp(0, 1), y

def test_classifier_cache_is_and_fid(tmp_path):
    x, y = _blobs()
    clf = train_classifier(TensorDataset(x, y), 4, epochs=3, cache_path=tmp_path / 'c.pt')
    assert accuracy(clf, TensorDataset(*_blobs(seed=1))) > 0.95
    again = train_classifier(TensorDataset(x, y), 4, cache_path=tmp_path / 'c.pt')         # loaded, same weights
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match='delete the file'): train_classifier(TensorDataset(x, y), 5, cache_path=tmp_path / 'c.pt')
    mean, _ = inception_score_of(x, clf, splits=2)
    assert 3.0 < mean <= 4.0 + 1e-9                  # accurate but not perfectly confident: a little below 4
    assert inception_score_of(x[:1].expand(100, -1, -1, -1), clf, splits=2)[0] == pytest.approx(1.0, abs=1e-6)
    x2, _ = _blobs(seed=2)
    noisy = (x2 + 0.5 * torch.randn(x2.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    f_same, f_noisy = fid_of(x, x2, clf), fid_of(x, noisy, clf)
    assert f_same < f_noisy
    assert torchmetrics_fid(x, noisy, clf) == pytest.approx(f_noisy, rel=1e-3)
    with pytest.raises(ValueError, match='one size'): fid_of(x, torch.zeros(10, 1, 16, 16), clf)

@pytest.mark.parametrize('size', [8, 28, 32, 64])
def test_image_classifier_sizes(size):
    net = ImageClassifier(3, 5, size)
    assert net(torch.randn(2, 3, size, size)).shape == (2, 5)
    assert net.features(torch.randn(2, 3, size, size)).shape == (2, net.num_features)
    with pytest.raises(ValueError, match='img_size'): net(torch.randn(2, 3, size + 2, size + 2))

# ---------------------------------------------------------------- intra-class diversity
def test_ms_ssim_settings_and_single_scale_is_ssim():
    assert [len(ms_ssim_settings(s)['betas']) for s in (8, 16, 32, 64, 128, 256)] == [1, 2, 3, 4, 5, 5]
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 1, 8, 8, generator=g); b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    expected = ssim(a, b, sigma=0.5, kernel_size=3, data_range=1.0, reduction='none').clamp(min=0)
    assert torch.allclose(pairwise_ms_ssim(a, b), expected, atol=1e-6)

@pytest.mark.parametrize('size', [8, 32, 64])
def test_intra_class_diversity_known_answers(size):
    g = torch.Generator().manual_seed(size)
    base = torch.rand(1, 1, size, size, generator=g).expand(10, -1, -1, -1)
    labels = torch.tensor([0] * 5 + [1] * 5)
    mean, per_class = intra_class_diversity(base, labels)
    assert mean == pytest.approx(0.0, abs=1e-6) and set(per_class) == {0, 1}
    divs = [intra_class_diversity((base + s * torch.randn(base.shape, generator=g)).clamp(0, 1), labels)[0] for s in (0.03, 0.1, 0.3)]
    assert 0 < divs[0] < divs[1] < divs[2] <= 1
    # per class: a class of identical images has 0 even when another is diverse
    mixed = torch.cat([base[:5], torch.rand(5, 1, size, size, generator=g)])
    _, pc = intra_class_diversity(mixed, labels)
    assert pc[0] == pytest.approx(0.0, abs=1e-6) and pc[1] > 0.5

def test_intra_class_diversity_pairs_and_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g); y = torch.zeros(40, dtype=torch.long)
    full, _ = intra_class_diversity(x, y, n_pairs=10_000)
    sampled, _ = intra_class_diversity(x, y, n_pairs=300, seed=1)
    assert abs(full - sampled) < 0.03
    assert intra_class_diversity(x, y, n_pairs=50, seed=5) == intra_class_diversity(x, y, n_pairs=50, seed=5)
    with pytest.raises(ValueError, match='different sizes'): intra_class_diversity([torch.rand(1, 8, 8), torch.rand(1, 9, 9)], [0, 0])
    with pytest.raises(ValueError, match='labels has'): intra_class_diversity(x, y[:5])
    with pytest.raises(ValueError, match='NaN'): intra_class_diversity(x * float('nan'), y)
    with pytest.raises(ValueError, match='two or more images'): intra_class_diversity(x[:3], torch.arange(3))

# ---------------------------------------------------------------- disentanglement
SIZES = [4, 5, 6, 3]
PERM, SCALE = np.array([2, 0, 3, 1]), np.array([1.0, 0.5, 3.0, 2.0])
def ideal(f, g): return np.concatenate([(f * SCALE)[:, np.argsort(PERM)] + 0.01 * g.normal(size=f.shape), g.normal(size=(len(f), 2))], 1)
def random_rep(f, g): return g.normal(size=(len(f), 6))
def mixed(f, g): return np.concatenate([np.stack([f[:, 0] + f[:, 1], f[:, 0] - f[:, 1]], 1), f[:, 2:] + 0.01 * g.normal(size=(len(f), 2)), g.normal(size=(len(f), 2))], 1)
REPS = dict(ideal=ideal, random=random_rep, mixed=mixed)
SMALL = dict(n_train=600, n_eval=400, n_std=2000)

def encoder(rep, seed=0):
    g = np.random.default_rng(seed)
    return lambda x: torch.as_tensor(rep(SyntheticFactors.factors_from_images(x).numpy(), g))

def test_factor_dataset_protocol():
    data = SyntheticFactors(SIZES)
    assert isinstance(data, FactorDataset) and isinstance(FactorTable(np.zeros((2, 3, 4))), FactorDataset)
    f = data.sample_factors(50, np.random.default_rng(0))
    assert (SyntheticFactors.factors_from_images(data.images_from_factors(f)).numpy() == f).all()
    assert all_factors(SIZES).shape == (np.prod(SIZES), 4)

def test_factor_vae_known_answers():
    data = SyntheticFactors(SIZES)
    s = {k: factor_vae_score(data, encoder(rep), **SMALL)['eval_accuracy'] for k, rep in REPS.items()}
    assert s['ideal'] == pytest.approx(1.0)
    assert abs(s['random'] - 0.25) < 0.1
    assert s['random'] + 0.1 < s['mixed'] < s['ideal'] - 0.1
    # the precomputed table agrees with encoding images
    t = {k: factor_vae_score(FactorTable.from_function(SIZES, lambda f: rep(f, np.random.default_rng(1))), **SMALL)['eval_accuracy'] for k, rep in REPS.items()}
    for k in REPS: assert abs(s[k] - t[k]) < 0.07, (k, s[k], t[k])
    # same seed, same score
    assert factor_vae_score(data, encoder(mixed), **SMALL) ['eval_accuracy'] == factor_vae_score(data, encoder(mixed), **SMALL)['eval_accuracy']

def test_factor_vae_pruning_and_errors():
    data = SyntheticFactors(SIZES)
    # a constant dimension has zero variance under every fixed factor: unpruned it would win every vote
    const = lambda x: torch.cat([torch.zeros(len(x), 1), encoder(ideal)(x)], 1)
    r = factor_vae_score(data, const, **SMALL)
    assert r['num_active_dims'] == 6 and r['eval_accuracy'] == pytest.approx(1.0)
    assert factor_vae_score(data, const, threshold=0.0, **SMALL)['num_active_dims'] == 6    # zero variance: always pruned
    r = factor_vae_score(data, encoder(ideal), threshold=0.8, **SMALL)      # factor 1's dimension has std 0.5 * sqrt(2)
    assert r['num_active_dims'] == 5 and r['eval_accuracy'] < 0.9
    with pytest.raises(ValueError, match='one code row per image'): factor_vae_score(data, lambda x: torch.zeros(len(x) - 1, 3), **SMALL)
    with pytest.raises(ValueError, match='NaN'): factor_vae_score(data, lambda x: torch.full((len(x), 3), float('nan')), **SMALL)
    with pytest.raises(ValueError, match='FactorDataset'): factor_vae_score([1, 2, 3], lambda x: x)

def test_mig_known_answers():
    from sklearn.metrics import mutual_info_score
    g = np.random.default_rng(0)
    f = SyntheticFactors(SIZES).sample_factors(8000, g)
    z = ideal(f, g)
    m = mig(z, f)
    zb = discretize(z)
    assert m['mutual_info'][1, 3] == pytest.approx(mutual_info_score(zb[:, 1], f[:, 3]), abs=1e-10)
    assert m['mutual_info'][PERM[2], 2] == pytest.approx(m['entropy'][2], abs=1e-10)            # a copy of v_k carries H(v_k)
    assert m['entropy'][1] == pytest.approx(mutual_info_score(f[:, 1], f[:, 1]), abs=1e-10)
    s = {k: mig(rep(f, g), f)['mig'] for k, rep in REPS.items()}
    assert s['ideal'] > 0.95 and s['random'] < 0.05 and s['random'] + 0.1 < s['mixed'] < s['ideal'] - 0.1
    with pytest.raises(ValueError, match='one code per sample'): mig(z[:-1], f)
    with pytest.raises(ValueError, match='at least 2'): mig(z[:, :1], f)

def test_dci_known_answers():
    g = np.random.default_rng(1)
    data = SyntheticFactors(SIZES)
    ftr, fte = data.sample_factors(1500, g), data.sample_factors(500, g)
    r = {k: dci_disentanglement(rep(ftr, g), ftr, rep(fte, g), fte) for k, rep in REPS.items()}
    D = {k: v['disentanglement'] for k, v in r.items()}
    assert D['ideal'] > 0.95 and r['ideal']['completeness'] > 0.95 and r['ideal']['informativeness_test'] > 0.99
    assert D['random'] < 0.15 and r['random']['informativeness_test'] < 0.35
    assert D['random'] + 0.1 < D['mixed'] < D['ideal'] - 0.1
    imp = r['ideal']['importance']
    assert (imp.argmax(1)[PERM] == np.arange(4)).all()                                       # dimension perm[k] matters for factor k
    with pytest.raises(ValueError, match='model must be'): dci_disentanglement(ideal(ftr, g), ftr, ideal(fte, g), fte, model='svm')
    with pytest.raises(ValueError, match='rows'): dci_disentanglement(ideal(ftr, g), ftr[:10], ideal(fte, g), fte)

# ---------------------------------------------------------------- categorical codes
def test_categorical_perfect_and_random():
    g = np.random.default_rng(0)
    classes = g.integers(0, 10, 20000)
    sigma = g.permutation(10)
    N = count_matrix(sigma[classes], classes, 10, 10)
    assert N.sum() == 20000 and ent_score(N) == 0.0 and nmi_score(sigma[classes], classes) == pytest.approx(1.0)
    assert (match_codes_to_classes(N)[sigma] == np.arange(10)).all()
    codes = g.integers(0, 10, 20000)
    assert ent_score(count_matrix(codes, classes, 10, 10)) == pytest.approx(math.log(10), abs=0.01)
    assert nmi_score(codes, classes) < 0.005

def test_ent_and_rmse_by_hand():
    H = lambda *p: -sum(x * math.log(x) for x in p if x > 0)
    N = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    rows = (H(.75, .25) + H(.5, .5)) / 2                          # the empty row is left out
    cols = (H(1.) + H(1 / 3, 2 / 3) + H(1.)) / 3
    assert ent_score(N) == pytest.approx((rows + cols) / 2, abs=1e-12)
    true = np.array([.5, .3, .2]); counts = np.array([[0, 9, 1], [8, 0, 0], [0, 1, 7]])      # code 0 -> class 1, 1 -> 0, 2 -> 2
    assert list(match_codes_to_classes(counts)) == [1, 0, 2]
    learned = np.array([.25, .55, .2])                           # class 0 gets .55 (true .5), class 1 .25 (.3), class 2 .2 (.2)
    assert prior_rmse(learned, true, counts) == pytest.approx(math.sqrt((.05 ** 2 + .05 ** 2 + 0) / 3), abs=1e-12)
    with pytest.raises(ValueError, match='probability vector'): prior_rmse([.5, .6, .2], true, counts)
    with pytest.raises(ValueError, match='codes must lie'): count_matrix([0, 3], [0, 1], 3, 3)
    with pytest.raises(ValueError, match='one prediction per sample'): count_matrix([0, 1], [0], 3, 3)
