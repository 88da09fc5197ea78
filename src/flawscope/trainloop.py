"""The training loop of the models that train for many epochs (autoencoders, f-AnoGAN).

One loop owns everything around the optimizer steps, so every model gets it the same way:

- **Position.** Epoch, batch, step count, the epoch's image order, the running loss sums and
  the per-epoch history; with the random generator's state, the weights and the optimizer
  states this is the whole state of a fit.
- **Checkpoints** (:mod:`flawscope.checkpoint`) after every epoch and on Ctrl-C; a new run
  with the same fingerprint continues from there, bit for bit. On a GPU, where an epoch of a
  small category takes milliseconds, the models ask for one at most every
  :data:`GPU_CHECKPOINT_EVERY_S` seconds instead (f-AnoGAN's paper preset: 1,500 epochs, each
  checkpoint ~120 MB of weights and Adam moments).
- **Ctrl-C** (SIGINT) is deferred to the end of the optimizer step in progress: the loop then
  writes a checkpoint of a consistent state (weights, optimizer and RNG all after the same
  step) and raises :class:`KeyboardInterrupt`. A second Ctrl-C stops at once; the last
  checkpoint is then what a new run resumes from.
- **Files**: the per-epoch loss means as CSV, and a picture hook called every
  ``picture_every`` epochs and at the first and last.
- **Subnormal floats** are flushed to zero on every CPU thread while the loop trains
  (:mod:`flawscope.subnormals`: up to 7x faster steps once gradients sink that low).
- **Divergence** cannot pass silently (see :data:`JUMP_FACTOR` for the rule, and
  ``collapsed_at`` for a loss whose model knows the value of a network that has lost its
  input). On divergence the
  loop goes back to the best state so far (the end of the epoch with the lowest ``monitor``
  loss, once the next step's loss has vouched for it; without a monitor, the end of the last
  epoch that passed the checks and whose next step was finite), multiplies every
  learning rate by :data:`LR_FACTOR`, and trains on from there; after :data:`MAX_RECOVERIES`
  such recoveries it stops with a :class:`~flawscope.errors.FlawscopeError` that names the
  epoch and the loss. Why the best state and not simply the last one: a collapse can be
  brewing before it shows. ae_ssim at 32 px (lr 1e-3) swung between 0.32 and 0.53 within its
  7th epoch (mean still under twice the low), then its output ran away (pixel std 0.6, 3, 11,
  ... 10^4) with the SSIM loss flat at 1.0; from the end of epoch 7 it collapsed again at a
  half, a quarter and an eighth of the learning rate.

Usage (a model supplies its networks, optimizers and two callables)::

    loop = TrainLoop(
        "ae_l2", modules={"net": net}, optimizers={"net": opt}, generator=gen, epochs=10,
        batches_per_epoch=16, epoch_order=lambda g: torch.randperm(len(data), generator=g),
        batch=lambda order, b: data[order[b * 16:(b + 1) * 16]],
        step=lambda x, n_step: {"loss": train_step(x)}, monitor="loss",
        checkpoint=workdir / "checkpoint.pt", fingerprint=fingerprint,
        csv=workdir / "losses.csv")
    history = loop.run()  # [{"epoch": 1, "loss": ...}, ...]
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import FlawscopeError
from .subnormals import flushed_subnormals
from .trainfiles import write_csv

log = logging.getLogger(__name__)

#: Divergence rule, checked on the ``monitor`` loss (a loss that is never negative): an epoch
#: whose mean is more than ``JUMP_FACTOR`` times the lowest epoch mean of the last
#: ``JUMP_WINDOW`` epochs has diverged. Epoch means, not single batches: with batches of 16 a
#: batch's loss scatters by tens of percent around its epoch's mean, while a collapse is a
#: lasting jump (ae_ssim's paper preset on toothbrush went 0.54 -> 1.32 -> 1.0 for every later
#: epoch, the network giving out a constant). Independently of the monitor, any non-finite
#: loss of a step or any non-finite weight at the end of an epoch is a divergence.
JUMP_FACTOR = 2.0
JUMP_WINDOW = 10
#: On divergence every learning rate is multiplied by this, at most MAX_RECOVERIES times in a
#: fit: three halvings take the seed's Adam lr of 1e-3 to 1.25e-4, below the 2e-4 that
#: Bergmann et al. 2019 trained with.
LR_FACTOR = 0.5
MAX_RECOVERIES = 3

Step = Callable[[torch.Tensor, int], dict[str, float]]

#: Seconds between checkpoints when training on a GPU (see the module docstring).
GPU_CHECKPOINT_EVERY_S = 60.0

#: Values of the models' ``device`` setting.
DEVICES = ("auto", "cpu", "cuda")


def training_device(name: str) -> torch.device:
    """The device a model trains on: ``auto`` is the first CUDA GPU when PyTorch sees one,
    else the CPU; ``cuda`` (or ``cuda:N``) without a usable GPU is an error, not a silent CPU
    fit. Only training moves: the fitted networks come back to the CPU, where flawscope scores,
    calibrates and saves, so a model file is the same whichever device trained it.

    >>> training_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise FlawscopeError(f"device={name}: PyTorch sees no CUDA GPU here "
                                 f"(torch {torch.__version__}); use device=cpu or auto")
        return torch.device(name)
    raise FlawscopeError(f"device={name!r}: choose auto, cpu, cuda or cuda:N")


class _Diverged(Exception):
    """Raised inside the loop when a check fails; turned into a recovery or an error."""


class TrainLoop:
    """Epochs of ``batches_per_epoch`` optimizer steps; see the module docstring.

    ``epoch_order(generator)`` gives an epoch's image order, ``batch(order, b)`` the training
    batch ``b`` of it (augmented with the same generator), and ``step(x, n_step)`` does one
    optimizer step (``n_step`` counts from 1 over the whole fit) and returns its losses as
    floats. ``pictures(epoch, history)`` draws what the model wants to show. ``upgrade``
    turns a checkpoint of an older layout into this loop's, or returns it unchanged;
    ``what`` names the training in messages about checkpoints.
    """

    def __init__(self, desc: str, *, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
                 epochs: int, batches_per_epoch: int,
                 epoch_order: Callable[[torch.Generator], torch.Tensor],
                 batch: Callable[[torch.Tensor, int], torch.Tensor], step: Step,
                 monitor: str | None = None, checkpoint: Path | None = None,
                 fingerprint: str = "", csv: Path | None = None,
                 pictures: Callable[[int, list[dict[str, float]]], None] | None = None,
                 picture_every: int = 0,
                 upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 what: str = "training", checkpoint_every_s: float = 0.0,
                 collapsed_at: float | None = None) -> None:
        self.desc = desc
        self.modules = modules
        self.optimizers = optimizers
        self.generator = generator
        self.epochs = int(epochs)
        self.n_batches = int(batches_per_epoch)
        self.epoch_order = epoch_order
        self.batch = batch
        self.step = step
        self.monitor = monitor
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint
        self.csv = csv
        self.pictures = pictures
        self.picture_every = int(picture_every)
        self.upgrade = upgrade
        self.what = what
        #: ``monitor`` value of a network that no longer depends on its input (ae_ssim's
        #: 1 - SSIM is 1 for a constant reconstruction): once an epoch has been below it, an
        #: epoch mean at or above it is a divergence, however small the jump (an untrained
        #: network may start there). ae_ssim's paper preset on the synthetic part
        #: went 0.57 -> 1.05 -> 1.0 for every later epoch, a jump of 1.8 times, under
        #: JUMP_FACTOR; a jump rule tight enough to catch it would fire on f-AnoGAN's encoder
        #: loss, which measured jumps of 1.96 times in a run that trained well.
        self.collapsed_at = collapsed_at
        #: A checkpoint after an epoch only once this many seconds passed since the last one
        #: (always after the last epoch and on Ctrl-C); 0 = after every epoch.
        self.checkpoint_every_s = float(checkpoint_every_s)
        self._saved_at = time.monotonic()
        self.base_lrs = {k: [g["lr"] for g in opt.param_groups]
                         for k, opt in optimizers.items()}
        self.pos: dict[str, Any] = {"epoch": 0, "batch": 0, "n_step": 0, "order": None,
                                    "sums": {}, "history": [], "recoveries": 0}
        #: The best state so far (see the module docstring): where a recovery goes back to.
        self._best: dict[str, Any] | None = None
        #: The end of the latest best epoch, waiting for the next step's loss to vouch for it.
        self._candidate: dict[str, Any] | None = None

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        """A deep copy of everything that decides how training continues."""
        return copy.deepcopy({
            "pos": self.pos, "rng": self.generator.get_state(),
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}})

    def _restore(self, state: dict[str, Any]) -> None:
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.generator.set_state(state["rng"])
        self.pos = copy.deepcopy(state["pos"])

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        self._saved_at = time.monotonic()
        state = self._state()
        flat = {"fingerprint": self.fingerprint, **state.pop("pos"), **state}
        if self._best is not None and self._best["pos"]["n_step"] != self.pos["n_step"]:
            # so that a recovery after resuming goes back where an unbroken run's would
            flat["best"] = self._best
        flat["candidate_is_current"] = self._candidate is not None and (
            self._candidate["pos"]["n_step"] == self.pos["n_step"])
        save_checkpoint(self.checkpoint, flat)

    def _resume(self) -> None:
        if self.checkpoint is None:
            return
        saved = load_checkpoint(self.checkpoint, self.fingerprint, self.epochs, self.what)
        if saved is None:
            return
        if self.upgrade is not None:
            saved = self.upgrade(saved)
        pos = {k: saved.get(k, v) for k, v in self.pos.items()}
        self._restore({"pos": pos, "rng": saved["rng"], "modules": saved["modules"],
                       "optimizers": saved["optimizers"]})
        self._best = saved.get("best")
        if saved.get("candidate_is_current"):
            self._candidate = self._state()
        log.info("%s: resuming at epoch %d, batch %d", self.desc, self.pos["epoch"] + 1,
                 self.pos["batch"])

    # ------------------------------------------------------------------ checks
    def _check_step(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            if not math.isfinite(value):
                raise _Diverged(f"{key} {value}")

    def _check_epoch(self, means: dict[str, float]) -> None:
        for key, module in self.modules.items():
            for name, t in module.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise _Diverged(f"non-finite weights in {key}.{name}")
        if self.monitor is None or self.monitor not in means:
            return
        broken = self._broken(means[self.monitor], self.pos["history"])
        if broken:
            raise _Diverged(broken)

    def _broken(self, value: float, history: list[dict[str, float]]) -> str | None:
        """Why a ``monitor`` value after ``history`` means divergence, or None."""
        if (self.collapsed_at is not None and value >= self.collapsed_at
                and any(row.get(self.monitor, math.inf) < self.collapsed_at for row in history)):
            return (f"{self.monitor} {value:.4g}, at or above {self.collapsed_at:g}: the "
                    f"network no longer depends on its input")
        recent = [row[self.monitor] for row in history[-JUMP_WINDOW:] if self.monitor in row]
        if recent and value > JUMP_FACTOR * min(recent):
            return (f"{self.monitor} {value:.4g}, more than {JUMP_FACTOR:g} times its recent "
                    f"low of {min(recent):.4g}")
        return None

    def _recover(self, epoch: int, what: str) -> None:
        """Back to the last good state with lower learning rates, or a clear error."""
        n = self.pos["recoveries"] + 1
        if n > MAX_RECOVERIES or self._best is None:
            lrs = ", ".join(f"{g['lr']:.3g}" for o in self.optimizers.values()
                            for g in o.param_groups)
            raise FlawscopeError(
                f"{self.desc}: training diverged at epoch {epoch} ({what}) with learning "
                f"rate {lrs}, after {n - 1} recoveries; try a smaller lr")
        self._restore(self._best)
        self._candidate = None
        self.pos["recoveries"] = n
        scale = LR_FACTOR ** n
        for key, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[key], strict=True):
                group["lr"] = base * scale
        log.warning("%s: training diverged at epoch %d (%s); back to epoch %d, batch %d with "
                    "the learning rate times %g (recovery %d of %d)", self.desc, epoch, what,
                    self.pos["epoch"], self.pos["batch"], scale, n, MAX_RECOVERIES)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, float]]:
        """Train to ``epochs``; returns the per-epoch history (also after resuming)."""
        self._resume()
        if self._best is None:
            self._best = self._state()
        pos = self.pos
        total = self.epochs * self.n_batches
        bar = tqdm(total=total, initial=pos["epoch"] * self.n_batches + pos["batch"],
                   desc=self.desc, disable=None, mininterval=1.0, unit="batch")
        shown: dict[str, str] = {}
        with _DeferredInterrupt() as ctrl_c, flushed_subnormals():
            try:
                while self.pos["epoch"] < self.epochs:
                    pos = self.pos
                    epoch = pos["epoch"] + 1  # 1-based in files and messages
                    try:
                        if pos["order"] is None:
                            pos["order"] = self.epoch_order(self.generator)
                        while pos["batch"] < self.n_batches:
                            if ctrl_c.requested:
                                self._stop()
                            x = self.batch(pos["order"], pos["batch"])
                            pos["n_step"] += 1
                            losses = self.step(x, pos["n_step"])
                            self._check_step(losses)
                            self._vouch(losses)
                            # Epoch means are over images, not batches: a one-pass
                            # epoch of 33 images in batches of 32 ends with a batch of one,
                            # whose loss would otherwise weigh as much as the other 32.
                            weight = len(x) if isinstance(x, torch.Tensor) else 1
                            for key, value in losses.items():
                                # [sum, count]: some losses are not computed at every step
                                acc = pos["sums"].setdefault(key, [0.0, 0])
                                acc[0] += value * weight
                                acc[1] += weight
                            pos["batch"] += 1
                            shown.update({"epoch": str(epoch),
                                          **{k: f"{v:.4g}" for k, v in losses.items()}})
                            bar.update(1)
                            bar.set_postfix(shown, refresh=False)
                        means = {k: v[0] / v[1] for k, v in pos["sums"].items()}
                        self._check_epoch(means)
                    except _Diverged as exc:
                        self._recover(epoch, str(exc))
                        bar.n = self.pos["epoch"] * self.n_batches + self.pos["batch"]
                        continue
                    pos["history"].append({"epoch": epoch, **means})
                    pos.update(epoch=epoch, batch=0, order=None, sums={})
                    self._keep_if_best(means)
                    if (epoch == self.epochs or time.monotonic() - self._saved_at
                            >= self.checkpoint_every_s):
                        self._save()
                    self._epoch_files(epoch)
                    if epoch % max(1, self.epochs // 10) == 0 or epoch == self.epochs:
                        log.info("%s epoch %d/%d: %s", self.desc, epoch, self.epochs,
                                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
                if ctrl_c.requested:  # pressed during the last epoch's files: stop as asked
                    self._stop()
            finally:
                bar.close()
        return self.pos["history"]

    def _keep_if_best(self, means: dict[str, float]) -> None:
        """The end of an epoch with the lowest mean loss so far becomes the candidate.

        Why not the best state at once: the epoch's mean loss was measured on the weights
        *during* the epoch, before its last update, so the end state is not yet vouched for.
        With one batch per epoch (ae_l2's paper preset on 33 welding images, batch 70) the
        update that made the loss jump from 0.18 to 0.61 was the best epoch's own last step;
        going back to its end state met the same 0.61 at every recovery, whatever the lr.
        """
        if self.monitor is None or self.monitor not in means:
            self._candidate = self._state()
            return
        seen = [self._best, self._candidate]
        low = min((r[self.monitor] for s in seen if s is not None
                   for r in s["pos"]["history"] if self.monitor in r), default=math.inf)
        if means[self.monitor] <= low:
            self._candidate = self._state()

    def _vouch(self, losses: dict[str, float]) -> None:
        """The first step after a candidate decides: a finite loss within the jump rule (and
        below ``collapsed_at``) makes the candidate the best state; otherwise the candidate
        is dropped."""
        if self._candidate is None:
            return
        candidate, self._candidate = self._candidate, None
        if self.monitor is not None and self.monitor in losses and self._broken(
                losses[self.monitor], candidate["pos"]["history"]):
            return
        self._best = candidate

    def _stop(self) -> None:
        self._save()
        log.warning("%s interrupted at epoch %d, batch %d; checkpoint in %s: run the same "
                    "fit again to resume", self.desc, self.pos["epoch"] + 1, self.pos["batch"],
                    self.checkpoint)
        raise KeyboardInterrupt

    def _epoch_files(self, epoch: int) -> None:
        if self.csv is not None:
            write_csv(self.pos["history"], self.csv)
        if self.pictures is not None and self.picture_every > 0 and (
                epoch == 1 or epoch == self.epochs or epoch % self.picture_every == 0):
            self.pictures(epoch, self.pos["history"])


class _DeferredInterrupt:
    """Ctrl-C sets ``requested`` instead of raising, so the loop stops between two steps; a
    second Ctrl-C raises :class:`KeyboardInterrupt` at once.

    Only the main thread can own SIGINT; elsewhere Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step (press again to stop now)")

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
