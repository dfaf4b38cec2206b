"""The shipped trained digits DDPM U-Net, classifier, DDIM sampler, Fréchet distance and PNG writer.

CPU tier, well under a minute: one 10-step DDIM run of 32 samples (plus tiny ones) through the
shipped U-Net. Thresholds come from measurements of the shipped assets (docs/digits.md), each
with a margin, never from copying a computed output.
"""
from __future__ import annotations

import struct
import zlib

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from fusediff import digits  # noqa: E402

# Measured on the shipped assets with DDIM-10, 32 samples, seeds 0-5 (docs/digits.md):
#   samples: mean max-probability 0.94-0.985, confident (>0.9) fraction 0.84-0.97,
#            FD to the 1797 real digits 216-361;
#   clamped Gaussian noise: mean max-probability 0.62-0.78, confident fraction 0.06-0.34,
#            FD 1910-2070;
#   32 real digits: FD 269-362 (FD of a small set is dominated by its finite-sample bias,
#            which is why 32 samples rather than 16: with 16 the noise/sample gap shrinks to ~3x).
# Thresholds are those measurements minus a margin, between the samples and the noise.
N_SAMPLES = 32
MIN_MEAN_CONFIDENCE = 0.85
MIN_CONFIDENT_FRAC = 0.6
FD_NOISE_RATIO = 3.0  # measured >= 5.3
FD_REAL_RATIO = 2.5  # samples vs a same-size real set, measured <= 1.34


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These are tiny tensors: one intra-op thread is as fast on an idle machine and several times
    # faster on a shared one (measured 13 s vs 61 s for this file with 2 threads at load ~5).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    return digits.load_digits_unet()


@pytest.fixture(scope="module")
def classifier():
    return digits.load_classifier()


@pytest.fixture(scope="module")
def short_run(unet):
    return digits.ddim_sample(unet, n=N_SAMPLES, steps=10, seed=0)


def test_assets_exist_and_are_small():
    total = digits.UNET_ASSET.stat().st_size + digits.CLASSIFIER_ASSET.stat().st_size
    assert total < 5.5e6, f"assets are {total / 1e6:.2f} MB, budget ~5 MB"


def test_unet_loads_with_expected_architecture(unet):
    import diffusers

    assert isinstance(unet, diffusers.UNet2DModel)
    assert not unet.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in unet.parameters())
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 and unet.config.out_channels == 1
    # The fusediff rewrite targets are present: GroupNorm(8 groups) chains and attention.
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    attn_cls = diffusers.models.attention_processor.Attention
    assert sum(isinstance(m, attn_cls) for m in unet.modules()) >= 2  # attention level + mid block
    sched = digits.load_scheduler_config()
    assert sched["num_train_timesteps"] == 1000 and sched["prediction_type"] == "epsilon"


def test_unet_outputs_are_finite(unet):
    x = torch.randn(3, 1, 16, 16)
    for t in (0, 500, 999):
        out = unet(x, t).sample
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
    # Trained eps-prediction at t=300: cosine(pred, eps) measured 0.99, while the noisy input
    # itself scores 0.85 and a randomly initialised U-Net 0.16.
    eps = torch.randn(8, 1, 16, 16)
    x0 = digits.real_digits(8, seed=1)
    a = digits.alphas_cumprod()[300]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = unet(xt, torch.full((8,), 300)).sample
    cos = torch.nn.functional.cosine_similarity(pred.flatten(), eps.flatten(), dim=0)
    assert cos > 0.95


def test_classifier_accuracy_and_features(classifier):
    x, y = digits.digits_dataset()
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean()
        feats = classifier.features(x[:5])
    assert acc > 0.95
    assert feats.shape == (5, classifier.feature_dim) == (5, 64)
    with pytest.raises(ValueError, match="shape"):
        classifier.features(torch.zeros(2, 1, 8, 8))


def test_real_digits_range_and_seeding():
    a = digits.real_digits(32, seed=3)
    assert a.shape == (32, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.max() > 0.5  # strokes reach the bright end
    assert torch.equal(a, digits.real_digits(32, seed=3))
    assert not torch.equal(a, digits.real_digits(32, seed=4))
    assert digits.real_digits(2000, seed=0).shape[0] == 2000  # beyond 1797: with replacement
    with pytest.raises(ValueError, match="n must be"):
        digits.real_digits(0, seed=0)


def test_short_ddim_run_gives_confident_digits(short_run, classifier):
    assert short_run.shape == (N_SAMPLES, 1, 16, 16) and torch.isfinite(short_run).all()
    m = digits.evaluate(short_run, classifier)
    noise = torch.randn(N_SAMPLES, 1, 16, 16, generator=torch.Generator().manual_seed(123)).clamp(-1, 1)
    m_noise = digits.evaluate(noise, classifier)
    m_real = digits.evaluate(digits.real_digits(N_SAMPLES, seed=50), classifier)
    assert m["mean_confidence"] > MIN_MEAN_CONFIDENCE, m
    assert m["confident_frac"] > MIN_CONFIDENT_FRAC, m
    assert m_noise["mean_confidence"] < MIN_MEAN_CONFIDENCE, m_noise  # the threshold separates
    assert m["fd"] * FD_NOISE_RATIO < m_noise["fd"], (m, m_noise)
    assert m["fd"] < FD_REAL_RATIO * m_real["fd"], (m, m_real)
    assert sum(c > 0 for c in m["class_counts"]) >= 6, m  # many classes, not one mode


def test_ddim_seeds_callback_and_unet_fn(unet, short_run):
    seen = []
    x = digits.ddim_sample(unet, n=N_SAMPLES, steps=10, seed=0, callback=lambda i, t, z: seen.append((i, t, z.clone())))
    assert torch.equal(x, short_run)  # same seed, same samples
    assert [s[:2] for s in seen] == list(enumerate(digits.ddim_timesteps(10)))
    assert seen[0][1] == 900 and seen[-1][1] == 0
    assert torch.equal(seen[-1][2], x)

    calls = []

    def unet_fn(z, t):
        calls.append(t)
        return unet(z, t)  # a UNet2DOutput: .sample is taken

    y = digits.ddim_sample(None, n=N_SAMPLES, steps=10, seed=0, unet_fn=unet_fn)
    assert len(calls) == 10 and calls[0].shape == (N_SAMPLES,) and calls[0].dtype == torch.int64
    torch.testing.assert_close(y, short_run, rtol=0, atol=0)
    other = digits.ddim_sample(unet, n=4, steps=2, seed=1)
    assert not torch.allclose(other, short_run[:4])
    with pytest.raises(ValueError, match="steps"):
        digits.ddim_sample(unet, n=2, steps=0)
    with pytest.raises(ValueError, match="unet or unet_fn"):
        digits.ddim_sample(None, n=2)


def test_ddim_matches_diffusers_pipeline(unet):
    from diffusers import DDIMPipeline, DDIMScheduler

    sched = DDIMScheduler.from_config(digits.load_scheduler_config())
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=4, generator=torch.Generator().manual_seed(5), num_inference_steps=8,
               eta=0.0, output_type="pt").images  # (N, 1, H, W) in [0, 1]
    ours = digits.ddim_sample(unet, n=4, steps=8, seed=5)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), ref.reshape(ours.shape), rtol=1e-4, atol=1e-4)


def test_frechet_distance_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(150, 6, generator=g) * 2 + 1
    assert digits.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    fab, fba = digits.frechet_distance(a, b), digits.frechet_distance(b, a)
    assert fab > 1 and fab == pytest.approx(fba, rel=1e-8)
    # 1-D closed form: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2, unbiased sigmas.
    u, v = torch.randn(50, 1, generator=g).double(), (3 * torch.randn(40, 1, generator=g) + 2).double()
    expect = (u.mean() - v.mean()) ** 2 + (u.std() - v.std()) ** 2
    assert digits.frechet_distance(u, v) == pytest.approx(float(expect), rel=1e-9)
    # Against scipy's matrix square root where scipy exists (an independent implementation).
    try:
        import numpy as np
        from scipy import linalg
    except ImportError:
        pass
    else:
        an, bn = a.double().numpy(), b.double().numpy()
        ca, cb = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
        covmean = linalg.sqrtm(ca @ cb).real
        ref = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean)
        assert fab == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="feature dims"):
        digits.frechet_distance(a, b[:, :5])
    with pytest.raises(ValueError, match="N >= 2"):
        digits.frechet_distance(a[:1], b)


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    return chunks


def test_png_writer_writes_a_valid_png(tmp_path):
    x = torch.full((3, 1, 4, 5), -1.0)
    x[0, 0, 0, 0] = 1.0  # one white pixel in the first tile
    x[2] = 0.0  # a mid-grey tile
    path = digits.save_grid_png(x, tmp_path / "sub" / "g.png", nrow=2, scale=2, padding=1)
    chunks = _read_png(path)
    assert [c[0] for c in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    # 2 tiles across, 2 rows of tiles: (2 * (5 + 1) + 1) * 2 by (2 * (4 + 1) + 1) * 2.
    assert (w, h) == (26, 22) and (depth, color, comp, filt, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == h * (w + 1)
    rows = [raw[r * (w + 1) : (r + 1) * (w + 1)] for r in range(h)]
    assert all(row[0] == 0 for row in rows)  # filter byte
    px = [list(row[1:]) for row in rows]
    assert px[2][2] == px[3][3] == 255  # the white pixel, scaled 2x, after 1 px padding
    assert px[2][4] == 0 and px[0][0] == 0
    grey = px[2 + 2 * 5][2 + 2]  # tile 2 is row 1, column 0
    assert grey in (127, 128)
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        assert im.size == (26, 22) and im.mode == "L"
        assert im.getpixel((2, 2)) == 255


def test_png_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one channel"):
        digits.save_grid_png(torch.zeros(2, 3, 4, 4), tmp_path / "a.png")
    with pytest.raises(ValueError, match="scale"):
        digits.save_grid_png(torch.zeros(2, 4, 4), tmp_path / "a.png", scale=0)
