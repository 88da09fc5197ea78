"""The one interface every anomaly-detection method implements.

A model learns "normal" from good images (:meth:`AnomalyModel.fit`) and turns a batch of
images into one score per image plus one anomaly map per image
(:meth:`AnomalyModel.score_batch`). Everything else in flawscope (evaluation, reports,
thresholds, the CLI, the service) talks only to this interface, so a new method is one module
in this package that subclasses :class:`AnomalyModel` and is decorated with
:func:`flawscope.models.register`.

Conventions every model follows:

- Input images are float tensors ``(B, 3, S, S)`` with values in [0, 1], where
  ``S = config.image_size``; each model does its own normalization inside.
- ``score_batch`` returns ``(scores (B,), maps (B, h, w))``; maps may be at any resolution,
  callers resize them bilinearly. Higher means more anomalous.
- Everything needed to score again after loading lives in ``state_tensors()`` (saved as
  safetensors) and ``config`` / ``extra_state()`` (saved as JSON). No pickle, ever.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FlawscopeError


class AnomalyModel(ABC):
    """Base class of all models; see the module docstring for the contract."""

    #: Registry name, used on the command line (``--model NAME``) and in saved manifests.
    name: ClassVar[str]
    #: A dataclass of hyper-parameters with defaults; must have ``image_size`` and ``seed``.
    Config: ClassVar[type]
    #: Named sets of overrides of ``Config`` fields, e.g. ``{"fast": {...}, "paper": {...}}``.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Preset used when the user names none (None = the Config defaults).
    default_preset: ClassVar[str | None] = None

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_settings(cls, preset: str | None = None,
                      overrides: Mapping[str, Any] | None = None) -> AnomalyModel:
        """A new, unfitted model from a preset name plus field overrides (strings allowed)."""
        preset = preset if preset is not None else cls.default_preset
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                known = ", ".join(sorted(cls.presets)) or "none"
                raise FlawscopeError(f"model {cls.name!r} has no preset {preset!r} "
                                     f"(presets: {known})")
            values.update(cls.presets[preset])
        values.update(coerce_overrides(cls.Config, overrides or {}))
        model = cls(cls.Config(**values))
        model.preset = preset
        return model

    preset: str | None = None
    #: The tile grid (:class:`flawscope.geometry.TileGrid`) the fitted state is tied to, for a
    #: model with statistics per tile position: it scores only images with this grid, and a
    #: blank image of its working size (``width`` x ``height``) is a valid warm-up input.
    #: None (every other model): tiles may lie anywhere, images may have any size.
    tile_grid: Any = None

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    # ----------------------------------------------------------------- the contract
    @abstractmethod
    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        """Learn normal appearance from good images.

        ``images`` yields ``(3, S, S)`` tensors in [0, 1]. ``workdir``, when given, is where
        the model may write checkpoints (to resume an interrupted fit) and training pictures.
        In a tiled geometry ``images`` is a :class:`flawscope.geometry.TileDataset`, which also
        says where each tile lies in its image; only a model with statistics per tile
        position (see :meth:`score_tiles`) needs that.
        """

    @abstractmethod
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, S, S)`` in [0, 1] -> ``(scores (B,), anomaly maps (B, h, w))``."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every fitted tensor needed to score, by name (saved with safetensors)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` on a model built from the same config."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-serializable fitted state that is not a tensor (default: none)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state` (default: nothing to restore)."""
        return None

    #: True where :meth:`leave_one_out_scores` is implemented (exactly, without refitting).
    supports_leave_one_out: ClassVar[bool] = False

    def kfold_scores(self, images: torch.utils.data.Dataset, folds: Sequence[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """Scores ``(N,)`` and maps ``(N, S, S)`` of each of the ``N`` images of the last
        :meth:`fit` (same dataset, same order) by a model fitted on the images outside its
        part of ``folds`` (index arrays that partition ``range(N)``), computed more cheaply
        than by refitting; None (the default): ``fit --calibration kfold`` refits the model
        once per fold."""
        return None

    def auto_calibration(self) -> str:
        """What ``fit --calibration auto`` does for this model (see
        :mod:`flawscope.calibration`): ``loo`` where the leave-one-out scores equal a refit
        without the image, so every good image is fitted on and calibrated on; ``kfold``
        where they do not but a fit is cheap; ``holdout`` (the default) where a fit is
        expensive."""
        return "loo" if self.supports_leave_one_out else "holdout"

    def leave_one_out_scores(self, images: torch.utils.data.Dataset
                             ) -> tuple[np.ndarray, np.ndarray] | None:
        """Scores ``(N,)`` and maps ``(N, S, S)`` (float32, model resolution, as
        :meth:`score_tensor`) of each of the ``N`` training images as if the model had been
        fitted without that image; None (the default) where the model cannot do this.

        ``images`` must be the dataset given to the last :meth:`fit`, in the same order: the
        fitted state remembers which image each part of it came from. Only available on the
        model that was just fitted (a loaded model returns None). Example::

            model.fit(train)
            scores, maps = model.leave_one_out_scores(train)  # calibration scores

        Each score is what a new good image would get, so thresholds set from them keep
        their false-alarm rate without holding images out of the fit.
        """
        return None

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor | None:
        """For models that reconstruct their input: the reconstruction in [0, 1], else None."""
        return None

    def onnx_module(self) -> torch.nn.Module | None:
        """For ONNX export: an ``nn.Module`` whose ``forward(images)`` returns the same
        ``(scores, maps)`` as :meth:`score_batch`, built only from traceable torch operations
        (no numpy, scipy or Python branches on tensor values), with the fitted state as
        buffers or parameters. None (the default) means this model cannot be exported.

        A model whose ``score_batch`` is already such a graph can return
        ``ScoreBatchModule(self)``; ``flawscope export`` checks the exported file against
        PyTorch on a batch of a different size before it reports success.
        """
        return None

    @classmethod
    def exports_onnx(cls) -> bool:
        """Whether fitted models of this class can be exported (they implement
        :meth:`onnx_module`)."""
        return cls.onnx_module is not AnomalyModel.onnx_module

    def score_tiles(self, tiles: torch.Tensor, grid: Any, positions: torch.Tensor,
                    engine=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps, as :meth:`score_tensor` gives them, of tiles ``(B, 3, S, S)`` cut
        from one image: ``grid`` (a :class:`flawscope.geometry.TileGrid`) says where that
        image's tiles lie and ``positions`` ``(B,)`` which of them these are.

        :func:`flawscope.geometry.score_image` scores every tile of every model through this
        method. The default scores each tile as an image, wherever it lies (the statistics
        of a position inside a tile are shared by all tiles). A model that keeps statistics
        per tile position overrides it, and raises
        :class:`~flawscope.errors.TileGridError` for a grid it was not fitted on.
        """
        return self.score_tensor(tiles, engine)

    # ----------------------------------------------------------------- shared helpers
    @torch.no_grad()
    def score_tensor(self, images: torch.Tensor, engine=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps resized to the input's resolution ``(B, S, S)``, as float32.

        ``engine`` (default: this model's own ``score_batch``) is any function with the same
        contract, such as an exported graph: resizing stays here, the same for every engine.
        """
        scores, maps = (engine or self.score_batch)(images)
        maps = resize_maps(maps, images.shape[-2:])
        return scores.float().reshape(-1), maps


class ScoreBatchModule(torch.nn.Module):
    """Wraps a model's own ``score_batch`` as a module, for models whose scoring is a fixed
    torch graph; fitted tensors held as attributes become constants of the exported graph."""

    def __init__(self, model: AnomalyModel):
        super().__init__()
        self.model = model
        # The model's networks become submodules, so their weights export as parameters
        # (the tracer refuses weights that require grad as constants).
        for key, value in vars(model).items():
            if isinstance(value, torch.nn.Module):
                self.add_module(f"net_{key.lstrip('_')}", value)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.model.score_batch(images)
        return scores.float().reshape(-1), maps.float()


def resize_maps(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of ``(B, h, w)`` maps to ``size``; float32 out."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


def coerce_overrides(config_cls: type, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check override names against the Config fields and convert strings to field types."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise FlawscopeError(f"unknown setting {key!r}; settings: {', '.join(sorted(fields))}")
        default = fields[key].default
        if isinstance(value, str) and default is not dataclasses.MISSING and default is not None:
            try:
                if isinstance(default, bool):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "1", "yes")
                elif isinstance(default, int):
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                elif isinstance(default, (tuple, list)):
                    inner = type(default[0]) if default else str
                    value = type(default)(inner(v) for v in value.split(",") if v)
            except ValueError:
                raise FlawscopeError(f"setting {key}={value!r}: expected a value like "
                                     f"{default!r}") from None
        out[key] = value
    return out
