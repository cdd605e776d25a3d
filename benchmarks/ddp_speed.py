"""Data-parallel training speed on this machine: optimiser steps per second of the two training stages' loops (the
diffusion U-Net's :func:`pipeline.diffusion.training.fit`, the autoencoder's ``Trainer.step``) in one process on every
core against ``processes`` torchrun processes sharing the cores (:mod:`pipeline.core.distributed`).

The networks and batch sizes are those of params.yaml (the U-Net with ``train_ldm``'s own keys, or ``--tuned``'s
best_params.yaml); the data are random tensors of the real shapes (speed does not depend on their values). Writes
``metrics/ddp_speed.json``.

    python benchmarks/ddp_speed.py --tuned models/tune/best_params.yaml
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.networks.nets import AutoencoderKL, DiffusionModelUNet  # noqa: E402

from pipeline.core.data import pad_amounts  # noqa: E402
from pipeline.core.distributed import start, stop, under_torchrun  # noqa: E402
from pipeline.core.runtime import cpu_model, pick_device  # noqa: E402
from pipeline.diffusion.autoencoder import Trainer  # noqa: E402
from pipeline.diffusion.networks import autoencoder_args, unet_args  # noqa: E402
from pipeline.diffusion.schedule import make_ddpm, scheduler_args  # noqa: E402
from pipeline.diffusion.training import fit  # noqa: E402
from pipeline.diffusion.tune import read_tuned  # noqa: E402

app = typer.Typer(add_completion=False, help=__doc__)
N_TRAIN = 4708  # PneumoniaMNIST's train split


def _padded_size(params: dict) -> int:
    """The side of the prepared images (``data.size`` reflect-padded as ``prepare`` pads it)."""
    return params["data"]["size"] + sum(pad_amounts(params["data"]["size"], params["data"]["pad_multiple"]))


def _time_unet(params: dict, tuned: Path | None, steps: int, processes: int) -> float:
    p = params["train_ldm"]
    hp = {"channels": p["channels"], "attention_levels": p["attention_levels"], "num_res_blocks": p["num_res_blocks"],
          "lr": p["lr"]} | read_tuned(tuned, tuned is not None)
    ranks = start(processes, "--processes", pick_device())
    size = _padded_size(params)
    side = size // 2 ** (len(params["autoencoder"]["channels"]) - 1)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N_TRAIN, params["autoencoder"]["latent_channels"], side, side, generator=gen)
    y = torch.randint(0, 2, (N_TRAIN,), generator=gen)
    torch.manual_seed(0)
    unet = DiffusionModelUNet(**unet_args(z.shape[1], hp["channels"], hp["attention_levels"], hp["num_res_blocks"],
                                          p["num_head_channels"], p["norm_num_groups"])).to(ranks.device)
    sched = make_ddpm(scheduler_args(p["num_train_timesteps"], p["schedule"], p["prediction_type"]))
    kwargs = dict(eval_every=10 ** 9, batch_size=p["batch_size"], lr=hp["lr"], warmup_steps=p["warmup_steps"],
                  grad_clip=p["grad_clip"], label_dropout=p["label_dropout"], ema_decay=p["ema_decay"], seed=0,
                  device=ranks.device, min_snr_gamma=p["min_snr_gamma"], progress=False, ranks=ranks)
    val = (z[:2], y[:2])
    fit(unet, sched, (z, y), val, steps=3, gen=gen, **kwargs)  # warm-up
    t0 = time.perf_counter()
    fit(unet, sched, (z, y), val, steps=steps, gen=gen, **kwargs)
    elapsed = time.perf_counter() - t0
    stop(ranks)
    return steps / elapsed


def _time_autoencoder(params: dict, steps: int, processes: int) -> float:
    p = params["autoencoder"]
    ranks = start(processes, "--processes", pick_device())
    size = _padded_size(params)
    torch.manual_seed(0)
    ae = AutoencoderKL(**autoencoder_args(p["channels"], p["latent_channels"], p["num_res_blocks"],
                                          p["norm_num_groups"]))
    trainer = Trainer(ae, lr=p["lr"], total_steps=steps + 3, kl_weight=p["kl_weight"], adv_weight=0.0,
                      disc_channels=p["disc_channels"], device=ranks.device, ranks=ranks)
    x = torch.rand(p["batch_size"], 1, size, size, generator=torch.Generator().manual_seed(0)).to(ranks.device)
    for _ in range(3):
        trainer.step(x, use_adv=False)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(x, use_adv=False)
    elapsed = time.perf_counter() - t0
    stop(ranks)
    return steps / elapsed


@app.command()
def main(
    params: Path = typer.Option(REPO / "params.yaml", help="Params file (networks and batch sizes)."),
    tuned: Path = typer.Option(None, help="best_params.yaml of the tune stage (the U-Net train_ldm trains)."),
    processes: int = typer.Option(2, min=2, help="Processes of the data-parallel runs."),
    unet_steps: int = typer.Option(60, min=1, help="Timed U-Net steps per run."),
    autoencoder_steps: int = typer.Option(150, min=1, help="Timed autoencoder steps per run."),
    loops: list[str] = typer.Option(["unet", "autoencoder"], help="Training loops to time: unet, autoencoder."),
    out: Path = typer.Option(REPO / "metrics" / "ddp_speed.json", help="Output JSON."),
    worker: str = typer.Option("", hidden=True, help="Internal: time this loop in this process and print it."),
) -> None:
    """Time both training loops in one process and in ``processes`` data-parallel processes; write the speed-ups."""
    cfg = yaml.safe_load(params.read_text())
    if worker:
        n = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
        if worker == "unet":
            rate = _time_unet(cfg, tuned, unet_steps, n)
        else:
            rate = _time_autoencoder(cfg, autoencoder_steps, n)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"steps_per_s": rate}))
        return
    result: dict = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "device": pick_device().type,
                    "processes": processes}
    script = [str(Path(__file__).resolve()), "--params", str(params), "--unet-steps", str(unet_steps),
              "--autoencoder-steps", str(autoencoder_steps)] + (["--tuned", str(tuned)] if tuned else [])
    for loop in loops:
        if loop not in ("unet", "autoencoder"):
            raise typer.BadParameter(f"unknown loop {loop!r}: unet or autoencoder", param_hint="--loops")
        rates = {}
        for n in (1, processes):
            launch = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            done = subprocess.run([sys.executable, *launch, *script, "--worker", loop], capture_output=True, text=True,
                                  check=True)
            rates[n] = json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"]
            typer.echo(f"{loop}: {n} process(es): {rates[n]:.2f} steps/s", err=True)
        result[f"{loop}_steps_per_s_1"] = round(rates[1], 3)
        result[f"{loop}_steps_per_s_{processes}"] = round(rates[processes], 3)
        result[f"{loop}_speedup"] = round(rates[processes] / rates[1], 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
