"""Conditional LDM: conditioning, guidance, EMA, seeding, and the train_ldm / sample stages on the tiny profile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO
from monai.networks.nets import DiffusionModelUNet
from torch.optim.swa_utils import AveragedModel

from pipeline.core.artifacts import load_model
from pipeline.core.cli import PipelineError
from pipeline.core.runtime import pick_device
from pipeline.diffusion.guidance import NULL_CLASS, drop_labels, guided_output
from pipeline.diffusion.latents import (
    CLASS_MEANS_FILE,
    class_mean_latents,
    from_model_space,
    latent_normalizer,
    to_model_space,
)
from pipeline.diffusion.networks import REGISTRY, unet_args
from pipeline.diffusion.sampler import Sampler
from pipeline.diffusion.schedule import ddim_step, make_ddim, make_ddpm, scheduler_args, snr_weights
from pipeline.diffusion.training import diffusion_loss, ema_avg_fn


@pytest.fixture(scope="module")
def unet() -> DiffusionModelUNet:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(**unet_args(2, [8, 16], [False, True], 1, 8, 8)).eval()
    with torch.no_grad():  # MONAI zero-initialises output layers; give them weights so outputs depend on inputs
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet


def test_null_label_forward_pass(unet):
    z, t = torch.randn(3, 2, 16, 16), torch.tensor([5, 50, 500])
    out_null = unet(z, timesteps=t, class_labels=torch.full((3,), NULL_CLASS))
    out_cond = unet(z, timesteps=t, class_labels=torch.tensor([0, 1, 1]))
    assert out_null.shape == z.shape and torch.isfinite(out_null).all()
    assert not torch.allclose(out_null, out_cond)  # the label embedding changes the prediction


def test_guidance_scale_one_is_the_conditional_prediction(unet):
    z, labels, t = torch.randn(4, 2, 16, 16), torch.tensor([0, 1, 0, 1]), torch.tensor(300)
    with torch.no_grad():
        cond = unet(z, timesteps=t.expand(4), class_labels=labels)
        uncond = unet(z, timesteps=t.expand(4), class_labels=torch.full((4,), NULL_CLASS))
        assert torch.allclose(guided_output(unet, z, t, labels, 1.0), cond, atol=1e-5)
        assert torch.allclose(guided_output(unet, z, t, labels, 0.0), uncond, atol=1e-5)
        w = 3.0
        assert torch.allclose(guided_output(unet, z, t, labels, w), uncond + w * (cond - uncond), atol=1e-4)


def test_latent_normalisation_standardises_each_channel_and_inverts():
    std, mean = torch.tensor([0.05, 1.0, 3.0]).view(1, 3, 1, 1), torch.tensor([1.0, 0.0, -2.0]).view(1, 3, 1, 1)
    z = torch.randn(500, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * std + mean
    stats = {"latent_shape": [3, 4, 4], "scale_factor": 1 / z.std().item(),
             "channel_mean": z.mean((0, 2, 3)).tolist(), "channel_std": z.std((0, 2, 3)).tolist()}
    shift, scale = latent_normalizer(stats, "channel")
    n = to_model_space(z, shift, scale)
    assert torch.allclose(n.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(n.std((0, 2, 3)), torch.ones(3), atol=1e-5)
    assert torch.allclose(from_model_space(n, shift, scale), z, atol=1e-5)
    shift, scale = latent_normalizer(stats, "global")
    assert shift == [0.0] * 3
    assert torch.allclose(to_model_space(z, shift, scale), z * stats["scale_factor"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        latent_normalizer(stats, "per-pixel")


def test_label_dropout():
    labels = torch.tensor([0, 1] * 500)
    assert torch.equal(drop_labels(labels, 0.0), labels)
    assert (drop_labels(labels, 1.0) == NULL_CLASS).all()
    dropped = (drop_labels(labels, 0.3, torch.Generator().manual_seed(0)) == NULL_CLASS).float().mean().item()
    assert 0.25 < dropped < 0.35


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [0.0, 2.5])
def test_batched_stochastic_step_equals_monai_per_image(prediction_type, clip):
    """ddim_step with each image's noise drawn from its own generator is MONAI's step of each image alone, bit for
    bit, at the first, a middle and the last timestep."""
    sched = make_ddim(scheduler_args(1000, "scaled_linear_beta", prediction_type), 40, clip)
    z, out = torch.randn(5, 8, 16, 16), torch.randn(5, 8, 16, 16) * 3
    for t in sched.timesteps[[0, 10, -1]].tolist():
        ref = torch.cat([sched.step(out[i:i + 1], t, z[i:i + 1], 1.0, torch.Generator().manual_seed(7 + i))[0]
                         for i in range(5)])
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(7 + i))
                             for i in range(5)])
        assert torch.equal(ddim_step(sched, out, t, z, 1.0, noise), ref)
        assert torch.equal(ddim_step(sched, out, t, z, 0.0, noise), sched.step(out, t, z)[0])


def test_min_snr_weights():
    for prediction_type in ("epsilon", "v_prediction"):
        sched = make_ddpm(scheduler_args(1000, "scaled_linear_beta", prediction_type))
        t = torch.tensor([0, 20, 100, 400, 999])
        a = sched.alphas_cumprod[t]
        snr = a / (1 - a)
        w = snr_weights(sched, t, 5.0)
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
        assert torch.allclose(w, expected)
        assert (w <= 1 + 1e-6).all()
        if prediction_type == "epsilon":  # the nearly clean timesteps count least; the noisiest fully
            assert torch.all(w[:-1] <= w[1:]) and w[0] < 0.01 and w[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        snr_weights(sched, t, 0.0)


def test_min_snr_loss_weights_each_sample_and_zero_is_plain_mse(unet, monkeypatch):
    monkeypatch.setenv("CXR_PRECISION", "fp32")  # the weighting's arithmetic, compared exactly with a float32 loop
    sched = make_ddpm(scheduler_args(1000, "scaled_linear_beta", "epsilon"))
    z0, labels = torch.randn(6, 2, 16, 16), torch.tensor([0, 1] * 3)
    plain = diffusion_loss(unet, sched, z0, labels, torch.Generator().manual_seed(3))
    weighted = diffusion_loss(unet, sched, z0, labels, torch.Generator().manual_seed(3), 5.0)
    gen = torch.Generator().manual_seed(3)  # the same draws, by hand
    noise, t = torch.randn(z0.shape, generator=gen), torch.randint(0, 1000, (6,), generator=gen)
    err = (unet(sched.add_noise(z0, noise, t), timesteps=t, class_labels=labels) - noise).pow(2).flatten(1).mean(1)
    assert torch.allclose(plain, err.mean(), rtol=1e-5)
    assert torch.allclose(weighted, (snr_weights(sched, t, 5.0) * err).mean(), rtol=1e-5)


def test_ema_follows_the_decay_after_warm_up():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = AveragedModel(net, avg_fn=ema_avg_fn(0.9), use_buffers=True)
    with torch.no_grad():
        net.weight.fill_(1.0)
        ema.update_parameters(net)  # first update copies
        net.weight.fill_(2.0)
        ema.update_parameters(net)  # n = 1: warm-up decay (1 + 1) / (10 + 1) = 2/11 < 0.9
        assert torch.allclose(ema.module.weight, torch.full((1, 2), 2 / 11 * 1.0 + 9 / 11 * 2.0))
        for _ in range(200):  # long after warm-up the decay is 0.9
            ema.update_parameters(net)
        before = ema.module.weight.clone()
        net.weight.fill_(3.0)
        ema.update_parameters(net)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * 3.0)


def test_the_default_ema_decay_binds_only_from_step_8990():
    """(1 + n)/(10 + n) < 0.999 until n = 8990: the default run (120 epochs, 8880 steps) averages under the warm-up."""
    f, zero, one = ema_avg_fn(0.999), torch.zeros(()), torch.ones(())
    weight_of_current = {n: float(f(zero, one, torch.tensor(n))) for n in (4439, 8879, 8989, 8990, 20000)}
    assert weight_of_current[4439] == pytest.approx(9 / 4449) and weight_of_current[8879] == pytest.approx(9 / 8889)
    assert weight_of_current[8989] > 0.001 + 1e-9
    assert weight_of_current[8990] == pytest.approx(0.001) and weight_of_current[20000] == pytest.approx(0.001)


def test_train_ldm_outputs(pipeline_run):
    unet, config = load_model(pipeline_run / "models/ldm", REGISTRY)
    assert config["class"] == "DiffusionModelUNet" and config["args"]["num_class_embeds"] == 3
    assert config["scheduler"]["prediction_type"] == "v_prediction"
    stats = json.loads((pipeline_run / "data/latents/scale.json").read_text())
    assert config["latent_shift"] == pytest.approx(stats["channel_mean"])
    assert config["latent_scale"] == pytest.approx([1 / s for s in stats["channel_std"]])
    m = json.loads((pipeline_run / "metrics/ldm.json").read_text())
    assert m["epochs"] == 2 and np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"])
    assert len((pipeline_run / "metrics/plots/ldm_loss.tsv").read_text().splitlines()) == 3


def test_sample_outputs(pipeline_run):
    with np.load(pipeline_run / "data/samples/cohort_matched.npz") as z:
        images, labels, seeds = z["images"], z["labels"], z["seeds"]
    assert images.shape == (24, 28, 28) and images.dtype == np.uint8
    assert list(labels).count(0) == 12 and list(labels).count(1) == 12  # matches the (tiny) training set
    np.testing.assert_array_equal(seeds, np.arange(24))
    with np.load(pipeline_run / "data/samples/cohort_balanced.npz") as z:
        assert z["images"].shape == (6, 28, 28) and list(z["labels"]) == [0, 0, 0, 1, 1, 1]
    m = json.loads((pipeline_run / "metrics/sample.json").read_text())
    assert m["matched_n"] == 24 and m["matched_images_per_s"] > 0
    dicoms = sorted((pipeline_run / "data/samples/dicom").glob("*.dcm"))
    assert len(dicoms) == 4
    ds = pydicom.dcmread(dicoms[0])
    assert "DERIVED" in ds.ImageType and "SYNTHETIC" in ds.ImageType and ds.PatientName == "SYNTHETIC"
    assert ds.pixel_array.shape == (28, 28) and ds.pixel_array.dtype == np.uint8
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in dicoms}) == 4


def test_one_seed_per_image_and_determinism(pipeline_run):
    means = class_mean_latents(pipeline_run / "data/latents", pipeline_run / "models/ldm")
    sampler = Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", 5, pick_device(),
                      clip_denoised=2.5, eta=1.0, guidance_max_t=[100, 50], x0_spread=1.2, x0_spread_min_t=50,
                      class_means=means)  # the tiny profile's, as the cohort
    labels = np.array([0, 1, 1, 0, 1])
    seeds = [10, 11, 12, 13, 14]
    together = sampler.generate(labels, seeds, 2.0, batch_size=5)
    again = sampler.generate(labels, seeds, 2.0, batch_size=5)
    one_by_one = np.concatenate([sampler.generate(labels[i:i + 1], seeds[i:i + 1], 2.0, 1) for i in range(5)])
    np.testing.assert_array_equal(together, again)
    # stochastic steps draw each image's noise from its own generator: the batch changes only float rounding
    np.testing.assert_allclose(together.astype(int), one_by_one.astype(int), atol=1)
    cohort = np.load(pipeline_run / "data/samples/cohort_matched.npz")
    idx = [3, 20]
    regen = sampler.generate(cohort["labels"][idx], [int(s) for s in cohort["seeds"][idx]], 2.0, 2)
    np.testing.assert_allclose(regen.astype(int), cohort["images"][idx].astype(int), atol=1)
    settings = json.loads((pipeline_run / "data/samples/settings.json").read_text())
    assert settings["eta"] == 1.0 and settings["num_inference_steps"] == 5 and settings["guidance_max_t"] == [100, 50]


def test_class_mean_latents_are_the_normalised_class_means(pipeline_run, tmp_path):
    means = class_mean_latents(pipeline_run / "data/latents", pipeline_run / "models/ldm")
    config = json.loads((pipeline_run / "models/ldm/config.json").read_text())
    with np.load(pipeline_run / "data/latents/train.npz") as z:
        lat, labels = z["latents"], z["labels"]
    for k in (0, 1):
        expected = to_model_space(torch.from_numpy(lat[labels == k]).float(), config["latent_shift"],
                                  config["latent_scale"]).mean(0)
        torch.testing.assert_close(means[k], expected)
    # the cohort saved the means its spread used, beside its settings
    with np.load(pipeline_run / "data/samples" / CLASS_MEANS_FILE) as z:
        np.testing.assert_allclose(z["class_means"], means.numpy())
    with pytest.raises(PipelineError, match="train.npz not found"):
        class_mean_latents(tmp_path, pipeline_run / "models/ldm")
    with pytest.raises(PipelineError, match="config.json not found"):
        class_mean_latents(pipeline_run / "data/latents", tmp_path)


def test_x0_spread_steps_from_the_spread_prediction(pipeline_run):
    """At t >= x0_spread_min_t a step goes from m + s (x̂0 − m) with the model's own noise direction (for every eta);
    below it, and with s = 1, it is the plain step; spreading needs the class means."""
    ldm, ae = pipeline_run / "models/ldm", pipeline_run / "models/autoencoder"
    means = class_mean_latents(pipeline_run / "data/latents", ldm)
    plain = Sampler(ldm, ae, 5, pick_device(), eta=0.0)
    spread = Sampler(ldm, ae, 5, pick_device(), eta=0.0, x0_spread=1.5, x0_spread_min_t=50, class_means=means)
    sched = plain.scheduler
    z = torch.randn(4, *means.shape[1:], generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    t = int(sched.timesteps[0])
    out = plain.step_output(z, labels, t, 2.0)
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - sched.num_train_timesteps // 5]
    x0 = a_t ** 0.5 * z - (1 - a_t) ** 0.5 * out  # v-prediction
    eps = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * z
    x0_spread = means[labels] + 1.5 * (x0 - means[labels])
    expected = a_prev ** 0.5 * x0_spread + (1 - a_prev) ** 0.5 * eps
    stepped, _ = sched.step(out, t, z)
    torch.testing.assert_close(stepped + spread.spread_correction(out, t, z, labels), expected, atol=1e-5, rtol=1e-5)
    assert not spread.spread_correction(out, 40, z, labels).any()  # below x0_spread_min_t
    assert not plain.spread_correction(out, t, z, labels).any()  # s = 1
    # whole trajectories: the spread changes them, a threshold above every timestep leaves them as they are
    never = Sampler(ldm, ae, 5, pick_device(), eta=0.0, x0_spread=1.5, x0_spread_min_t=1000, class_means=means)
    a, b, c = (s.denoise(z, labels, 2.0) for s in (plain, spread, never))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="class mean latents"):
        Sampler(ldm, ae, 5, pick_device(), x0_spread=1.5)
    with pytest.raises(ValueError, match="x0_spread must be > 0"):
        Sampler(ldm, ae, 5, pick_device(), x0_spread=0.0)


def test_guidance_interval_is_per_class(pipeline_run):
    """``guidance_max_t`` switches guidance off above a timestep of each class's own: a mixed batch denoises each
    image as a batch of its class alone would, and one class's interval leaves the other class's images as they are."""
    kw = dict(num_inference_steps=5, device=pick_device(), clip_denoised=2.5, eta=0.0)
    models = (pipeline_run / "models/ldm", pipeline_run / "models/autoencoder")
    always, interval = Sampler(*models, **kw), Sampler(*models, **kw, guidance_max_t=[100, 50])
    assert always.guidance_max_t == [100, 100]  # num_train_timesteps of the tiny profile: every step
    labels = torch.tensor([0, 1, 0, 1])
    assert interval.guides(labels, 40).all() and interval.guides(labels, 80).tolist() == [True, False, True, False]
    z1 = always.initial_noise([5])
    torch.testing.assert_close(interval.step_output(z1, labels[[1]], 80, 2.0),  # unguided: the conditional output
                               interval.step_output(z1, labels[[1]], 80, 1.0), atol=1e-6, rtol=0)
    z = always.initial_noise([0, 1, 2, 3])
    mixed = interval.denoise(z, labels, 2.0)
    torch.testing.assert_close(mixed[[0, 2]], interval.denoise(z[[0, 2]], labels[[0, 2]], 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[[1, 3]], interval.denoise(z[[1, 3]], labels[[1, 3]], 2.0), atol=1e-5, rtol=0)
    full = always.denoise(z, labels, 2.0)
    torch.testing.assert_close(mixed[[0, 2]], full[[0, 2]], atol=1e-5, rtol=0)
    changed = (mixed[[1, 3]] - full[[1, 3]]).abs()  # pneumonia lost its high-noise guidance
    assert changed.mean() > 1e-3 and changed.max() > 100 * (mixed[[0, 2]] - full[[0, 2]]).abs().max()
    with pytest.raises(ValueError, match="one timestep >= 0 per class"):
        Sampler(*models, **kw, guidance_max_t=[100])


def test_eta_zero_is_deterministic_ddim_and_eta_adds_noise(pipeline_run):
    """eta 0 is plain DDIM (no generator needed, seeds alone fix the image); eta > 0 changes the images, and the
    noise of the steps is not the initial noise's generator (other step seeds give other images)."""
    kw = dict(num_inference_steps=5, device=pick_device(), clip_denoised=2.5)
    ddim = Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", eta=0.0, **kw)
    stochastic = Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", eta=1.0, **kw)
    labels, seeds = np.array([0, 1, 0, 1]), [0, 1, 2, 3]
    z = ddim.initial_noise(seeds)
    np.testing.assert_array_equal(ddim.decode(ddim.denoise(z, torch.from_numpy(labels), 2.0)),
                                  ddim.generate(labels, seeds, 2.0, 4))
    a = stochastic.generate(labels, seeds, 2.0, 4)
    assert np.abs(a.astype(int) - ddim.generate(labels, seeds, 2.0, 4).astype(int)).mean() > 1
    gens = [torch.Generator().manual_seed(99 + i) for i in range(4)]
    other = stochastic.decode(stochastic.denoise(z, torch.from_numpy(labels), 2.0, gens))
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 1
    with pytest.raises(ValueError, match="one generator per image"):
        stochastic.denoise(z, torch.from_numpy(labels), 2.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", eta=-0.5, **kw)


def test_sampler_from_settings_samples_as_the_cohorts(pipeline_run, tmp_path):
    samples = pipeline_run / "data/samples"
    settings = json.loads((samples / "settings.json").read_text())
    sampler = Sampler.from_settings(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder",
                                    samples / "settings.json", pick_device())
    assert (sampler.num_inference_steps, sampler.clip_denoised, sampler.eta, sampler.guidance_scale,
            sampler.guidance_max_t) == (settings["num_inference_steps"], settings["clip_denoised"], settings["eta"],
                                        settings["guidance_scale"], settings["guidance_max_t"])
    with np.load(samples / "cohort_balanced.npz") as c:
        images, labels, seeds = c["images"][:3], c["labels"][:3], c["seeds"][:3].tolist()
    np.testing.assert_array_equal(sampler.generate(labels, seeds, sampler.guidance_scale, 3), images)
    with pytest.raises(PipelineError, match="run the sample stage"):
        Sampler.from_settings(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder",
                              tmp_path / "settings.json", pick_device())


def test_sampling_speed_metrics(pipeline_run):
    m = json.loads((pipeline_run / "metrics/sampling_speed.json").read_text())
    assert m["ddim_steps"] == 5 and m["ddpm_steps"] == 20 and m["n_images"] == 4
    assert m["ddim_images_per_s"] > 0 and m["ddpm_images_per_s"] > 0
    # the speed-up is the ratio of the two timings (its size is a benchmark of the real run, not a unit test)
    assert m["speedup_vs_ddpm"] == pytest.approx(m["ddim_images_per_s"] / m["ddpm_images_per_s"], rel=0.01, abs=0.01)


def test_generate_command_writes_png_and_dicom(pipeline_run, tmp_path):
    from conftest import invoke_command
    from PIL import Image

    from pipeline import generate

    out = tmp_path / "gen"
    result = invoke_command(generate, ["--label", "pneumonia", "-n", "3", "--seed", "10", "--format", "both",
                                      "--steps", "5", "--guidance-scale", "2.0", "--out", str(out),
                                      "--ldm", str(pipeline_run / "models/ldm"),
                                      "--autoencoder", str(pipeline_run / "models/autoencoder"),
                                      "--latents", str(pipeline_run / "data/latents")], pipeline_run.params)
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"pneumonia_seed{s:06d}.png" for s in (10, 11, 12)]
    assert np.asarray(Image.open(pngs[0])).shape == (28, 28)
    assert len(list((out / "dicom").glob("*.dcm"))) == 3
    # image 11 of this run is image 1 of a run started at seed 10 ... and equals a fresh run at seed 11
    again = tmp_path / "again"
    invoke_command(generate, ["--label", "pneumonia", "-n", "1", "--seed", "11", "--steps", "5",
                             "--guidance-scale", "2.0", "--out", str(again),
                             "--ldm", str(pipeline_run / "models/ldm"),
                             "--autoencoder", str(pipeline_run / "models/autoencoder"),
                             "--latents", str(pipeline_run / "data/latents")], pipeline_run.params)
    a = np.asarray(Image.open(out / "pneumonia_seed000011.png")).astype(int)
    b = np.asarray(Image.open(again / "pneumonia_seed000011.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    # the x0 spread needs the training latents: a clear error without them, none with the spread off
    missing = invoke_command(generate, ["--label", "normal", "-n", "1", "--steps", "5", "--out", str(tmp_path / "m"),
                                       "--ldm", str(pipeline_run / "models/ldm"),
                                       "--autoencoder", str(pipeline_run / "models/autoencoder"),
                                       "--latents", str(tmp_path / "nowhere")], pipeline_run.params)
    assert isinstance(missing.exception, PipelineError) and "train.npz not found" in str(missing.exception)
    off = invoke_command(generate, ["--label", "normal", "-n", "1", "--steps", "5", "--out", str(tmp_path / "off"),
                                   "--x0-spread", "1", "--ldm", str(pipeline_run / "models/ldm"),
                                   "--autoencoder", str(pipeline_run / "models/autoencoder"),
                                   "--latents", str(tmp_path / "nowhere")], pipeline_run.params)
    assert off.exit_code == 0, off.output


def test_generate_help_explains_every_option():
    from typer.testing import CliRunner

    from pipeline.generate import app

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    for option in ["--label", "--n", "--out", "--format", "--seed", "--guidance-scale", "--guidance-max-t", "--steps",
                   "--x0-spread", "--x0-spread-min-t", "--ldm", "--latents"]:
        assert option in result.output


def test_generate_defaults_are_the_cohort_sampler_params(tmp_path):
    import yaml
    from conftest import default_params

    from pipeline import generate
    from pipeline.core.cli import command_defaults

    ldm = default_params()["ldm"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default_params()))
    defaults = command_defaults(generate.app, generate.SECTION, ["--params", str(tmp_path / "params.yaml")], False)
    names = ("guidance_scale", "guidance_max_t", "num_inference_steps", "clip_denoised", "eta", "x0_spread",
             "x0_spread_min_t", "sample_batch_size")
    assert {k: defaults[k] for k in names} == {k: ldm[k] for k in names}  # the cohorts' sampler, from params.yaml


def test_with_spread_centres_the_spread_on_the_training_class_means(pipeline_run, tmp_path):
    ldm, ae, latents = pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", pipeline_run / "data/latents"
    spread = Sampler.with_spread(ldm, ae, 5, pick_device(), 0.0, 1.0, None, 1.2, 50, latents)
    torch.testing.assert_close(spread.class_means.cpu(), class_mean_latents(latents, ldm))
    assert spread.spread_label() == ", x0 spread 1.2 at t >= 50"
    assert spread.spread_label(compact=True) == " x0_spread=1.2@t>=50"
    plain = Sampler.with_spread(ldm, ae, 5, pick_device(), 0.0, 1.0, None, 1.0, 50, tmp_path / "nowhere")
    assert plain.class_means is None and plain.spread_label() == plain.spread_label(compact=True) == ""
    with pytest.raises(PipelineError, match="nowhere"):  # the spread on, the latents missing
        Sampler.with_spread(ldm, ae, 5, pick_device(), 0.0, 1.0, None, 1.2, 50, tmp_path / "nowhere")
    with pytest.raises(PipelineError, match="eta"):  # a bad setting is the user's error, not a traceback
        Sampler.with_spread(ldm, ae, 5, pick_device(), 0.0, -1.0, None, 1.0, 50, latents)


def test_gpu_profile_times_each_task_on_the_devices_present(pipeline_run, tmp_path):
    """benchmarks/gpu_profile.py on the tiny run: one short epoch of each training and a few cohort images per
    device; without CUDA it says so and gives the CPU figures."""
    out = tmp_path / "gpu_profile.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_profile.py"), "--out", str(out),
                           "--params", str(pipeline_run.params), "--data", str(pipeline_run / "data/prepared"),
                           "--latents", str(pipeline_run / "data/latents"),
                           "--autoencoder", str(pipeline_run / "models/autoencoder"),
                           "--ldm", str(pipeline_run / "models/ldm"), "--steps", "1", "--sample-n", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ran_on_gpu"] == torch.cuda.is_available()
    assert set(result["devices"]) == ({"cuda", "cpu"} if torch.cuda.is_available() else {"cpu"})
    for timings in result["devices"].values():
        assert timings["train_autoencoder_epoch"]["steps"] == 1 and timings["train_ldm_epoch"]["steps"] == 1
        assert timings["sample_cohort"]["images"] == 2
        assert all(timings[t]["seconds"] > 0 for t in ("train_autoencoder_epoch", "train_ldm_epoch", "sample_cohort"))
    placeholder = tmp_path / "placeholder.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_profile.py"), "--placeholder", "--out",
                    str(placeholder)], check=True)
    assert json.loads(placeholder.read_text())["ran_on_gpu"] is False
