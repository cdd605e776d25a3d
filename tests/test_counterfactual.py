"""Counterfactual editing: the DDIM inversion grid, round trips on the tiny trained model, the ``counterfactual`` stage
on the tiny profile, and the ``pipeline.edit`` user command on PNG and DICOM files."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace

import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import default_params, invoke_command, run, run_subprocess
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

from pipeline import edit as edit_cmd
from pipeline.core.cli import PipelineError, command_defaults, stage_options
from pipeline.core.data import load_prepared, real_images
from pipeline.diffusion.edit import (
    EditSettings,
    GuidanceReference,
    InversionLabel,
    Mask,
    Method,
    denoise_from,
    diffedit_mask,
    edit_at,
    edit_guided,
    edit_images,
    edit_latents,
    edit_timesteps,
    guide_accepts,
    invert,
    invert_trajectory,
    mask_seeds,
    model_input,
    noise_to,
    smooth_change,
    unclamped,
)
from pipeline.diffusion.guidance import NULL_CLASS, guided_output
from pipeline.diffusion.networks import unet_args
from pipeline.diffusion.sampler import Sampler
from pipeline.diffusion.schedule import clip_denoised_latents
from pipeline.evaluation.classifier import load_classifier
from pipeline.evaluation.counterfactual import DIRECTIONS, select_sources, similarity
from pipeline.formats.images import read_image


def edit_settings(strength: float, *args, **overrides) -> EditSettings:
    """Edit settings at ``strength``: the default params' counterfactual section, with the given fields (positional
    in :class:`EditSettings` order after ``strength``, or by name) replaced."""
    names = [f.name for f in fields(EditSettings)][1:]
    return replace(stage_settings(default_params()["counterfactual"], strength), **dict(zip(names, args)), **overrides)


MEASURES = ("flip_rate", "ssim", "psnr_db", "l1", "reversibility_ssim", "composition_ssim")


def ddim(n: int, big_t: int = 1000, prediction_type: str = "epsilon") -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=big_t, schedule="scaled_linear_beta", beta_start=0.0015,
                          beta_end=0.0195, clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(n)
    return sched


class ConstantEps(torch.nn.Module):
    """A stand-in U-Net predicting the same noise everywhere; records the timesteps it is called at."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps, self.calls = eps, []

    def forward(self, z, timesteps, class_labels):
        self.calls.append(int(timesteps[0]))
        return self.eps.expand_as(z)


@pytest.mark.parametrize("n, big_t, strength, expected", [
    (50, 1000, 0.5, list(range(0, 501, 20))),
    (50, 1000, 0.2, list(range(0, 201, 20))),
    (25, 1000, 0.5, list(range(0, 521, 40))),   # 12.5 steps round half up to 13
    (5, 100, 1.0, [0, 20, 40, 60, 80]),         # capped below T
    (50, 1000, 0.0, [0]),
])
def test_edit_timesteps_are_multiples_of_the_scheduler_stride(n, big_t, strength, expected):
    assert edit_timesteps(ddim(n, big_t), strength) == expected


def test_inversion_ends_where_denoising_starts_and_round_trips_exactly():
    # With a prediction that does not depend on z or t, one DDIM step is exactly undone by one reversed step on the
    # same pair of timesteps: any off-by-one between the two loops breaks the equality.
    sched = ddim(50)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    unet = ConstantEps(torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    ts = edit_timesteps(sched, 0.5)
    labels = torch.tensor([0, 1])
    zt = invert(unet, sched, z, labels, ts)
    assert unet.calls == ts[:-1]
    unet.calls.clear()
    back = denoise_from(unet, sched, zt, labels, 1.0, ts)
    assert unet.calls == ts[:0:-1]
    assert unet.calls[0] == ts[-1]
    assert torch.allclose(back, z, atol=1e-4)
    assert (zt - z).abs().mean() > 0.1  # it did go somewhere


def test_guidance_from_the_null_class_is_classifier_free_guidance():
    torch.manual_seed(0)
    unet = DiffusionModelUNet(**unet_args(2, [8, 16], [False, True], 1, 8, 8)).eval()
    with torch.no_grad():
        for p in unet.parameters():  # MONAI zero-initialises output layers
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
        z, t, y = torch.randn(3, 2, 16, 16), torch.full((3,), 40), torch.tensor([0, 1, 1])
        null = torch.full_like(y, NULL_CLASS)
        assert torch.allclose(guided_output(unet, z, t, y, 3.0, reference=null), guided_output(unet, z, t, y, 3.0), atol=1e-5)
        # from the source label, a null edit (target = source) is the plain conditional prediction at any scale
        assert torch.allclose(guided_output(unet, z, t, y, 5.0, reference=y), unet(z, timesteps=t, class_labels=y), atol=1e-5)
        w, src = 4.0, 1 - y
        cond, ref = unet(z, timesteps=t, class_labels=y), unet(z, timesteps=t, class_labels=src)
        assert torch.allclose(guided_output(unet, z, t, y, w, reference=src), ref + w * (cond - ref), atol=1e-4)


def test_only_the_denoising_clamps():
    sched = clip_denoised_latents(ddim(50), 0.5)
    free = unclamped(sched)
    assert sched.clip_sample and not free.clip_sample and free.timesteps is sched.timesteps
    z = torch.full((1, 3, 4, 4), 2.0)  # a clean latent beyond the clamp
    unet = ConstantEps(torch.zeros(1, 3, 4, 4))
    ts = edit_timesteps(sched, 0.3)
    assert torch.allclose(denoise_from(unet, free, invert(unet, free, z, torch.tensor([0]), ts), torch.tensor([0]),
                                       1.0, ts), z, atol=1e-5)
    assert invert(unet, sched, z, torch.tensor([0]), ts).abs().max() < 1.0  # clamping would have lost the source


@pytest.fixture(scope="module")
def tiny_sampler(pipeline_run) -> Sampler:
    return Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", 50, torch.device("cpu"))


@pytest.fixture(scope="module")
def test_images(pipeline_run) -> tuple[np.ndarray, np.ndarray]:
    return real_images(pipeline_run / "data/prepared", "test")


def test_model_input_pads_like_prepare(pipeline_run, tiny_sampler, test_images):
    padded, _ = load_prepared(pipeline_run / "data/prepared", "test")
    assert torch.equal(model_input(test_images[0], tiny_sampler.pad), padded)


def test_ddim_inversion_round_trip_on_the_trained_model(tiny_sampler, test_images):
    """Inversion then denoising with the same label at guidance 1 comes back close to the source latent; SDEdit (fresh
    noise) and a random latent do not."""
    images, labels = test_images
    z = tiny_sampler.encode(model_input(images[:8], tiny_sampler.pad))
    y = torch.from_numpy(labels[:8]).long()
    seeds = list(range(8))
    errors = {}
    for name, settings in {"inversion": edit_settings(0.5, Method.ddim_inversion, InversionLabel.source, 1.0,
                                                     inversion_guidance=1.0),
                           "sdedit": edit_settings(0.5, Method.sdedit, InversionLabel.source, 1.0)}.items():
        errors[name] = (edit_latents(tiny_sampler, z, y, y, settings, seeds) - z).abs().mean().item()
    errors["random"] = (tiny_sampler.initial_noise(seeds) - z).abs().mean().item()
    scale = z.abs().mean().item()
    assert errors["inversion"] < 0.1 * scale, errors
    assert errors["inversion"] < 0.25 * errors["sdedit"] < errors["random"], errors


def test_guided_inversion_makes_the_null_edit_the_round_trip_of_one_ode(tiny_sampler, test_images):
    """Inverting under the guided prediction the denoising uses (w 7 both ways) makes a null edit (target = source)
    as close to the source latent as the unguided round trip (only the discretisation is left), whereas the plain
    inversion (w 1 up, w 7 down) lands elsewhere; a real edit changes with it."""
    images, labels = test_images
    z = tiny_sampler.encode(model_input(images[:8], tiny_sampler.pad))
    y = torch.from_numpy(labels[:8]).long()
    seeds = list(range(8))
    plain = edit_settings(0.5, guidance_scale=7.0, inversion_guidance=1.0)
    guided = edit_settings(0.5, guidance_scale=7.0, inversion_guidance=7.0)
    unguided = edit_settings(0.5, guidance_scale=1.0, inversion_guidance=1.0)
    err = {name: (edit_latents(tiny_sampler, z, y, y, s, seeds) - z).abs().mean().item()
           for name, s in (("plain", plain), ("guided", guided), ("unguided", unguided))}
    assert err["guided"] < 1.25 * err["unguided"], err  # measured 0.0053 vs 0.0054 (plain 0.0195)
    assert err["guided"] < 0.5 * err["plain"], err
    assert not torch.allclose(edit_latents(tiny_sampler, z, y, 1 - y, plain, seeds),
                              edit_latents(tiny_sampler, z, y, 1 - y, guided, seeds))
    with pytest.raises(PipelineError, match="inversion_guidance"):
        edit_settings(0.5, inversion_guidance=-1.0)


def test_null_inversion_label_conditions_on_the_null_class(tiny_sampler):
    z = tiny_sampler.initial_noise([0, 1])
    y = torch.tensor([0, 1])
    a = edit_latents(tiny_sampler, z, y, y, edit_settings(0.3, inversion_label=InversionLabel.unconditional), [0, 1])
    b = edit_latents(tiny_sampler, z, y, y, edit_settings(0.3), [0, 1])
    assert not torch.allclose(a, b)
    assert NULL_CLASS == 2


@pytest.mark.parametrize("method", list(Method))
def test_strength_zero_returns_the_source(tiny_sampler, test_images, method):
    images, labels = test_images
    z = tiny_sampler.encode(model_input(images[:3], tiny_sampler.pad))
    y = torch.from_numpy(labels[:3]).long()
    out = edit_latents(tiny_sampler, z, y, 1 - y, edit_settings(0.0, method, guidance_scale=4.0), [0, 1, 2])
    assert torch.equal(out, z)
    edited = edit_images(tiny_sampler, images[:3], labels[:3], 1 - labels[:3],
                         edit_settings(0.0, method, change_sigma=0.0), [0, 1, 2], 2)
    assert np.array_equal(edited, tiny_sampler.decode(z))  # the autoencoder round trip, nothing more


def test_smooth_change_keeps_broad_changes_and_the_source_detail():
    rng = np.random.default_rng(0)
    src = rng.integers(60, 190, (2, 28, 28)).astype(np.uint8)
    assert np.array_equal(smooth_change(src, src + 9, 1.5), src + 9)  # a uniform change passes as it is
    edit = src.copy()
    edit[0, 14, 14] += 60  # a one-pixel change spreads into a blob of the same total, the other image untouched
    out = smooth_change(src, edit, 1.5).astype(int) - src
    assert 0 < out[0, 14, 14] < 60 and abs(out[0].sum() - 60) <= 10 and (out[0] >= 0).all()
    assert out[0, 14, 16] > 0 and not out[1].any()
    assert np.array_equal(smooth_change(src, edit, 0.0), edit)
    with pytest.raises(ValueError, match="shape"):
        smooth_change(src, edit[:1], 1.0)
    with pytest.raises(PipelineError, match="change_sigma"):
        edit_settings(0.5, change_sigma=-1.0)


def test_an_edit_with_a_change_sigma_is_the_low_pass_of_the_plain_edit(tiny_sampler, test_images):
    images, labels = test_images[0][:3], test_images[1][:3]
    plain = edit_images(tiny_sampler, images, labels, 1 - labels, edit_settings(0.4, guidance_scale=3.0,
                        change_sigma=0.0), [0, 1, 2], 2)
    smooth = edit_images(tiny_sampler, images, labels, 1 - labels, edit_settings(0.4, guidance_scale=3.0,
                         change_sigma=1.5), [0, 1, 2], 2)
    assert np.array_equal(smooth, smooth_change(images, plain, 1.5))
    assert not np.array_equal(smooth, plain)


def test_edit_command_defaults_are_the_stage_params(tmp_path):
    cf = default_params()["counterfactual"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(default_params()))
    defaults = command_defaults(edit_cmd.app, edit_cmd.SECTION, ["--params", str(params)], False)
    shared = set(stage_options(edit_cmd.app)) & set(cf)
    assert {"method", "strength_rule", "guide_strengths", "guidance_scale", "num_inference_steps", "seed"} <= shared
    assert defaults == {k: cf[k] for k in shared}  # every edit option named like a stage key defaults to its value
    help_text = run_subprocess("edit", ["--help", "--params", str(params)]).stdout
    assert "default: guided" in help_text.replace("[", "").replace("]", "")  # --help shows the params value
    missing = tmp_path / "none.yaml"  # no params file: the options are required, with click's usual message
    result = CliRunner().invoke(edit_cmd.app, ["--image", str(params), "--target", "normal", "--out", str(tmp_path),
                                               "--params", str(missing)])
    assert result.exit_code != 0 and "Missing option" in result.output


def test_guide_accepts_a_clear_call_of_the_target_only():
    prob = np.array([0.95, 0.55, 0.45, 0.2, 0.05])
    target = np.array([1, 1, 1, 0, 0])
    # threshold 0.5: plain call; margin 0.5 asks for P >= 0.75 towards pneumonia, P < 0.25 towards normal
    assert guide_accepts(prob, 0.5, target, 0.0).tolist() == [True, True, False, True, True]
    assert guide_accepts(prob, 0.5, target, 0.5).tolist() == [True, False, False, True, True]
    assert guide_accepts(prob, 0.5, 1 - target, 0.5).tolist() == [False, False, False, False, False]
    with pytest.raises(PipelineError, match="margin"):
        guide_accepts(prob, 0.5, target, 1.0)


def test_edit_guided_stops_each_image_at_the_first_strength_the_guide_accepts(pipeline_run, tiny_sampler,
                                                                            test_images, monkeypatch):
    # exact equality across batch compositions holds in float32; bf16 kernels may round by batch size
    monkeypatch.setenv("CXR_PRECISION", "fp32")
    images, labels = test_images[0][:4], test_images[1][:4]
    guide = load_classifier(pipeline_run / "models/guide")
    settings, seeds, grid = edit_settings(0.0, guidance_scale=3.0), [5, 6, 7, 8], [0.6, 0.2, 0.4, 0.8]
    out, chosen = edit_guided(tiny_sampler, images, labels, 1 - labels, settings, grid, guide, 0.0, seeds, 3)
    assert set(chosen.tolist()) <= set(grid)
    for i in range(len(images)):
        at = {s: edit_images(tiny_sampler, images[i:i + 1], labels[i:i + 1], 1 - labels[i:i + 1],
                             edit_settings(s, guidance_scale=3.0), seeds[i:i + 1], 1) for s in sorted(grid)}
        assert np.array_equal(out[i], at[chosen[i]][0])  # the edit at its strength, nothing else
        accepted = {s: bool(guide_accepts(guide.predict_proba(e), guide.threshold, 1 - labels[i:i + 1], 0.0)[0])
                    for s, e in at.items()}
        assert not any(accepted[s] for s in sorted(grid) if s < chosen[i])  # no smaller strength was enough
        assert accepted[chosen[i]] or chosen[i] == max(grid)  # ... and its own was, unless it is the last
    with pytest.raises(PipelineError, match="candidate strengths"):
        edit_guided(tiny_sampler, images, labels, 1 - labels, settings, [0.2, 1.5], guide, 0.0, seeds, 3)


def test_edit_at_gives_each_image_its_own_strength(tiny_sampler, test_images, monkeypatch):
    monkeypatch.setenv("CXR_PRECISION", "fp32")  # exact equality across batch compositions: float32
    images, labels = test_images[0][:4], test_images[1][:4]
    settings, seeds, strengths = edit_settings(0.0, guidance_scale=3.0), [5, 6, 7, 8], np.array([0.2, 0.5, 0.2, 0.5])
    out = edit_at(tiny_sampler, images, labels, 1 - labels, settings, strengths, seeds, 3)
    for s in (0.2, 0.5):
        i = np.flatnonzero(strengths == s)
        alone = edit_images(tiny_sampler, images[i], labels[i], 1 - labels[i], edit_settings(s, guidance_scale=3.0),
                            [seeds[k] for k in i], 3)
        assert np.array_equal(out[i], alone)
    assert not np.array_equal(out[:1], out[1:2])


@pytest.fixture(scope="module")
def source_latents(tiny_sampler, test_images) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = test_images
    return tiny_sampler.encode(model_input(images[:4], tiny_sampler.pad)), torch.from_numpy(labels[:4]).long()


@pytest.mark.parametrize("method", list(Method))
def test_without_a_mask_an_edit_is_inversion_then_guided_denoising_bitwise(tiny_sampler, source_latents, method):
    # mask none must be exactly the edit before masks existed: invert (under the default guidance 7) or noise to t0,
    # denoise under the target
    z, y = source_latents
    seeds = [0, 1, 2, 3]
    settings = edit_settings(0.4, method, guidance_scale=3.0)
    ts = edit_timesteps(tiny_sampler.scheduler, 0.4)
    if method == Method.sdedit:
        zt = noise_to(tiny_sampler.scheduler, z, tiny_sampler.initial_noise(seeds), ts[-1])
    else:
        zt = invert(tiny_sampler.unet, unclamped(tiny_sampler.scheduler), z, y, ts, settings.inversion_guidance)
    expected = denoise_from(tiny_sampler.unet, tiny_sampler.scheduler, zt, 1 - y, 3.0, ts)
    assert torch.equal(edit_latents(tiny_sampler, z, y, 1 - y, settings, seeds), expected)


def test_inversion_trajectory_ends_at_the_inverted_latent(tiny_sampler, source_latents):
    z, y = source_latents
    ts = edit_timesteps(tiny_sampler.scheduler, 0.3)
    traj = invert_trajectory(tiny_sampler.unet, tiny_sampler.scheduler, z, y, ts)
    assert len(traj) == len(ts) and traj[0] is z
    assert torch.equal(traj[-1], invert(tiny_sampler.unet, tiny_sampler.scheduler, z, y, ts))


def test_diffedit_mask_is_binary_and_shrinks_with_the_threshold(tiny_sampler, source_latents):
    z, y = source_latents
    noises = [tiny_sampler.initial_noise(mask_seeds([0, 1, 2, 3], d)) for d in range(2)]
    t = edit_timesteps(tiny_sampler.scheduler, 0.5)[-1]
    masks = {th: diffedit_mask(tiny_sampler.unet, tiny_sampler.scheduler, z, y, 1 - y, t, noises, th)
             for th in (0.0, 0.3, 0.7, 1.0)}
    assert masks[0.0].shape == (4, 1, *z.shape[2:]) and bool((masks[0.0] == 1).all())
    assert set(torch.unique(masks[0.7]).tolist()) <= {0.0, 1.0}
    areas = [masks[th].sum().item() for th in (0.0, 0.3, 0.7, 1.0)]
    assert areas == sorted(areas, reverse=True) and areas[-1] >= 4  # the maximum of each image is always inside
    assert mask_seeds([0, 1], 0) != mask_seeds([0, 1], 1) and mask_seeds([7], 0) == mask_seeds([3, 7], 0)[1:]


def test_a_masked_edit_keeps_the_source_latent_outside_the_mask(tiny_sampler, source_latents):
    """DiffEdit: after every step the outside of the mask is the inversion's latent, so the edit ends there as the
    source latent itself, while the inside changes."""
    z, y = source_latents
    seeds, settings = [0, 1, 2, 3], edit_settings(0.5, guidance_scale=4.0, mask=Mask.diffedit, mask_threshold=0.5)
    ts = edit_timesteps(tiny_sampler.scheduler, 0.5)
    noises = [tiny_sampler.initial_noise(mask_seeds(seeds, d)) for d in range(settings.mask_noise_draws)]
    m = diffedit_mask(tiny_sampler.unet, tiny_sampler.scheduler, z, y, 1 - y, ts[-1], noises, 0.5).bool()
    assert 0 < m.float().mean() < 1
    out = edit_latents(tiny_sampler, z, y, 1 - y, settings, seeds)
    outside, inside = ~m.expand_as(z), m.expand_as(z)
    assert torch.equal(out[outside], z[outside])
    unmasked = edit_latents(tiny_sampler, z, y, 1 - y, edit_settings(0.5, guidance_scale=4.0), seeds)
    assert (out[inside] - z[inside]).abs().mean() > 0.1 * (unmasked - z).abs().mean()
    # and at every step: a stand-in U-Net, a half mask, a given trajectory
    unet = ConstantEps(torch.ones(1, 2, 4, 4))
    sched, half = ddim(50), torch.zeros(1, 1, 4, 4)
    half[..., :2] = 1
    traj = [torch.full((1, 2, 4, 4), float(j)) for j in range(len(ts))]
    res = denoise_from(unet, sched, traj[-1], torch.tensor([1]), 1.0, ts, mask=half, trajectory=traj)
    assert torch.equal(res[..., 2:], traj[0][..., 2:]) and not torch.equal(res[..., :2], traj[0][..., :2])
    with pytest.raises(ValueError, match="trajectory"):
        denoise_from(unet, sched, traj[-1], torch.tensor([1]), 1.0, ts, mask=half)


@pytest.mark.parametrize("kwargs", [{"mask_threshold": 1.5}, {"mask_threshold": -0.1}, {"mask_noise_draws": 0}])
def test_edit_settings_reject_bad_mask_options(kwargs):
    with pytest.raises(PipelineError, match="mask"):
        edit_settings(0.5, mask=Mask.diffedit, **kwargs)


def test_edits_do_not_depend_on_the_batch_size(tiny_sampler, test_images):
    images, labels = test_images
    settings = edit_settings(0.4, Method.sdedit, guidance_scale=2.0)
    a = edit_images(tiny_sampler, images[:4], labels[:4], 1 - labels[:4], settings, [5, 6, 7, 8], 4)
    b = edit_images(tiny_sampler, images[:4], labels[:4], 1 - labels[:4], settings, [5, 6, 7, 8], 1)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_similarity_of_identical_images_is_finite():
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    s = similarity(x, x)
    assert np.allclose(s["ssim"], 1) and np.all(s["l1"] == 0) and np.all(np.isfinite(s["psnr_db"]))


def test_select_sources_is_seeded_and_checks_the_count():
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    idx = select_sources(labels, 2, 0)
    assert list(labels[idx]) == [0, 0, 1, 1] and np.array_equal(idx, select_sources(labels, 2, 0))
    assert len(select_sources(labels, None, 0)) == len(labels)
    with pytest.raises(PipelineError, match="n_per_class"):
        select_sources(labels, 4, 0)


# --- the stage on the tiny profile ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cf_metrics(pipeline_run) -> dict:
    """The counterfactual stage's metrics and its regenerate baseline's (counterfactual_baseline), together."""
    return (json.loads((pipeline_run / "metrics/counterfactual.json").read_text())
            | json.loads((pipeline_run / "metrics/counterfactual_baseline.json").read_text()))


def test_stage_writes_every_metric_as_a_plain_number(cf_metrics):
    for d in DIRECTIONS:
        for prefix in ("", "baseline_identity_", "baseline_regenerate_"):
            for m in MEASURES:
                assert f"{prefix}{d}_{m}" in cf_metrics
    for k, v in cf_metrics.items():
        if v is None:  # the honest count has nothing to score where no source is read as its own label
            d = k.split("_")[0]
            assert k in (f"{d}_readable_flip_rate", f"{d}_readable_ssim") and cf_metrics[f"{d}_readable_n"] == 0, k
            continue
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), k
    for k in cf_metrics:
        if k.endswith(("flip_rate", "ssim")) and cf_metrics[k] is not None:
            assert -1.0 <= cf_metrics[k] <= 1.0, k
    assert cf_metrics["n2p_n"] == cf_metrics["p2n_n"] == 3
    for d in DIRECTIONS:  # every source is either counted or excluded
        kept = cf_metrics[f"{d}_readable_n"]
        assert 0 <= kept <= 3 and cf_metrics[f"{d}_excluded_share"] == pytest.approx(1 - kept / 3, abs=1e-5)
    for d in DIRECTIONS:  # the tiny profile's rule is guided
        for key in ("strength_max", "guide_flip_rate", "guide_agreement"):
            assert 0.0 <= cf_metrics[f"{d}_{key}"] <= 1.0


def test_stage_baselines_bracket_the_trade_off(cf_metrics):
    for d in DIRECTIONS:
        # the identity baseline is the autoencoder round trip: the closest any edit can stay to its source
        assert cf_metrics[f"baseline_identity_{d}_ssim"] >= cf_metrics[f"baseline_regenerate_{d}_ssim"]
        assert cf_metrics[f"baseline_identity_{d}_ssim"] >= cf_metrics[f"{d}_ssim"] - 0.02


def test_stage_sweep_has_one_row_per_strength(pipeline_run, cf_metrics):
    import yaml

    strengths = yaml.safe_load(pipeline_run.params.read_text())["counterfactual"]["sweep_strengths"]
    lines = (pipeline_run / "metrics/plots/counterfactual_sweep.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["strength", "flip_n2p", "ssim_n2p", "flip_p2n", "ssim_p2n"]
    assert [float(line.split("\t")[0]) for line in lines[1:]] == strengths
    for s in strengths:
        for d in DIRECTIONS:
            assert f"sweep_t{s:g}_{d}_flip_rate" in cf_metrics and f"sweep_t{s:g}_{d}_ssim" in cf_metrics


def stage_settings(cf: dict, strength: float) -> EditSettings:
    """The edit settings of a counterfactual params section, at ``strength``."""
    return EditSettings(strength, Method(cf["method"]), InversionLabel(cf["inversion_label"]), cf["guidance_scale"],
                        GuidanceReference(cf["guidance_reference"]), Mask(cf["mask"]), cf["mask_threshold"],
                        cf["mask_noise_draws"], cf["inversion_guidance"], cf["change_sigma"])


def test_stage_edits_each_image_at_the_strength_its_guide_chose(pipeline_run, cf_metrics):
    import yaml

    cf = yaml.safe_load(pipeline_run.params.read_text())["counterfactual"]
    assert cf["strength_rule"] == "guided"
    with np.load(pipeline_run / "data/counterfactuals.npz") as z:
        sources, src, edits, seeds, chosen = (z["sources"], z["source_labels"], z["edits"], z["seeds"].tolist(),
                                              z["strengths"])
    assert set(chosen.tolist()) <= set(cf["guide_strengths"])
    for d, (label, _) in DIRECTIONS.items():
        assert cf_metrics[f"{d}_strength"] == pytest.approx(chosen[src == label].mean(), abs=1e-5)
        assert cf_metrics[f"{d}_strength_max"] == pytest.approx(chosen[src == label].max(), abs=1e-5)
    sampler = Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", cf["num_inference_steps"],
                      torch.device("cpu"), cf["clip_denoised"])
    guide = load_classifier(pipeline_run / "models/guide")
    for i in range(len(sources)):
        one = slice(i, i + 1)
        expected = edit_images(sampler, sources[one], src[one], 1 - src[one], stage_settings(cf, float(chosen[i])),
                               seeds[one], 1)
        assert np.abs(edits[i].astype(int) - expected[0].astype(int)).max() <= 1, i
        smaller = [s for s in cf["guide_strengths"] if s < chosen[i]]
        if smaller:  # the strength before was not enough for the guide
            before = edit_images(sampler, sources[one], src[one], 1 - src[one], stage_settings(cf, max(smaller)),
                                 seeds[one], 1)
            assert not guide_accepts(guide.predict_proba(before), guide.threshold, 1 - src[one], cf["guide_margin"])[0]


def test_stage_arrays_and_figures(pipeline_run):
    with np.load(pipeline_run / "data/counterfactuals.npz") as z:
        arrays = dict(z)
    n = len(arrays["sources"])
    for key in ("edits", "reversed", "null_edits"):
        assert arrays[key].shape == arrays["sources"].shape == (n, 28, 28) and arrays[key].dtype == np.uint8
    assert np.array_equal(arrays["target_labels"], 1 - arrays["source_labels"])
    images, labels = real_images(pipeline_run / "data/prepared", "test")
    assert np.array_equal(images[arrays["test_index"]], arrays["sources"])
    assert np.array_equal(labels[arrays["test_index"]], arrays["source_labels"])
    for name in ("counterfactual_sweep.png", "counterfactual_frontier.png", "counterfactual_panels.png"):
        with Image.open(pipeline_run / "metrics/plots" / name) as img:
            assert img.size[0] > 200 and img.size[1] > 200


def test_stage_on_val_edits_val_images(pipeline_run, tmp_path, capsys):
    ws = pipeline_run
    args = ["--params", ws.params, "--data", ws / "data/prepared", "--ldm", ws / "models/ldm",
            "--autoencoder", ws / "models/autoencoder", "--classifier", ws / "models/classifier",
            "--out", tmp_path / "cf.npz",
            "--metrics", tmp_path / "cf.json", "--curve", tmp_path / "cf.tsv", "--figure", tmp_path / "cf.png",
            "--frontier", tmp_path / "frontier.png", "--panels", tmp_path / "panels.png", "--split", "val",
            "--n-per-class", "2", "--sweep-strengths", "0.5"]
    args += ["--guide", tmp_path / "nowhere"]
    assert run("counterfactual", args + ["--strength-rule", "guided"]) == 1
    assert "nowhere has no config.json: run the train_guide stage" in capsys.readouterr().err
    assert run("counterfactual", args + ["--strength-rule", "fixed"]) == 0  # the fixed rule reads no guide
    assert (tmp_path / "frontier.png").is_file() and not (tmp_path / "nowhere").exists()
    with np.load(tmp_path / "cf.npz") as z:
        index, sources, src, edits, seeds, chosen = (z["test_index"], z["sources"], z["source_labels"], z["edits"],
                                                     z["seeds"].tolist(), z["strengths"])
    images, labels = real_images(ws / "data/prepared", "val")
    assert np.array_equal(images[index], sources) and np.bincount(labels[index]).tolist() == [2, 2]
    import yaml

    cf = yaml.safe_load(ws.params.read_text())["counterfactual"]
    metrics = json.loads((tmp_path / "cf.json").read_text())
    assert (metrics["n2p_strength"], metrics["p2n_strength"]) == (cf["strength_to_pneumonia"], cf["strength_to_normal"])
    assert "n2p_guide_flip_rate" not in metrics
    sampler = Sampler(ws / "models/ldm", ws / "models/autoencoder", cf["num_inference_steps"], torch.device("cpu"),
                      cf["clip_denoised"])
    for label, key in ((0, "strength_to_pneumonia"), (1, "strength_to_normal")):  # each direction at its own t0
        i = np.flatnonzero(src == label)
        assert np.all(chosen[i] == cf[key])
        expected = edit_images(sampler, sources[i], src[i], 1 - src[i], stage_settings(cf, cf[key]),
                               [seeds[k] for k in i], 2)
        assert np.abs(edits[i].astype(int) - expected.astype(int)).max() <= 1, key
    capsys.readouterr()
    assert run("counterfactual", args + ["--n-per-class", "13"]) == 1  # 12 per class
    assert "but the val split has only 12" in capsys.readouterr().err


# --- the user command -------------------------------------------------------------------------------------------------


def model_args(ws) -> list[str]:
    return ["--ldm", str(ws / "models/ldm"), "--autoencoder", str(ws / "models/autoencoder"),
            "--classifier", str(ws / "models/classifier"), "--guide", str(ws / "models/guide"), "--steps", "10"]


def test_edit_command_on_a_png_matches_the_library(pipeline_run, test_images, tmp_path):
    images, labels = test_images
    cf = yaml.safe_load(pipeline_run.params.read_text())["counterfactual"]
    k = int(np.flatnonzero(labels == 0)[0])
    Image.fromarray(images[k], mode="L").save(tmp_path / "child.png")
    result = invoke_command(edit_cmd, ["--image", str(tmp_path / "child.png"), "--target", "pneumonia",
                                               "--strength", "0.5", "--out", str(tmp_path / "out"),
                                               *model_args(pipeline_run)], pipeline_run.params)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out/child_to_pneumonia.png") as img:
        out = np.asarray(img)
    assert out.shape == (28, 28)
    sampler = Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", 10, torch.device("cpu"),
                      clip_denoised=cf["clip_denoised"])  # the command's defaults: the params section's
    expected = edit_images(sampler, images[k:k + 1], np.array([0]), np.array([1]), stage_settings(cf, 0.5),
                           [cf["seed"]], 1)
    assert np.abs(out.astype(int) - expected[0].astype(int)).max() <= 1
    assert (tmp_path / "out/child_to_pneumonia_difference.png").is_file()


def test_edit_command_guides_the_strength_by_default(pipeline_run, test_images, tmp_path):
    images, labels = test_images
    cf = yaml.safe_load(pipeline_run.params.read_text())["counterfactual"]
    k = int(np.flatnonzero(labels == 1)[0])
    Image.fromarray(images[k], mode="L").save(tmp_path / "child.png")
    args = ["--image", str(tmp_path / "child.png"), "--target", "normal", "--out", str(tmp_path / "out"),
            "--guide-margin", "0.1", *model_args(pipeline_run)]
    result = invoke_command(edit_cmd, args, pipeline_run.params)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out/child_to_normal.png") as img:
        out = np.asarray(img)
    sampler = Sampler(pipeline_run / "models/ldm", pipeline_run / "models/autoencoder", 10, torch.device("cpu"),
                      clip_denoised=cf["clip_denoised"])
    expected, _ = edit_guided(sampler, images[k:k + 1], np.array([1]), np.array([0]), stage_settings(cf, 0.0),
                              cf["guide_strengths"], load_classifier(pipeline_run / "models/guide"), 0.1,
                              [cf["seed"]], 1)
    assert np.abs(out.astype(int) - expected[0].astype(int)).max() <= 1
    missing = invoke_command(edit_cmd, args + ["--guide", str(tmp_path / "nowhere")], pipeline_run.params)
    assert isinstance(missing.exception, PipelineError) and "nowhere" in str(missing.exception)


def make_dicom(path, photometric: str = "MONOCHROME2", rows: int = 64, cols: int = 80) -> Dataset:
    """A 16-bit (12 stored) radiograph-like DICOM with geometry and a patient name."""
    y, x = np.mgrid[:rows, :cols]
    pixels = (2000 + 1500 * np.sin(x / 7.0) * np.cos(y / 5.0)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "Doe^Jane", "12345"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing, ds.PatientOrientation = [0.5, 0.5], ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_edit_command_on_a_dicom_keeps_geometry_and_marks_it_derived(pipeline_run, tmp_path):
    source = make_dicom(tmp_path / "xray.dcm")
    result = invoke_command(edit_cmd, ["--image", str(tmp_path / "xray.dcm"), "--target", "pneumonia",
                                               "--out", str(tmp_path / "out"), *model_args(pipeline_run)], pipeline_run.params)
    assert result.exit_code == 0, result.output
    ds = pydicom.dcmread(tmp_path / "out/xray_to_pneumonia.dcm")
    assert (ds.Rows, ds.Columns) == (64, 80) and ds.pixel_array.shape == (64, 80)
    assert "DERIVED" in ds.ImageType and ds.SOPClassUID == SecondaryCaptureImageStorage
    for uid in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert ds[uid].value != source[uid].value, uid
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5] and list(ds.PatientOrientation) == ["L", "F"]
    assert str(ds.PatientName) != "Doe^Jane" and ds.PatientID != "12345"
    assert "(guided (margin" in ds.DerivationDescription  # the default rule
    assert (tmp_path / "out/xray_to_pneumonia_difference.png").is_file()
    # the change lives in the centre square; the columns outside it keep the source's grey levels
    src = read_image(tmp_path / "xray.dcm").pixels
    out = ds.pixel_array.astype(np.float64) / 65535
    assert np.abs(out[:, :8] - src[:, :8]).max() < 1e-3


def test_monochrome1_is_inverted_on_reading(tmp_path):
    make_dicom(tmp_path / "m2.dcm", "MONOCHROME2")
    make_dicom(tmp_path / "m1.dcm", "MONOCHROME1")
    m2, m1 = read_image(tmp_path / "m2.dcm").pixels, read_image(tmp_path / "m1.dcm").pixels
    assert np.allclose(m1, 1 - m2, atol=1e-6)


def test_edit_command_rejects_a_file_that_is_no_image(pipeline_run, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    result = invoke_command(edit_cmd, ["--image", str(tmp_path / "notes.png"), "--target", "normal",
                                               "--out", str(tmp_path / "out"), *model_args(pipeline_run)], pipeline_run.params)
    assert isinstance(result.exception, PipelineError) and "notes.png" in str(result.exception)


def test_edit_help_explains_every_option():
    result = CliRunner().invoke(edit_cmd.app, ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    command = edit_cmd.app.registered_commands[0].callback
    import typer.main

    click_cmd = typer.main.get_command(edit_cmd.app)
    for param in click_cmd.params:
        if param.name == "help":
            continue
        assert param.help and len(param.help) > 15, param.name
        assert param.opts[0] in result.output, param.opts[0]
    assert command.__doc__
