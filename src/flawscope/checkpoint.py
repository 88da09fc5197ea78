"""Training checkpoints that resume an interrupted fit and can never execute code.

Shared by the models that train for many epochs (autoencoders, f-AnoGAN): a checkpoint is
a ``torch.save`` of tensors and plain Python values only, written atomically, and loaded
with ``weights_only=True``. A fingerprint of the settings and training images decides
whether a checkpoint belongs to the fit at hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import FlawscopeError

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str, epochs: int,
                    what: str = "training") -> dict[str, Any] | None:
    """The checkpoint to resume from, or None to start ``what`` over.

    A checkpoint of other settings or images, or one that went past ``epochs``, is ignored
    with a warning; an unreadable one is an error that says which file to delete.
    """
    if not path.is_file():
        return None
    try:
        # CPU tensors whatever device wrote them: loading into the networks and optimizers
        # moves them to where training runs (Optimizer.load_state_dict follows the params).
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # any unreadable file: tell the user what to delete
        raise FlawscopeError(f"{path}: unreadable checkpoint ({exc}); delete it to start "
                             f"{what} over") from None
    if state.get("fingerprint") != fingerprint:
        log.warning("%s: made with other settings or images; starting %s over", path, what)
        return None
    if state["epoch"] > epochs:
        log.warning("%s: trained %d epochs, more than the %d asked for; starting %s over",
                    path, state["epoch"], epochs, what)
        return None
    return state
