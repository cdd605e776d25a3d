"""Each stage, run for real on the tiny profile (see conftest.pipeline_run), wrote what it promises."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.core.artifacts import load_model
from pipeline.core.data import crop, load_prepared, read_meta
from pipeline.diffusion.networks import REGISTRY, encode_mean


def test_prepare_writes_padded_shards_and_metrics(pipeline_run):
    meta = read_meta(pipeline_run / "data/prepared")
    assert meta["size"] == 28 and meta["padded_size"] == 32 and meta["pad"] == [2, 2]
    metrics = json.loads((pipeline_run / "metrics/data.json").read_text())
    for split in ("train", "val", "test"):
        x, y = load_prepared(pipeline_run / "data/prepared", split)
        assert x.shape == (24, 1, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert (y == 0).sum() == 12 and (y == 1).sum() == 12
        assert metrics[f"{split}_n"] == 24 and metrics[f"{split}_normal"] == 12
        assert 0.3 < metrics[f"{split}_pixel_mean"] < 0.8 and 0.05 < metrics[f"{split}_pixel_std"] < 0.4
    assert (pipeline_run / "metrics/plots/data_examples.png").stat().st_size > 1000


def test_prepared_images_are_the_real_medmnist_pixels(pipeline_run, real_npz):
    x, _ = load_prepared(pipeline_run / "data/prepared", "test")
    real = np.load(real_npz)["test_images"]
    restored = (crop(x[:, 0], [2, 2]) * 255).round().byte().numpy()
    # every prepared image is one of the real test images, unchanged
    flat = {img.tobytes() for img in real}
    assert all(img.tobytes() in flat for img in restored)


def test_fid_ref_features(pipeline_run):
    with np.load(pipeline_run / "data/fid_ref/train.npz") as z:
        assert z["features"].shape == (24, 2048) and z["features"].dtype == np.float32
        assert np.isfinite(z["features"]).all() and z["features"].std() > 0
        assert list(z["labels"]).count(1) == 12


def test_autoencoder_folder_describes_itself(pipeline_run):
    folder = pipeline_run / "models/autoencoder"
    ae, config = load_model(folder, REGISTRY)
    assert config["class"] == "AutoencoderKL" and config["args"]["channels"] == [8, 16]
    assert config["data"]["pad"] == [2, 2]
    assert set(load_file(str(folder / "model.safetensors"))) == set(ae.state_dict())
    curve = (pipeline_run / "metrics/plots/autoencoder_loss.tsv").read_text().splitlines()
    assert curve[0].split("\t")[:2] == ["epoch", "train_l1"] and len(curve) == 3  # header + 2 epochs
    train = json.loads((pipeline_run / "metrics/autoencoder_train.json").read_text())
    assert train["epochs"] == 2 and train["best_epoch"] in (1, 2) and train["best_val_l1"] > 0


def test_evaluate_autoencoder_metrics(pipeline_run):
    m = json.loads((pipeline_run / "metrics/autoencoder.json").read_text())
    assert 5 < m["test_psnr_db"] < 60 and -1 <= m["test_ssim"] <= 1 and 0 < m["test_mae"] < 1
    assert m["fid_recon_train_vs_train_n24"] > 0 and m["fid_recon_test_vs_test_n24"] > 0
    assert m["latent_channels"] == 2 and m["latent_size"] == 16
    assert (pipeline_run / "metrics/plots/autoencoder_reconstructions.png").stat().st_size > 1000


def test_encode_latents_scale_factor_is_computed(pipeline_run):
    scale = json.loads((pipeline_run / "data/latents/scale.json").read_text())
    with np.load(pipeline_run / "data/latents/train.npz") as z:
        latents, labels = z["latents"], z["labels"]
    assert latents.shape == (24, 2, 16, 16) and labels.shape == (24,)
    assert abs(scale["scale_factor"] - 1.0 / latents.std(ddof=1)) < 1e-4 * scale["scale_factor"]
    assert abs((latents * scale["scale_factor"]).std(ddof=1) - 1.0) < 1e-4
    np.testing.assert_allclose(scale["channel_mean"], latents.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(scale["channel_std"], latents.std(axis=(0, 2, 3), ddof=1), rtol=1e-4)
    # the stored latents are the autoencoder's posterior means of the prepared images
    ae, _ = load_model(pipeline_run / "models/autoencoder", REGISTRY)
    x, _ = load_prepared(pipeline_run / "data/prepared", "train")
    z_mu = encode_mean(ae, x[:4], 4, torch.device("cpu"))
    assert torch.allclose(z_mu, torch.from_numpy(latents[:4]), atol=1e-5)
    metrics = json.loads((pipeline_run / "metrics/latents.json").read_text())
    assert abs(metrics["scale_factor"] - scale["scale_factor"]) < 1e-5
