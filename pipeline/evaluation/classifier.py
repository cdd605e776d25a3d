"""The evaluator: a pneumonia-vs-normal classifier of uint8 chest X-rays, its training recipe and its metrics.

Other stages judge images with it (label fidelity of samples, a "domain FID" on its penultimate features,
train-on-synthetic utility, counterfactual flip rates), so everything takes what the data set stores: uint8 N×H×W
images at the data size (28×28 by default, unpadded, 0 = black).

The network is MONAI's 2-D ResNet with basic blocks, a 3×3 stride-1 stem and no max-pool (the images are tiny), one
logit out (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016). The recipe: random affine and
contrast/brightness augmentation, class-balanced binary cross-entropy with label smoothing (Szegedy et al., CVPR
2016), AdamW with a one-cycle cosine schedule, an exponential moving average of the weights (with BatchNorm
statistics), and the EMA weights of the epoch with the best validation AUC. The decision threshold is chosen on
validation by Youden's J (Youden, "Index for rating diagnostic tests", Cancer 1950).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from monai.networks.nets import ResNet
from scipy.special import expit
from scipy.stats import rankdata
from tqdm import tqdm

from pipeline.core.artifacts import load_model, load_model_config, save_model
from pipeline.core.cli import PipelineError
from pipeline.core.optim import one_cycle
from pipeline.core.runtime import autocast, pick_device

__all__ = [
    "REGISTRY",
    "Evaluator",
    "Recipe",
    "binary_metrics",
    "report",
    "choose_threshold",
    "load_classifier",
    "resnet_args",
    "roc_auc",
    "save_classifier",
    "train_evaluator",
]

REGISTRY: dict[str, type[torch.nn.Module]] = {"ResNet": ResNet}
CLASS_NAME = "ResNet"
INFERENCE_BATCH = 512


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of the evaluator's training recipe (the keys of the ``classifier`` params section, less seed;
    every field required: the values come from params.yaml).

    A stage that retrains the evaluator on other data (e.g. synthetic images) builds the same ``Recipe`` from the same
    section, so every run has the same network, budget and validation-based selection.

    Args:
        widths: channels of the ResNet stages (MONAI ``block_inplanes``); stage *k* > 0 halves the resolution.
        blocks: basic residual blocks per stage (MONAI ``layers``), one entry per width.
        input_size: images are resized (bilinear) to this many pixels before the network.
        epochs: passes over the training images.
        batch_size: images per optimisation step.
        lr: peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: targets become ``y (1 - s) + s / 2``.
        class_balance: weight each class's loss by ``N / (2 N_c)`` so both classes count equally.
        rotation: maximum random rotation, degrees.
        translation: maximum random shift, fraction of the image size.
        scale: maximum random zoom, ``1 ± scale``.
        intensity: maximum random contrast ``1 ± intensity`` and brightness ``± intensity`` (images in [0, 1]).
        ema_decay: decay of the weight average that is evaluated and saved; 0 uses the raw weights.
    """

    widths: list[int]
    blocks: list[int]
    input_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float
    class_balance: bool
    rotation: float
    translation: float
    scale: float
    intensity: float
    ema_decay: float

    @classmethod
    def from_params(cls, values: dict[str, Any]) -> Recipe:
        """A recipe from a params section (unknown keys, such as ``seed``, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items() if k in names})


def resnet_args(widths: tuple[int, ...] | list[int], blocks: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """Constructor arguments of the evaluator's MONAI :class:`ResNet` (its keys are MONAI's argument names)."""
    if len(widths) != 4 or len(blocks) != 4:
        raise PipelineError(f"classifier widths {list(widths)} and blocks {list(blocks)} must each have 4 entries "
                            "(MONAI's ResNet has four stages)")
    return {"block": "basic", "layers": list(blocks), "block_inplanes": list(widths), "spatial_dims": 2,
            "n_input_channels": 1, "conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True, "num_classes": 1}


def _check_images(images: np.ndarray, size: int | None = None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"the evaluator wants uint8 N×H×W images, got {got}")
    if size is not None and images.shape[1:] != (size, size):
        raise ValueError(f"the evaluator was trained on {size}×{size} images, "
                         f"got {images.shape[1]}×{images.shape[2]}")


def _to_input(batch: np.ndarray | torch.Tensor, mean: float, std: float, input_size: int,
              device: torch.device) -> torch.Tensor:
    """uint8 N×H×W -> normalised float N×1×S×S on ``device``."""
    x = torch.as_tensor(batch).to(device).float().div(255.0).unsqueeze(1)
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return (x - mean) / std


class Evaluator:
    """A trained classifier with its input normalisation and decision threshold.

    Args:
        net: the MONAI ResNet (one logit: pneumonia).
        args: its constructor arguments (``ResNet(**args)``), saved with it.
        threshold: predict pneumonia when ``predict_proba >= threshold`` (chosen on validation).
        size: image size the evaluator takes (the data size, e.g. 28).
        input_size: size the images are resized to before the network.
        mean: pixel mean of the training images in [0, 1], subtracted before the network.
        std: pixel standard deviation of the training images in [0, 1], divided by before the network.
        device: where the network runs (default: CUDA when available, else CPU).
    """

    def __init__(self, net: torch.nn.Module, args: dict[str, Any], *, threshold: float, size: int, input_size: int,
                 mean: float, std: float, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.net = net.to(self.device, memory_format=torch.channels_last).eval()
        self.args = dict(args)
        self.threshold, self.size, self.input_size = float(threshold), int(size), int(input_size)
        self.mean, self.std = float(mean), float(std)

    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        x = _to_input(images, self.mean, self.std, self.input_size, self.device)
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """Logits (float64 N) of uint8 N×H×W images."""
        _check_images(images, self.size)
        self.net.eval()
        with autocast(self.device):
            out = [self.net(self._inputs(images[i:i + batch_size])).reshape(-1).double().cpu()
                   for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0)

    def predict_proba(self, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """P(pneumonia) (float64 N) of uint8 N×H×W images at the data size, unpadded."""
        return expit(self.logits(images, batch_size))

    def predict(self, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """Predicted labels (int64 N: 0 normal, 1 pneumonia) at the validation-chosen threshold."""
        return (self.predict_proba(images, batch_size) >= self.threshold).astype(np.int64)

    @torch.inference_mode()
    def features(self, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """Penultimate-layer features (global-average-pooled last stage, float64 N×D) of uint8 N×H×W images."""
        _check_images(images, self.size)
        self.net.eval()
        with autocast(self.device):
            out = [_pooled(self.net, self._inputs(images[i:i + batch_size])).double().cpu()
                   for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.net.fc.in_features))


def _pooled(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``net.fc`` (the pooled features), captured by a hook during one forward pass."""
    captured: list[torch.Tensor] = []
    handle = net.fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return captured[0]


# --- metrics -----------------------------------------------------------------------------------------------------


def _check_binary(prob: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prob, labels = np.asarray(prob, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    if len(prob) != len(labels):
        raise ValueError(f"{len(prob)} probabilities but {len(labels)} labels")
    if not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) != 2:
        raise ValueError("labels must be 0/1 and contain both classes")
    return prob, labels.astype(np.int64)


def roc_auc(prob: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting ½
    (the Mann-Whitney U statistic divided by n_pos·n_neg)."""
    prob, labels = _check_binary(prob, labels)
    ranks = rankdata(prob)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(prob: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and accuracy, sensitivity (recall of pneumonia) and specificity (recall of normal) at ``threshold``.

    Args:
        prob: P(pneumonia), N.
        labels: 0 normal / 1 pneumonia, N (both classes present).
        threshold: predict pneumonia when ``prob >= threshold``.
    """
    prob, labels = _check_binary(prob, labels)
    pred = prob >= threshold
    pos = labels == 1
    return {"auc": roc_auc(prob, labels), "accuracy": float((pred == pos).mean()),
            "sensitivity": float(pred[pos].mean()), "specificity": float((~pred[~pos]).mean())}


def report(evaluator: "Evaluator", splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``<split>_<metric>`` (:func:`binary_metrics`) for every split at the evaluator's threshold, rounded for a
    metrics file."""
    out: dict[str, float] = {}
    for split, (images, labels) in splits.items():
        for key, value in binary_metrics(evaluator.predict_proba(images), labels, evaluator.threshold).items():
            out[f"{split}_{key}"] = round(value, 6)
    return out


def choose_threshold(prob: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity - 1 (rule: pneumonia iff prob >= t).

    Candidates are the midpoints between consecutive distinct probabilities (and the ends), so the threshold does
    not sit on a validation score; among equal J the highest threshold (the most specific) wins.
    """
    prob, labels = _check_binary(prob, labels)
    values = np.unique(prob)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    pred = prob[None, :] >= candidates[:, None]
    pos = labels == 1
    youden = pred[:, pos].mean(1) + (~pred[:, ~pos]).mean(1) - 1.0
    best = np.flatnonzero(youden >= youden.max() - 1e-12)
    return float(candidates[best[-1]])


# --- training ----------------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, shift, zoom; border pixels repeated) and contrast/brightness of images in [0, 1].

    Horizontal flips are left out on purpose: they move the heart to the right side of the chest.
    """
    n = len(x)

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * bound

    angle = uniform(math.radians(recipe.rotation))
    zoom = 1.0 + uniform(recipe.scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = torch.stack([uniform(2 * recipe.translation), uniform(2 * recipe.translation)], 1)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1.0 + uniform(recipe.intensity)).to(x).view(-1, 1, 1, 1)
    brightness = uniform(recipe.intensity).to(x).view(-1, 1, 1, 1)
    return ((x - 0.5) * contrast + 0.5 + brightness).clamp(0, 1)


def _class_weights(labels: np.ndarray, balanced: bool) -> torch.Tensor:
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    if not balanced or (counts == 0).any():
        return torch.ones(2)
    return torch.from_numpy(len(labels) / (2 * counts)).float()


def _ema(net: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    if decay <= 0:
        return None
    return torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
                                               use_buffers=True)


def _train_epoch(net: torch.nn.Module, ema: Any, opt: torch.optim.Optimizer, sched: Any, images: torch.Tensor,
                 labels: torch.Tensor, weights: torch.Tensor, recipe: Recipe, norm: tuple[float, float],
                 gen: torch.Generator, desc: str) -> float:
    """One pass over the shuffled training images; returns the mean loss."""
    net.train()
    device = next(net.parameters()).device
    order = torch.randperm(len(images), generator=gen)
    steps = -(-len(images) // recipe.batch_size)
    total = 0.0
    bar = tqdm(range(steps), desc=desc, leave=False)
    for i in bar:
        idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
        x = augment(images[idx].float().div(255.0).unsqueeze(1), recipe, gen)
        if x.shape[-1] != recipe.input_size:
            x = F.interpolate(x, size=(recipe.input_size,) * 2, mode="bilinear", align_corners=False)
        y = labels[idx].float()
        target = y * (1 - recipe.label_smoothing) + recipe.label_smoothing / 2
        with autocast(device):  # bfloat16 where the CPU computes it natively; channels-last is faster either way
            logit = net(((x - norm[0]) / norm[1]).to(device, memory_format=torch.channels_last)).reshape(-1).float()
        loss = (F.binary_cross_entropy_with_logits(logit, target.to(device), reduction="none")
                * weights[labels[idx]].to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(net)
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / steps


def train_evaluator(train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
                    val_labels: np.ndarray, recipe: Recipe, *, seed: int, device: torch.device | None = None,
                    desc: str = "classifier", select_every: int | None = None,
                    ) -> tuple[Evaluator, list[dict[str, float]], float]:
    """Train the evaluator recipe on uint8 N×H×W images; select the epoch and the threshold on validation only.

    Args:
        train_images: uint8 N×H×W training images (real, synthetic or mixed).
        train_labels: 0 normal / 1 pneumonia, N.
        val_images: uint8 M×H×W validation images, same size (both classes present).
        val_labels: M labels.
        recipe: the hyperparameters.
        seed: seeds the weights, the batch order and the augmentation.
        device: where to train (default: CUDA when available, else CPU).
        desc: progress-bar label.
        select_every: optimiser steps between validations (rounded to whole epochs; the last epoch always); None
            validates after every epoch. Training sets of a few dozen images take one step an epoch, so the utility
            runs validate at the evaluator's own cadence in steps (an epoch of the real train split) instead of
            after each of their 1,480 epochs.

    Returns:
        The evaluator with the EMA weights of the best-val-AUC validated epoch and its Youden threshold on validation, the
        per-epoch history (``epoch``, ``train_loss``, ``val_auc``), and that threshold.
    """
    _check_images(train_images)
    _check_images(val_images, train_images.shape[1])
    _check_binary(np.zeros(len(val_labels)), val_labels)
    device = device or pick_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    size = train_images.shape[1]
    norm = (float(train_images.mean() / 255.0), float(train_images.std() / 255.0))
    args = resnet_args(recipe.widths, recipe.blocks)
    net = ResNet(**args).to(device, memory_format=torch.channels_last)
    ema = _ema(net, recipe.ema_decay)
    steps = recipe.epochs * -(-len(train_images) // recipe.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = one_cycle(opt, recipe.lr, steps, 0.1)
    weights = _class_weights(train_labels, recipe.class_balance)
    x, y = torch.from_numpy(train_images), torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    geometry = {"size": size, "input_size": recipe.input_size, "mean": norm[0], "std": norm[1], "device": device}
    history, best_auc, best_state = [], -1.0, None
    per_epoch = -(-len(train_images) // recipe.batch_size)
    every = 1 if select_every is None else max(1, round(select_every / per_epoch))
    for epoch in range(recipe.epochs):
        loss = _train_epoch(net, ema, opt, sched, x, y, weights, recipe, norm, gen,
                            f"{desc} epoch {epoch + 1}/{recipe.epochs}")
        if (epoch + 1) % every and epoch + 1 < recipe.epochs:
            continue
        judged = ema.module if ema is not None else net
        val_auc = roc_auc(Evaluator(judged, args, threshold=0.5, **geometry).predict_proba(val_images), val_labels)
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_auc": val_auc})
        typer.echo(f"{desc} epoch={epoch + 1} train_loss={loss:.5g} val_auc={val_auc:.5g}", err=True)
        if val_auc > best_auc:
            best_auc, best_state = val_auc, copy.deepcopy(judged.state_dict())
    final = ResNet(**args)
    final.load_state_dict(best_state)
    ev = Evaluator(final, args, threshold=0.5, **geometry)
    ev.threshold = choose_threshold(ev.predict_proba(val_images), val_labels)
    return ev, history, ev.threshold


# --- model folder ------------------------------------------------------------------------------------------------


def save_classifier(folder: Path, evaluator: Evaluator, stage: str, **extra: Any) -> None:
    """Save the evaluator as a model folder: ResNet weights + ``config.json`` with its constructor args, the stage
    that trained it, threshold, image size, input size and normalisation (and ``extra``)."""
    save_model(folder, evaluator.net, CLASS_NAME, evaluator.args, stage, threshold=evaluator.threshold, size=evaluator.size,
               input_size=evaluator.input_size, normalisation={"mean": evaluator.mean, "std": evaluator.std},
               input="uint8 N×H×W at `size`, unpadded, 0 = black; x/255 -> bilinear resize to input_size -> "
                     "(x - mean) / std", output="one logit; sigmoid = P(pneumonia)", **extra)


def load_classifier(folder: Path, device: torch.device | None = None) -> Evaluator:
    """Rebuild the evaluator from its model folder (written by :func:`save_classifier`).

    Raises:
        PipelineError: the folder is not a model folder, or holds another kind of model.
    """
    config = load_model_config(folder)
    if config.get("class") not in REGISTRY or "threshold" not in config or "normalisation" not in config:
        raise PipelineError(f"{folder} is not a classifier folder (config.json has no threshold/normalisation); "
                            "run the train_classifier stage first")
    net, config = load_model(folder, REGISTRY)
    norm = config["normalisation"]
    return Evaluator(net, config["args"], threshold=config["threshold"], size=config["size"],
                     input_size=config["input_size"], mean=norm["mean"], std=norm["std"], device=device)
