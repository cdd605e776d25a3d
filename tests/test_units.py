"""Small unit tests of the shared library."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import typer

from pipeline.core.artifacts import atomic_outputs, write_json
from pipeline.core.cli import PipelineError, load_section, read_keys
from pipeline.core.data import crop, pad_amounts, pad_images, to_uint8
from pipeline.core.runtime import keep_freed_memory
from pipeline.diffusion.networks import kl_loss
from pipeline.evaluation.fid import fid_from_features, frechet_distance
from pipeline.prepare import subsample


@pytest.mark.parametrize("size,multiple,expected", [(28, 32, (2, 2)), (64, 32, (0, 0)), (224, 32, (0, 0)),
                                                    (29, 32, (1, 2)), (128, 64, (0, 0))])
def test_pad_amounts(size, multiple, expected):
    assert pad_amounts(size, multiple) == expected


def test_crop_undoes_pad():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    padded, pad = pad_images(images, 32)
    assert padded.shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(crop(padded[:, 0], pad), images)


def test_to_uint8_clips_and_rounds():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255])


def test_subsample_is_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 30)
    idx = subsample(labels, 5, seed=3)
    assert (labels[idx] == 0).sum() == 5 and (labels[idx] == 1).sum() == 5
    np.testing.assert_array_equal(idx, subsample(labels, 5, seed=3))
    assert not np.array_equal(idx, subsample(labels, 5, seed=4))


def test_kl_is_zero_for_the_prior():
    assert kl_loss(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).item() == pytest.approx(0.5 * 48)


def test_frechet_distance_of_known_gaussians():
    d = 4
    mu1, mu2 = np.zeros(d), np.full(d, 2.0)
    s1, s2 = np.eye(d), 4 * np.eye(d)
    # |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) = 16 + 4 * (1 + 4 - 4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(20.0)


def test_fid_matches_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 32)), rng.normal(0.3, 1.2, size=(250, 32))
    ours = fid_from_features(a, b)
    theirs = _compute_fid(torch.tensor(a.mean(0)), torch.tensor(np.cov(a, rowvar=False)),
                          torch.tensor(b.mean(0)), torch.tensor(np.cov(b, rowvar=False))).item()
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_fid_low_sample_path_equals_the_matrix_square_root():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(0.2, 1.1, size=(30, 64)) @ rng.normal(size=(64, 64)) / 8
    from pipeline.evaluation.fid import gaussian_stats

    exact = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert fid_from_features(a, b) == pytest.approx(exact, rel=1e-6, abs=1e-6)


def _app():
    app = typer.Typer()

    @app.command()
    def main(out: Path = typer.Option(...), size: int = typer.Option(28), lr: float = typer.Option(0.1),
             flag: bool = typer.Option(False), name: str = typer.Option("x"),
             channels: list[int] = typer.Option([1]), limit: Optional[int] = typer.Option(None)) -> None:
        pass

    return app


FULL = {"size": 3, "lr": 1, "flag": True, "name": "y", "channels": [1, 2], "limit": None}


@pytest.mark.parametrize("values", [FULL, FULL | {"limit": 5, "lr": 0.5}])
def test_load_section_accepts_well_typed_values(values):
    assert load_section({"s": values}, "s", [_app()]) == values


def test_load_section_wants_every_key_of_the_stage():
    with pytest.raises(PipelineError, match=re.escape("params key(s) s.limit, s.name missing")):
        load_section({"s": {k: v for k, v in FULL.items() if k not in ("limit", "name")}}, "s", [_app()])


@pytest.mark.parametrize("values,message", [
    ({"size": 2.5}, "'s.size' must be an integer"),
    ({"size": True}, "'s.size' must be an integer"),
    ({"lr": "0.1"}, "'s.lr' must be a number"),
    ({"flag": 1}, "'s.flag' must be true or false"),
    ({"channels": 3}, "'s.channels' must be a list"),
    ({"limit": "all"}, "'s.limit' must be an integer or null"),
    ({"out": "x"}, "unknown params key(s) 's.out'; known keys of 's': channels, flag, limit, lr, name, size"),
    ({"sise": 28}, "unknown params key(s) 's.sise' (did you mean 's.size'?)"),
])
def test_load_section_rejects_bad_values(values, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_section({"s": FULL | values}, "s", [_app()])


def test_load_section_missing_section():
    with pytest.raises(PipelineError, match="section 's' is missing"):
        load_section({}, "s", [_app()])


@dataclasses.dataclass
class Schema:
    size: int
    lr: float
    flag: bool


def test_read_keys_takes_another_sections_keys_type_checked(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("s:\n  size: 3\n  lr: 0.5\n  other_stage_key: 1\n")
    assert read_keys(params, "s", Schema, "reader", ["size", "lr"]) == {"size": 3, "lr": 0.5}
    with pytest.raises(PipelineError, match=re.escape("lacks s.flag (the reader stage reads them)")):
        read_keys(params, "s", Schema, "reader")
    params.write_text("s:\n  size: 2.5\n")
    with pytest.raises(PipelineError, match=re.escape("'s.size' must be an integer")):
        read_keys(params, "s", Schema, "reader", ["size"])


def test_keep_freed_memory_applies_on_glibc():
    import platform
    # every mallopt call must be accepted where glibc is the C library (each stage calls it at start)
    assert keep_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_atomic_outputs_leave_nothing_on_failure(tmp_path):
    out, metrics = tmp_path / "folder", tmp_path / "m.json"
    with pytest.raises(ValueError):
        with atomic_outputs(out, metrics) as (t_out, t_metrics):
            t_out.mkdir()
            write_json(t_metrics, {"a": 1})
            raise ValueError("stage failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_outputs(out, metrics) as (t_out, t_metrics):
        t_out.mkdir()
        (t_out / "x").write_text("1")
        write_json(t_metrics, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.json"]
