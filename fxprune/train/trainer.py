"""Stage 4, train: ISTA training (and baselines) of the user's module, resumable.

`train(model, data, config, gm=..., analysis=...)` trains `model` in place.
The traced `gm` and its `analysis` say which BatchNorm γ to penalise and what
λ they get; the training itself runs on `model`. Every epoch ends with an
atomic fxprune checkpoint at `out_path` holding the optimizer, scheduler,
ISTA and monitor state, so `resume=out_path` continues a killed run and
reproduces the uninterrupted one exactly (the RNG is reseeded from
(seed, epoch, rank) at every epoch, the sampler shuffles by (seed, epoch)).

Modes, all ending in exact zeros the compiler removes:
  ista      ρ·Σλ|γ| by the proximal step (fxprune.train.ista), γ–W rescaled by α
  slimming  Liu et al. 2017: L1 subgradient on γ, then zero γ under a global
            threshold that reaches `sparsity`
  l1        Li et al. 2017: zero (γ = 0) the filters of smallest L1 norm at rate
            `l1_rate` per layer once, then fine-tune with them held at zero
  sfp       He et al. 2018: after every epoch zero the filters of smallest L2
            norm (weights and γ) at rate `sfp_rate`, keep training them
  none      plain training / fine-tuning
Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel
(gloo on CPU); γ and the prox are identical on every rank, rank 0 writes.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from fxprune.analysis import ChannelAnalysis, site_classes
from fxprune.errors import CheckpointError, UsageError
from fxprune.load import (
    CHECKPOINT_FORMAT,
    apply_state_dict,
    architecture_for,
    checkpoint_dict,
    read_weights_only,
    save_checkpoint,
)
from fxprune.train.ista import (
    IstaOptimizer,
    Monitor,
    lasso_term,
    param_groups_for,
    penalty_targets,
    rescale,
    suggest_rho,
    unscale,
)
from fxprune.train.procedure import (
    RECALIBRATION_BATCHES,
    ParameterEma,
    RhoSchedule,
    choose_alpha,
    loss_scale,
    plateaued,
    recalibrate_batchnorm,
)

MODES = ("ista", "slimming", "sfp", "l1", "none")
SCHEDULES = ("cosine", "step", "none", "auto")
OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_BETAS = (0.9, 0.999)
SNAPSHOT_CHECK_EVERY = 10  # steps between sparsity checks for snapshots


@dataclass
class TrainConfig:
    """How to train. `rho=None` picks ρ on the first batch so that ρ·lasso equals
    the cross-entropy, or ln(classes) if larger (`suggest_rho`, `loss_scale`); a
    string is a `RhoSchedule` ("0.0002:30000,0.001"). `alpha=None` picks α by
    `choose_alpha` (never below its ALPHA_FLOOR when ρ is automatic too).
    `schedule="auto"` is a constant lr under ISTA (the prox threshold lr·ρ·λ must
    not decay away, as in the paper) and cosine otherwise. `ema` evaluates (and
    ends with) an EMA of the weights; `until_plateau` stops before `epochs` once
    cross-entropy, sparsity and the lasso term are flat
    (`fxprune.train.procedure.plateaued`). `sparsity` is slimming's final target.
    `recalibrate` train batches re-estimate the BatchNorm statistics after every
    epoch of a pruning mode (`recalibrate_batchnorm`; 0: off)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "auto"
    mode: str = "none"
    rho: float | str | None = None
    optimizer: str = "sgd"
    ema: float | None = None
    until_plateau: bool = False
    alpha: float | None = None
    group_ista: bool = False
    snapshot_at: list[float] = field(default_factory=list)
    seed: int = 0
    device: str = "cpu"
    sfp_rate: float = 0.3
    l1_rate: float = 0.3
    slimming_lambda: float = 1e-4
    sparsity: float = 0.5
    recalibrate: int = RECALIBRATION_BATCHES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, not '{self.mode}'")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.schedule == "auto":
            self.schedule = "none" if self.mode == "ista" else "cosine"
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.rho is not None:
            self.rho = str(RhoSchedule.parse(self.rho)) if isinstance(self.rho, str) else self.rho
        if self.ema is not None and not 0 < self.ema < 1:
            raise UsageError(f"--ema must be in (0, 1), e.g. 0.999; got {self.ema}")
        if self.recalibrate < 0:
            raise UsageError(f"--recalibrate-bn must be ≥ 0, got {self.recalibrate}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UsageError("--epochs and --batch-size must be ≥ 1 and --lr > 0")
        if (self.alpha is not None and not self.alpha > 0) or (
            isinstance(self.rho, float | int) and self.rho < 0
        ):
            raise UsageError("--alpha must be > 0 and --rho ≥ 0")
        for name in ("sfp_rate", "l1_rate", "sparsity"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1)")
        if any(not 0 < s < 1 for s in self.snapshot_at):
            raise UsageError("--snapshot-at levels must be fractions in (0, 1), e.g. 0.3,0.5")
        self.snapshot_at = sorted(float(s) for s in self.snapshot_at)


@dataclass
class TrainResult:
    """The trained model (in place), its history and where it was written."""

    model: nn.Module
    history: list[dict]
    test_loss: float
    test_accuracy: float
    sparsity: float
    checkpoint: Path | None
    snapshots: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    unreached: list[float] = field(default_factory=list)  # --snapshot-at levels never reached
    epochs: int = 0  # epochs trained (fewer than asked when --until-plateau stopped)


@dataclass
class DemoRecipe:
    """The demo: pre-train the ConvNet normally, ISTA-train it, compile, then
    fine-tune the compact model (see `demo_recipe`)."""

    source: str
    data: str
    pretrain: TrainConfig
    ista: TrainConfig
    finetune: TrainConfig | None = None


def demo_recipe() -> DemoRecipe:
    """A ConvNet recipe on `synthetic` that reaches about 50 % channel sparsity at ≤ 2
    points accuracy loss, in 5 to 25 minutes on 2 CPU cores: 4 epochs of plain training,
    4 of ISTA (ρ = 0.08, no γ–W rescaling, cosine learning rate, BatchNorm statistics
    re-estimated after each epoch), the exact compile, then 2 epochs of fine-tuning the
    compact model, as the paper does. Measured from the pre-trained ConvNet (99.5 %):
    ρ = 0.08 ends at 50 % sparsity, 92.9 % compiled, 99.7 % fine-tuned. ρ sits near a
    cliff here: ρ = 0.1 zeroes the first layer in epoch 3 and then every channel (the
    monitor's "sparsity racing to 100 %"); ρ = 0.04 with α = 0.2 for 3 epochs gives
    59 %, 81 % compiled, 95.5 % fine-tuned."""
    return DemoRecipe(
        source="zoo:convnet",
        data="synthetic",
        pretrain=TrainConfig(epochs=4, lr=0.05, mode="none", schedule="cosine"),
        ista=TrainConfig(epochs=4, lr=0.02, mode="ista", rho=0.08, alpha=1.0, schedule="cosine"),
        finetune=TrainConfig(epochs=2, lr=0.01, mode="none", schedule="cosine"),
    )


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) of `model` on `loader`, eval mode."""
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    loss = correct = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
    model.train(was_training)
    return loss / max(count, 1), correct / max(count, 1)


def train(
    model: nn.Module,
    data,
    config: TrainConfig,
    *,
    gm: fx.GraphModule,
    analysis: ChannelAnalysis,
    out_path: str | Path | None,
    resume: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    source: str | None = None,
    architecture: dict | None = None,
) -> TrainResult:
    """Train `model` in place on `data` (a DataBundle); see the module docstring.

    `architecture` (`Loaded.architecture`: a base and compile steps, data only),
    or `source` (e.g. "zoo:convnet") for an uncompiled model, is what the
    checkpoints record. `progress` receives a dict per step ({"event": "step",
    ...}) and per epoch (the monitor record).
    """
    architecture = architecture or (architecture_for(source) if source else None)
    if out_path is not None and architecture is None:
        raise UsageError(
            "train() writes checkpoints: give architecture= (Loaded.architecture) or "
            "source='zoo:NAME'"
        )
    trainer = Trainer(model, data, config, gm, analysis, out_path, architecture, progress)
    if resume is not None:
        trainer.load(Path(resume))
    return trainer.run()


def _distributed(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return dist.get_rank(), dist.get_world_size(), device


def snapshot_path(out: Path, level: float) -> Path:
    """`run.pt` -> `run.sparsity30.pt` for level 0.3."""
    return out.with_name(f"{out.stem}.sparsity{round(level * 100)}{out.suffix or '.pt'}")


class Trainer:
    """One training run: the loop, the mode's hooks, checkpoints and resume."""

    def __init__(self, model, data, config, gm, analysis, out_path, architecture, progress):
        self.rank, self.world, device = _distributed(config.device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
        self.model, self.data, self.cfg = model.to(device), data, config
        self.gm, self.analysis, self.device = gm, analysis, torch.device(device)
        self.out = Path(out_path) if out_path is not None else None
        self.arch, self.progress = architecture, progress
        self.targets = penalty_targets(gm, analysis, group_ista=config.group_ista)
        if config.mode in ("ista", "slimming") and not self.targets:
            raise UsageError("the model has no prunable BatchNorm γ to penalise")
        self.monitor = Monitor(model, self.targets, data.num_classes)
        self.net = model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(model)
        self.sampler, self.loader = self._loader()
        self.epoch, self.alpha_applied, self.finished = 0, 1.0, False
        self.snapshots_done: list[float] = []
        self.mask: dict[str, list[int]] = {}
        self.refused: list[str] = []
        self.pending_rho = config.mode == "ista" and config.rho is None
        self.rho_schedule = RhoSchedule.parse(config.rho) if config.rho is not None else None
        self.ema = ParameterEma(model, config.ema) if config.ema else None
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()

    # -- setup ---------------------------------------------------------------
    def _loader(self):
        base = self.data.train
        sampler = DistributedSampler(
            base.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
            seed=self.cfg.seed,
        )  # fmt: skip
        loader = DataLoader(
            base.dataset, batch_size=max(1, self.cfg.batch_size // self.world), sampler=sampler,
            num_workers=base.num_workers, collate_fn=base.collate_fn,
        )  # fmt: skip
        return sampler, loader

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        adam = cfg.optimizer != "sgd"
        if cfg.mode == "ista":  # slimming: γ decay and momentum like the rest (Liu et al.)
            beta2 = ADAM_BETAS[1] if adam else None
            groups = param_groups_for(self.model, self.targets, cfg.weight_decay, adam_beta2=beta2)
        else:
            groups = [{"params": list(self.model.parameters()), "weight_decay": cfg.weight_decay}]
        if cfg.optimizer == "sgd":
            inner = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
            inner = kind(groups, lr=cfg.lr, betas=ADAM_BETAS)
        if cfg.mode != "ista":
            return inner
        rho = self.rho_schedule.at(0, 0) if self.rho_schedule else 0.0
        return IstaOptimizer(inner, self.model, self.targets, rho, group_ista=cfg.group_ista)

    def _scheduler(self):
        epochs = self.cfg.epochs
        if self.cfg.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=epochs)
        if self.cfg.schedule == "step":
            milestones = sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)})
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=0.1)
        return None

    def _start(self) -> None:
        """Mode set-up that happens once per run, before the first epoch."""
        cfg = self.cfg
        if cfg.mode == "ista" and self.epoch == 0 and self.alpha_applied == 1.0:
            alpha = cfg.alpha if cfg.alpha is not None else self._auto_alpha()
            self.refused = rescale(
                self.model, self.gm, self.analysis, alpha, group_ista=cfg.group_ista
            )
            self.alpha_applied = alpha
        if cfg.mode == "l1" and self.epoch == 0 and not self.mask:
            chosen = self._lowest_filters(cfg.l1_rate, p=1)
            self.mask = self._zero_classes(chosen, weights=False)

    # -- the loop ------------------------------------------------------------
    def run(self) -> TrainResult:
        self._start()
        for epoch in range(self.epoch, self.cfg.epochs):
            started = time.perf_counter()
            ce, train_acc = self._train_epoch(epoch)
            self._end_epoch(epoch, ce, train_acc, time.perf_counter() - started)
            if self.cfg.until_plateau and plateaued(self._penalised_history()):
                break
        return self._finish()

    def _penalised_history(self) -> list[dict]:
        """Epoch records at the current ρ (a ρ schedule's step restarts the plateau)."""
        rho = getattr(self.optimizer, "rho", 0.0)
        history = self.monitor.history
        start = len(history)
        while start > 0 and history[start - 1].get("rho", 0.0) == rho:
            start -= 1
        return history[start:]

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        torch.manual_seed(self.cfg.seed * 1_000_003 + epoch * 7_919 + self.rank)
        self.sampler.set_epoch(epoch)
        self.net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for step, (x, y) in enumerate(self.loader):
            x, y = x.to(self.device), y.to(self.device)
            if self.rho_schedule is not None:
                self.optimizer.rho = self.rho_schedule.at(epoch * len(self.loader) + step, epoch)
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            if self.pending_rho:
                self._auto_rho(loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.mode == "slimming":
                self._slimming_subgradient()
            self.optimizer.step()
            if self.mask:
                self._apply_mask()
            if self.ema is not None:
                self.ema.update(self.model)
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
            if step % SNAPSHOT_CHECK_EVERY == 0:
                self._snapshots(epoch, step)
            if self.progress and self.rank == 0:
                info = {"epoch": epoch + 1, "epochs": self.cfg.epochs, "step": step + 1}
                self.progress(
                    {
                        "event": "step",
                        **info,
                        "steps": len(self.loader),
                        "loss": float(loss.detach()),
                    }
                )
        if self.world > 1:
            dist.all_reduce(sums)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    def _end_epoch(self, epoch: int, ce: float, train_acc: float, seconds: float) -> None:
        if self.cfg.mode == "sfp":
            self._zero_classes(self._lowest_filters(self.cfg.sfp_rate, p=2), weights=True)
        self._recalibrate(self.model)
        if self.world > 1:  # every rank keeps the same BN statistics as rank 0
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        evaluated = self._evaluated()
        if evaluated is not self.model:  # the EMA's averaged statistics lag the same way
            self._recalibrate(evaluated)
        test_loss, test_acc = evaluate(evaluated, self.data.test)
        rho = getattr(self.optimizer, "rho", 0.0)
        record = self.monitor.record(
            epoch + 1, ce=ce, accuracy=test_acc, train_accuracy=train_acc, test_loss=test_loss,
            lr=lr, rho=rho, alpha=self.alpha_applied, mode=self.cfg.mode,
            seconds=round(seconds, 2),
        )  # fmt: skip
        self.epoch = epoch + 1
        self._snapshots(epoch, None)
        self._save()
        if self.progress and self.rank == 0:
            self.progress({"event": "epoch", "epochs": self.cfg.epochs, **record})

    def _evaluated(self) -> nn.Module:
        """The model evaluations see: the EMA (zeros kept) with --ema, else the live one."""
        if self.ema is None:
            return self.model
        return self.ema.model_like(self.model, [t.module for t in self.targets])

    def _finish(self) -> TrainResult:
        cfg = self.cfg
        if self.ema is not None:  # the paper evaluates, and we keep, the averaged model
            self.ema.copy_into(self.model, [t.module for t in self.targets])
        if cfg.mode == "slimming":
            self._zero_classes(self._smallest_gammas(cfg.sparsity), weights=False)
        if self.ema is not None or cfg.mode == "slimming":  # the function changed
            self._recalibrate(self.model)
        if cfg.mode == "ista" and self.alpha_applied != 1.0:
            unscale(
                self.model, self.gm, self.analysis, self.alpha_applied, group_ista=cfg.group_ista
            )
            self.alpha_applied = 1.0
        self.finished = True
        last = self.monitor.history[-1]
        test_loss, test_acc = last["test_loss"], last["accuracy"]
        if cfg.mode == "slimming":  # the threshold changed the function
            test_loss, test_acc = evaluate(self.model, self.data.test)
        sparsity = self.monitor.sparsity()[0]
        self._save(final={"test_loss": test_loss, "test_accuracy": test_acc, "sparsity": sparsity})
        if self.world > 1:
            dist.barrier()
        snaps = [snapshot_path(self.out, s) for s in self.snapshots_done] if self.out else []
        unreached = [s for s in cfg.snapshot_at if s not in self.snapshots_done]
        return TrainResult(
            self.model, self.monitor.history, test_loss, test_acc, sparsity, self.out, snaps,
            self.refused, unreached if self.out else [], self.epoch,
        )  # fmt: skip

    def _recalibrate(self, model: nn.Module) -> None:
        """Fresh BN statistics after a pruning mode's epoch (`recalibrate_batchnorm`)."""
        if self.cfg.mode == "none" or not self.cfg.recalibrate:
            return
        batches = itertools.islice(self.loader, self.cfg.recalibrate)
        recalibrate_batchnorm(model, batches, self.device)

    # -- mode hooks ----------------------------------------------------------
    def _auto_rho(self, loss: torch.Tensor) -> None:
        """ρ from the first batch: ρ·lasso equal to its cross-entropy, or to ln(classes)
        if that is larger (`loss_scale`: trained weights start near 0)."""
        ce = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(ce)
            ce /= self.world
        scale = loss_scale(float(ce), self.data.num_classes)
        self.optimizer.rho = suggest_rho(scale, lasso_term(self.model, self.targets))
        self.pending_rho = False

    def _auto_alpha(self) -> float:
        """`choose_alpha` from the first batch's cross-entropy (eval mode: no BN update)."""
        x, y = next(iter(self.loader))
        self.model.eval()
        with torch.no_grad():
            ce = F.cross_entropy(self.model(x.to(self.device)), y.to(self.device))
        if self.world > 1:
            dist.all_reduce(ce)
            ce /= self.world
        gammas = torch.cat([
            self.model.get_submodule(t.module).weight.detach().abs().cpu()[t.positions]
            for t in self.targets
        ])  # fmt: skip
        lam = np.concatenate([t.lam for t in self.targets])
        rho = self.rho_schedule.at(0, 0) if self.rho_schedule else None
        return choose_alpha(gamma_mean=float(gammas.mean()), lam_mean=float(lam.mean()),
                            lasso_sum=lasso_term(self.model, self.targets), ce=float(ce),
                            lr=self.cfg.lr, rho=rho, num_classes=self.data.num_classes)  # fmt: skip

    def _slimming_subgradient(self) -> None:
        with torch.no_grad():
            for t in self.targets:
                gamma = self.model.get_submodule(t.module).weight
                if gamma.grad is not None:
                    pos = torch.as_tensor(t.positions, device=gamma.device)
                    gamma.grad[pos] += self.cfg.slimming_lambda * gamma[pos].sign()

    def _apply_mask(self) -> None:
        with torch.no_grad():
            for module, positions in self.mask.items():
                self.model.get_submodule(module).weight[positions] = 0

    def _units(self):
        """Groups the baselines prune: the ones ISTA penalises."""
        penalised = {int(c) for t in self.targets for c in t.classes}
        return [
            (g, [int(c) for c in g.classes if int(c) in penalised]) for g in self.analysis.groups
        ]

    def _lowest_filters(self, rate: float, p: int) -> set[int]:
        """Per group, the `rate` fraction of classes whose producer filters have the
        smallest L`p` norm (summed over the group's producers)."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        chosen: set[int] = set()
        for group, classes in self._units():
            count = min(int(rate * len(classes)), len(classes) - 1)
            if count <= 0:
                continue
            norms = dict.fromkeys(classes, 0.0)
            for site in group.producers:
                weight = self.model.get_submodule(site.module).weight.detach()
                rows = weight[torch.as_tensor(site.positions)].reshape(len(site.positions), -1)
                cls = site_classes(nodes[site.node], site, self.analysis, "producer")
                for c, n in zip(cls.tolist(), rows.norm(p=p, dim=1).tolist(), strict=True):
                    if c in norms:
                        norms[c] += n
            chosen.update(sorted(classes, key=lambda c: (norms[c], c))[:count])
        return chosen

    def _smallest_gammas(self, fraction: float) -> set[int]:
        """The `fraction` of penalised classes with the smallest max |γ| (global threshold)."""
        score: dict[int, float] = {}
        for t in self.targets:
            gamma = self.model.get_submodule(t.module).weight.detach().abs().cpu()
            for c, g in zip(t.classes.tolist(), gamma[t.positions].tolist(), strict=True):
                score[c] = max(score.get(c, 0.0), g)
        ranked = sorted(score, key=lambda c: (score[c], c))
        return set(ranked[: int(fraction * len(ranked))])

    def _zero_classes(self, chosen: set[int], *, weights: bool) -> dict[str, list[int]]:
        """γ = 0 for `chosen` classes at their BN sites (with `weights`, also their
        producers' filters). Returns the zeroed γ positions per BN module."""
        zeroed: dict[str, list[int]] = {}
        nodes = {n.name: n for n in self.gm.graph.nodes}
        with torch.no_grad():
            for t in self.targets:
                pos = [p for p, c in zip(t.positions.tolist(), t.classes.tolist(), strict=True)
                       if c in chosen]  # fmt: skip
                if pos:
                    self.model.get_submodule(t.module).weight[pos] = 0
                    zeroed[t.module] = pos
            for group, _ in self._units() if weights else []:
                for site in group.producers:
                    cls = site_classes(nodes[site.node], site, self.analysis, "producer")
                    pos = site.positions[np.isin(cls, list(chosen))].tolist()
                    self.model.get_submodule(site.module).weight[pos] = 0
        return zeroed

    # -- snapshots and checkpoints -------------------------------------------
    def _snapshots(self, epoch: int, step: int | None) -> None:
        levels = [s for s in self.cfg.snapshot_at if s not in self.snapshots_done]
        if not levels or self.out is None:
            return
        sparsity = self.monitor.sparsity()[0]
        for level in (s for s in levels if sparsity >= s):
            self.snapshots_done.append(level)
            if self.rank == 0:
                model = copy.deepcopy(self.model)
                if self.alpha_applied != 1.0:
                    unscale(model, self.gm, self.analysis, self.alpha_applied,
                            group_ista=self.cfg.group_ista)  # fmt: skip
                info = {"snapshot": {"level": level, "sparsity": sparsity, "epoch": epoch + 1,
                                     "step": step, "config": asdict(self.cfg)}}  # fmt: skip
                ckpt = checkpoint_dict(model, input_shape=self.data.input_shape,
                                       architecture=self.arch, extra=info)  # fmt: skip
                save_checkpoint(snapshot_path(self.out, level), ckpt, force=True)

    def _state(self) -> dict:
        return {
            "epoch": self.epoch,
            "finished": self.finished,
            "config": asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "monitor": self.monitor.state_dict(),
            "alpha_applied": self.alpha_applied,
            "pending_rho": self.pending_rho,
            "snapshots_done": list(self.snapshots_done),
            "mask": self.mask,
            "refused": self.refused,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def _save(self, final: dict | None = None) -> None:
        if self.out is None or self.rank != 0:
            return
        extra = {"train": self._state(), **({"final": final} if final else {})}
        ckpt = checkpoint_dict(self.model, input_shape=self.data.input_shape,
                               architecture=self.arch, extra=extra)  # fmt: skip
        save_checkpoint(self.out, ckpt, force=True)
        log = self.out.with_suffix(".jsonl")
        from fxprune.files import atomic_write

        atomic_write(log, lambda tmp: tmp.write_text(self.monitor.to_jsonl()), force=True)

    def load(self, path: Path) -> None:
        """Restore a run written by `_save` (a killed run, not a finished one)."""
        ckpt = read_weights_only(path)  # data only, every failure one line
        extra = ckpt.get("extra") if isinstance(ckpt, dict) else None
        state = extra.get("train") if isinstance(extra, dict) else None
        if not isinstance(state, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a checkpoint written by fxprune train")
        try:
            self._restore(path, ckpt, state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"{path}: training state is incomplete or malformed ({type(exc).__name__}: "
                f"{str(exc)[:80]})"
            ) from None

    def _restore(self, path: Path, ckpt: dict, state: dict) -> None:
        for key in ("mode", "group_ista"):
            if state["config"][key] != getattr(self.cfg, key):
                flag = key.replace("_", "-")
                raise UsageError(f"{path} was trained with --{flag} {state['config'][key]}")
        if state["finished"]:
            raise UsageError(
                f"{path} is a finished run ({state['epoch']} epochs): train it further "
                f"as a SOURCE (fxprune train {path} ...), not with --resume"
            )
        apply_state_dict(self.model, ckpt["state_dict"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.monitor.load_state_dict(state["monitor"])
        self.epoch, self.alpha_applied = int(state["epoch"]), float(state["alpha_applied"])
        self.pending_rho, self.refused = bool(state["pending_rho"]), list(state["refused"])
        self.snapshots_done = list(state["snapshots_done"])
        self.mask = {k: list(v) for k, v in state["mask"].items()}
        if self.epoch >= self.cfg.epochs:
            raise UsageError(f"{path} already has {self.epoch} epochs; raise --epochs to go on")
        if self.ema is not None:
            if state.get("ema") is None:
                raise UsageError(f"{path} was trained without --ema; resume it without --ema")
            self.ema.load_state_dict(state["ema"])
        if self.progress and self.rank == 0:
            self.progress({"event": "resume", "path": str(path), "epoch": self.epoch,
                           "epochs": self.cfg.epochs, "step": self.epoch * len(self.loader),
                           "rho": getattr(self.optimizer, "rho", None)})  # fmt: skip


__all__ = [
    "DemoRecipe",
    "ADAM_BETAS",
    "MODES",
    "OPTIMIZERS",
    "SCHEDULES",
    "SNAPSHOT_CHECK_EVERY",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "demo_recipe",
    "evaluate",
    "snapshot_path",
    "train",
]
