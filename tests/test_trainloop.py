"""The shared training loop: divergence is recovered (back to the epoch's start, half the
learning rate) or stopped with a clear error, and a real Ctrl-C resumes bit for bit, also
across a recovery. A linear regression keeps these tests to milliseconds; the models' own
tests (test_autoencoder, test_fanogan) run the same loop on real networks."""

from __future__ import annotations

import logging
import math
import os
import signal

import pytest
import torch
from torch import nn

from flawscope.errors import FlawscopeError
from flawscope.trainloop import LR_FACTOR, MAX_RECOVERIES, TrainLoop

N, BATCH, BATCHES, EPOCHS, LR = 12, 4, 3, 4, 0.05


class Toy:
    """Least squares ``y = x·w`` by SGD in a TrainLoop; ``loss_at`` overrides step losses."""

    def __init__(self, workdir=None, loss_at=None, lr_at=None, epochs=EPOCHS, collapsed_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 2, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Linear(2, 1, bias=False)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR)
        self.loss_at = loss_at or {}
        self.lr_at = lr_at
        self.steps: list[int] = []
        gen = torch.Generator().manual_seed(1)
        self.loop = TrainLoop(
            "toy", modules={"net": self.net}, optimizers={"net": self.opt}, generator=gen,
            epochs=epochs, batches_per_epoch=BATCHES,
            epoch_order=lambda g: torch.randperm(N, generator=g),
            batch=lambda order, b: order[b * BATCH:(b + 1) * BATCH], step=self.step,
            monitor="loss", checkpoint=workdir / "ckpt.pt" if workdir else None,
            fingerprint="toy", csv=workdir / "losses.csv" if workdir else None,
            collapsed_at=collapsed_at)

    def step(self, idx: torch.Tensor, n_step: int) -> dict[str, float]:
        self.steps.append(n_step)
        if self.lr_at is not None:  # the reference: learning rate as a function of the step
            self.opt.param_groups[0]["lr"] = self.lr_at(n_step)
        loss = ((self.net(self.x[idx])[:, 0] - self.y[idx]) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": self.loss_at.get(len(self.steps), loss.item())}

    def weights(self) -> torch.Tensor:
        return self.net.weight.detach().clone()


def test_a_nan_loss_goes_back_to_the_epoch_start_with_half_the_learning_rate(caplog):
    # The 5th step (epoch 2, batch 2) reports NaN: epoch 2 is trained again from its start,
    # at LR/2 from then on, with the same image order (the RNG is rolled back too).
    toy = Toy(loss_at={5: math.nan})
    with caplog.at_level(logging.WARNING, logger="flawscope.trainloop"):
        history = toy.loop.run()
    assert toy.steps == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert toy.opt.param_groups[0]["lr"] == LR * LR_FACTOR
    assert "diverged at epoch 2 (loss nan)" in caplog.text and "recovery 1 of 3" in caplog.text
    reference = Toy(lr_at=lambda n: LR if n <= BATCHES else LR * LR_FACTOR)
    reference.loop.run()
    assert torch.equal(toy.weights(), reference.weights())


def scripted(*epoch_means: float) -> dict[int, float]:
    """Reported losses by call: every step of the i-th epoch trained reports epoch_means[i]."""
    return {1 + e * BATCHES + b: v for e, v in enumerate(epoch_means) for b in range(BATCHES)}


def test_a_jump_of_the_epoch_mean_loss_goes_back_to_the_best_epoch():
    # Epoch 4's mean (1.1) is more than JUMP_FACTOR = 2 times the recent low (0.5 in epoch 2):
    # training goes back to the end of epoch 2, the best state, not of epoch 3 (0.8), and
    # epochs 3 and 4 are trained again (0.45, 0.4).
    toy = Toy(loss_at=scripted(1.0, 0.5, 0.8, 1.1, 0.45, 0.4))
    history = toy.loop.run()
    assert toy.steps == [*range(1, 13), *range(7, 13)]
    assert toy.loop.pos["recoveries"] == 1
    assert [r["loss"] for r in history] == pytest.approx([1.0, 0.5, 0.45, 0.4])
    # A rise within the factor (0.9 after 0.5) is ordinary noise of training and is kept.
    mild = Toy(loss_at=scripted(1.0, 0.5, 0.9, 0.4))
    history = mild.loop.run()
    assert mild.loop.pos["recoveries"] == 0
    assert [r["loss"] for r in history] == pytest.approx([1.0, 0.5, 0.9, 0.4])


def test_a_best_epoch_whose_last_update_broke_the_weights_is_not_gone_back_to():
    # Epoch 2 has the lowest mean (0.5), but the first loss after it is already 1.5: its end
    # state is never vouched for, so the recovery goes back to the end of epoch 1 (steps 4-9
    # again), not to the end of epoch 2, where the same 1.5 would come back at any lr.
    toy = Toy(loss_at=scripted(1.0, 0.5, 1.5, 0.5, 0.45, 0.4))
    history = toy.loop.run()
    assert toy.steps == [*range(1, 10), *range(4, 13)]
    assert toy.loop.pos["recoveries"] == 1
    assert [r["loss"] for r in history] == pytest.approx([1.0, 0.5, 0.45, 0.4])


def test_a_loss_at_the_collapsed_level_is_a_divergence_once_training_got_below_it():
    # ae_ssim's collapse: 1 - SSIM went from 0.57 to 1.0 (a constant output), a rise under
    # the jump factor. With collapsed_at=0.99 epoch 4's 1.0 is a divergence; the first epoch's
    # 1.0 (an untrained network) is not, nothing having been below the level yet. Epoch 3's
    # end is never vouched for (the next step reports 1.0), so training goes back to epoch 2's.
    losses = scripted(1.0, 0.6, 0.55, 1.0, 0.5, 0.45)
    toy = Toy(loss_at=losses, collapsed_at=0.99)
    history = toy.loop.run()
    assert toy.steps == [*range(1, 13), *range(7, 13)]
    assert toy.loop.pos["recoveries"] == 1
    assert toy.opt.param_groups[0]["lr"] == LR * LR_FACTOR
    assert [r["loss"] for r in history] == pytest.approx([1.0, 0.6, 0.5, 0.45])
    # Without the level the same rise (1.8 times the low) passes as noise.
    plain = Toy(loss_at=losses)
    assert [r["loss"] for r in plain.loop.run()] == pytest.approx([1.0, 0.6, 0.55, 1.0])
    assert plain.loop.pos["recoveries"] == 0


def test_a_divergence_that_persists_stops_with_an_error_naming_epoch_and_loss():
    toy = Toy(loss_at={n: math.inf for n in range(5, 100)})  # from epoch 2, batch 2 on
    with pytest.raises(FlawscopeError, match=r"toy: training diverged at epoch 2 \(loss inf\)"
                                             r".*after 3 recoveries"):
        toy.loop.run()
    assert toy.loop.pos["recoveries"] == MAX_RECOVERIES
    assert toy.opt.param_groups[0]["lr"] == LR * LR_FACTOR ** MAX_RECOVERIES


def test_non_finite_weights_at_the_end_of_an_epoch_are_a_divergence(caplog):
    toy = Toy()
    real_step = toy.step

    def step(idx, n_step):
        losses = real_step(idx, n_step)
        if len(toy.steps) == BATCHES:  # the first epoch's last step leaves a NaN weight
            with torch.no_grad():
                toy.net.weight[0, 0] = math.nan
        return losses

    toy.loop.step = step
    with caplog.at_level(logging.WARNING, logger="flawscope.trainloop"):
        toy.loop.run()
    assert "epoch 1 (non-finite weights in net.weight)" in caplog.text
    assert toy.steps[:BATCHES + 1] == [1, 2, 3, 1]  # back to the initial weights
    assert bool(torch.isfinite(toy.weights()).all())


def test_ctrl_c_inside_a_step_then_resume_equals_an_unbroken_run_across_a_recovery(tmp_path):
    # An unbroken run that recovers from a NaN at its 8th step (epoch 3, batch 2) ...
    unbroken = Toy(loss_at={8: math.nan})
    unbroken.loop.run()
    # ... and one that gets a real SIGINT inside its 7th step (epoch 3, batch 1), stops
    # after that step, and resumes: the NaN then comes at the resumed run's 1st step, and
    # the recovery must still go back to the start of epoch 3, not to the resumption point.
    broken = Toy(workdir=tmp_path)
    real_step = broken.step

    def step(idx, n_step):
        if len(broken.steps) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while this step runs
        return real_step(idx, n_step)

    broken.loop.step = step
    with pytest.raises(KeyboardInterrupt):
        broken.loop.run()
    assert broken.steps == [1, 2, 3, 4, 5, 6, 7]  # the step in progress was finished
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["n_step"]) == (2, 1, 7)

    resumed = Toy(workdir=tmp_path, loss_at={1: math.nan})
    resumed.loop.run()
    assert resumed.steps == [8, 7, 8, 9, 10, 11, 12]
    assert torch.equal(resumed.weights(), unbroken.weights())
    assert resumed.loop.pos["history"] == unbroken.loop.pos["history"]
    assert resumed.opt.param_groups[0]["lr"] == unbroken.opt.param_groups[0]["lr"]
    assert (tmp_path / "losses.csv").read_text().count("\n") == EPOCHS + 1


def test_training_device_names():
    from flawscope.trainloop import training_device

    assert training_device("cpu") == torch.device("cpu")
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(FlawscopeError, match="device='tpu'"):
        training_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(FlawscopeError, match="sees no CUDA GPU"):
            training_device("cuda")


def test_checkpoints_can_be_spaced_in_time_but_the_last_epoch_is_always_saved(tmp_path,
                                                                               monkeypatch):
    import flawscope.trainloop as trainloop

    saved = []
    monkeypatch.setattr(trainloop, "save_checkpoint",
                        lambda path, state: saved.append(state["epoch"]))
    toy = Toy(tmp_path)
    toy.loop.checkpoint_every_s = 3600.0  # as on a GPU, where epochs take milliseconds
    toy.loop.run()
    assert saved == [EPOCHS]
    saved.clear()
    (tmp_path / "every").mkdir()
    every = Toy(tmp_path / "every")
    every.loop.run()
    assert saved == list(range(1, EPOCHS + 1))


def test_subnormal_floats_are_flushed_to_zero_on_every_thread_while_training_and_only_then(
        subnormal_probe):
    survivors: list[int] = []
    toy = Toy()
    step = toy.step

    def step_and_look(idx, n_step):
        survivors.append(subnormal_probe.survivors())
        return step(idx, n_step)

    toy.loop.step = step_and_look
    everyone = subnormal_probe.values.numel()
    assert subnormal_probe.survivors() == everyone
    toy.loop.run()
    assert survivors and all(n == 0 for n in survivors)
    # back to the default after training, on every thread
    assert subnormal_probe.survivors() == everyone
