"""Bad input stops a stage with a short, clear error, a non-zero exit and nothing half-written."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
from conftest import run, run_subprocess, write_params


def prepare_args(tmp: Path, params: Path) -> list:
    return ["--params", params, "--out", tmp / "out/prepared", "--metrics", tmp / "out/data.json",
            "--grid", tmp / "out/grid.png"]


def assert_clean_failure(proc, tmp: Path, *needles: str) -> None:
    """Exit code non-zero, a short message without a traceback, and no output (or temporary) left behind."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    out = tmp / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.fixture
def bad_root(tmp_path: Path, real_npz: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def test_wrong_md5(tmp_path, bad_root, real_npz):
    data = bytearray(real_npz.read_bytes())
    data[1000] ^= 0xFF
    (bad_root / "pneumoniamnist.npz").write_bytes(bytes(data))
    params = write_params(tmp_path / "p.yaml", data={"root": str(bad_root)})
    proc = run_subprocess("prepare", prepare_args(tmp_path, params))
    assert_clean_failure(proc, tmp_path, "pneumoniamnist.npz", "28209eda62fecd6e6a2d98b1501bb15f", "corrupt")


def test_truncated_npz(tmp_path, bad_root, real_npz):
    (bad_root / "pneumoniamnist.npz").write_bytes(real_npz.read_bytes()[:100_000])
    params = write_params(tmp_path / "p.yaml", data={"root": str(bad_root)})
    proc = run_subprocess("prepare", prepare_args(tmp_path, params))
    assert_clean_failure(proc, tmp_path, "truncated", "28209eda62fecd6e6a2d98b1501bb15f", str(bad_root))


def test_missing_file_offline(tmp_path, bad_root, monkeypatch, capsys):
    def offline(root, size):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("pipeline.core.data._download", offline)
    params = write_params(tmp_path / "p.yaml", data={"root": str(bad_root)})
    assert run("prepare", prepare_args(tmp_path, params)) == 1
    err = capsys.readouterr().err
    assert "missing and could not be downloaded" in err and "28209eda62fecd6e6a2d98b1501bb15f" in err
    assert "zenodo" in err and str(bad_root) in err
    assert not (tmp_path / "out/prepared").exists() and not list(bad_root.iterdir())


@pytest.mark.parametrize("section,values,needles", [
    ("data", {"sizee": 28}, ["unknown params key", "data.sizee"]),
    ("autoencoder", {"epochs": 1.5}, ["autoencoder.epochs", "integer"]),
    ("data", {"size": "28"}, ["data.size", "integer"]),
    ("autoencoder", {"channels": [8, "16"]}, ["autoencoder.channels", "list"]),
    ("autoencoder", {"adv_weight": True}, ["autoencoder.adv_weight", "number"]),
    ("data", {"size": 32}, ["data.size", "28, 64, 128, 224"]),
])
def test_bad_params(tmp_path, medmnist_root, section, values, needles):
    params = write_params(tmp_path / "p.yaml", **{section: values})
    if section == "data":
        proc = run_subprocess("prepare", prepare_args(tmp_path, params))
    else:
        proc = run_subprocess("train_autoencoder", ["--params", params, "--data", tmp_path / "nowhere",
                                                    "--out", tmp_path / "out/ae", "--metrics", tmp_path / "out/m.json",
                                                    "--curve", tmp_path / "out/c.tsv"])
    assert_clean_failure(proc, tmp_path, *needles)


def test_missing_params_section(tmp_path, medmnist_root):
    params = tmp_path / "p.yaml"
    params.write_text("autoencoder: {}\n")
    proc = run_subprocess("prepare", prepare_args(tmp_path, params))
    assert_clean_failure(proc, tmp_path, "'data'", "missing")


def test_failed_stage_keeps_previous_outputs(tmp_path, medmnist_root, monkeypatch):
    """A stage that dies midway leaves the outputs of the last good run untouched and no temporaries."""
    params = write_params(tmp_path / "p.yaml")
    assert run("prepare", prepare_args(tmp_path, params)) == 0
    before = (tmp_path / "out/data.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("killed midway")

    monkeypatch.setattr("pipeline.prepare.save_rows", boom)
    with pytest.raises(RuntimeError):
        run("prepare", prepare_args(tmp_path, params))
    assert (tmp_path / "out/data.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.json", "grid.png", "prepared"]


def test_model_folder_error(tmp_path, medmnist_root):
    proc = run_subprocess("encode_latents", ["--data", tmp_path, "--model", tmp_path / "nope",
                                             "--out", tmp_path / "out/l", "--metrics", tmp_path / "out/m.json"])
    assert_clean_failure(proc, tmp_path, "not a model folder")
