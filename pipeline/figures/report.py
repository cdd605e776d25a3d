"""One self-contained HTML page of a run: the model card, every target against its measurement, every figure (PNG
files embedded as data URIs, image grids upscaled without smoothing), the curves of the TSV files (one quantity per
axis), every metric, the params and the git revision. Nothing is loaded from the network: it reads offline, from
``file://``, in an air-gapped hospital.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.cli import PipelineError
from pipeline.figures.common import finish_figure, plt

__all__ = ["curve_png", "render_report", "metrics_of", "MODEL_CARD"]

MODEL_CARD: tuple[tuple[str, str], ...] = (
    ("Limits", "Images are 28×28 pixels (PneumoniaMNIST): far below clinical resolution, so no finding finer than a "
               "few millimetres on a child's chest can appear or be judged. Two labels only (normal, pneumonia; no "
               "bacterial / viral split, no other finding). One source population (Guangzhou, ages 1–5, Kermany et "
               "al. 2018). The only judges so far are two classifiers trained on the same images; no radiologist has "
               "read the synthetic images or the edits."),
    ("Intended use", "Research and teaching: synthetic cohorts to augment small data sets and stress-test "
                     "diagnostic classifiers, and counterfactual edits that show how pneumonia would look on one "
                     "child's anatomy. Not for diagnosis, not for any clinical decision, not as evidence about a "
                     "patient."),
    ("Data", "PneumoniaMNIST (MedMNIST v2, CC BY 4.0): 4,708 train / 524 val / 624 test pediatric chest X-rays, "
             "normal or pneumonia, centre-cropped and resized to 28 px by MedMNIST, reflect-padded to 32 px here. "
             "External check: VinDr-PCXR DICOMs when present (external_eval)."),
    ("Training", "MONAI AutoencoderKL (L1 + KL, patch-adversarial) to 16×16 latents; a class-conditional MONAI "
                 "DiffusionModelUNet (v-prediction, Min-SNR weighting, EMA, learned null class for classifier-free "
                 "guidance; Optuna-tuned learning rate and width); DDIM sampling with guidance per class and the x0 "
                 "spread. Settings chosen on val or held-out data (docs/params-history.md)."),
    ("Privacy", "Every synthetic image is checked against its nearest training images in pixel and Inception space "
                "(the privacy stage fails the run on a near-copy); synthetic DICOMs carry no patient data."),
)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def curve_png(tsv: Path) -> bytes | None:
    """A PNG of a TSV curve file: its first column on x, one panel per other numeric column (None: nothing to draw)."""
    lines = [ln.split("\t") for ln in tsv.read_text().splitlines() if ln.strip()]
    if len(lines) < 2:
        return None
    header, rows = lines[0], lines[1:]
    try:
        data = np.array([[float(v) for v in r] for r in rows])
    except ValueError:
        return None
    cols = [i for i in range(1, len(header)) if not header[i].endswith("_std")]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.6), squeeze=False)
    for ax, i in zip(axes[0], cols):
        std = header.index(f"{header[i]}_std") if f"{header[i]}_std" in header else None
        ax.plot(data[:, 0], data[:, i], marker="o" if len(data) < 20 else None, ms=3, color=f"C{i % 10}")
        if std is not None:
            ax.fill_between(data[:, 0], data[:, i] - data[:, std], data[:, i] + data[:, std], alpha=0.25,
                            color=f"C{i % 10}")
        ax.set_xlabel(header[0].replace("_", " "))
        ax.set_ylabel(header[i].replace("_", " "))
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    finish_figure(fig, buf, tsv.stem.replace("_", " "))  # type: ignore[arg-type]
    return buf.getvalue()


def _fmt(value: Any, fmt: str = ".4g") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    return format(value, fmt)


def _targets_table(rows: Sequence[dict[str, Any]]) -> str:
    out = ["<table><tr><th>target</th><th>bound</th><th>measured</th><th></th><th>source</th></tr>"]
    for r in rows:
        state = "not measured" if r["met"] is None else ("met" if r["met"] else "missed")
        value = "—" if r["value"] is None else _fmt(r["value"], r["fmt"])
        out.append(f"<tr class='{state.replace(' ', '-')}'><td>{html.escape(r['label'])}</td>"
                   f"<td>{html.escape(r['op'])} {_fmt(r['bound'], r['fmt'])}</td><td><b>{value}</b></td>"
                   f"<td>{state}</td><td><code>{html.escape(r['file'])}: {html.escape(r['key'])}</code></td></tr>")
    return "\n".join(out + ["</table>"])


def _metrics_tables(metrics: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, values in sorted(metrics.items()):
        rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{_fmt(v)}</td></tr>"
                       for k, v in values.items() if not isinstance(v, (dict, list)))
        parts.append(f"<details><summary>{html.escape(name)} ({len(values)})</summary><table>{rows}</table>"
                     "</details>")
    return "\n".join(parts)


CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
tr.met td:nth-child(4){color:#17662c;font-weight:bold}tr.missed td:nth-child(4){color:#a51d1d;font-weight:bold}
figure{margin:1.2em 0}figcaption{color:#555;font-size:90%}img{max-width:100%}
img.pixels{image-rendering:pixelated;image-rendering:crisp-edges}code{font-size:90%}
pre{background:#f5f5f5;padding:.7em;overflow:auto;font-size:85%}"""


def render_report(title: str, revision: str, targets: Sequence[dict[str, Any]],
                  figures: Sequence[tuple[str, bytes, int]], curves: Sequence[Path], metrics: dict[str, dict[str, Any]],
                  params_text: str) -> str:
    """The HTML page (one string, every image inline).

    Args:
        title: the page title.
        revision: the git revision of the run.
        targets: rows of :func:`pipeline.evaluation.targets.evaluate_targets`.
        figures: (name, PNG bytes, scale) of each figure; a scale above 1 shows it that many times its pixel size,
            nearest-neighbour (no smoothing, so that one model pixel stays one visible square; at most 1150 px wide).
        curves: TSV curve files, drawn here.
        metrics: metrics file name -> its values.
        params_text: the params file, shown as it is.
    """
    met = sum(1 for r in targets if r["met"])
    measured = sum(1 for r in targets if r["met"] is not None)
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>Git revision <code>{html.escape(revision)}</code>. {met} of {measured} measured targets met.</p>",
            "<h2>Model card</h2>"]
    body += [f"<h3>{html.escape(h)}</h3><p>{html.escape(t)}</p>" for h, t in MODEL_CARD]
    body += ["<h2>Targets</h2>", _targets_table(targets), "<h2>Figures</h2>"]
    for name, png, scale in figures:
        width = int.from_bytes(png[16:20], "big") if png[:8] == b"\x89PNG\r\n\x1a\n" else 0
        style = f" class='pixels' style='width:{min(width * scale, 1150)}px'" if width and scale > 1 else ""
        caption = name + (f" (×{scale}, nearest-neighbour)" if style else "")
        body.append(f"<figure><img alt='{html.escape(name)}' src='{_data_uri(png)}'{style}>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    body.append("<h2>Curves</h2>")
    for tsv in curves:
        png = curve_png(tsv)
        if png is not None:
            body.append(f"<figure><img alt='{html.escape(tsv.name)}' src='{_data_uri(png)}'>"
                        f"<figcaption>{html.escape(tsv.name)}</figcaption></figure>")
    body += ["<h2>Every metric</h2>", _metrics_tables(metrics), "<h2>Params</h2>",
             f"<pre>{html.escape(params_text)}</pre>"]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def metrics_of(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Metrics files by file name, parsed (one-line error for a missing or broken file)."""
    out = {}
    for path in paths:
        try:
            out[path.name] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path} is missing or not JSON ({type(exc).__name__}): rerun the stage that "
                                "writes it (dvc repro)") from None
    return out
