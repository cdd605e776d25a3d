"""Edit one chest X-ray (PNG or DICOM) to the other clinical status: "how would pneumonia look on this child?".
Not a DVC stage.

Examples:
    python -m pipeline.edit --image x.png --target pneumonia --out out/                  # strength guided per image
    python -m pipeline.edit --image x.png --target pneumonia --strength 0.5 --out out/   # one fixed strength

The image is read (DICOM: grayscale pipeline, MONOCHROME1 inverted, min-max scaled), its centre square resized to the
data size, encoded, taken up the diffusion schedule by DDIM inversion (or SDEdit) to the strength, denoised under the
target label with classifier-free guidance and decoded (see ``pipeline/diffusion/edit.py``). By default the strength is
guided, as in the counterfactual stage: the smallest candidate strength whose edit the guide classifier
(``train_guide``, ``models/guide``) calls the target class; ``--strength`` or ``--strength-rule fixed`` edits at one
strength instead. The change is added back to the
full-resolution image, so the output keeps the input's size; a DICOM output is a derived Secondary Capture with new
UIDs (see ``pipeline/formats/images.py``). Every edit setting defaults to the counterfactual stage's (the
``counterfactual`` section of ``--params``, params.yaml). Writes into ``--out``:

- ``<name>_to_<target>.png`` or ``.dcm``: the edit, same rows and columns as the input;
- ``<name>_to_<target>_difference.png``: source | edit | signed difference heat map | edit back, at the data size.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from pipeline.core.artifacts import load_model_config
from pipeline.core.cli import PipelineError, params_option, run_command
from pipeline.core.data import CLASSES, Label
from pipeline.core.runtime import pick_device
from pipeline.diffusion.edit import (CHANGE_SIGMA_OPTION, CLIP_DENOISED_OPTION, GUIDANCE_REFERENCE_OPTION,
                                     GUIDANCE_SCALE_OPTION, GUIDE_MARGIN_OPTION, GUIDE_STRENGTHS_OPTION,
                                     INVERSION_GUIDANCE_OPTION, INVERSION_LABEL_OPTION, MASK_NOISE_DRAWS_OPTION,
                                     MASK_OPTION, MASK_THRESHOLD_OPTION, METHOD_OPTION, STRENGTH_HELP,
                                     STRENGTH_RULE_OPTION, EditSettings, GuidanceReference, InversionLabel, Mask,
                                     Method, StrengthRule, edit_guided, edit_images, strength_option)
from pipeline.diffusion.sampler import Sampler
from pipeline.evaluation.classifier import load_classifier
from pipeline.figures.grids import save_edit_rows
from pipeline.formats.images import apply_change, derived_dicom, model_view, read_image, unflip, write_png

SECTION = "counterfactual"  # the edit options take their defaults from this params.yaml section, as the stage edits

app = typer.Typer(add_completion=False, help=__doc__)


def evaluator_note(classifier: Path, images: np.ndarray) -> tuple[str, str]:
    """``P(pneumonia)`` of each image by the evaluator, as text for the figure and the log ('' without one)."""
    if not (classifier / "config.json").is_file():
        return "", f"no evaluator at {classifier}: P(pneumonia) not reported"
    ev = load_classifier(classifier)
    p = ev.predict_proba(images)
    text = " → ".join(f"{v:.2f}" for v in p)
    return f"\nevaluator P(pneumonia) {text}", f"evaluator P(pneumonia) {text} (threshold {ev.threshold:.2f})"


@app.command()
def main(
    image: Path = typer.Option(..., exists=True, dir_okay=False, help="Image to edit: a DICOM file (recognised by "
                               "its content) or a PNG / any grey or colour image Pillow reads."),
    target: Label = typer.Option(..., help="Clinical status to edit the image to."),
    out: Path = typer.Option(..., help="Output folder (created if absent) for the edit and the difference map."),
    strength: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=f"Edit strength t0: {STRENGTH_HELP} "
                                             "Given, the edit runs at this one strength (the fixed rule); with "
                                             "--strength-rule fixed and no --strength: --strength-to-<target>."),
    params: Path = params_option(),
    strength_rule: StrengthRule = STRENGTH_RULE_OPTION,
    strength_to_pneumonia: float = strength_option("pneumonia"),
    strength_to_normal: float = strength_option("normal"),
    guide_strengths: list[float] = GUIDE_STRENGTHS_OPTION,
    guide_margin: float = GUIDE_MARGIN_OPTION,
    source: Optional[Label] = typer.Option(None, help="Clinical status of the input image; default: the other "
                                           "class than --target. Conditions the inversion (--inversion-label "
                                           "source) and the edit back."),
    method: Method = METHOD_OPTION,
    inversion_label: InversionLabel = INVERSION_LABEL_OPTION,
    inversion_guidance: float = INVERSION_GUIDANCE_OPTION,
    guidance_scale: float = GUIDANCE_SCALE_OPTION,
    num_inference_steps: int = typer.Option(..., "--num-inference-steps", "--steps", min=1, help="DDIM steps of "
                                            "a full schedule (an edit runs about t0 x steps up and as many down)."),
    guidance_reference: GuidanceReference = GUIDANCE_REFERENCE_OPTION,
    clip_denoised: float = CLIP_DENOISED_OPTION,
    mask: Mask = MASK_OPTION,
    mask_threshold: float = MASK_THRESHOLD_OPTION,
    mask_noise_draws: int = MASK_NOISE_DRAWS_OPTION,
    change_sigma: float = CHANGE_SIGMA_OPTION,
    seed: int = typer.Option(..., help="Seed of the SDEdit noise and of the DiffEdit mask's noise draws (DDIM "
                             "inversion itself is deterministic)."),
    ldm: Path = typer.Option(Path("models/ldm"), help="Diffusion model folder."),
    autoencoder: Path = typer.Option(Path("models/autoencoder"), help="Autoencoder model folder."),
    classifier: Path = typer.Option(Path("models/classifier"), help="Evaluator folder; when present, its "
                                    "P(pneumonia) of the source and the edit is printed and shown; absent: skipped."),
    guide: Path = typer.Option(Path("models/guide"), help="Guide classifier folder (train_guide), which chooses the "
                               "strength of a guided edit."),
) -> None:
    """Edit one image to the target class; write the edit (same size and format as the input) and a difference map."""
    src_label = CLASSES.index(source.value) if source else 1 - CLASSES.index(target.value)
    tgt_label = CLASSES.index(target.value)
    guided = strength is None and strength_rule == StrengthRule.guided
    if guided and not (guide / "config.json").is_file():
        raise PipelineError(f"a guided edit needs the guide classifier, and {guide} has no config.json: run dvc repro "
                            "train_guide, pass --guide, or edit at one strength (--strength 0.5)")
    fixed = {"pneumonia": strength_to_pneumonia, "normal": strength_to_normal}
    back_strength = fixed[CLASSES[src_label]] if strength is None else strength  # the way back's own
    strength = fixed[target.value] if strength is None else strength
    size = load_model_config(autoencoder)["data"]["size"]
    read = read_image(image)
    small = model_view(read.pixels, size)[None]
    sampler = Sampler(ldm, autoencoder, num_inference_steps, pick_device(), clip_denoised)
    settings = EditSettings(strength, method, inversion_label, guidance_scale, guidance_reference, mask,
                            mask_threshold, mask_noise_draws, inversion_guidance, change_sigma)
    a, b = np.array([src_label]), np.array([tgt_label])
    if guided:
        guide_model = load_classifier(guide)
        edit, chosen = edit_guided(sampler, small, a, b, settings, guide_strengths, guide_model, guide_margin, [seed],
                                   1, "guided edit")
        back, _ = edit_guided(sampler, edit, b, a, settings, guide_strengths, guide_model, guide_margin, [seed], 1,
                              "guided edit back")
        strength = float(chosen[0])
    else:
        edit = edit_images(sampler, small, a, b, settings, [seed], 1, "edit")
        back = edit_images(sampler, edit, b, a, replace(settings, strength=back_strength), [seed], 1, "edit back")
    how = f"guided (margin {guide_margin:g})" if guided else "fixed"
    full = unflip(apply_change(read.pixels, small[0], edit[0]), read.flips)

    out.mkdir(parents=True, exist_ok=True)
    stem = f"{image.stem}_to_{target.value}"
    desc = (f"counterfactual {CLASSES[src_label]}->{target.value} strength={strength:g} ({how}) method={method.value} "
            f"inversion_label={inversion_label.value} inversion_guidance={inversion_guidance:g} "
            f"guidance={guidance_scale:g} "
            f"guidance_reference={guidance_reference.value} mask={mask.value} mask_threshold={mask_threshold:g} "
            f"change_sigma={change_sigma:g} ddim_steps={num_inference_steps} seed={seed}")
    if read.dataset is not None:
        derived_dicom(read.dataset, full, target.value, desc).save_as(out / f"{stem}.dcm", enforce_file_format=True)
        written = out / f"{stem}.dcm"
    else:
        write_png(out / f"{stem}.png", full)
        written = out / f"{stem}.png"
    note, log = evaluator_note(classifier, np.concatenate([small, edit]))
    save_edit_rows(out / f"{stem}_difference.png", small, edit, [f"{CLASSES[src_label]}→{target.value}"],
                   f"t0 {strength:g} ({how}), {method.value}, guidance {guidance_scale:g}, "
                   f"low-pass σ {change_sigma:g}{note}",
                   backs=back, cell=1.6)
    typer.echo(f"wrote {written} and {out / (stem + '_difference.png')}; {log}", err=True)


if __name__ == "__main__":
    run_command(app, SECTION)
