"""Stage ``train_autoencoder``: train MONAI's AutoencoderKL on the prepared train split, keep the best-on-val weights.

Loss: L1 reconstruction + ``kl_weight`` · KL, plus (if ``adv_weight`` > 0, from ``adv_start_epoch``) a least-squares
patch-adversarial term (:mod:`pipeline.diffusion.autoencoder`). Reads the ``autoencoder`` section of params.yaml.
With ``processes`` > 1 it trains data-parallel under torchrun (:mod:`pipeline.core.distributed`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import typer
from monai.networks.nets import AutoencoderKL
from tqdm import tqdm

from pipeline.core.artifacts import atomic_outputs, save_model, seed_all, write_json, write_tsv
from pipeline.core.cli import params_option, run_stage
from pipeline.core.distributed import Ranks, train_on
from pipeline.core.optim import checkpoint_beside
from pipeline.core.data import load_prepared, read_meta
from pipeline.diffusion.autoencoder import Trainer, val_l1
from pipeline.diffusion.networks import autoencoder_args

SECTION = "autoencoder"  # the params.yaml section this stage reads
app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    data: Path = typer.Option(..., help="Prepared data folder (output of prepare)."),
    out: Path = typer.Option(..., help="Output model folder (model.safetensors + config.json)."),
    metrics: Path = typer.Option(..., help="Output JSON: best epoch, best val L1, steps, wall time."),
    curve: Path = typer.Option(..., help="Output TSV of per-epoch losses for dvc plots."),
    params: Path = params_option(),
    channels: list[int] = typer.Option(..., help="Channels per level; latent = size / 2^(levels-1)."),
    latent_channels: int = typer.Option(..., min=1, help="Latent channels."),
    num_res_blocks: int = typer.Option(..., min=1, help="Residual blocks per level."),
    norm_num_groups: int = typer.Option(..., min=1, help="GroupNorm groups (must divide every channel count)."),
    epochs: int = typer.Option(..., min=1, help="Training epochs over the train split."),
    batch_size: int = typer.Option(..., min=1, help="Batch size."),
    lr: float = typer.Option(..., min=0.0, help="Peak learning rate (one-cycle schedule, AdamW)."),
    kl_weight: float = typer.Option(..., min=0.0, help="Weight of the KL term."),
    adv_weight: float = typer.Option(..., min=0.0, help="Weight of the patch-adversarial term (0 = off)."),
    adv_start_epoch: int = typer.Option(..., min=0, help="Epoch from which the adversarial term is used."),
    disc_channels: int = typer.Option(..., min=1, help="Base channels of the PatchDiscriminator."),
    seed: int = typer.Option(..., help="Seed for weights and batch order."),
    processes: int = typer.Option(..., min=1, help="Training processes (data-parallel with torchrun: gloo on the "
                                  "CPU, NCCL on CUDA, one GPU each); 1 trains in this process."),
) -> None:
    """Train the autoencoder; write the best-on-val model folder, a loss curve and a metrics JSON. A run killed midway
    resumes from its last finished epoch when rerun with the same settings (models/.autoencoder.checkpoint)."""
    options = {k: v for k, v in locals().items() if k not in ("params", "processes")}
    train_on(processes, "pipeline.train_autoencoder", "autoencoder.processes",
             lambda ranks: _train(**options, ranks=ranks))


def _train(*, data: Path, out: Path, metrics: Path, curve: Path, channels: list[int], latent_channels: int,
           num_res_blocks: int, norm_num_groups: int, epochs: int, batch_size: int, lr: float, kl_weight: float,
           adv_weight: float, adv_start_epoch: int, disc_channels: int, seed: int, ranks: Ranks) -> None:
    """The training of :func:`main` in this process (one of ``ranks``; rank 0 writes)."""
    t0 = time.time()
    gen = seed_all(seed)
    device = ranks.device
    x_train, _ = load_prepared(data, "train")
    x_val, _ = load_prepared(data, "val")
    args = autoencoder_args(channels, latent_channels, num_res_blocks, norm_num_groups)
    ae = AutoencoderKL(**args)
    steps_per_epoch = -(-len(x_train) // batch_size)
    trainer = Trainer(ae, lr=lr, total_steps=epochs * steps_per_epoch, kl_weight=kl_weight, adv_weight=adv_weight,
                      disc_channels=disc_channels, device=device, ranks=ranks)
    rows, best, best_state, best_epoch, start = [], float("inf"), None, -1, 0
    settings = {"args": args, "epochs": epochs, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight,
                "adv_weight": adv_weight, "adv_start_epoch": adv_start_epoch, "disc_channels": disc_channels,
                "seed": seed}
    settings |= ranks.settings()
    checkpoint = checkpoint_beside(out, settings, data, precision="float32")  # a killed run resumes from its last epoch
    saved = checkpoint.load()
    if saved is not None:
        trainer.load_state(saved["trainer"])
        gen.set_state(saved["gen"])
        rows, best, best_state, best_epoch, start = (saved["rows"], saved["best"], saved["best_state"],
                                                     saved["best_epoch"], saved["epoch"])
        if ranks.main:
            typer.echo(f"resuming from epoch {start} ({checkpoint.folder})", err=True)
    for epoch in range(start, epochs):
        order = torch.randperm(len(x_train), generator=gen)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not ranks.main)
        for i in bar:
            batch = x_train[order[i * batch_size:(i + 1) * batch_size]].to(device)
            terms = trainer.step(batch, use_adv=epoch >= adv_start_epoch)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(l1=f"{terms['l1']:.4f}")
        v = val_l1(ae, x_val, device, ranks)
        row = {"epoch": epoch + 1, **{f"train_{k}": s / steps_per_epoch for k, s in sums.items()}, "val_l1": v}
        rows.append(row)
        if ranks.main:
            typer.echo("  ".join(f"{k}={val:.5g}" if isinstance(val, float) else f"{k}={val}"
                                 for k, val in row.items()), err=True)
        if v < best:
            best, best_epoch, best_state = v, epoch + 1, copy.deepcopy(ae.state_dict())
        if epoch + 1 < epochs and ranks.main:
            checkpoint.save({"trainer": trainer.state(), "gen": gen.get_state(), "rows": rows, "best": best,
                             "best_state": best_state, "best_epoch": best_epoch, "epoch": epoch + 1})
    ae.load_state_dict(best_state)
    parallel = ranks.provenance(ae)
    if not ranks.main:
        return
    meta = read_meta(data)
    with atomic_outputs(out, metrics, curve) as (tmp_out, tmp_metrics, tmp_curve):
        save_model(tmp_out, ae, "AutoencoderKL", args, "train_autoencoder", data=meta,
                   **({"training": parallel} if parallel else {}))
        write_tsv(tmp_curve, [{k: r.get(k, float("nan")) for k in rows[-1]} for r in rows])
        write_json(tmp_metrics, {"best_epoch": best_epoch, "best_val_l1": round(best, 6), "epochs": epochs,
                                 "steps": epochs * steps_per_epoch, "wall_time_s": round(time.time() - t0, 1)})
    checkpoint.clear()


if __name__ == "__main__":
    run_stage(app, SECTION)
