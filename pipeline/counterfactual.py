"""Stage ``counterfactual``: edit real test X-rays to the other clinical status; measure what changed and what not.

For ``n_per_class`` real test images of each class (a seeded subset; ``split: val`` edits val images instead, to
choose settings), each image is edited to the other class (:mod:`pipeline.diffusion.edit`: autoencoder, DDIM inversion
or SDEdit to the direction's edit strength, guided denoising under the target label, optionally inside a DiffEdit mask,
decoding, the low-pass of the change to the source, ``change_sigma``). Per direction (``n2p`` normal → pneumonia,
``p2n`` pneumonia → normal):

- effectiveness: the evaluator's flip rate, the share of edits it calls the target class (at its val threshold);
- identity: SSIM, PSNR and L1 between edit and source;
- reversibility: SSIM between the source and the edit edited back to the source label;
- composition: SSIM between the source and a null edit (target = source label);
- the same for the ``identity`` baseline (strength 0: encode and decode only, what every edit pays for the
  autoencoder); the other end of the trade-off, a fresh sample that forgets the source, is the
  ``counterfactual_baseline`` stage's (it depends on the cohort's sampler, these edits do not);
- a sweep of the strength: flip rate and SSIM per strength, to choose an operating point.

The strength of an edit: ``strength_rule: fixed`` edits every image of a direction at that direction's strength
(``strength_to_pneumonia``, ``strength_to_normal``); ``guided`` edits each image at the smallest of
``guide_strengths`` whose edit the *guide* (a second classifier, stage ``train_guide``) calls the target class with
``guide_margin`` (:func:`pipeline.diffusion.edit.edit_guided`), and the edit back and the null edit likewise (the null
edit at the edit's own strength). The flip rate is always the evaluator's.

Reads the ``counterfactual`` section of params.yaml.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from pipeline.core.artifacts import atomic_outputs, save_npz, write_json, write_tsv
from pipeline.core.cli import PipelineError, params_option, run_stage
from pipeline.core.data import real_images
from pipeline.core.runtime import pick_device
from pipeline.diffusion.edit import (CHANGE_SIGMA_OPTION, CLIP_DENOISED_OPTION, GUIDANCE_REFERENCE_OPTION,
                                     GUIDANCE_SCALE_OPTION, GUIDE_MARGIN_OPTION, GUIDE_STRENGTHS_OPTION,
                                     INVERSION_GUIDANCE_OPTION, INVERSION_LABEL_OPTION, MASK_NOISE_DRAWS_OPTION,
                                     MASK_OPTION, MASK_THRESHOLD_OPTION, METHOD_OPTION, NUM_INFERENCE_STEPS_OPTION,
                                     SEED_OPTION, STRENGTH_RULE_OPTION, EditSettings, GuidanceReference,
                                     Inversion, InversionLabel, Mask, Method, StrengthRule, edit_guided,
                                     strength_option)
from pipeline.diffusion.sampler import Sampler
from pipeline.evaluation.classifier import load_classifier
from pipeline.evaluation.counterfactual import (ARROWS, DIRECTIONS, direction_scores, guide_scores, panel_rows,
                                                readable_scores, select_sources, sweep_scores)
from pipeline.figures.charts import save_frontier, save_panels
from pipeline.figures.grids import save_edit_rows

SECTION = "counterfactual"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


class Split(str, Enum):
    """Real split whose images are edited."""

    test = "test"
    val = "val"


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (real images to edit)."),
    ldm: Path = typer.Option(..., help="Diffusion model folder (output of train_ldm)."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    guide: Path = typer.Option(..., help="Guide classifier folder (output of train_guide); read by --strength-rule "
                               "guided only."),
    out: Path = typer.Option(..., help="Output npz: sources, edits, edits back, null edits, labels, test indices."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (per direction, baselines, sweep)."),
    curve: Path = typer.Option(..., help="Output TSV, one row per sweep strength, for dvc plots."),
    figure: Path = typer.Option(..., help="Output PNG: flip rate and SSIM against the strength."),
    frontier: Path = typer.Option(..., help="Output PNG: flip rate against SSIM, the sweep's fixed strengths as a "
                                  "line and the stage's own edits as a star, per direction."),
    panels: Path = typer.Option(..., help="Output PNG: source | edit | signed difference | edit back, per image."),
    params: Path = params_option(),
    split: Split = typer.Option(..., help="Real split edited: test (what the stage reports) or val (to choose "
                                "edit settings without looking at test, e.g. --split val --seed 1)."),
    n_per_class: Optional[int] = typer.Option(None, min=1, help="Real images edited per class (a seeded subset); "
                                              "null edits all of them."),
    strength_to_pneumonia: float = strength_option("pneumonia"),
    strength_to_normal: float = strength_option("normal"),
    strength_rule: StrengthRule = STRENGTH_RULE_OPTION,
    guide_strengths: list[float] = GUIDE_STRENGTHS_OPTION,
    guide_margin: float = GUIDE_MARGIN_OPTION,
    method: Method = METHOD_OPTION,
    inversion_label: InversionLabel = INVERSION_LABEL_OPTION,
    inversion_guidance: float = INVERSION_GUIDANCE_OPTION,
    guidance_scale: float = GUIDANCE_SCALE_OPTION,
    num_inference_steps: int = NUM_INFERENCE_STEPS_OPTION,
    guidance_reference: GuidanceReference = GUIDANCE_REFERENCE_OPTION,
    clip_denoised: float = CLIP_DENOISED_OPTION,
    mask: Mask = MASK_OPTION,
    mask_threshold: float = MASK_THRESHOLD_OPTION,
    mask_noise_draws: int = MASK_NOISE_DRAWS_OPTION,
    change_sigma: float = CHANGE_SIGMA_OPTION,
    sweep_strengths: list[float] = typer.Option(..., help="Strengths of the "
                                                "sweep (flip rate and SSIM per strength)."),
    seed: int = SEED_OPTION,
    n_panels: int = typer.Option(..., min=1, help="Images per direction shown in the panels PNG."),
    batch_size: int = typer.Option(..., min=1, help="Images per batch (no effect on the edits)."),
) -> None:
    """Edit real images to the other class; write pairs, metrics, a strength sweep and panels."""
    t0 = time.time()
    if any(not 0.0 <= s <= 1.0 for s in sweep_strengths):
        raise PipelineError(f"counterfactual.sweep_strengths must lie in [0, 1], got {sweep_strengths}")
    images, labels = real_images(data, split.value)
    test_index = select_sources(labels, n_per_class, seed, split.value)
    sources, src = images[test_index], labels[test_index]
    tgt = 1 - src
    seeds = [seed + i for i in range(len(sources))]
    sampler = Sampler(ldm, autoencoder, num_inference_steps, pick_device(), clip_denoised)
    evaluator = load_classifier(classifier)
    settings = EditSettings(0.0, method, inversion_label, guidance_scale, guidance_reference, mask,
                            mask_threshold, mask_noise_draws, inversion_guidance, change_sigma)
    to = np.array([strength_to_normal, strength_to_pneumonia])  # strength per target label
    guided = strength_rule == StrengthRule.guided
    top = max([*sweep_strengths, *(guide_strengths if guided else to)])
    # the sources' way up, once: the edits, the null edits, the identity baseline and the sweep all start from it
    up = Inversion(sampler, sources, src, settings, top, seeds, batch_size, "inversion of the sources")

    def edits_back(edits: np.ndarray, strengths: np.ndarray | float) -> np.ndarray:
        back = Inversion(sampler, edits, tgt, settings, float(np.max(strengths)), seeds, batch_size, "inversion back")
        return back.edit_at(src, strengths, "edit back")

    if guided:
        if not (guide / "config.json").is_file():
            raise PipelineError(f"strength_rule guided needs the guide's model folder (--guide), and {guide} has no "
                                "config.json: run the train_guide stage first (dvc repro train_guide), or set "
                                "counterfactual.strength_rule: fixed")
        guide_model = load_classifier(guide)
        edits, strengths = edit_guided(sampler, sources, src, tgt, settings, guide_strengths, guide_model,
                                       guide_margin, seeds, batch_size, "guided edit", inversion=up)
        backs, back_strengths = edit_guided(sampler, edits, tgt, src, settings, guide_strengths, guide_model,
                                            guide_margin, seeds, batch_size, "guided edit back")
    else:
        strengths, back_strengths = to[tgt], to[src]
        edits = up.edit_at(tgt, strengths, "edit")
        backs = edits_back(edits, back_strengths)  # to the source class, at that direction's t0
    strengths, back_strengths = np.broadcast_to(strengths, len(src)), np.broadcast_to(back_strengths, len(src))
    nulls = up.edit_at(src, strengths, "null edit")  # the edit's own strength, target = source
    result = {**{f"{d}_strength": round(float(strengths[src == a].mean()), 5) for d, (a, _) in DIRECTIONS.items()},
              **direction_scores(sources, src, edits, backs, nulls, evaluator)}  # guided: the mean strength
    if guided:
        result.update(guide_scores(src, edits, strengths, evaluator, guide_model))

    recon = up.edit_at(tgt, 0.0, "identity baseline")
    recon_back = edits_back(recon, 0.0)
    result.update({f"baseline_identity_{k}": v for k, v in
                   direction_scores(sources, src, recon, recon_back, recon, evaluator).items()})

    edits_at = {s: up.edit_at(tgt, s, "sweep, edit") for s in sorted(set(sweep_strengths))}
    sweep_keys, rows = sweep_scores(sources, src, edits_at, evaluator)
    result.update(sweep_keys)
    result["wall_time_s"] = round(time.time() - t0, 1)
    p_source, p_edit = evaluator.predict_proba(sources), evaluator.predict_proba(edits)
    result.update(readable_scores(sources, src, edits, p_source, p_edit, evaluator.threshold))  # the honest count
    outputs = (out, metrics, curve, figure, frontier, panels)
    with atomic_outputs(*outputs) as (tmp_out, tmp_metrics, tmp_curve, tmp_fig, tmp_frontier, tmp_pan):
        save_npz(tmp_out, sources=sources, edits=edits, reversed=backs, null_edits=nulls, source_labels=src,
                 target_labels=tgt, test_index=test_index, seeds=np.asarray(seeds), p_source=p_source, p_edit=p_edit,
                 strengths=np.asarray(strengths, np.float64), back_strengths=np.asarray(back_strengths, np.float64))
        write_json(tmp_metrics, result)
        write_tsv(tmp_curve, rows)
        sweep_panels = {name: {ARROWS[d]: [r[f"{col}_{d}"] for r in rows] for d in DIRECTIONS}
                        for name, col in (("flip rate to the target class (evaluator)", "flip"),
                                          ("SSIM edit vs source", "ssim"))}
        save_panels(tmp_fig, [r["strength"] for r in rows], sweep_panels, "edit strength t0 (fraction of the schedule)",
                    f"counterfactual edits: {method.value}, inversion label {inversion_label.value} (guidance "
                    f"{inversion_guidance:g}),\nguidance {guidance_scale:g}, mask {mask.value}, change low-pass σ "
                    f"{change_sigma:g} px, {num_inference_steps} DDIM steps")
        guided = strength_rule == StrengthRule.guided
        points = {d: (result[f"{d}_ssim"], result[f"{d}_flip_rate"],
                      f"guided t0 per image (mean {result[f'{d}_strength']:.2f})" if guided
                      else f"this stage's t0 {result[f'{d}_strength']:g}") for d in DIRECTIONS}
        save_frontier(tmp_frontier, rows, ARROWS, points, f"counterfactual edits of real {split.value} images: flip "
                             f"rate against identity\nchange low-pass σ {change_sigma:g} px, guidance "
                             f"{guidance_scale:g}, {num_inference_steps} DDIM steps")
        idx, row_labels = panel_rows(src, test_index, p_source, p_edit, strengths, n_panels, evaluator.threshold)
        rule = (f"t0 per image: the smallest of {min(guide_strengths):g}-{max(guide_strengths):g} the guide accepts "
                f"(margin {guide_margin:g})" if strength_rule == StrengthRule.guided else
                f"t0 {strength_to_pneumonia:g} (n2p) / {strength_to_normal:g} (p2n)")
        save_edit_rows(tmp_pan, sources[idx], edits[idx], row_labels,
                       f"counterfactual edits of real {split.value} images, {rule},\n{method.value}, guidance "
                       f"{guidance_scale:g}, change low-pass σ {change_sigma:g} px",
                       backs=backs[idx])
    typer.echo(" ".join(f"{k}={result[k]}" for k in result if not k.startswith(("sweep", "baseline"))), err=True)


if __name__ == "__main__":
    run_stage(app, SECTION)
