"""The reference VAE in examples/vae: data, likelihood heads, estimators, training, resume, DDP."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import structlik  # noqa: E402
from examples.vae import data as vdata  # noqa: E402
from examples.vae.__main__ import main  # noqa: E402
from examples.vae.config import PRESETS, preset  # noqa: E402
from examples.vae.evaluate import iwae_nll, mutual_information  # noqa: E402
from examples.vae.likelihoods import Likelihood, YCbCrDiagonalNormal  # noqa: E402
from examples.vae.model import ConvVAE  # noqa: E402
from examples.vae.train import train  # noqa: E402
from examples.vae import inpaint, tail  # noqa: E402
from examples.vae.calibration import whitened  # noqa: E402
from structlik.color import downsample_chroma, rgb_to_ycbcr  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """The example runs on CPU here even when the kernel tests use a GPU default device."""
    previous = torch.get_default_device()
    torch.set_default_device("cpu")
    yield
    torch.set_default_device(previous)


# ---- data -------------------------------------------------------------------------------------------

def test_dequantise_stays_in_its_bin():
    levels = torch.arange(256, dtype=torch.uint8).repeat(50)
    x = vdata.dequantise(levels, torch.Generator().manual_seed(0))
    k = levels.double()
    assert ((x >= k / 256) & (x < (k + 1) / 256)).all()
    with pytest.raises(TypeError, match="images: expected uint8"):
        vdata.dequantise(levels.float())


def test_mnist_is_padded_and_split():
    train, test = vdata.mnist(n_test=100, seed=0)
    assert train.shape == (4900, 1, 32, 32) and test.shape == (100, 1, 32, 32) and train.dtype == torch.uint8
    assert train[..., :2, :].max() == 0 and train[..., :, -2:].max() == 0      # the 2-pixel padding
    assert not (test[:, None] == train[None, :200]).flatten(2).all(-1).any()   # no test digit in train


def test_mnist_training_set_is_capped_at_the_digits_left():
    """Every preset loads MNIST: n_train is at most what the test and validation splits leave."""
    for name in PRESETS:
        cfg = preset(name)
        data = vdata.load("mnist", cfg, seed=0)
        train = data.epoch_data(torch.Generator())
        assert len(train) == min(cfg.n_train, 5000 - cfg.n_test - cfg.n_valid)
        assert len(data.valid) == cfg.n_valid and len(data.test) == cfg.n_test
    with pytest.raises(ValueError, match="n_valid"):
        vdata.load("mnist", preset("tiny", n_test=4000, n_valid=1000), seed=0)


def test_random_crops_are_windows_of_one_image():
    # every pixel encodes (image, row, column), so a crop proves where it came from
    images = [torch.stack([torch.full((40, 50), i), torch.arange(40)[:, None].expand(40, 50),
                           torch.arange(50)[None].expand(40, 50)]) for i in range(3)]
    crops = vdata.random_crops(images, 20, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (20, 3, 8, 8)
    for crop in crops:
        assert (crop[0] == crop[0, 0, 0]).all()
        y0, x0 = int(crop[1, 0, 0]), int(crop[2, 0, 0])
        assert torch.equal(crop, images[int(crop[0, 0, 0])][:, y0:y0 + 8, x0:x0 + 8])


def test_random_crops_at_given_positions():
    images = [torch.arange(3 * 20 * 30).view(3, 20, 30) for _ in range(2)]
    positions = [torch.tensor([[0, 0]]), torch.tensor([[4, 7], [12, 22]])]
    crops = vdata.random_crops(images, 30, 8, torch.Generator().manual_seed(0), positions)
    allowed = [images[0][:, :8, :8], images[1][:, 4:12, 7:15], images[1][:, 12:20, 22:30]]
    assert all(any(torch.equal(c, a) for a in allowed) for c in crops)


def test_held_out_tiles_are_a_diagonal_lattice():
    mask = vdata.held_out_mask(45, 50, tile=10)      # 4 x 5 whole tiles, 5 rows and 0 columns left over
    tiles = mask[:40, :50].view(4, 10, 5, 10).permute(0, 2, 1, 3)
    assert ((tiles.all(-1).all(-1)) == (tiles.any(-1).any(-1))).all()       # whole tiles only
    expected = torch.tensor([[(i + j) % vdata.HELD_OUT_PERIOD == 0 for j in range(5)] for i in range(4)])
    assert torch.equal(tiles.all(-1).all(-1), expected)
    assert not mask[40:].any()                                               # the rest trains
    # every row and column of tiles holds test pixels, and no two held-out tiles share an edge
    assert expected.any(0).all() and expected[:, :4].any(1).all()
    assert not (expected[1:] & expected[:-1]).any() and not (expected[:, 1:] & expected[:, :-1]).any()


def test_photos_split_by_tiles():
    photos = vdata.photos(vdata.PHOTOS, short_side=64)
    assert len(photos) == len(vdata.PHOTOS)
    assert all(p.dtype == torch.uint8 and p.shape[0] == 3 and min(p.shape[1:]) == 64 for p in photos)
    train, test = vdata.split_tiles(photos, size=16)
    for image, train_at, test_at in zip(photos, train, test):
        mask = vdata.held_out_mask(*image.shape[-2:], vdata.tile_side(16))
        assert 0.15 < mask.float().mean() <= 0.25 + 1e-6
        # test crops wholly held out, training crops wholly not, and every such crop listed
        assert all(mask[y:y + 16, x:x + 16].all() for y, x in test_at.tolist())
        assert all(not mask[y:y + 16, x:x + 16].any() for y, x in train_at.tolist())
        windows = mask.unfold(0, 16, 1).unfold(1, 16, 1)
        assert len(test_at) == int(windows.all(-1).all(-1).sum())
        assert len(train_at) == int((~windows.any(-1).any(-1)).sum())
    with pytest.raises(ValueError, match="no 40-pixel crop"):
        vdata.split_tiles([torch.zeros(3, 64, 64, dtype=torch.uint8)], size=40)


def test_photo_test_crops_come_from_the_held_out_tiles():
    crops = vdata.PhotoCrops(size=16, n_train=8, n_test=8, short_side=64)
    windows = []
    for image in crops.images:
        mask = vdata.held_out_mask(*image.shape[-2:], vdata.tile_side(16))
        held_out = mask.unfold(0, 16, 1).unfold(1, 16, 1).all(-1).all(-1).flatten()
        windows.append(image.unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 16, 16)[held_out])
    for crop in crops.test:
        assert any((w == crop).all(dim=(1, 2, 3)).any() for w in windows)
    assert crops.epoch_data(torch.Generator().manual_seed(0)).shape == (8, 3, 16, 16)


def _write_folder(root: Path):
    from PIL import Image
    import numpy as np

    (root / "nested").mkdir(parents=True)
    # a 30x40 image whose centre 30x30 square is red and whose margins are blue
    im = np.zeros((30, 40, 3), np.uint8)
    im[..., 2] = 255
    im[:, 5:35] = (255, 0, 0)
    Image.fromarray(im).save(root / "a.png")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / "nested" / f"{i}.jpg")
    (root / "notes.txt").write_text("not an image")


def test_image_folder_crops_centre_square_and_resizes(tmp_path):
    _write_folder(tmp_path)
    images = vdata.image_folder(tmp_path, size=16)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    red = images[0]                           # a.png sorts first: its centre square is pure red
    assert (red[0] == 255).all() and (red[1:] == 0).all()
    assert vdata.image_folder(tmp_path, size=16, crop=0.5).shape == (6, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="root: no"):
        vdata.image_folder(tmp_path / "nested" / "missing", size=16)
    with pytest.raises(ValueError, match="crop"):
        vdata.image_folder(tmp_path, size=16, crop=0.0)


def test_flip_half_flips_only_whole_images():
    images = torch.arange(2 * 8 * 1 * 3 * 4).view(16, 1, 3, 4).to(torch.uint8)
    out = vdata.flip_half(images, torch.Generator().manual_seed(0))
    flipped = [(o == i.flip(-1)).all() for o, i in zip(out, images)]
    kept = [(o == i).all() for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


# ---- likelihoods and model heads -------------------------------------------------------------------

@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_model_heads_give_a_distribution_over_the_image(color, structured):
    stencil = structlik.Stencil(1, dilations=(1, 2)) if structured else None
    model = ConvVAE(Likelihood(color, stencil), size=16, latent=3, base_width=8)
    x = torch.rand(5, 3 if color else 1, 16, 16)
    loss, parts = model(x, beta=2.0, alpha=3.0)
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, parts["nll"] + 2.0 * parts["kl"] + 3.0 * parts["sq_error"])
    loss.mean().backward()
    p = model.decode(torch.randn(5, 3))
    assert p.mean.shape == x.shape and p.rsample().shape == x.shape


def test_ycbcr_diagonal_log_prob_is_three_normals():
    B, H, W, f = 2, 8, 8, 4
    y_loc, y_ls = torch.rand(B, 1, H, W), torch.randn(B, 1, H, W) * 0.1
    c_loc, c_ls = torch.rand(B, 2, H // f, W // f), torch.randn(B, 2, H // f, W // f) * 0.1
    rgb = torch.rand(B, 3, H, W, dtype=torch.float32)
    dist = YCbCrDiagonalNormal(y_loc, y_ls, c_loc, c_ls, f)
    ycc = rgb_to_ycbcr(rgb)
    chroma = downsample_chroma(ycc[:, 1:], f)

    def normal(v, m, ls):
        return (-0.5 * ((v - m) / ls.exp()) ** 2 - ls - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))

    expected = normal(ycc[:, :1], y_loc, y_ls) + normal(chroma, c_loc, c_ls)
    torch.testing.assert_close(dist.log_prob(rgb), expected)
    assert dist.rsample().shape == rgb.shape


def test_gamma_prior_option_only_for_structured():
    model = ConvVAE(Likelihood(True, structlik.Stencil(1)), size=16, latent=3, base_width=8)
    loss, parts = model(torch.rand(2, 3, 16, 16), gamma_prior=(2.0, 1.0))
    assert torch.isfinite(parts["gamma_prior"]).all()
    diag = ConvVAE(Likelihood(False, None), size=16, latent=3, base_width=8)
    with pytest.raises(ValueError, match="gamma prior"):
        diag(torch.rand(2, 1, 16, 16), gamma_prior=(2.0, 1.0))


# ---- estimators ------------------------------------------------------------------------------------

class _IgnoresZ:
    """A decoder whose p(x|z) = N(x; m, s^2 I) for every z: then log p(x) is known exactly."""

    def __init__(self, m, s):
        self.m, self.s = m, s

    def decode(self, z):
        n = z.shape[0]
        return torch.distributions.Independent(torch.distributions.Normal(self.m.expand(n, -1, -1, -1),
                                                                          self.s), 3)


def test_iwae_is_exact_when_the_posterior_is_the_prior():
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    m = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    model = _IgnoresZ(m, 0.3)
    q = torch.distributions.Normal(torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))
    exact = -torch.distributions.Normal(m, 0.3).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(iwae_nll(model, x, q, samples=7, chunk=3), exact)


def test_mutual_information_limits():
    g = torch.Generator().manual_seed(0)
    N, L = 40, 3
    same = mutual_information(torch.zeros(N, L), torch.ones(N, L), 5, g)
    torch.testing.assert_close(same, torch.zeros(N), atol=1e-5, rtol=0)           # q(z|x) = q(z)
    apart = mutual_information(torch.arange(N).float()[:, None].expand(N, L) * 100, torch.ones(N, L), 5, g)
    torch.testing.assert_close(apart, torch.full((N,), math.log(N)), atol=1e-4, rtol=0)   # at log N


# ---- training, resume, the whole run ---------------------------------------------------------------

def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_calibration_of_noise_drawn_from_the_model_itself():
    """Data drawn from the likelihood: the noise is as large as the residual, the whitened residual
    has unit mean square, structured noise is correlated like the residual; and the measure leaves
    the global random stream alone (the IWAE draws after it stay the same)."""
    from torch.distributions import Independent, Normal
    from examples.vae.calibration import calibration, summarise
    torch.manual_seed(0)
    mu = torch.full((64, 1, 16, 16), 0.5)
    diagonal = Independent(Normal(mu, torch.full_like(mu, 0.05)), 3)
    stencil = structlik.Stencil(1)
    off = torch.zeros(64, stencil.S, 16, 16)
    off[:, 0] = -0.9 * 20.0                      # u_p = 20 (r_p - 0.9 r_{p+1}): neighbours correlated
    structured = structlik.StructuredNormal(mu, torch.full_like(mu, math.log(20.0)), off, stencil)
    for dist in (diagonal, structured):
        x = dist.sample()
        state = torch.get_rng_state()
        s = summarise(calibration(dist, x, color=False, seed=1))
        assert torch.equal(torch.get_rng_state(), state)
        assert 0.9 < s["median_noise_ratio"] < 1.1 and s["share_ratio_in_0.5_2"] == 1.0
        assert 0.9 < s["whitened_ms"] < 1.1 and s["overconfident"] == 0.0
        assert abs(s["corr_e"] - s["corr_r"]) < 0.1
        assert 0.93 < s["coverage"] < 0.97      # exact marginal sigma_p: 95% of the pixels within 1.96 sigma_p
    assert s["corr_e"] > 0.5                     # the structured one
    x = diagonal.sample()
    noisy = Independent(Normal(mu, torch.full_like(mu, 0.1)), 3)    # twice too wide for x
    s = summarise(calibration(noisy, x, color=False, seed=1))
    assert 1.8 < s["median_noise_ratio"] < 2.2 and 0.2 < s["whitened_ms"] < 0.3 and s["overconfident"] == 0.0
    assert s["coverage"] > 0.99                  # P(|z| <= 3.92)
    # overconfident on a quarter of the images: their residual three times the model's scale (mean u^2 9)
    wide = x.clone()
    wide[:16] = mu[:16] + 3 * (x[:16] - mu[:16])
    s = summarise(calibration(diagonal, wide, color=False, seed=1))
    assert s["overconfident"] == 0.25 and 0.9 < s["whitened_ms"] < 1.1          # the median does not see it
    assert 0.80 < s["coverage"] < 0.87           # 3/4 * 0.95 + 1/4 * P(|z| <= 0.65) = 0.83
    assert "median_noise_ratio_z" not in s
    # at a posterior sample: here a decoder output whose mean is off by as much as its noise
    shifted = Independent(Normal(mu + 0.05 * torch.randn_like(mu), torch.full_like(mu, 0.05)), 3)
    s = summarise(calibration(diagonal, x, color=False, seed=1, dist_z=shifted))
    assert 0.9 < s["median_noise_ratio"] < 1.1 and 0.6 < s["median_noise_ratio_z"] < 0.8
    assert s["share_ratio_z_in_0.5_2"] == 1.0


def test_resume_refuses_other_training_settings(tmp_path):
    import dataclasses
    from examples.vae.train import check_resumable
    cfg = preset("cpu")
    state = {"config": dataclasses.asdict(cfg), "seed": 0}
    check_resumable(state, dataclasses.replace(cfg, iwae_samples=500, eval_batch=10), 0, tmp_path)   # evaluation only
    # the cpu run, resumed as cpu-long: its cosine decay would restart half-way, and MNIST's split moves
    with pytest.raises(ValueError, match=r"epochs 50 -> 100, n_test 500 -> 1000\); pass --fresh"):
        check_resumable(state, PRESETS["cpu-long"], 0, tmp_path)
    with pytest.raises(ValueError, match="weight_bound 0.9 -> 0.5"):
        check_resumable(state, dataclasses.replace(cfg, weight_bound=0.5), 0, tmp_path)
    with pytest.raises(ValueError, match="seed 0 -> 1"):
        check_resumable(state, cfg, 1, tmp_path)
    with pytest.raises(ValueError, match="epochs"):
        check_resumable(state, dataclasses.replace(cfg, epochs=60), 0, tmp_path)       # cosine: refused
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    check_resumable({"config": dataclasses.asdict(constant), "seed": 0}, dataclasses.replace(constant, epochs=60),
                    0, tmp_path)                                                      # constant: continues
    with pytest.raises(ValueError, match="epochs 50 -> 110"):   # the variance minimiser's warm-up: 5 -> 10 epochs
        check_resumable({"config": dataclasses.asdict(constant), "seed": 0},
                        dataclasses.replace(constant, epochs=110), 0, tmp_path)


def test_main_refuses_to_resume_another_config(tmp_path):
    args = ["--data", "mnist", "--models", "diagonal", "--out", str(tmp_path), "--no-progress"]
    main(["--config", "tiny", *args])
    with pytest.raises(ValueError, match="trained with other settings"):
        main(["--config", "tiny", "--lr", "0.01", *args])


def test_calibration_by_source_finds_the_miscalibrated_one():
    from examples.vae.calibration import by_source, source_table
    ratio = torch.tensor([1.0, 1.1, 0.9, 3.0, 2.5, 1.0])
    sources = ["a", "a", "a", "b", "b", "b"]
    rows = by_source({"noise_ratio": ratio}, sources)
    assert rows["a"] == (3, 1.0, 1.0)
    n, median, share = rows["b"]
    assert n == 3 and median == 2.5 and share == pytest.approx(1 / 3)
    text = source_table({"m": rows})
    assert "a (3)" in text and "2.50 / 0.33" in text


def test_resume_continues_exactly(tmp_path):
    cfg = preset("tiny", epochs=3)
    data = vdata.ImageData("toy", torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8),
                           train=torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8), flips=True,
                           valid=torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    straight, hist = train("structured", data, cfg, tmp_path / "a", 0, torch.device("cpu"), progress=False)
    assert [h["alpha"] for h in hist] == [5e3, 10.0, 10.0]        # warm-up, then the paper's 10
    import dataclasses
    train("structured", data, dataclasses.replace(cfg, epochs=1), tmp_path / "b", 0, torch.device("cpu"),
          progress=False)
    resumed, hist_b = train("structured", data, cfg, tmp_path / "b", 0, torch.device("cpu"), progress=False)
    assert torch.equal(_params(straight), _params(resumed))
    assert [h["epoch"] for h in hist_b] == [0, 1, 2]
    assert [h["valid_nelbo"] for h in hist_b] == [h["valid_nelbo"] for h in hist]


def test_main_writes_table_json_and_figures(tmp_path):
    main(["--config", "tiny", "--data", "mnist", "photos", "--out", str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "results.json").read_text())
    for name in ("mnist", "photos"):
        models = report["datasets"][name]["models"]
        assert set(models) == {"diagonal", "beta", "structured"}
        sources = report["datasets"][name]["test_sources"]
        for m in models.values():
            assert all(math.isfinite(v["mean"]) for v in m["summary"].values())
            by_source = m["calibration"].pop("by_source", None)
            assert all(math.isfinite(v) for v in m["calibration"].values())
            # photo crops: calibration per photograph, over the test crops of each
            if name == "photos":
                assert set(by_source) == set(sources) and set(sources) <= set(vdata.PHOTOS)
                assert sum(v["n"] for v in by_source.values()) == report["datasets"][name]["n_test"]
            else:
                assert by_source is None and sources is None
        for fig in ("reconstructions", "samples", "nll_hist", "residual_correlations", "uncertainty"):
            assert (tmp_path / f"{name}_{fig}.png").stat().st_size > 1000
    table = (tmp_path / "results.md").read_text()
    # NLL and calibration tables of both datasets, and the photos' calibration by source
    assert table.count("| structured") == 5 and "YCbCr" in table
    assert table.count("Calibration of the luminance noise") == 2
    assert table.count("By source") == 1                                # photos only
    # the tail tool rebuilds the evaluation's structured model and test images from the run: their
    # whitened residual is the one results.json has
    ds = report["datasets"]["photos"]
    model, x, _ = tail.structured_at_test(tmp_path, report, "photos")
    for i in (0, len(x) - 1):
        with torch.no_grad():
            luma, y = tail.luma_and_y(model, x[i:i + 1])
            ms = float(whitened(luma, y - luma.mean).square().mean())
        assert ms == pytest.approx(ds["per_image"]["structured"]["whitened_ms"][i], rel=1e-3, abs=1e-4)
    tail.main([str(tmp_path), "--data", "photos", "--worst", "3", "--pixels"])
    with pytest.raises(ValueError, match="data: 'folder' is not in"):
        tail.main([str(tmp_path), "--data", "folder"])
    # inpainting with both models: the conditional mean keeps the observed pixels, and the figure is written
    for name in ("photos", "mnist"):
        inpaint.main([str(tmp_path), "--data", name, "--hole", "8", "--images", "4", "--show", "2"])
        assert (tmp_path / f"{name}_inpainting.png").stat().st_size > 1000
    model, x, _ = tail.structured_at_test(tmp_path, report, "photos")
    mask = inpaint.hole_mask(*x.shape[-2:], 8, model.likelihood.factor)
    mean, samples, nll, mse, iterations = inpaint.inpaint(model, x[:3], mask, samples=2)
    assert torch.equal(torch.where(mask, mean, 0), torch.where(mask, x[:3], 0))
    assert samples.shape == (2, *x[:3].shape) and torch.isfinite(nll).all() and (mse > 0).all() and iterations >= 1


def test_tail_counts_overconfident_images_and_their_nll():
    ds = {"n_test": 4, "test_sources": ["a", "b", "a", "b"], "per_image": {
        "diagonal": {"whitened_ms": [1.0, 1.0, 5.0, 1.0], "nll": [-10.0, -20.0, -30.0, -40.0]},
        "structured": {"whitened_ms": [9.0, 1.0, 4.5, 0.5], "nll": [90.0, -25.0, 0.0, -50.0]}}}
    lines, worst = tail.report_dataset("photos", ds, worst=2)
    text = "\n".join(lines)
    assert "- diagonal: 1 (0.250): a 1" in text and "- structured: 2 (0.500): a 2" in text
    # differences on the overconfident images 0 and 2: 100 and 30; worse on 2 of 4 images
    assert "median 65, max 100" in text and "worse on 0.500 of all images" in text
    assert worst == [0, 2]


def test_main_trains_on_a_folder(tmp_path):
    _write_folder(tmp_path / "images")
    for i in range(10):      # enough images for a train/test split and one batch
        _write_folder(tmp_path / "images" / f"copy{i}")
    main(["--config", "tiny", "--data", "folder", "--folder", str(tmp_path / "images"), "--batch", "8",
          "--models", "structured", "--out", str(tmp_path / "out"), "--no-progress"])
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["datasets"]["folder"]["size"] == 16 and report["datasets"]["folder"]["color"]


def test_torchrun_two_cpu_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "examples.vae", "--config", "tiny", "--data", "mnist", "--models", "diagonal", "structured",
           "--out", str(tmp_path), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mnist/structured: parameters identical on all 2 ranks" in done.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["world_size"] == 2


def test_the_likelihood_bounds_its_weights():
    with pytest.raises(ValueError, match="weight_bound"):
        Likelihood(False, structlik.Stencil(1), weight_bound=0.0)
    dist = Likelihood(False, structlik.Stencil(2), weight_bound=0.5)(
        torch.rand(2, 1, 8, 8), torch.randn(2, 13, 8, 8))
    assert (dist.off_diag.abs().sum(1, keepdim=True) < 0.5 * dist.log_diag.exp()).all()


def test_training_options_reach_the_config():
    from examples.vae.__main__ import parse

    args = parse(["--weight-bound", "0.8", "--variance-weights", "100", "5", "--lr-warmup", "1", "--grad-clip", "50",
                  "--warmup-fraction", "0.2", "--gamma-prior", "2", "1e-4", "--lr-schedule", "cosine"])
    assert (args.weight_bound, args.variance_weights, args.lr_warmup, args.grad_clip) == (0.8, [100.0, 5.0], 1.0, 50.0)
    assert args.lr_schedule == "cosine"


def test_learning_rate_warms_up_then_follows_the_schedule():
    from examples.vae.config import preset
    from examples.vae.train import learning_rate

    steps = 10
    constant = preset("tiny", epochs=4, lr=1e-3)
    assert [learning_rate(constant, t, steps) for t in (0, 17, 39)] == [1e-3] * 3
    warm = preset("tiny", epochs=4, lr=1e-3, lr_warmup=2.0)
    assert learning_rate(warm, 0, steps) == pytest.approx(1e-3 / 20)      # 1 of 20 warm-up steps done
    assert learning_rate(warm, 19, steps) == pytest.approx(1e-3)
    cosine = preset("tiny", epochs=4, lr=1e-3, lr_schedule="cosine")
    rates = [learning_rate(cosine, t, steps) for t in range(40)]
    assert rates[0] == pytest.approx(1e-3) and rates[20] == pytest.approx(5e-4)
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] < 1e-5
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(preset("tiny", lr_schedule="step"), 0, steps)
