"""The reader study as one static HTML page: it works from ``file://`` with no server and nothing from the network.
A reader enters a reader id, answers every item in the browser and exports one JSON file (study id, reader id, one
answer per item), which ``python -m pipeline.score_reader_study`` scores against the key.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["upscale_png", "questionnaire_html"]

INTRO = {
    "real_or_synthetic": "Is this chest X-ray a real radiograph or a synthetic (generated) one? How sure are you "
                         "(1 = guessing, 5 = certain)?",
    "label": "Does this chest X-ray show pneumonia?",
    "counterfactual": "Left: an image. Right: the same image edited by the model towards the finding named. Does the "
                      "right image show that finding (1 = not at all, 5 = clearly)? Is it the same child (1 = "
                      "another child, 5 = certainly the same)?",
}
QUESTIONS = {
    "real_or_synthetic": [("call", ["real", "synthetic"]), ("confidence", ["1", "2", "3", "4", "5"])],
    "label": [("call", ["normal", "pneumonia"])],
    "counterfactual": [("finding", ["1", "2", "3", "4", "5"]), ("same_child", ["1", "2", "3", "4", "5"])],
}


def upscale_png(image: np.ndarray, size: int) -> str:
    """A uint8 H×W image resized to ``size``×``size`` with Lanczos (Pillow) as a PNG data URI; real and synthetic
    images go through exactly this, so the resizing tells nothing apart."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.LANCZOS).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _item_html(item_id: str, part: str, images: Sequence[np.ndarray], target: str | None, size: int) -> str:
    pics = "".join(f"<img alt='{html.escape(item_id)} image {k + 1}' src='{upscale_png(img, size)}' "
                   f"width='{size}' height='{size}'>" for k, img in enumerate(images))
    ask = INTRO[part] if target is None else INTRO[part].replace("the finding named", f"<b>{target}</b>")
    fields = []
    for field, options in QUESTIONS[part]:
        radios = "".join(f"<label><input type='radio' name='{item_id}.{field}' value='{html.escape(o)}'> "
                         f"{html.escape(o)}</label> " for o in options)
        fields.append(f"<div class='q'><span>{field.replace('_', ' ')}:</span> {radios}</div>")
    return (f"<section class='item' id='{item_id}' data-part='{part}'><h3>{item_id}</h3><p>{ask}</p>"
            f"<div class='pics'>{pics}</div>{''.join(fields)}</section>")


SCRIPT = """
const STUDY = %(study)s, FIELDS = %(fields)s;
function collect() {
  const reader = document.getElementById('reader').value.trim();
  if (!reader) { alert('Enter your reader id first.'); return null; }
  const answers = [], missing = [];
  for (const sec of document.querySelectorAll('section.item')) {
    const a = {item: sec.id};
    for (const f of FIELDS[sec.dataset.part]) {
      const c = sec.querySelector(`input[name="${sec.id}.${f}"]:checked`);
      if (!c) { missing.push(sec.id); break; }
      a[f] = /^[0-9]$/.test(c.value) ? Number(c.value) : c.value;
    }
    answers.push(a);
  }
  if (missing.length) { alert('Unanswered: ' + missing.join(', ')); return null; }
  return {study_id: STUDY, reader_id: reader, answers: answers};
}
function exportAnswers() {
  const data = collect();
  if (!data) return;
  const blob = new Blob([JSON.stringify(data, null, 1)], {type: 'application/json'});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = `answers_${STUDY}_${data.reader_id}.json`;
  document.body.appendChild(a); a.click(); a.remove();
  document.getElementById('status').textContent = 'Exported ' + a.download;
}
"""

CSS = """body{font:15px/1.4 system-ui,sans-serif;max-width:900px;margin:2em auto;padding:0 1em}
.item{border-top:1px solid #ccc;padding:.6em 0}.pics img{margin-right:12px;image-rendering:auto;background:#000}
.q{margin:.3em 0}.q span{display:inline-block;width:7em}button{font-size:16px;padding:.4em 1em}"""


def questionnaire_html(study: str, items: Sequence[tuple[str, str, Sequence[np.ndarray], str | None]],
                       size: int) -> str:
    """The study page.

    Args:
        study: the study id (written into every answer file).
        items: (item id, part, images, target finding of an edit or None), in the order shown.
        size: the side, in pixels, every image is shown at (Lanczos-resized).
    """
    body = "".join(_item_html(i, p, imgs, t, size) for i, p, imgs, t in items)
    script = SCRIPT % {"study": json.dumps(study), "fields": json.dumps({p: [f for f, _ in q]
                                                                         for p, q in QUESTIONS.items()})}
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Reader study {study}</title>"
            f"<style>{CSS}</style></head><body><h1>Chest X-ray reader study</h1>"
            f"<p>Study <code>{study}</code>; {len(items)} items. Images are shown at {size} px (Lanczos from 28 "
            "px). Answer every item, then export your answers and send the file back.</p>"
            "<p><label>Reader id: <input id='reader' autocomplete='off'></label></p>"
            f"{body}<p><button id='export' onclick='exportAnswers()'>Export answers</button> "
            f"<span id='status'></span></p><script>{script}</script></body></html>\n")
