"""The report stage's page, as the tiny `dvc repro` wrote it: self-contained (every image inline and decodable, nothing
from the network), with the model card, every target and the headline file."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from dvc_project import shared_project
from PIL import Image

from pipeline.evaluation.targets import TARGETS


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        self.links += [v for k, v in a.items() if k in ("href", "src") and not v.startswith("data:")]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    return shared_project(tmp_path_factory)


def test_report_is_self_contained_and_complete(project):
    text = (project / "metrics/report.html").read_text()
    page = Page()
    page.feed(text)
    assert page.scripts == 0 and page.links == []  # readable offline, from file://
    assert len(page.images) >= 2 + 13 + 7  # two image grids, the stages' figures, the curves
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,"), img["alt"]
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            im.load()
            assert im.width >= 28 and im.height >= 28, img["alt"]
    grid = next(i for i in page.images if i["alt"] == "counterfactual_pairs.png")
    assert "pixelated" in text and "width:" in grid.get("style", "")  # upscaled, nearest-neighbour
    card = text.index("<h2>Model card</h2>")
    assert text.index("28×28", card) < text.index("Intended use", card)  # the resolution, first among the limits
    assert text.count("<tr class=") == len(TARGETS)


def test_headline_holds_the_targets_figures(project):
    headline = json.loads((project / "metrics/headline.json").read_text())
    fid = json.loads((project / "metrics/fid.json").read_text())
    assert headline["label_fidelity"] == fid["label_fidelity_accuracy"]
    assert headline["targets_measured"] >= 8 and 0 <= headline["targets_met"] <= headline["targets_measured"]
    assert len(headline) < 25  # a dozen figures, not the 400 keys of every file
