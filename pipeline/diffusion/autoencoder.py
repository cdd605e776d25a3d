"""Training of MONAI's AutoencoderKL: L1 reconstruction + ``kl_weight`` · KL, plus (if ``adv_weight`` > 0) a
least-squares patch-adversarial term with MONAI's PatchDiscriminator, which sharpens reconstructions (Esser et al.,
"Taming Transformers", CVPR 2021; Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
CVPR 2022). Trains in one process or data-parallel (:mod:`pipeline.core.distributed`)."""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from pipeline.core.cli import PipelineError
from pipeline.core.distributed import SINGLE, Ranks
from pipeline.core.optim import one_cycle
from pipeline.diffusion.networks import batched, kl_loss

__all__ = ["Trainer", "val_l1"]


class _ShareOfBatch(torch.nn.Module):
    """AutoencoderKL's forward on one rank's share of a batch of ``n``, with the posterior noise of the whole batch
    drawn (every rank draws the same numbers as one process would) and this rank's share kept: N processes sample
    the latents one process samples, and no two ranks share their noise."""

    def __init__(self, ae: AutoencoderKL, ranks: Ranks) -> None:
        super().__init__()
        self.ae, self.ranks = ae, ranks

    def forward(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.ae.encode(x)
        eps = torch.randn((n, *z_sigma.shape[1:]), dtype=z_sigma.dtype, device=z_sigma.device)
        return self.ae.decode(z_mu + eps[self.ranks.share(n)] * z_sigma), z_mu, z_sigma


class Trainer:
    """Holds the autoencoder, the optional discriminator, their optimisers and one training step.

    With several ``ranks`` each step gets the whole batch and trains on this rank's share, its loss scaled so that
    DDP's averaged gradient is the whole batch's (:meth:`pipeline.core.distributed.Ranks.loss_scale`). The
    adversarial term stays one-process: its discriminator's BatchNorm would see only a rank's share, and PyTorch's
    ``SyncBatchNorm`` runs on GPUs only.

    Raises:
        PipelineError: ``adv_weight`` > 0 with several ranks.
    """

    def __init__(self, ae: AutoencoderKL, *, lr: float, total_steps: int, kl_weight: float, adv_weight: float,
                 disc_channels: int, device: torch.device, ranks: Ranks = SINGLE) -> None:
        self.ae, self.kl_weight, self.adv_weight, self.device = ae.to(device), kl_weight, adv_weight, device
        if adv_weight > 0 and ranks.world > 1:
            raise PipelineError("the adversarial term (autoencoder.adv_weight > 0) trains in one process only: set "
                                "autoencoder.processes: 1 or adv_weight: 0")
        self.ranks, self.model = ranks, ranks.wrap(_ShareOfBatch(self.ae, ranks)) if ranks.world > 1 else None
        self.opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
        self.sched = one_cycle(self.opt, lr, total_steps, 0.05)
        self.disc = PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=disc_channels, in_channels=1,
                                       out_channels=1).to(device) if adv_weight > 0 else None
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=lr) if self.disc is not None else None
        self.adv = PatchAdversarialLoss(criterion="least_squares")

    def step(self, x: torch.Tensor, use_adv: bool) -> dict[str, float]:
        """One optimisation step on batch ``x`` (with several ranks: the whole batch; each trains on its share);
        returns its loss terms (of the whole batch)."""
        self.ae.train()
        scale = 1.0
        if self.ranks.world > 1:
            n = len(x)
            scale, x = self.ranks.loss_scale(n), x[self.ranks.share(n)]
            recon, z_mu, z_sigma = self.model(x, n)
        else:
            recon, z_mu, z_sigma = self.ae(x)  # float32: bf16 would round the decoder's output by ~1 grey level
        l1 = (recon - x).abs().mean()
        kl = kl_loss(z_mu, z_sigma)
        loss = l1 + self.kl_weight * kl
        terms = {"l1": l1, "kl": kl}
        if use_adv and self.disc is not None:
            g_adv = self.adv(self.disc(recon)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + self.adv_weight * g_adv
            terms["g_adv"] = g_adv
        out = self._whole(terms, scale)
        self.opt.zero_grad(set_to_none=True)
        (loss if self.ranks.world == 1 else scale * loss).backward()
        self.opt.step()
        self.sched.step()
        if use_adv and self.disc is not None:
            out["d_adv"] = self._disc_step(x, recon.detach())
        return out

    def _whole(self, terms: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
        """The loss terms of this rank's share as the whole batch's values, in one all-reduce (the terms themselves
        for one process)."""
        if self.ranks.world == 1:
            return {k: v.item() for k, v in terms.items()}
        values = self.ranks.mean(scale * torch.stack([v.detach() for v in terms.values()]))
        return dict(zip(terms, values.tolist()))

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        loss = 0.5 * (self.adv(self.disc(fake)[-1], target_is_real=False, for_discriminator=True)
                      + self.adv(self.disc(real)[-1], target_is_real=True, for_discriminator=True))
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.item()

    def state(self) -> dict:
        """Everything a resumed run needs of the trainer (weights, optimisers, schedule)."""
        out = {"ae": self.ae.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        if self.disc is not None:
            out |= {"disc": self.disc.state_dict(), "opt_d": self.opt_d.state_dict()}
        return out

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state`."""
        self.ae.load_state_dict(state["ae"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])


def val_l1(ae: AutoencoderKL, x: torch.Tensor, device: torch.device, ranks: Ranks = SINGLE) -> float:
    """Mean L1 of deterministic reconstructions (posterior mean) over ``x``; with several ``ranks`` each
    reconstructs its share and the sums are gathered."""
    ae.eval()
    if ranks.world > 1:
        part = x[ranks.share(len(x))]
        recon = batched(lambda b: ae.decode(ae.encode(b)[0]), part, 256, device)
        return ranks.sum((recon - part).abs().sum().item()) / x.numel()
    recon = batched(lambda b: ae.decode(ae.encode(b)[0]), x, 256, device)
    return (recon - x).abs().mean().item()
