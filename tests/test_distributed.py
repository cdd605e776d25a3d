"""Data-parallel training (``processes: 2``: torchrun, DDP over gloo) of train_autoencoder and train_ldm on the tiny
profile, against the one-process run of the same settings; the outputs load in the stages that read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, run_subprocess, stage_args
from safetensors.torch import load_file

from pipeline.core.artifacts import load_model
from pipeline.core.data import load_prepared
from pipeline.core.distributed import SINGLE, Ranks, state_hash
from pipeline.diffusion.networks import REGISTRY, reconstruct


def _params(ws, tmp_path: Path, name: str, processes: int) -> Path:
    """The session run's params with ``processes`` in both training sections and no adversarial term (it stays
    one-process) in the autoencoder."""
    params = yaml.safe_load(ws.params.read_text())
    params["autoencoder"].update(processes=processes, adv_weight=0.0)
    params["train_ldm"]["processes"] = processes
    path = tmp_path / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _train(stage: str, ws, out: Path, params: Path) -> subprocess.CompletedProcess:
    """Run ``stage`` as its dvc.yaml command does, on the session run's inputs, writing into ``out``."""
    args = [str(a) for a in stage_args(stage, ws)]
    for flag in ("--out", "--metrics", "--curve"):
        i = args.index(flag)
        args[i + 1] = str(out / Path(args[i + 1]).name)
    return run_subprocess(stage, [*args, "--params", params])


@pytest.fixture(scope="module")
def trained(pipeline_run, tmp_path_factory):
    """Both training stages with one and with two processes (same settings, same inputs)."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = {}
    for n in (1, 2):
        params = _params(pipeline_run, tmp, f"params{n}.yaml", n)
        for stage in ("train_autoencoder", "train_ldm"):
            out = tmp / f"{stage}{n}"
            done = _train(stage, pipeline_run, out, params)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[stage, n] = out
    return runs


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("stage, model", [("train_autoencoder", "autoencoder"), ("train_ldm", "ldm")])
def test_both_ranks_end_with_the_same_weights(trained, stage, model):
    config = json.loads((trained[stage, 2] / model / "config.json").read_text())
    hashes = config["training"]["rank_weight_hashes"]
    assert config["training"]["processes"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    # rank 0 wrote the weights that both ranks hashed
    assert state_hash(_weights(trained[stage, 2] / model)) == hashes[0]
    one = json.loads((trained[stage, 1] / model / "config.json").read_text())
    assert "rank_weight_hashes" not in json.dumps(one)  # one process writes what it always did


def test_two_processes_train_the_one_process_recipe(pipeline_run, trained):
    """Same global batch, noise and learning rate: the weights differ only by summation order. The U-Net's agree to
    1e-4; the autoencoder's too except conv biases that GroupNorm cancels (zero gradient, so Adam's normalised step
    amplifies rounding noise), which move its decoder output by far less than a grey level."""
    one, two = _weights(trained["train_ldm", 1] / "ldm"), _weights(trained["train_ldm", 2] / "ldm")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    one, two = _weights(trained["train_autoencoder", 1] / "autoencoder"), \
        _weights(trained["train_autoencoder", 2] / "autoencoder")
    diff = np.concatenate([(one[k] - two[k]).abs().flatten().numpy() for k in one])
    assert np.quantile(diff, 0.99) < 1e-5
    x, _ = load_prepared(pipeline_run / "data/prepared", "val")
    recon = [reconstruct(load_model(trained["train_autoencoder", n] / "autoencoder", REGISTRY)[0].eval(), x[:64], 64,
                         torch.device("cpu")) for n in (1, 2)]
    assert (recon[0] - recon[1]).abs().max().item() < 0.5 / 255
    m1, m2 = (json.loads((trained["train_autoencoder", n] / "autoencoder_train.json").read_text()) for n in (1, 2))
    assert m1["best_epoch"] == m2["best_epoch"] and m1["best_val_l1"] == pytest.approx(m2["best_val_l1"], abs=1e-5)
    l1, l2 = (json.loads((trained["train_ldm", n] / "ldm.json").read_text()) for n in (1, 2))
    assert l1["val_loss"] == pytest.approx(l2["val_loss"], abs=1e-5)
    assert l1["train_loss"] == pytest.approx(l2["train_loss"], abs=1e-5)


def test_the_outputs_load_in_the_stages_that_read_them(pipeline_run, trained, tmp_path):
    ws = pipeline_run
    args = [str(a) for a in stage_args("encode_latents", ws)]
    for flag, value in (("--model", trained["train_autoencoder", 2] / "autoencoder"), ("--out", tmp_path / "latents"),
                        ("--metrics", tmp_path / "latents.json")):
        args[args.index(flag) + 1] = str(value)
    done = run_subprocess("encode_latents", args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "latents" / "scale.json").is_file()
    args = [str(a) for a in stage_args("sample", ws)]
    for flag, value in (("--ldm", trained["train_ldm", 2] / "ldm"), ("--out", tmp_path / "samples"),
                        ("--metrics", tmp_path / "sample.json"), ("--grid", tmp_path / "grid.png")):
        args[args.index(flag) + 1] = str(value)
    done = run_subprocess("sample", [*args, "--params", ws.params])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "sample.json").read_text())["matched_n"] > 0
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_torchrun_by_hand_must_agree_with_the_params_key(pipeline_run, tmp_path):
    """A user may start the stage with torchrun directly; a process count other than the key's is an error that names
    the key (DVC tracks the key, not the launcher)."""
    params = _params(pipeline_run, tmp_path, "params.yaml", 1)
    args = [str(a) for a in stage_args("train_ldm", pipeline_run)]
    args[args.index("--out") + 1] = str(tmp_path / "ldm")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pipeline.train_ldm", *args, "--params", str(params)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert "torchrun started 2 processes but params key train_ldm.processes is 1" in done.stderr
    assert not (tmp_path / "ldm").exists()


def test_the_adversarial_term_refuses_several_processes():
    """Refused before any process group is touched, so the stage's processes exit with the message and write
    nothing (the error reaches the user as every PipelineError does)."""
    from monai.networks.nets import AutoencoderKL

    from pipeline.core.cli import PipelineError
    from pipeline.diffusion.autoencoder import Trainer
    from pipeline.diffusion.networks import autoencoder_args

    ae = AutoencoderKL(**autoencoder_args([8, 16], 2, 1, 8))
    with pytest.raises(PipelineError, match=r"autoencoder.adv_weight > 0\) trains in one process only"):
        Trainer(ae, lr=1e-3, total_steps=2, kl_weight=1e-6, adv_weight=0.1, disc_channels=8,
                device=torch.device("cpu"), ranks=Ranks(rank=0, world=2))
    Trainer(ae, lr=1e-3, total_steps=2, kl_weight=1e-6, adv_weight=0.1, disc_channels=8, device=torch.device("cpu"))


def test_processes_above_one_outside_torchrun_is_an_error():
    from pipeline.core.cli import PipelineError
    from pipeline.core.distributed import start

    with pytest.raises(PipelineError, match="train_ldm.processes is 2: start the stage under torchrun"):
        start(2, "train_ldm.processes", torch.device("cpu"))
    assert start(1, "train_ldm.processes", torch.device("cpu")) == SINGLE


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (5, 3)])
def test_the_shares_cover_the_batch_and_the_scaled_losses_average_to_its_mean(n, world):
    losses = torch.rand(n, generator=torch.Generator().manual_seed(n))
    ranks = [Ranks(rank=r, world=world) for r in range(world)]
    shares = [range(n)[r.share(n)] for r in ranks]
    assert sorted(i for s in shares for i in s) == list(range(n))
    scaled = [r.loss_scale(n) * losses[r.share(n)].mean() for r in ranks]
    assert (sum(scaled) / world).item() == pytest.approx(losses.mean().item(), rel=1e-6)


def test_ddp_speed_benchmark_times_both_loops(tmp_path):
    out = tmp_path / "ddp_speed.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ddp_speed.py"), "--params",
                           str(REPO / "tests" / "params_tiny.yaml"), "--unet-steps", "2", "--autoencoder-steps", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for loop in ("unet", "autoencoder"):
        assert result[f"{loop}_steps_per_s_1"] > 0 and result[f"{loop}_steps_per_s_2"] > 0
        assert result[f"{loop}_speedup"] == pytest.approx(
            result[f"{loop}_steps_per_s_2"] / result[f"{loop}_steps_per_s_1"], rel=0.01)
    assert result["processes"] == 2 and result["cpu_count"] >= 1
