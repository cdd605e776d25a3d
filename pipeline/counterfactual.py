"""Stage ``counterfactual``: edit real test X-rays to the other clinical status; measure what changed and what not.

For ``n_per_class`` real test images of each class (a seeded subset; ``split: val`` edits val images instead, to
choose settings), each image is edited to the other class (:mod:`pipeline.editing`: autoencoder, DDIM inversion or
SDEdit to the direction's edit strength, guided denoising under the target label, optionally inside a DiffEdit mask,
decoding, the low-pass of the change to the source, ``change_sigma``). Per direction (``n2p`` normal → pneumonia,
``p2n`` pneumonia → normal):

- effectiveness: the evaluator's flip rate, the share of edits it calls the target class (at its val threshold);
- identity: SSIM, PSNR and L1 between edit and source;
- reversibility: SSIM between the source and the edit edited back to the source label;
- composition: SSIM between the source and a null edit (target = source label);
- the same for two baselines at the ends of the trade-off: ``identity`` (strength 0: encode and decode only, what
  every edit pays for the autoencoder) and ``regenerate`` (a fresh sample of the target class from image i's seed,
  made as the sample stage makes the cohorts, with its ``settings.json``; it forgets the source);
- a sweep of the strength: flip rate and SSIM per strength, to choose an operating point.

The strength of an edit: ``strength_rule: fixed`` edits every image of a direction at that direction's strength
(``strength_to_pneumonia``, ``strength_to_normal``); ``guided`` edits each image at the smallest of
``guide_strengths`` whose edit the *guide* (a second classifier, stage ``train_guide``) calls the target class with
``guide_margin`` (:func:`pipeline.editing.edit_guided`), and the edit back and the null edit likewise (the null edit at
the edit's own strength). The flip rate is always the evaluator's.

Reads the ``counterfactual`` section of params.yaml.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from pipeline.artifacts import atomic_outputs, save_npz, write_json, write_tsv
from pipeline.charts import plt, save_panels
from pipeline.classifier import Evaluator, load_classifier
from pipeline.cli import PipelineError, params_option, run_stage
from pipeline.data import CLASSES
from pipeline.diffmaps import save_edit_rows
from pipeline.editing import (CHANGE_SIGMA_OPTION, CLIP_DENOISED_OPTION, GUIDANCE_REFERENCE_OPTION,
                              GUIDANCE_SCALE_OPTION, GUIDE_MARGIN_OPTION, GUIDE_STRENGTHS_OPTION,
                              INVERSION_GUIDANCE_OPTION, INVERSION_LABEL_OPTION, MASK_NOISE_DRAWS_OPTION, MASK_OPTION,
                              MASK_THRESHOLD_OPTION, METHOD_OPTION, STRENGTH_RULE_OPTION, EditSettings,
                              GuidanceReference, InversionLabel, Mask, Method, StrengthRule, edit_at, edit_guided,
                              flips_to, similarity, strength_option)
from pipeline.fid_ref import real_uint8
from pipeline.models import pick_device
from pipeline.plots import finish_figure
from pipeline.sample import Sampler

SECTION = "counterfactual"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)

DIRECTIONS = {"n2p": (0, 1), "p2n": (1, 0)}
"""Direction key -> (source label, target label)."""
ARROWS = {"n2p": "normal→pneumonia", "p2n": "pneumonia→normal"}


class Split(str, Enum):
    """Real split whose images are edited."""

    test = "test"
    val = "val"


def select_sources(labels: np.ndarray, n_per_class: int | None, seed: int, split: str = "test") -> np.ndarray:
    """Indices of ``n_per_class`` images of each class (all when None), a seeded subset, normals first.

    Raises:
        PipelineError: a class has fewer images than asked for.
    """
    rng = np.random.default_rng(seed)
    out = []
    for k, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == k)
        if n_per_class is not None and n_per_class > len(idx):
            raise PipelineError(f"counterfactual.n_per_class is {n_per_class}, but the {split} split has only "
                                f"{len(idx)} {name} images; lower it, or set it to null for all of them")
        out.append(np.sort(rng.choice(idx, n_per_class, replace=False)) if n_per_class is not None else idx)
    return np.concatenate(out)


def edit_scores(sources: np.ndarray, edits: np.ndarray, target: np.ndarray,
                evaluator: Evaluator) -> dict[str, float]:
    """Flip rate to ``target`` and mean SSIM / PSNR / L1 of ``edits`` against ``sources`` (one direction)."""
    sim = similarity(edits, sources)
    flips = flips_to(evaluator.predict_proba(edits), evaluator.threshold, target)
    return {"flip_rate": float(flips.mean()), **{k: float(v.mean()) for k, v in sim.items()}}


def direction_scores(sources: np.ndarray, source_labels: np.ndarray, edits: np.ndarray, backs: np.ndarray,
                     nulls: np.ndarray, evaluator: Evaluator) -> dict[str, float]:
    """``<dir>_{n, flip_rate, ssim, psnr_db, l1, reversibility_ssim, composition_ssim}`` for both directions."""
    out: dict[str, float] = {}
    for d, (src, tgt) in DIRECTIONS.items():
        m = source_labels == src
        scores = edit_scores(sources[m], edits[m], np.full(m.sum(), tgt), evaluator)
        scores["reversibility_ssim"] = float(similarity(backs[m], sources[m])["ssim"].mean())
        scores["composition_ssim"] = float(similarity(nulls[m], sources[m])["ssim"].mean())
        out.update({f"{d}_n": int(m.sum()), **{f"{d}_{k}": round(v, 5) for k, v in scores.items()}})
    return out


def sweep_scores(sources: np.ndarray, source_labels: np.ndarray, edits_at: dict[float, np.ndarray],
                 evaluator: Evaluator) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Metrics ``sweep_t<s>_<dir>_<measure>`` and TSV rows (strength, flip and SSIM per direction) of the sweep."""
    keys, rows = {}, []
    for s, edits in edits_at.items():
        row: dict[str, float] = {"strength": s}
        for d, (src, tgt) in DIRECTIONS.items():
            m = source_labels == src
            scores = edit_scores(sources[m], edits[m], np.full(m.sum(), tgt), evaluator)
            keys.update({f"sweep_t{s:g}_{d}_{k}": round(v, 5) for k, v in scores.items()})
            row.update({f"flip_{d}": round(scores["flip_rate"], 5), f"ssim_{d}": round(scores["ssim"], 5)})
        rows.append(row)
    return keys, rows


def guide_scores(source_labels: np.ndarray, edits: np.ndarray, strengths: np.ndarray, evaluator: Evaluator,
                 guide: Evaluator) -> dict[str, float]:
    """Per direction, of guided edits: mean and largest strength, and the guide's own flip rate (its plain call) and
    its agreement with the evaluator on the edits (each at its own threshold)."""
    out: dict[str, float] = {}
    p_guide, p_eval = guide.predict_proba(edits), evaluator.predict_proba(edits)
    for d, (src, tgt) in DIRECTIONS.items():
        m = source_labels == src
        out[f"{d}_strength_max"] = round(float(strengths[m].max()), 5)
        out[f"{d}_guide_flip_rate"] = round(float(flips_to(p_guide[m], guide.threshold, np.full(m.sum(), tgt)).mean()),
                                            5)
        out[f"{d}_guide_agreement"] = round(float(((p_guide[m] >= guide.threshold)
                                                   == (p_eval[m] >= evaluator.threshold)).mean()), 5)
    return out


def panel_rows(source_labels: np.ndarray, test_index: np.ndarray, p_source: np.ndarray, p_edit: np.ndarray,
               strengths: np.ndarray, n: int) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` images of each direction, and their row labels (direction, test index, strength,
    P(pneumonia))."""
    idx, labels = [], []
    for d, (src, _) in DIRECTIONS.items():
        for i in np.flatnonzero(source_labels == src)[:n]:
            idx.append(i)
            labels.append(f"{ARROWS[d]}\ntest #{test_index[i]}, t0 {strengths[i]:g}\n"
                          f"P(pn) {p_source[i]:.2f}→{p_edit[i]:.2f}")
    return np.asarray(idx, dtype=np.int64), labels


def save_sweep_figure(path: Path, rows: list[dict[str, float]], title: str) -> None:
    """Flip rate and SSIM against the strength, one line per direction."""
    panels = {name: {ARROWS[d]: [r[f"{col}_{d}"] for r in rows] for d in DIRECTIONS}
              for name, col in (("flip rate to the target class (evaluator)", "flip"), ("SSIM edit vs source", "ssim"))}
    save_panels(path, [r["strength"] for r in rows], panels, "edit strength t0 (fraction of the schedule)", title)


def save_frontier_figure(path: Path, rows: list[dict[str, float]], points: dict[str, tuple[float, float, str]],
                         title: str) -> None:
    """Flip rate against SSIM, the trade-off an operating point is chosen on.

    Args:
        path: output PNG.
        rows: the sweep's rows (:func:`sweep_scores`): one fixed strength each, drawn as a line per direction with
            each point labelled by its t0.
        points: direction -> (SSIM, flip rate, label) of the stage's own edits, drawn as a star.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6.6, 4.8))
    for k, d in enumerate(DIRECTIONS):
        color = f"C{k}"
        x, y = [r[f"ssim_{d}"] for r in rows], [r[f"flip_{d}"] for r in rows]
        ax.plot(x, y, marker="o", color=color, label=f"{ARROWS[d]}: one fixed t0 (sweep)")
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['strength']:g}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=color)
        ssim, flip, label = points[d]
        ax.plot([ssim], [flip], marker="*", markersize=15, color=color, linestyle="none",
                label=f"{ARROWS[d]}: {label}")
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="flip rate 0.90 / SSIM 0.85 (the targets)")
    ax.axvline(0.85, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("SSIM edit vs source (higher keeps more of the image)")
    ax.set_ylabel("flip rate to the target class (evaluator)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    finish_figure(fig, path, title, 10)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (real images to edit)."),
    ldm: Path = typer.Option(..., help="Diffusion model folder (output of train_ldm)."),
    autoencoder: Path = typer.Option(..., help="Autoencoder model folder."),
    classifier: Path = typer.Option(..., help="Evaluator model folder (output of train_classifier)."),
    guide: Path = typer.Option(..., help="Guide classifier folder (output of train_guide); read by --strength-rule "
                               "guided only."),
    cohort_settings: Path = typer.Option(..., help="The sample stage's settings.json (guidance, steps, clamp, eta): "
                                         "the regenerate baseline is sampled as the cohorts were."),
    out: Path = typer.Option(..., help="Output npz: sources, edits, edits back, null edits, labels, test indices."),
    metrics: Path = typer.Option(..., help="Output metrics JSON (per direction, baselines, sweep)."),
    curve: Path = typer.Option(..., help="Output TSV, one row per sweep strength, for dvc plots."),
    figure: Path = typer.Option(..., help="Output PNG: flip rate and SSIM against the strength."),
    frontier: Path = typer.Option(..., help="Output PNG: flip rate against SSIM, the sweep's fixed strengths as a "
                                  "line and the stage's own edits as a star, per direction."),
    panels: Path = typer.Option(..., help="Output PNG: source | edit | signed difference | edit back, per image."),
    params: Path = params_option(),
    split: Split = typer.Option(Split.test, help="Real split edited: test (what the stage reports) or val (to choose "
                                "edit settings without looking at test, e.g. --split val --seed 1)."),
    n_per_class: Optional[int] = typer.Option(100, min=1, help="Real images edited per class (a seeded subset); "
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
    num_inference_steps: int = typer.Option(50, min=1, help="DDIM steps of a full schedule; an edit of strength "
                                            "t0 runs about t0 x this many steps up and as many down."),
    guidance_reference: GuidanceReference = GUIDANCE_REFERENCE_OPTION,
    clip_denoised: float = CLIP_DENOISED_OPTION,
    mask: Mask = MASK_OPTION,
    mask_threshold: float = MASK_THRESHOLD_OPTION,
    mask_noise_draws: int = MASK_NOISE_DRAWS_OPTION,
    change_sigma: float = CHANGE_SIGMA_OPTION,
    sweep_strengths: list[float] = typer.Option([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], help="Strengths of the "
                                                "sweep (flip rate and SSIM per strength)."),
    seed: int = typer.Option(0, help="Seeds the choice of images; image i uses seed + i for noise (SDEdit, "
                             "the regenerate baseline)."),
    n_panels: int = typer.Option(6, min=1, help="Images per direction shown in the panels PNG."),
    batch_size: int = typer.Option(128, min=1, help="Images per batch (no effect on the edits)."),
) -> None:
    """Edit real images to the other class; write pairs, metrics, a strength sweep and panels."""
    t0 = time.time()
    if any(not 0.0 <= s <= 1.0 for s in sweep_strengths):
        raise PipelineError(f"counterfactual.sweep_strengths must lie in [0, 1], got {sweep_strengths}")
    images, labels = real_uint8(data, split.value)
    test_index = select_sources(labels, n_per_class, seed, split.value)
    sources, src = images[test_index], labels[test_index]
    tgt = 1 - src
    seeds = [seed + i for i in range(len(sources))]
    sampler = Sampler(ldm, autoencoder, num_inference_steps, pick_device(), clip_denoised)
    evaluator = load_classifier(classifier)
    settings = EditSettings(0.0, method, inversion_label, guidance_scale, guidance_reference, mask,
                            mask_threshold, mask_noise_draws, inversion_guidance, change_sigma)
    to = np.array([strength_to_normal, strength_to_pneumonia])  # strength per target label

    def edit(x: np.ndarray, a: np.ndarray, b: np.ndarray, s: float | np.ndarray, desc: str) -> np.ndarray:
        return edit_at(sampler, x, a, b, settings, np.broadcast_to(s, len(x)), seeds, batch_size, desc)

    if strength_rule == StrengthRule.guided:
        if not (guide / "config.json").is_file():
            raise PipelineError(f"strength_rule guided needs the guide's model folder (--guide), and {guide} has no "
                                "config.json: run the train_guide stage first (dvc repro train_guide), or set "
                                "counterfactual.strength_rule: fixed")
        guide_model = load_classifier(guide)
        edits, strengths = edit_guided(sampler, sources, src, tgt, settings, guide_strengths, guide_model,
                                       guide_margin, seeds, batch_size, "guided edit")
        backs, back_strengths = edit_guided(sampler, edits, tgt, src, settings, guide_strengths, guide_model,
                                            guide_margin, seeds, batch_size, "guided edit back")
    else:
        strengths, back_strengths = to[tgt], to[src]
        edits = edit(sources, src, tgt, strengths, "edit")
        backs = edit(edits, tgt, src, back_strengths, "edit back")  # to the source class, at that direction's t0
    strengths, back_strengths = np.broadcast_to(strengths, len(src)), np.broadcast_to(back_strengths, len(src))
    nulls = edit(sources, src, src, strengths, "null edit")  # the edit's own strength, target = source
    result = {**{f"{d}_strength": round(float(strengths[src == a].mean()), 5) for d, (a, _) in DIRECTIONS.items()},
              **direction_scores(sources, src, edits, backs, nulls, evaluator)}  # guided: the mean strength
    if strength_rule == StrengthRule.guided:
        result.update(guide_scores(src, edits, strengths, evaluator, guide_model))

    recon = edit(sources, src, tgt, 0.0, "identity baseline")
    recon_back = edit(recon, tgt, src, 0.0, "identity baseline back")
    result.update({f"baseline_identity_{k}": v for k, v in
                   direction_scores(sources, src, recon, recon_back, recon, evaluator).items()})
    fresh = Sampler.from_settings(ldm, autoencoder, cohort_settings, pick_device())
    regen = fresh.generate(tgt, seeds, fresh.guidance_scale, batch_size, desc="regenerate baseline")
    regen_src = fresh.generate(src, seeds, fresh.guidance_scale, batch_size, desc="regenerate baseline, source")
    result.update({f"baseline_regenerate_{k}": v for k, v in
                   direction_scores(sources, src, regen, regen_src, regen_src, evaluator).items()})

    edits_at = {s: edit(sources, src, tgt, s, "sweep, edit") for s in sorted(set(sweep_strengths))}
    sweep_keys, rows = sweep_scores(sources, src, edits_at, evaluator)
    result.update(sweep_keys)
    result["wall_time_s"] = round(time.time() - t0, 1)
    p_source, p_edit = evaluator.predict_proba(sources), evaluator.predict_proba(edits)
    outputs = (out, metrics, curve, figure, frontier, panels)
    with atomic_outputs(*outputs) as (tmp_out, tmp_metrics, tmp_curve, tmp_fig, tmp_frontier, tmp_pan):
        save_npz(tmp_out, sources=sources, edits=edits, reversed=backs, null_edits=nulls, source_labels=src,
                 target_labels=tgt, test_index=test_index, seeds=np.asarray(seeds), p_source=p_source, p_edit=p_edit,
                 strengths=np.asarray(strengths, np.float64), back_strengths=np.asarray(back_strengths, np.float64))
        write_json(tmp_metrics, result)
        write_tsv(tmp_curve, rows)
        save_sweep_figure(tmp_fig, rows, f"counterfactual edits: {method.value}, inversion label "
                          f"{inversion_label.value} (guidance {inversion_guidance:g}),\nguidance {guidance_scale:g}, "
                          f"mask {mask.value}, change low-pass σ {change_sigma:g} px, "
                          f"{num_inference_steps} DDIM steps")
        guided = strength_rule == StrengthRule.guided
        points = {d: (result[f"{d}_ssim"], result[f"{d}_flip_rate"],
                      f"guided t0 per image (mean {result[f'{d}_strength']:.2f})" if guided
                      else f"this stage's t0 {result[f'{d}_strength']:g}") for d in DIRECTIONS}
        save_frontier_figure(tmp_frontier, rows, points, f"counterfactual edits of real {split.value} images: flip "
                             f"rate against identity\nchange low-pass σ {change_sigma:g} px, guidance "
                             f"{guidance_scale:g}, {num_inference_steps} DDIM steps")
        idx, row_labels = panel_rows(src, test_index, p_source, p_edit, strengths, n_panels)
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
