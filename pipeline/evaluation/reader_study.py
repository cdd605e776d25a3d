"""A blinded reader study of the cohort and the edits (the thesis's radiologist questionnaire), and its scoring.

Three parts, each item with an opaque id, in an order shuffled by a seed:

- ``real_or_synthetic``: one image; real or synthetic, and a confidence 1–5. Balanced per class and source (as many
  real test as synthetic images of each class), as in Tordjman et al. (Radiology 2025), who had 17 radiologists tell
  real from synthetic chest X-rays on balanced sets (accuracy 70 %, 95 % CI 62–78).
- ``label``: one image, real and synthetic mixed; normal or pneumonia.
- ``counterfactual``: a source image and its edit, side by side (which side is the edit is stated); does the edit show
  the target finding (Likert 1–5), and is it the same child (Likert 1–5).

The answer key is a separate JSON file; it carries the study id, a SHA-256 of the package's item list, so that an
answer file of another study, or a key that was changed, is refused. Scoring: accuracy with Wilson 95 % intervals per
reader and pooled, a two-sided exact binomial test against 50 % (scipy), label accuracy on synthetic against real
images, Likert means, and Fleiss' κ between readers (statsmodels) on the real-or-synthetic calls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.cli import PipelineError

__all__ = ["PARTS", "Item", "build_items", "study_id", "make_key", "read_key", "read_answers", "score"]

PARTS = ("real_or_synthetic", "label", "counterfactual")
FIELDS = {"real_or_synthetic": ("call", "confidence"), "label": ("call",), "counterfactual": ("finding", "same_child")}
CHOICES = {"call_real_or_synthetic": ("real", "synthetic"), "call_label": ("normal", "pneumonia")}


@dataclass
class Item:
    """One question: its part, the image(s) shown (uint8, one per panel) and the truth (only in the key)."""

    part: str
    images: list[np.ndarray]
    truth: dict[str, Any]
    id: str = ""


def _take(rng: np.random.Generator, idx: np.ndarray, n: int, what: str) -> np.ndarray:
    if len(idx) < n:
        raise PipelineError(f"reader study: {what} has {len(idx)} images, fewer than the {n} asked for")
    return rng.choice(idx, size=n, replace=False)


def build_items(real: tuple[np.ndarray, np.ndarray], synthetic: tuple[np.ndarray, np.ndarray],
                pairs: dict[str, np.ndarray], n_per_cell: int, n_label: int, n_pairs: int,
                seed: int) -> list[Item]:
    """The study's items, shuffled, with opaque ids ``q001``...

    Args:
        real: real test images (uint8 N×H×W) and labels.
        synthetic: synthetic images and their requested labels.
        pairs: the counterfactual stage's arrays (``sources``, ``edits``, ``source_labels``, ``target_labels``).
        n_per_cell: part 1 images per class and source (4 cells: real / synthetic × normal / pneumonia).
        n_label: part 2 images per class and source.
        n_pairs: part 3 pairs (at most as many as the counterfactual stage made).
        seed: the selection and the order.
    """
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    sources = {"real": real, "synthetic": synthetic}
    used = {name: set() for name in sources}
    for part, n in (("real_or_synthetic", n_per_cell), ("label", n_label)):
        for name, (images, labels) in sources.items():
            for c in (0, 1):
                free = np.array([i for i in np.flatnonzero(labels == c) if i not in used[name]], dtype=int)
                for i in _take(rng, free, n, f"the {name} class {c} ({part})"):
                    used[name].add(int(i))
                    items.append(Item(part, [images[i]], {"source": name, "label": int(c), "index": int(i)}))
    n = min(n_pairs, len(pairs["sources"]))
    for i in rng.choice(len(pairs["sources"]), size=n, replace=False):
        items.append(Item("counterfactual", [pairs["sources"][i], pairs["edits"][i]],
                          {"source_label": int(pairs["source_labels"][i]),
                           "target_label": int(pairs["target_labels"][i]), "index": int(i)}))
    order = rng.permutation(len(items))
    items = [items[k] for k in order]
    for k, item in enumerate(items):
        item.id = f"q{k + 1:03d}"
    return items


def study_id(items: Sequence[Item]) -> str:
    """A SHA-256 of the items as shown (ids, parts and pixels): the package and its key share it."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}:{item.part}".encode())
        for img in item.images:
            digest.update(np.ascontiguousarray(img).tobytes())
    return digest.hexdigest()[:16]


def _key_digest(key: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in key.items() if k != "key_sha256"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def make_key(items: Sequence[Item], sid: str) -> dict[str, Any]:
    """The answer key: the study id, each item's part and truth, and a checksum of all of it."""
    key: dict[str, Any] = {"study_id": sid, "items": {i.id: {"part": i.part, **i.truth} for i in items}}
    key["key_sha256"] = _key_digest(key)
    return key


def read_key(path: Path) -> dict[str, Any]:
    """The answer key, checked against its own checksum (one-line error for a changed or broken key)."""
    try:
        key = json.loads(path.read_text())
        ok = isinstance(key, dict) and key.get("key_sha256") == _key_digest(key) and "items" in key
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable answer key ({type(exc).__name__})") from None
    if not ok:
        raise PipelineError(f"{path}: the answer key was changed (its checksum does not match): use the key the "
                            "reader_study stage wrote")
    return key


def read_answers(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """One reader's answer file, checked against the key: same study, every item answered once, valid values."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable answer file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
        raise PipelineError(f"{path}: not an answer file of the reader study (no answers list)")
    if data.get("study_id") != key["study_id"]:
        raise PipelineError(f"{path}: answers another study (study id {data.get('study_id')!s:.20}, the key's "
                            f"{key['study_id']})")
    if not str(data.get("reader_id", "")).strip():
        raise PipelineError(f"{path}: no reader id")
    ids = [a.get("item") for a in data["answers"] if isinstance(a, dict)]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise PipelineError(f"{path}: item(s) answered twice: {', '.join(map(str, dupes[:5]))}")
    missing = sorted(set(key["items"]) - set(ids))
    unknown = sorted(set(ids) - set(key["items"]), key=str)
    if missing or unknown:
        raise PipelineError(f"{path}: {len(missing)} item(s) unanswered ({', '.join(missing[:5])})"
                            + (f", {len(unknown)} unknown" if unknown else ""))
    answers = {}
    for a in data["answers"]:
        part = key["items"][a["item"]]["part"]
        for field in FIELDS[part]:
            value = a.get(field)
            allowed = CHOICES.get(f"{field}_{part}", range(1, 6))
            if value not in allowed:
                raise PipelineError(f"{path}: item {a['item']}: {field} must be one of {list(allowed)}")
        answers[a["item"]] = a
    return {"reader_id": str(data["reader_id"]), "answers": answers}


def _proportion(k: int, n: int) -> dict[str, float]:
    from scipy.stats import binomtest

    if n == 0:
        return {"n": 0}
    test = binomtest(k, n, 0.5)
    ci = test.proportion_ci(0.95, method="wilson")
    return {"n": n, "accuracy": k / n, "ci_low": ci.low, "ci_high": ci.high, "p_vs_50": test.pvalue}


def score(key: dict[str, Any], readers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per reader and pooled: real-vs-synthetic accuracy (Wilson 95 % CI, binomial test against 50 %), label
    accuracy on synthetic and on real images, Likert means of the edits; Fleiss' κ of the real-or-synthetic calls."""
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    items = key["items"]
    rs_ids = sorted(i for i, t in items.items() if t["part"] == "real_or_synthetic")
    label_ids = {s: [i for i, t in items.items() if t["part"] == "label" and t["source"] == s]
                 for s in ("real", "synthetic")}
    cf_ids = [i for i, t in items.items() if t["part"] == "counterfactual"]
    out: dict[str, Any] = {"n_readers": len(readers), "per_reader": {}}
    pooled = {"rs": [0, 0], "label_real": [0, 0], "label_synthetic": [0, 0], "finding": [], "same_child": []}
    for r in readers:
        a = r["answers"]
        rs = sum(a[i]["call"] == items[i]["source"] for i in rs_ids)
        label = {s: [sum(("pneumonia" if items[i]["label"] else "normal") == a[i]["call"] for i in ids), len(ids)]
                 for s, ids in label_ids.items()}
        finding = [a[i]["finding"] for i in cf_ids]
        same = [a[i]["same_child"] for i in cf_ids]
        out["per_reader"][r["reader_id"]] = {
            "real_or_synthetic": _proportion(rs, len(rs_ids)),
            "label_accuracy_real": label["real"][0] / max(label["real"][1], 1),
            "label_accuracy_synthetic": label["synthetic"][0] / max(label["synthetic"][1], 1),
            "finding_likert_mean": float(np.mean(finding)) if finding else None,
            "same_child_likert_mean": float(np.mean(same)) if same else None}
        pooled["rs"] = [pooled["rs"][0] + rs, pooled["rs"][1] + len(rs_ids)]
        for s in ("real", "synthetic"):
            pooled[f"label_{s}"] = [pooled[f"label_{s}"][0] + label[s][0], pooled[f"label_{s}"][1] + label[s][1]]
        pooled["finding"] += finding
        pooled["same_child"] += same
    out["pooled"] = {"real_or_synthetic": _proportion(*pooled["rs"]),
                     "label_accuracy_real": pooled["label_real"][0] / max(pooled["label_real"][1], 1),
                     "label_accuracy_synthetic": pooled["label_synthetic"][0] / max(pooled["label_synthetic"][1], 1),
                     "finding_likert_mean": float(np.mean(pooled["finding"])) if pooled["finding"] else None,
                     "same_child_likert_mean": float(np.mean(pooled["same_child"])) if pooled["same_child"] else None}
    if len(readers) >= 2 and rs_ids:
        calls = np.array([[r["answers"][i]["call"] == "synthetic" for r in readers] for i in rs_ids], dtype=int)
        table, _ = aggregate_raters(calls, n_cat=2)
        kappa = float(fleiss_kappa(table, method="fleiss"))
        out["pooled"]["fleiss_kappa_real_or_synthetic"] = kappa if np.isfinite(kappa) else None
    return out
