"""The pages a person opens, in headless Chromium (tests/browser.py): the reader-study questionnaire that the tiny
`dvc repro` built is answered item by item with real clicks and exported through its own button, and the scorer reads
the downloaded file; a 200-item study answered at random in the browser scores near 50 %, one answered from the key
100 %; the report page renders with every image decoded, and its screenshot is a full, non-blank page; `dvc plots show`
with the repository's page template draws every chart offline."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from browser import start_browser, wait_for_file
from conftest import REPO
from dvc_project import dvc, shared_project
from PIL import Image
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By

from pipeline.evaluation.reader_study import build_items, make_key, read_answers, score, study_id
from pipeline.formats.questionnaire import QUESTIONS, questionnaire_html


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    return shared_project(tmp_path_factory)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    (tmp_path / "downloads").mkdir()
    yield from start_browser(tmp_path / "downloads", tmp_path / "profile")


def choose(truth: dict | None, part: str, rng: np.random.Generator) -> dict[str, str]:
    """What a reader clicks for one item: the key's truth where given, else a random option of every question."""
    picks = {field: str(rng.choice(options)) for field, options in QUESTIONS[part]}
    if truth is not None and part == "real_or_synthetic":
        picks["call"] = truth["source"]
    if truth is not None and part == "label":
        picks["call"] = "pneumonia" if truth["label"] else "normal"
    return picks


def answer_in_browser(driver, page: Path, reader: str, key: dict, holds_key: bool, downloads: Path,
                      seed: int = 0, real_clicks: bool = True) -> tuple[Path, dict[str, dict[str, str]]]:
    """Open ``page`` from file://, type the reader id, click one option per question of every item and press the
    export button; return the downloaded file and what was clicked. ``real_clicks=False`` clicks the same inputs
    from one script (each ``input.click()`` fires the page's own events) instead of one WebDriver click each, for
    studies of hundreds of items."""
    rng = np.random.default_rng(seed)
    driver.get(page.resolve().as_uri())
    driver.find_element(By.ID, "reader").send_keys(reader)
    shown = driver.execute_script("return [...document.querySelectorAll('section.item')].map(s => [s.id, "
                                  "s.dataset.part])")
    clicked = {item: choose(key["items"][item] if holds_key else None, part, rng) for item, part in shown}
    selectors = [f"input[name='{item}.{field}'][value='{value}']" for item, picks in clicked.items()
                 for field, value in picks.items()]
    if real_clicks:
        for selector in selectors:
            driver.find_element(By.CSS_SELECTOR, selector).click()
    else:
        driver.execute_script("for (const s of arguments[0]) document.querySelector(s).click()", selectors)
    driver.find_element(By.ID, "export").click()
    path = wait_for_file(downloads, f"answers_{key['study_id']}_{reader}.json")
    return path, clicked


def test_questionnaire_is_answered_exported_and_scored(project, browser, tmp_path):
    page = project / "data/reader_study/study.html"
    key = json.loads((project / "data/reader_study_key.json").read_text())
    downloads = tmp_path / "downloads"

    browser.get(page.resolve().as_uri())  # export with nothing answered: an alert, and no file
    browser.find_element(By.ID, "reader").send_keys("R0")
    browser.find_element(By.ID, "export").click()
    alert = browser.switch_to.alert
    assert alert.text.startswith("Unanswered: q")
    alert.accept()
    assert not list(downloads.iterdir())

    readers = []
    for reader, holds_key in (("guesser", False), ("keyholder", True)):
        path, clicked = answer_in_browser(browser, page, reader, key, holds_key, downloads)
        data = json.loads(path.read_text())
        assert data["study_id"] == key["study_id"] and data["reader_id"] == reader
        exported = {a["item"]: {f: str(v) for f, v in a.items() if f != "item"} for a in data["answers"]}
        assert exported == clicked  # every click, and nothing else, is in the file
        assert all(isinstance(a["confidence"], int) for a in data["answers"] if "confidence" in a)
        readers.append(read_answers(path, key))
    result = score(key, readers)
    assert result["per_reader"]["keyholder"]["real_or_synthetic"]["accuracy"] == 1.0
    assert result["per_reader"]["keyholder"]["label_accuracy_synthetic"] == 1.0
    assert result["per_reader"]["guesser"]["real_or_synthetic"]["n"] == len(
        [i for i in key["items"].values() if i["part"] == "real_or_synthetic"])


def test_a_browser_reader_at_random_scores_near_chance(browser, tmp_path):
    rng = np.random.default_rng(0)
    real = (rng.integers(0, 255, (300, 28, 28), dtype=np.uint8), np.repeat([0, 1], 150))
    syn = (rng.integers(0, 255, (300, 28, 28), dtype=np.uint8), np.repeat([0, 1], 150))
    pairs = {"sources": real[0][:4], "edits": syn[0][:4], "source_labels": np.zeros(4, int),
             "target_labels": np.ones(4, int)}
    items = build_items(real, syn, pairs, 50, 4, 4, 0)  # 200 real-or-synthetic items
    sid = study_id(items)
    key = make_key(items, sid)
    page = tmp_path / "study.html"
    page.write_text(questionnaire_html(sid, [(i.id, i.part, i.images, "pneumonia" if i.part == "counterfactual"
                                              else None) for i in items], 64))
    readers = [read_answers(answer_in_browser(browser, page, r, key, r == "oracle", tmp_path / "downloads", 1,
                                              real_clicks=False)[0], key) for r in ("random", "oracle")]
    result = score(key, readers)
    rand, oracle = (result["per_reader"][r]["real_or_synthetic"] for r in ("random", "oracle"))
    assert rand["n"] == 200 and 0.4 < rand["accuracy"] < 0.6 and rand["ci_low"] < 0.5 < rand["ci_high"]
    assert oracle["accuracy"] == 1.0 and oracle["p_vs_50"] < 1e-10


def test_report_renders_every_image(project, browser, tmp_path):
    report = project / "metrics/report.html"
    browser.get(report.resolve().as_uri())
    images = browser.execute_script(
        "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight, i.width])")
    assert len(images) >= 2 + 13 + 7  # two image grids, the stages' figures, the curves
    broken = [alt for alt, complete, w, h, _ in images if not (complete and w > 0 and h > 0)]
    assert broken == []
    shown = {alt: width for alt, *_, width in images}
    assert shown["counterfactual_pairs.png"] >= 6 * 28  # drawn upscaled for a person to see the change
    try:
        browser.switch_to.alert
        raise AssertionError("the report raised an alert")
    except NoAlertPresentException:
        pass
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1200, min(height + 200, 16000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), dtype=float)
    assert grey.shape[1] >= 1000 and grey.shape[0] >= min(height, 16000) - 200
    assert grey.std() > 10 and (grey < 128).mean() > 0.01  # text and images, not a blank page


def test_dvc_plots_show_draws_every_chart_offline(project, browser, tmp_path):
    template = dvc(REPO, "config", "plots.html_template").stdout.strip()  # the repository's own setting
    assert template, ".dvc/config names no plots.html_template"
    out = tmp_path / "plots"
    dvc(project, "plots", "show", "-o", str(out), "--html-template", str(REPO / ".dvc" / template))
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page and "<script src=" not in page  # vega comes inline, not from a CDN
    browser.get((out / "index.html").as_uri())
    ids = re.findall(r"vegaEmbed\('#([^']+)'", page)  # one chart per vega spec on the page
    script = """return arguments[0].map(id => { const div = document.getElementById(id);
        return [id, div.querySelectorAll('canvas, svg.marks').length,
                Math.max(0, ...[...div.querySelectorAll('canvas')].map(c => c.width))]; })"""
    end = time.monotonic() + 20
    while True:  # vega-embed draws asynchronously
        charts = browser.execute_script(script, ids)
        if all(drawn for _, drawn, _ in charts) or time.monotonic() > end:
            break
        time.sleep(0.5)
    declared = [name for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"] if isinstance(entry, dict)
                for name, spec in entry.items() if isinstance(spec, dict) and "y" in spec]  # (not the image files)
    assert len(charts) == len(declared) >= 7, (charts, declared)  # every chart dvc.yaml defines
    blank = [name for name, drawn, width in charts if not (drawn and width > 100)]
    assert blank == [], f"charts not drawn offline: {blank}"
