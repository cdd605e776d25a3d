"""Training of MONAI's AutoencoderKL: L1 reconstruction + ``kl_weight`` · KL, plus (if ``adv_weight`` > 0) a
least-squares patch-adversarial term with MONAI's PatchDiscriminator, which sharpens reconstructions (Esser et al.,
"Taming Transformers", CVPR 2021; Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
CVPR 2022)."""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from pipeline.core.optim import one_cycle
from pipeline.diffusion.networks import batched, kl_loss

__all__ = ["Trainer", "val_l1"]


class Trainer:
    """Holds the autoencoder, the optional discriminator, their optimisers and one training step."""

    def __init__(self, ae: AutoencoderKL, *, lr: float, total_steps: int, kl_weight: float, adv_weight: float,
                 disc_channels: int, device: torch.device) -> None:
        self.ae, self.kl_weight, self.adv_weight, self.device = ae.to(device), kl_weight, adv_weight, device
        self.opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
        self.sched = one_cycle(self.opt, lr, total_steps, 0.05)
        self.disc = PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=disc_channels, in_channels=1,
                                       out_channels=1).to(device) if adv_weight > 0 else None
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=lr) if self.disc is not None else None
        self.adv = PatchAdversarialLoss(criterion="least_squares")

    def step(self, x: torch.Tensor, use_adv: bool) -> dict[str, float]:
        """One optimisation step on batch ``x``; returns its loss terms."""
        self.ae.train()
        recon, z_mu, z_sigma = self.ae(x)  # float32: bf16 would round the decoder's output by ~1 grey level
        l1 = (recon - x).abs().mean()
        kl = kl_loss(z_mu, z_sigma)
        loss = l1 + self.kl_weight * kl
        out = {"l1": l1.item(), "kl": kl.item()}
        if use_adv and self.disc is not None:
            g_adv = self.adv(self.disc(recon)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + self.adv_weight * g_adv
            out["g_adv"] = g_adv.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if use_adv and self.disc is not None:
            out["d_adv"] = self._disc_step(x, recon.detach())
        return out

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


def val_l1(ae: AutoencoderKL, x: torch.Tensor, device: torch.device) -> float:
    """Mean L1 of deterministic reconstructions (posterior mean) over ``x``."""
    ae.eval()
    recon = batched(lambda b: ae.decode(ae.encode(b)[0]), x, 256, device)
    return (recon - x).abs().mean().item()
