"""The reader-study kit: the package the tiny `dvc repro` built (blinded, offline, key apart) and the scorer, with
simulated readers: one answering at random scores near 50 %, one holding the key 100 %; bad answer files and a changed
key stop with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_subprocess
from dvc_project import shared_project

from pipeline.evaluation.reader_study import build_items, make_key, read_answers, score, study_id


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    return shared_project(tmp_path_factory)


def shown_items(page: str) -> list[tuple[str, str]]:
    """(item id, part) of every question, read from the page as a reader's browser shows it."""
    return re.findall(r"<section class='item' id='(q\d+)' data-part='(\w+)'>", page)


def answer(items, key: dict | None, rng: np.random.Generator) -> list[dict]:
    """A reader: with the key, the truth; without, coin flips."""
    out = []
    for item_id, part in items:
        truth = key["items"][item_id] if key else None
        if part == "real_or_synthetic":
            call = truth["source"] if truth else rng.choice(["real", "synthetic"])
            out.append({"item": item_id, "call": str(call), "confidence": int(rng.integers(1, 6))})
        elif part == "label":
            call = ("pneumonia" if truth["label"] else "normal") if truth else rng.choice(["normal", "pneumonia"])
            out.append({"item": item_id, "call": str(call)})
        else:
            out.append({"item": item_id, "finding": int(rng.integers(1, 6)), "same_child": int(rng.integers(1, 6))})
    return out


def test_package_is_blinded_offline_and_complete(project):
    page = (project / "data/reader_study/study.html").read_text()
    key = json.loads((project / "data/reader_study_key.json").read_text())
    items = shown_items(page)
    assert sorted(i for i, _ in items) == sorted(key["items"])
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing from the network or the disk
    assert "synthetic" not in " ".join(re.findall(r"id='(q\d+)'", page))  # ids reveal nothing
    for truth_word in ("cohort", "test_index", "seed"):
        assert truth_word not in page
    parts = [p for _, p in items]
    m = json.loads((project / "metrics/reader_study.json").read_text())
    assert parts.count("real_or_synthetic") == m["n_real_or_synthetic"] and m["n_counterfactual"] >= 1
    cells = {(t["source"], t["label"]) for t in key["items"].values() if t["part"] == "real_or_synthetic"}
    assert cells == {("real", 0), ("real", 1), ("synthetic", 0), ("synthetic", 1)}  # balanced per class and source
    assert not (project / "data/reader_study/key.json").exists()  # the key is not in the package


def big_study(seed: int = 0):
    rng = np.random.default_rng(seed)
    real = (rng.integers(0, 255, (300, 28, 28), dtype=np.uint8), np.repeat([0, 1], 150))
    syn = (rng.integers(0, 255, (300, 28, 28), dtype=np.uint8), np.repeat([0, 1], 150))
    pairs = {"sources": real[0][:10], "edits": syn[0][:10], "source_labels": np.zeros(10, int),
             "target_labels": np.ones(10, int)}
    items = build_items(real, syn, pairs, 50, 10, 10, seed)
    return items, make_key(items, study_id(items))


def test_a_random_reader_scores_near_chance_and_a_key_holder_perfectly(tmp_path):
    items, key = big_study()
    shown = [(i.id, i.part) for i in items]
    readers = []
    for name, holder in (("random", None), ("oracle", key)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"study_id": key["study_id"], "reader_id": name,
                                    "answers": answer(shown, holder, np.random.default_rng(1))}))
        readers.append(read_answers(path, key))
    result = score(key, readers)
    rand, oracle = (result["per_reader"][n]["real_or_synthetic"] for n in ("random", "oracle"))
    assert rand["n"] == 200 and 0.4 < rand["accuracy"] < 0.6 and rand["ci_low"] < 0.5 < rand["ci_high"]
    assert rand["p_vs_50"] > 0.05
    assert oracle["accuracy"] == 1.0 and oracle["p_vs_50"] < 1e-10
    assert result["per_reader"]["oracle"]["label_accuracy_synthetic"] == 1.0
    assert -0.2 < result["pooled"]["fleiss_kappa_real_or_synthetic"] < 0.2  # chance and truth agree by chance


def test_score_command_and_its_one_line_errors(project, tmp_path):
    page = (project / "data/reader_study/study.html").read_text()
    key_path = project / "data/reader_study_key.json"
    key = json.loads(key_path.read_text())
    shown = shown_items(page)
    files = []
    for k in range(2):
        path = tmp_path / f"reader{k}.json"
        path.write_text(json.dumps({"study_id": key["study_id"], "reader_id": f"R{k}",
                                    "answers": answer(shown, key if k else None, np.random.default_rng(k))}))
        files.append(path)
    args = ["--key", key_path, "--metrics", tmp_path / "scores.json", "--figure", tmp_path / "scores.png"]
    ok = run_subprocess("score_reader_study", [*files, *args])
    assert ok.returncode == 0, ok.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["per_reader"]["R1"]["real_or_synthetic"]["accuracy"] == 1.0 and (tmp_path / "scores.png").is_file()

    good = json.loads(files[0].read_text())
    bad = {"other_study": {**good, "study_id": "0123456789abcdef"},
           "missing": {**good, "answers": good["answers"][1:]},
           "duplicate": {**good, "answers": good["answers"] + good["answers"][:1]}}
    for name, content in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        proc = run_subprocess("score_reader_study", [path, *args])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), (name, proc.stderr)
        assert str(path) in lines[0]
    tampered = tmp_path / "key.json"
    changed = json.loads(key_path.read_text())
    first = next(iter(changed["items"]))
    changed["items"][first]["source" if "source" in changed["items"][first] else "target_label"] = "x"
    tampered.write_text(json.dumps(changed))
    proc = run_subprocess("score_reader_study", [files[0], "--key", tampered, *args[2:]])
    assert proc.returncode != 0 and "was changed" in proc.stderr and str(tampered) in proc.stderr
