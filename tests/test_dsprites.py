"Fast checks of the dSprites renderer, cache and dataset (small subsets only; the full set is never rendered)."
import numpy as np, pytest, torch
from dlatent.data.dsprites import (N_IMAGES, FACTOR_SIZES, LATENT_SIZES, DSprites, factors_to_index, index_to_factors,
    latents_classes, latents_values, render_packed, render_reference, render_block, unpack, sprite_colors,
    save_packed, load_packed, cache_path, dsprites_cache_dir, dsprites_tensor_dataset, subset_indices)

def test_factor_grid():
    assert N_IMAGES == 737_280 == int(np.prod(LATENT_SIZES))
    assert list(FACTOR_SIZES) == [3, 6, 40, 32, 32] and DSprites.factor_sizes == [3, 6, 40, 32, 32]
    idx = np.random.default_rng(0).integers(0, N_IMAGES, 5000)
    np.testing.assert_array_equal(factors_to_index(index_to_factors(idx)), idx)
    assert latents_classes([1])[0].tolist() == [0, 0, 0, 0, 0, 1]
    assert latents_classes([1024])[0].tolist() == [0, 0, 0, 1, 0, 0]
    np.testing.assert_allclose(latents_values([N_IMAGES - 1])[0], [1, 3, 1, 2 * np.pi, 1, 1])

def test_renderer_matches_definition_and_sizes():
    idx = np.random.default_rng(1).integers(0, N_IMAGES, 40)
    np.testing.assert_array_equal(unpack(render_packed(idx)), render_reference(idx))
    sq = unpack(render_packed(factors_to_index([[0, 5, 0, 16, 16], [0, 5, 0, 0, 0], [0, 5, 0, 31, 31]])))
    assert sq[0].sum() == 400                                         # a 20x20 square at scale 1
    rows, cols = np.nonzero(sq[1]); assert abs(cols.mean() + 0.5 - 13) < 1e-9 and abs(rows.mean() + 0.5 - 13) < 1e-9
    rows, cols = np.nonzero(sq[2]); assert abs(cols.mean() + 0.5 - 48) < 1e-9
    blk = render_block(1, 0); start = 6 * (N_IMAGES // 18)
    sel = np.random.default_rng(2).integers(0, len(blk), 300)
    np.testing.assert_array_equal(blk[sel], render_packed(start + sel))

def test_reproducible_color():
    i = np.arange(5000)
    c = sprite_colors(i, 'ibgan', seed=3)
    np.testing.assert_array_equal(c, sprite_colors(i[::-1], 'ibgan', seed=3)[::-1])
    assert set(np.unique(c).tolist()) <= set(np.linspace(0, 1, 8, dtype=np.float32).tolist())
    assert (sprite_colors(i, 'ibgan', seed=4) != c).any(1).mean() > 0.99
    u = sprite_colors(i, 'uniform'); assert u.min() >= 0.5 and u.max() < 1
    a, b = DSprites(color=True, subset=50, seed=3, use_cache=False), DSprites(color=True, subset=50, seed=3, use_cache=False)
    x, y = a[7]
    assert x.shape == (3, 64, 64) and torch.equal(x, b[7][0])
    assert torch.equal(a.images_from_factors(y[None].numpy())[0], x)

def test_cache_round_trip(tmp_path, monkeypatch):
    idx = np.random.default_rng(5).integers(0, N_IMAGES, 300)
    p = save_packed(tmp_path / 'sub.npy', render_packed(idx))
    mm = load_packed(p, len(idx))
    assert isinstance(mm, np.memmap)
    np.testing.assert_array_equal(unpack(mm[[3, 299, 0]]), render_reference(idx[[3, 299, 0]]))
    assert sorted(x.name for x in tmp_path.iterdir()) == ['sub.npy', 'sub.npy.sha256.json']   # the images and their digests, no temporary file
    with pytest.raises(ValueError, match='not a packed dSprites file'): load_packed(p, 301)
    monkeypatch.setenv('DLATENT_CACHE', str(tmp_path / 'c'))
    assert dsprites_cache_dir() == tmp_path / 'c' / 'dsprites' and cache_path().parent == tmp_path / 'c' / 'dsprites'
    assert dsprites_cache_dir(tmp_path / 'x') == tmp_path / 'x'

def test_dataset_protocol_and_tensor_dataset():
    ds = DSprites(subset={'shape': [2], 'orientation': [0, 20], 'posY': [5]}, use_cache=False)
    assert len(ds) == 6 * 2 * 32
    f = ds.sample_factors(16, np.random.default_rng(0))
    assert f.shape == (16, 5) and (f[:, 0] == 2).all() and (f[:, 4] == 5).all()
    x = ds.images_from_factors(f)
    assert x.shape == (16, 1, 64, 64) and x.dtype == torch.float32
    np.testing.assert_array_equal(x[:, 0].numpy(), render_reference(factors_to_index(f)))
    t = dsprites_tensor_dataset(n=64, seed=2, use_cache=False)
    assert t.tensors[0].shape == (64, 1, 64, 64) and t.tensors[1].shape == (64, 5)
    d2 = DSprites(subset=64, seed=2, use_cache=False)
    assert torch.equal(t.tensors[0][9], d2[9][0]) and torch.equal(t.tensors[1][9], d2[9][1])

def test_errors():
    with pytest.raises(ValueError, match="'scale' must be a class in 0..5"): factors_to_index([[0, 6, 0, 0, 0]])
    with pytest.raises(ValueError, match=r'shape \(\.\.\., 5\)'): factors_to_index([1, 2, 3])
    with pytest.raises(ValueError, match='index must be in'): index_to_factors([-1])
    with pytest.raises(ValueError, match='color must be'): sprite_colors([0], 'rainbow')
    with pytest.raises(ValueError, match='subset keys'): subset_indices({'colour': [0]})
    with pytest.raises(ValueError, match='subset as a count'): subset_indices(0)
    ds = DSprites(subset=8, use_cache=False)
    with pytest.raises(ValueError, match=r'shape \(n, 5\)'): ds.images_from_factors(np.zeros((2, 6), int))
    with pytest.raises(ValueError, match="'posY'"): ds.images_from_factors([[0, 0, 0, 0, 32]])
    with pytest.raises(IndexError): ds[8]
    with pytest.raises(ValueError, match='either n'): dsprites_tensor_dataset(n=4, subset=4)


def test_concurrent_cache_builds_render_once(tmp_path):
    "Processes that open the same missing packed cache at once (a sweep's workers) take turns: one renders, the others load it."
    import subprocess, sys
    code = ("import sys, time, numpy as np\n"
            "from dlatent.data.dsprites import packed_cache\n"
            "def render(out):\n"
            "    open(sys.argv[2], 'a').write('rendered\\n'); time.sleep(1.0); out[:] = 7\n"
            "mm = packed_cache(sys.argv[1], 64, render, chunk=16, verbose=False)\n"
            "assert mm.shape == (64, 64, 8) and (mm == 7).all()\n")
    path, log = tmp_path / 'cache' / 'packed.npy', tmp_path / 'renders.log'
    procs = [subprocess.Popen([sys.executable, '-c', code, str(path), str(log)]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert log.read_text().count('rendered') == 1
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith('.tmp')]     # no temporary file left behind
