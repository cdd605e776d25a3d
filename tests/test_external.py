"""External evaluation on VinDr-PCXR-layout DICOMs: the reader on a generated fixture and on a real radiograph, the
label mapping, the counts, and the ``external_eval`` stage with and without data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import run, write_params
from PIL import Image
from pydicom.data import get_testdata_file
from vindr_fixture import READABLE, phantom, write_vindr_fixture

from pipeline.formats.external import (
    COUNT_KEYS,
    SKIP_REASONS,
    SkipFile,
    center_square,
    classify_findings,
    load_external,
    preprocess,
    read_dicom,
    read_label_table,
    resize,
)

SPLITS = ["train", "test"]


@pytest.fixture(scope="module")
def vindr(tmp_path_factory: pytest.TempPathFactory):
    return write_vindr_fixture(tmp_path_factory.mktemp("vindr"))


def gray_levels_apart(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


# --- counts ------------------------------------------------------------------------------------------------------


def test_counts_match_what_the_fixture_holds(vindr):
    ext = load_external(vindr.root, SPLITS, 28)
    assert {k: ext.counts[k] for k in COUNT_KEYS} == vindr.counts
    skipped = sum(v for k, v in ext.counts.items() if k.startswith("skipped_"))
    assert ext.counts["n_files"] == ext.counts["n_images"] + skipped  # every file lands in exactly one bucket
    assert ext.images.shape == (vindr.counts["n_images"], 28, 28) and ext.images.dtype == np.uint8
    assert sorted(ext.labels.tolist()) == sorted(vindr.labels.values())


def test_max_images_reads_only_the_first(vindr):
    ext = load_external(vindr.root, SPLITS, 28, max_images=1)  # train/ comes first: its one normal image
    assert ext.counts["n_images"] == 1 and ext.labels.tolist() == [0]
    candidates = vindr.counts["n_images"] + sum(vindr.counts[f"skipped_{r}"] for r in SKIP_REASONS)
    assert ext.counts["skipped_over_max"] == candidates - 1


def test_absent_pieces_are_counted_not_raised(tmp_path):
    (tmp_path / "test").mkdir()
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(tmp_path / "test" / "a.dicom")
    ext = load_external(tmp_path, ["train", "test"], 28)
    assert ext.counts["missing_split_folders"] == 1 and ext.counts["missing_label_csvs"] == 2
    assert ext.counts["skipped_no_label"] == 1 and ext.counts["n_images"] == 0 and ext.images.shape == (0, 28, 28)
    (tmp_path / "image_labels_test.csv").write_bytes(b"\xff\xfe garbage, no header\n")
    log: list[str] = []
    ext = load_external(tmp_path, ["test"], 28, log=log)
    assert ext.counts["bad_label_csvs"] == 1 and ext.counts["skipped_no_label"] == 1
    assert any("image_labels_test.csv cannot be used" in line for line in log)


def test_a_misspelt_label_name_is_counted(vindr):
    log: list[str] = []
    ext = load_external(vindr.root, ["test"], 28, pneumonia_labels=["Pneumonia", "Pneumonie"], log=log)
    assert ext.counts["label_names_not_in_csv"] == 1
    assert any("'Pneumonie'" in line for line in log)


# --- the reader ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, _, _ in READABLE])
def test_every_encoding_decodes_to_the_phantom(vindr, name):
    """Window, VOI LUT, MONOCHROME1, rescale, bit depth, odd sizes, compression, orientation: the same picture."""
    rel = next(k for k in vindr.expected if Path(k).stem == name)
    image, _ = read_dicom(vindr.root / rel, 64)
    expected = preprocess(vindr.expected[rel], 64)
    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    assert gray_levels_apart(image, 255 - expected) > 40  # not inverted
    assert gray_levels_apart(image, preprocess(vindr.expected[rel][:, ::-1], 64)) > 20  # not mirrored


@pytest.mark.parametrize("name", ["mono2_window_16bit", "mono1_window_16bit", "mono2_voi_lut_12bit",
                                  "mono2_rescale_signed", "mono1_12bit_plain", "j2k_lossless", "rle_lossless"])
def test_the_fixture_catches_a_naive_reader(vindr, name):
    """Stored values scaled by min-max, without the DICOM grayscale pipeline, must look clearly wrong."""
    rel = next(k for k in vindr.expected if Path(k).stem == name)
    naive = preprocess(pydicom.dcmread(vindr.root / rel).pixel_array.astype(float), 64)
    assert gray_levels_apart(naive, preprocess(vindr.expected[rel], 64)) > 10


@pytest.mark.parametrize("name,reason", [("truncated", "decode_failed"), ("not_dicom", "unreadable"),
                                         ("report", "not_image"), ("colour", "unsupported"), ("constant", "blank"),
                                         ("ct_slice", "not_radiograph"), ("skull", "not_chest"),
                                         ("lateral", "not_frontal")])
def test_bad_files_are_skipped_with_their_reason(vindr, name, reason):
    assert reason in SKIP_REASONS
    with pytest.raises(SkipFile) as info:
        read_dicom(vindr.root / "test" / f"{name}.dicom", 28)
    assert info.value.reason == reason


def test_skip_reasons_never_quote_header_values(vindr):
    log: list[str] = []
    load_external(vindr.root, ["train", "test"], 28, log=log)
    skipped = [line for line in log if line.startswith("skipped")]
    assert len(skipped) >= 8
    for line in skipped:  # the values the bad files hold in their headers
        assert not any(v in line for v in ("SKULL", "'CT'", " CT", "LL", "PHANTOM", "RGB", "1.2.840")), line


def test_rg1_and_other_pydicom_test_files_only_a_chest_radiograph_is_read():
    from collections import Counter

    from pydicom.data import get_testdata_files

    reasons: Counter = Counter()
    for f in get_testdata_files("*.dcm"):
        try:
            read_dicom(Path(f), 28)
            reasons["read"] += 1
        except SkipFile as exc:
            reasons[exc.reason] += 1
        except Exception as exc:  # noqa: BLE001 -- read_dicom must raise nothing else
            pytest.fail(f"{Path(f).name}: {type(exc).__name__}")
    ct_mr = sum(1 for f in get_testdata_files("*.dcm") if Path(f).name.startswith(("CT_", "MR_")))
    assert reasons["not_radiograph"] >= ct_mr > 0  # every CT and MR slice of the set is refused
    assert 0 < reasons["read"] < 30, reasons  # RG1_UNCI (CR chest PA) among the few read


def test_center_square_and_antialiased_resize():
    tall = np.arange(5 * 3).reshape(5, 3)
    assert center_square(tall).tolist() == tall[1:4].tolist()
    assert center_square(tall.T).tolist() == tall.T[:, 1:4].tolist()
    checker = (np.indices((280, 280)).sum(0) % 2).astype(np.float32)  # finest possible detail
    small = resize(checker, 28)
    assert abs(small.mean() - 0.5) < 0.01 and small.std() < 0.01  # averaged to gray, not aliased into a pattern
    assert resize(phantom(300, 300).astype(np.float32), 28).shape == (28, 28)


def test_rg1_radiograph_is_upright_and_not_inverted(tmp_path):
    """The real CR chest radiograph of pydicom-data (MONOCHROME1, 15 bits): bone bright, lungs dark, heart on the
    viewer's right, abdomen below."""
    image, flips = read_dicom(Path(get_testdata_file("RG1_UNCI.dcm")), 64)
    assert flips == (False, False)
    x = image.astype(float)

    def region(r0: float, r1: float, c0: float, c1: float) -> float:
        return float(x[int(r0 * 64):int(r1 * 64), int(c0 * 64):int(c1 * 64)].mean())

    lungs = (region(.25, .55, .15, .35) + region(.25, .55, .62, .82)) / 2
    spine, abdomen, apices = region(.25, .55, .45, .55), region(.85, .95, .1, .9), region(.1, .25, .15, .85)
    assert lungs < spine - 40 and lungs < abdomen - 40  # polarity: air dark, bone and soft tissue bright
    assert abdomen > apices + 30  # upright: the bright abdomen is at the bottom
    assert region(.55, .75, .55, .70) > region(.55, .75, .30, .45) + 8  # the heart on the viewer's right
    path = Path(get_testdata_file("RG1_UNCI.dcm"))
    for size in (28, 256):  # the pipeline's size, and one a person can judge
        Image.fromarray(read_dicom(path, size)[0]).save(tmp_path / f"rg1_{size}.png")
    shutil.copy(tmp_path / "rg1_256.png", "/tmp/rg1_check.png")  # to look at
    shutil.copy(tmp_path / "rg1_28.png", "/tmp/rg1_check_28.png")
    assert (tmp_path / "rg1_256.png").stat().st_size > 10_000


def test_rg1_jpeg2000_decodes_like_its_uncompressed_twin():
    """The reversible JPEG 2000 copy (through the installed decoder plugins) gives the same image, pixel for pixel."""
    j2k, _ = read_dicom(Path(get_testdata_file("RG1_J2KR.dcm")), 64)
    raw, _ = read_dicom(Path(get_testdata_file("RG1_UNCR.dcm")), 64)
    assert np.array_equal(j2k, raw)


# --- labels ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marked,expected", [
    (["No finding"], "normal"),
    (["Pneumonia"], "pneumonia"),
    (["pneumonia ", "Bronchitis"], "pneumonia"),  # other findings may come with pneumonia; names without case/space
    (["Bronchiolitis"], "excluded_label"),
    ([], "excluded_label"),
    (["No finding", "Pneumonia"], "conflicting_label"),
    (["No finding", "Bronchitis"], "conflicting_label"),
])
def test_classify_findings(marked, expected):
    findings = {name: int(name in marked) for name in ["No finding", "Pneumonia", "Bronchitis", "Bronchiolitis"]}
    findings.update({name: 1 for name in marked})
    assert classify_findings(findings, "No finding", ["Pneumonia"]) == expected


def test_related_labels_can_count_as_pneumonia():
    findings = {"No finding": 0, "Pneumonia": 0, "Broncho-pneumonia": 1}
    assert classify_findings(findings, "No finding", ["Pneumonia"]) == "excluded_label"
    assert classify_findings(findings, "No finding", ["Pneumonia", "Broncho-pneumonia"]) == "pneumonia"


def test_label_table_merges_readers_and_keeps_only_finding_columns(tmp_path):
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["a", "a", "b"], "rad_ID": ["R1", "R2", "R3"], "No finding": [1, 0, 1],
                  "Pneumonia": [0, 1, None]}).to_csv(csv, index=False)
    table = read_label_table(csv)
    assert list(table.columns) == ["No finding", "Pneumonia"]
    assert table.loc["a"].tolist() == [1, 1] and table.loc["b"].tolist() == [1, 0]


# --- the stage -------------------------------------------------------------------------------------------------


def stage_args(ws, metrics: Path, params: Path) -> list:
    return ["--data", ws / "data/prepared", "--autoencoder", ws / "models/autoencoder", "--classifier",
            ws / "models/classifier", "--samples", ws / "data/samples", "--metrics", metrics, "--params", params]


def test_stage_without_data_succeeds_and_says_where_to_get_it(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", external={"root": str(tmp_path / "absent")})
    missing = tmp_path / "no_models"  # nothing is loaded when there is no external data
    args = ["--data", missing, "--autoencoder", missing, "--classifier", missing, "--samples", missing,
            "--metrics", tmp_path / "external.json", "--params", params]
    assert run("external_eval", args) == 0
    m = json.loads((tmp_path / "external.json").read_text())
    assert m["n_images"] == 0 and m["root_found"] == 0 and m["n_files"] == 0
    assert "physionet.org/content/vindr-pcxr" in capsys.readouterr().err


def test_stage_on_the_fixture_writes_every_metric(pipeline_run, vindr, tmp_path):
    params = write_params(tmp_path / "params.yaml", external={"root": str(vindr.root), "splits": SPLITS})
    metrics = tmp_path / "external.json"
    assert run("external_eval", stage_args(pipeline_run, metrics, params)) == 0
    m = json.loads(metrics.read_text())
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in m.values())  # numbers only: no pixels
    assert {k: m[k] for k in COUNT_KEYS} == vindr.counts and m["root_found"] == 1
    for name in ("external", "test"):
        assert 0 <= m[f"classifier_{name}_auc"] <= 1 and 0 <= m[f"classifier_{name}_accuracy"] <= 1
        assert 0 < m[f"autoencoder_{name}_psnr_db"] < 100 and -1 <= m[f"autoencoder_{name}_ssim"] <= 1
    assert "classifier_auc_drop" in m and "autoencoder_psnr_drop_db" in m
    with np.load(pipeline_run / "data/samples/cohort_matched.npz") as z:
        synth = np.bincount(z["labels"], minlength=2)
    for k, cls in enumerate(("normal", "pneumonia")):
        n = min(synth[k], vindr.counts[f"n_{cls}"])
        key = f"inception_synthetic_{cls}_vs_external_{cls}_n{n}"
        assert m[f"fid_{key}"] >= 0 and f"kid_{key}_mean" in m and m[f"kid_{key}_std"] >= 0
        assert any(k.startswith(f"fid_inception_test_{cls}_vs_external_{cls}_n") for k in m)
