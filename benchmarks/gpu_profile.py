"""GPU against CPU on the default run's own inputs: one epoch of each training stage and the sampling of the cohort.

For each device (the CPU, and CUDA when present): one epoch of `train_autoencoder` (its Trainer, the default
`autoencoder` params, the prepared train split), one epoch of `train_ldm` (the U-Net of `models/ldm/config.json`, the
`train_ldm` params, the train latents; mixed precision as the stage uses it: bf16 autocast on CUDA, float32 on the
CPU) and the sampling of the label-matched cohort (the `ldm` sampler settings; ``--sample-n`` images, all 4708 by
default). Writes ``metrics/gpu_profile.json``: seconds and throughput per device and task, the device names, and the
GPU/CPU speed-up. Without a GPU it writes the CPU figures and ``"ran_on_gpu": false``; the README's times are CPU-only
until this has run where a GPU is lent.

    python benchmarks/gpu_profile.py --out metrics/gpu_profile.json
    python benchmarks/gpu_profile.py --placeholder   # the file that says it has not run on a GPU
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet  # noqa: E402

from pipeline.core.data import load_prepared  # noqa: E402
from pipeline.core.runtime import cpu_model  # noqa: E402
from pipeline.diffusion.autoencoder import Trainer  # noqa: E402
from pipeline.diffusion.latents import load_train_val  # noqa: E402
from pipeline.diffusion.networks import autoencoder_args  # noqa: E402
from pipeline.diffusion.sampler import Sampler, SamplerSettings, label_matched  # noqa: E402
from pipeline.diffusion.schedule import make_ddpm  # noqa: E402
from pipeline.diffusion.training import fit  # noqa: E402

app = typer.Typer(add_completion=False, help=__doc__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def autoencoder_epoch(data: Path, p: dict, device: torch.device, steps: int | None) -> dict[str, float]:
    """One epoch (or ``steps`` steps) of the autoencoder's training, with the adversarial term on."""
    x, _ = load_prepared(data, "train")
    ae = AutoencoderKL(**autoencoder_args(p["channels"], p["latent_channels"], p["num_res_blocks"],
                                          p["norm_num_groups"]))
    n = min(steps or 10**9, -(-len(x) // p["batch_size"]))
    trainer = Trainer(ae, lr=p["lr"], total_steps=n + 1, kl_weight=p["kl_weight"], adv_weight=p["adv_weight"],
                      disc_channels=p["disc_channels"], device=device)
    gen = torch.Generator().manual_seed(p["seed"])
    order = torch.randperm(len(x), generator=gen)
    trainer.step(x[order[:p["batch_size"]]].to(device), use_adv=p["adv_weight"] > 0)  # warm-up, not timed
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        trainer.step(x[order[i * p["batch_size"]:(i + 1) * p["batch_size"]]].to(device), use_adv=p["adv_weight"] > 0)
    sync(device)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 2), "steps": n, "steps_per_s": round(n / s, 3)}


def ldm_epoch(latents: Path, ldm: Path, p: dict, device: torch.device, steps: int | None) -> dict[str, float]:
    """One epoch (or ``steps`` steps) of the U-Net's training, its architecture read from the trained model."""
    config = json.loads((ldm / "config.json").read_text())
    data, _, _ = load_train_val(latents, p["latent_norm"])
    unet = DiffusionModelUNet(**config["args"]).to(device)
    n = min(steps or 10**9, -(-len(data["train"][0]) // p["batch_size"]))
    gen = torch.Generator().manual_seed(p["seed"])
    lr = config.get("training", {}).get("lr", p["lr"])  # the tuned learning rate the model was trained with
    kwargs = dict(batch_size=p["batch_size"], lr=lr, warmup_steps=min(p["warmup_steps"], n),
                  grad_clip=p["grad_clip"], label_dropout=p["label_dropout"], ema_decay=p["ema_decay"],
                  seed=p["seed"], gen=gen, device=device, min_snr_gamma=p["min_snr_gamma"], progress=False)
    small_val = tuple(t[:8] for t in data["val"])
    fit(unet, make_ddpm(config["scheduler"]), data["train"], small_val, steps=1, eval_every=1, **kwargs)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    fit(unet, make_ddpm(config["scheduler"]), data["train"], small_val, steps=n, eval_every=n, **kwargs)
    sync(device)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 2), "steps": n, "steps_per_s": round(n / s, 3)}


def sampling(latents: Path, ldm: Path, ae: Path, p: dict, device: torch.device, n: int | None) -> dict[str, float]:
    """The label-matched cohort (its first ``n`` images) with the cohorts' sampler settings."""
    settings = SamplerSettings(**{k: p[k] for k in SamplerSettings.__dataclass_fields__})
    sampler = Sampler.from_params(ldm, ae, settings, device, latents)
    with np.load(latents / "train.npz") as z:
        labels = label_matched(z["labels"])
    if n:
        labels = labels[np.linspace(0, len(labels) - 1, min(n, len(labels))).astype(int)]
    seeds = [p["sample_seed"] + i for i in range(len(labels))]
    sampler.generate(labels[:2], seeds[:2], p["guidance_scale"], 2, desc="warm-up")
    sync(device)
    t0 = time.perf_counter()
    sampler.generate(labels, seeds, p["guidance_scale"], p["sample_batch_size"], desc=f"cohort on {device.type}")
    sync(device)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 2), "images": int(len(labels)), "images_per_s": round(len(labels) / s, 3)}


@app.command()
def main(
    out: Path = typer.Option(REPO / "metrics" / "gpu_profile.json", help="Output JSON."),
    params: Path = typer.Option(REPO / "params.yaml", help="The params file (its autoencoder, train_ldm, ldm)."),
    data: Path = typer.Option(REPO / "data" / "prepared", help="Prepared data (prepare)."),
    latents: Path = typer.Option(REPO / "data" / "latents", help="Latents (encode_latents)."),
    autoencoder: Path = typer.Option(REPO / "models" / "autoencoder", help="Autoencoder model folder."),
    ldm: Path = typer.Option(REPO / "models" / "ldm", help="Diffusion model folder (train_ldm)."),
    steps: int = typer.Option(0, min=0, help="Training steps per task instead of one epoch (0 = one epoch)."),
    sample_n: int = typer.Option(0, min=0, help="Images to sample instead of the whole cohort (0 = all)."),
    cpu: bool = typer.Option(True, help="Also time the CPU (the baseline of the speed-up)."),
    placeholder: bool = typer.Option(False, help="Only write the file saying the profile has not run on a GPU."),
) -> None:
    """Time the training epochs and the cohort's sampling per device; write the JSON."""
    if placeholder:
        out.write_text(json.dumps({"ran_on_gpu": False, "note": "not run on a GPU yet: run "
                                   "`python benchmarks/gpu_profile.py` where CUDA is present (README, Scale out); "
                                   "every time in the README is CPU-only"}, indent=2) + "\n")
        return
    p = yaml.safe_load(params.read_text())
    devices = ([torch.device("cuda")] if torch.cuda.is_available() else []) + ([torch.device("cpu")] if cpu else [])
    if not devices:
        raise SystemExit("no device to time: no CUDA device, and --no-cpu")
    result: dict = {"ran_on_gpu": torch.cuda.is_available(), "torch": torch.__version__, "devices": {}}
    for device in devices:
        typer.echo(f"timing on {device_name(device)}", err=True)
        result["devices"][device.type] = {
            "name": device_name(device),
            "train_autoencoder_epoch": autoencoder_epoch(data, p["autoencoder"], device, steps or None),
            "train_ldm_epoch": ldm_epoch(latents, ldm, p["train_ldm"], device, steps or None),
            "sample_cohort": sampling(latents, ldm, autoencoder, p["ldm"], device, sample_n or None)}
    if "cuda" in result["devices"] and "cpu" in result["devices"]:
        gpu, cpu_ = result["devices"]["cuda"], result["devices"]["cpu"]
        result["speedup_gpu_over_cpu"] = {task: round(cpu_[task]["seconds"] / gpu[task]["seconds"], 2)
                                          for task in gpu if isinstance(gpu[task], dict)}
    if not result["ran_on_gpu"]:
        result["note"] = "no CUDA device here: CPU figures only; run again where a GPU is lent"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
