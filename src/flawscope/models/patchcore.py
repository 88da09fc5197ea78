"""``patchcore``: nearest-neighbour distance to a memory bank of normal patch features.

After Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022):

1. Every image goes through an ImageNet backbone (:mod:`flawscope.backbones`); the feature
   maps of two middle block groups are averaged over each 3 x 3 neighbourhood ("locally aware"
   patch features: a patch sees its surroundings, which makes the features robust to small
   shifts), the coarser one is upsampled to the finer one's resolution, and they are
   concatenated: one feature vector per patch position.
2. Fitting keeps a greedy k-center coreset of all training patches, ``coreset_ratio`` of
   them: nearly the coverage of the full set at a fraction of the size. ``coreset="exact"``
   is the paper's selection (:mod:`flawscope.coreset`), whose time grows with the square of
   the number of patches; ``coreset="approx"`` runs greedy k-center inside k-means cells on
   streamed chunks of features (:mod:`flawscope.cellcoreset`): time linear in the number of
   images, memory one chunk plus the kept patches; ``"auto"`` picks exact up to
   ``AUTO_EXACT_PATCHES`` training patches and approx above, and is the default.
3. A patch's score is the Euclidean distance to its nearest neighbour in the memory bank
   (exact, found by :mod:`flawscope.nnsearch`, which skips most of the bank; the exported
   graph of :meth:`PatchCoreModel.onnx_module` computes the same distances by brute force
   over blocks of the bank, a fixed graph for any batch size); the
   image score is the largest patch score (or, with ``reweight``, the paper's re-weighted
   version of it, which discounts a patch whose nearest neighbour sits in a dense region of
   the bank); the map is upsampled to the image and smoothed with a Gaussian of ``sigma``.

**Few good images** (preset ``fewshot``; after AnomalyDINO, Damm et al., "AnomalyDINO:
Boosting Patch-based Few-shot Anomaly Detection with DINOv2", 2024): a new part number may
start with 1-16 good images, too few to show every normal pose. ``augment`` adds rotated
and/or flipped copies of each training image to the bank (only where these are normal
variations of the part: a flipped asymmetric part is a defect); ``full_bank_patches`` keeps
every patch of a bank that small, without coreset (up to 16 images x 36 views at 256 px:
589,824 rows, 180 MB in float16). ``image_score="top"`` takes the mean of the top
``top_fraction`` of patch scores instead of the single largest one (AnomalyDINO's score,
meant to depend less on one patch that happens to have no close match); on the dev
categories it did not beat the max (see the preset), so it is an option, not the
preset's choice. Every
augmented row remembers its source image, so leave-one-out drops an image together with its
augmented copies.

**Finer patches** (preset ``fine``): block group 1 (stride 4) joins groups 2 and 4, so the
grid is four times as dense; every image is first matched to the training images' median
brightness and contrast, a low-contrast part stretched to a spread of at least 0.3
(``intensity="matched"``), and the image score is the largest value of the smoothed map
(``image_score="map_max"``); training sets of up to 100 images are also mirrored
(``augment="flips"``, ``augment_max_images=100``). On the four dev categories (256 px, AMD
EPYC, 2 threads) it raised the mean image AUROC from 0.957 to 0.981 with coreset seed 0 and
by 0.018 over three seeds (0.962 to 0.980: screw +0.021, magnetic tile +0.023, welding
+0.026, toothbrush +0.003; +0.017 over five seeds), and with seed 0 the mean AU-PRO from
0.814 to 0.823, at 4-14 times fewer images per second.

Middle block groups because early ones are too generic and late ones too ImageNet-specific
and coarse (the paper's argument); for EfficientNet-Lite that is groups 2 and 4 (stride 8 and
16, 40 + 112 channels for lite0 and lite1, 48 + 120 for lite2). With several backbones
(``backbone="efficientnet_lite0+efficientnet_lite2"``) each group's maps are concatenated
before the neighbourhood averaging, so a patch's feature vector holds every backbone's
(see :class:`flawscope.backbones.EnsembleExtractor` for why concatenation rather than the
paper's averaging of per-backbone scores).

The memory bank is rounded to ``bank_dtype`` (float16 by default: half the file and the
memory, a relative change of the distances below 1e-3) at the end of fitting, so that the
saved model scores exactly like the one in memory.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbones import (
    EnsembleExtractor,
    FeatureExtractor,
    backbone_names,
    check_intensity,
    create_extractor,
)
from ..cellcoreset import StreamingCoreset
from ..coreset import greedy_coreset
from ..errors import FlawscopeError
from ..nnsearch import (
    ClusteredBank,
    blocked_nearest_distances,
    nearest_distances,
    nearest_indices,
)
from . import register
from ._maps import upsample_and_smooth
from .base import AnomalyModel

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_CORESETS = ("auto", "exact", "approx")
_IMAGE_SCORES = ("max", "top", "map_max")

#: Reference augmentation: named sets of views of a square training image, each view a
#: (rotation counter-clockwise in degrees, then mirror left-right) pair; (0, False) is the
#: image itself. Quarter turns are exact; other angles resample the image bilinearly with
#: reflected borders (no empty corners).
AUGMENTATIONS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "hflip": ((0, False), (0, True)),
    # left-right and top-bottom mirror (a top-bottom mirror is a half turn of the left-right)
    "flips": ((0, False), (0, True), (180, True)),
    "rot90": ((0, False), (90, False), (180, False), (270, False)),
    "rot180": ((0, False), (180, False)),
    # the 8 symmetries of the square
    "rot90+flips": tuple((a, m) for m in (False, True) for a in (0, 90, 180, 270)),
    # for parts that lie at any angle (a screw): every 45 degrees, or every 10 degrees.
    # Screw from 16 good images (benchmarks/fewshot.py, 3 draws, every patch kept): image
    # AUROC 0.830 turned every 45 degrees, 0.915 every 10; on the first draw 0.892 every
    # 22.5, 0.916 every 15, 0.929 every 10, 0.934 every 5 (a 1.2-million-row bank, over
    # 5 minutes to fit). rot10's fit: 84-91 s on 2 cores.
    "rot45": tuple((a, False) for a in range(0, 360, 45)),
    "rot10": tuple((a, False) for a in range(0, 360, 10)),
}

#: Patches kept whole by the ``fewshot`` preset: 16 images x 36 views (``rot10``) x 32 x 32
#: patches, 180 MB in float16 with the default 152 channels. A larger bank is cut to a
#: coreset, which undoes what the extra views add.
FEWSHOT_FULL_BANK = 16 * 36 * 32 * 32

#: :meth:`PatchCoreModel.kfold_scores` keeps every training patch's features in memory up
#: to this size (magnetic tile's 762 images at 256 px: 474 MB); above it, cross-fitting refits.
KFOLD_FEATURE_BYTES = 2 * 1024 ** 3

#: ``coreset="auto"`` selects exactly up to this many training patches (about 250 images at
#: 256 px, where the exact selection takes a few minutes on 2 cores) and approximately above.
AUTO_EXACT_PATCHES = 250_000


@dataclass
class PatchCoreConfig:
    #: 256: MVTec-style defects (a thread flaw on a screw) are a few pixels wide, and at
    #: stride 8 this gives 32 x 32 patches; 224 is ~25% faster where defects are larger.
    image_size: int = 256
    #: A key of flawscope.backbones.BACKBONES (efficientnet_lite0, _lite1, _lite2), or
    #: several joined by "+" (an ensemble: each patch's features from every backbone,
    #: concatenated; flawscope.backbones.EnsembleExtractor).
    backbone: str = "efficientnet_lite0"
    #: Block groups whose outputs make the patch features (see flawscope.backbones).
    stages: tuple[int, ...] = (2, 4)
    #: What each image goes through before the backbone: "raw", or "standardized" (one mean
    #: and spread per image, flawscope.backbones.standardize_intensity) for parts whose
    #: brightness and contrast vary between good images. PatchCore, features of all training
    #: images, max patch score: magnetic tile 0.949 -> 0.966, welding 0.952 -> 0.955,
    #: toothbrush 0.989 -> 0.989, screw 0.938 -> 0.920 (a small dark part on white: its
    #: scaled-up contrast clips), so not the default. "matched": each image shifted and
    #: scaled to the training images' median mean and spread (the spread at least
    #: flawscope.backbones.MATCHED_MIN_SPREAD), unclipped (flawscope.backbones.match_intensity;
    #: the ``fine`` preset's choice). "highpass": each image less its blurred grey level,
    #: lighting and shading gone (flawscope.backbones.highpass_intensity), for textures under
    #: changing lighting with few good images: magnetic tile, 16 images, 0.798 -> 0.845.
    intensity: str = "raw"
    #: Fraction of all training patches kept in the memory bank. 2%: over 3 seeds each
    #: (benchmarks/coreset_accuracy.py, features computed once, maps at 256 px), the image
    #: AUROC / AU-PRO of 2% against 10% banks were screw 0.946 / 0.947 vs 0.949 / 0.959,
    #: toothbrush 0.996 / 0.835 vs 0.994 / 0.840, welding 0.958 / 0.715 vs 0.955 / 0.718,
    #: magnetic tile 0.948 / 0.732 vs 0.949 / 0.725: the same detection on average (each
    #: within its seed-to-seed range; screw's AU-PRO 0.012 lower) with five times fewer rows
    #: to search, which on screw took PatchCore from 12.7 to 25.4 images/s eager and 40.7
    #: with OpenVINO (AMD EPYC, 2 threads, batch 16; the exported graph's brute-force search
    #: was slower than eager on the 10% bank). 1% lost 0.046 AUROC on screw; the ``paper``
    #: preset keeps 10%.
    coreset_ratio: float = 0.02
    #: Coreset selection: "exact" (greedy k-center over all patches, Roth et al.; time grows
    #: with the square of the patch count: 93 s for 190 images, 716 s for 360), "approx"
    #: (greedy k-center inside k-means cells of streamed chunks, flawscope.cellcoreset; time
    #: linear in the number of images, memory bounded by a chunk plus the kept patches; for
    #: thousands of images) or "auto" (exact up to AUTO_EXACT_PATCHES patches, approx above).
    #: "auto" by default: over seeds, approx's mean image AUROC / AU-PRO (maps at 256 px)
    #: stayed within 0.003 of exact's on every dev category measured — toothbrush
    #: 0.9917 / 0.8417 vs 0.9928 / 0.8402 (5 seeds each), welding 0.9526 / 0.7160 vs
    #: 0.9548 / 0.7172 (5), screw 0.9512 / 0.9585 vs 0.9508 / 0.9585 (2), magnetic tile
    #: 0.9494 / 0.7253 (3) vs 0.9514 / 0.7246 (1; its exact selection took 2 h) — while exact's
    #: own seed-to-seed range was larger (0.011, 0.004, 0.013), and on screw's 327,680
    #: patches approx selected in 4 s where exact took 575 s (AMD EPYC, 1 thread).
    coreset: str = "auto"
    #: Dimension of a random projection used only while selecting the coreset; 0 = select on
    #: the features themselves. The paper projects to save time on wide backbones; at
    #: EfficientNet-Lite's 152 channels projecting to 128 saves only 16% of the coreset's
    #: distance work, and on 64 screw images (3 seeds) the exact selection scored image
    #: AUROC 0.764 on average against 0.760 with the projection.
    projection_dim: int = 0
    #: Image score = max patch score (False) or the paper's re-weighted max (True).
    reweight: bool = False
    #: Image score from the patch scores: "max" (the largest), "top" (the mean of the
    #: largest ``top_fraction`` of them, at least one; AnomalyDINO's few-shot score) or
    #: "map_max" (the largest value of the smoothed map: on a fine patch grid one patch
    #: without a close match weighs less; see the ``fine`` preset).
    image_score: str = "max"
    top_fraction: float = 0.01
    #: Reference augmentation of the training images (a key of AUGMENTATIONS): "none",
    #: "hflip", "flips", "rot90", "rot180", "rot90+flips", "rot45" or "rot10" (a turn every
    #: 45 or 10 degrees, for parts that lie at any angle). Only variations that are
    #: normal for the part: a mirrored asymmetric part or a turned oriented one is a defect.
    augment: str = "none"
    #: Augment only training sets of at most this many images (0: any number). Mirrored
    #: copies help where few images show the normal variation and cost more than they give
    #: where hundreds do (see the ``fine`` preset).
    augment_max_images: int = 0
    #: Banks of at most this many training patches (augmented copies included) keep every
    #: patch, without coreset; 0 = always select ``coreset_ratio`` of them.
    full_bank_patches: int = 0
    #: Neighbours in the bank used by the re-weighting.
    num_neighbors: int = 9
    #: Gaussian smoothing of the map, in pixels at image_size.
    sigma: float = 4.0
    #: Storage type of the memory bank: float16 (half the size) or float32.
    bank_dtype: str = "float16"
    batch_size: int = 16
    #: Channels-last activations in the backbone: measured 1.8x faster on this AVX2 CPU.
    channels_last: bool = True
    seed: int = 0


@register
class PatchCoreModel(AnomalyModel):
    name = "patchcore"
    Config = PatchCoreConfig
    presets = {
        "default": {},
        # Smaller input and bank: about twice the speed (screw, eager, 2 threads: 54.7 vs
        # 27.3 images/s), for large parts / coarse defects.
        "fast": {"image_size": 224, "coreset_ratio": 0.01},
        # The paper's image score, exact coreset and 10% bank; full-precision bank.
        "paper": {"reweight": True, "bank_dtype": "float32", "coreset": "exact",
                  "coreset_ratio": 0.1},
        # 1-16 good images (a new part number): every patch of the images and of their
        # mirrored copies. Measured by benchmarks/fewshot.py on the four dev categories
        # (3 draws of 1, 4, 16 images): flips beat no augmentation by 0.01-0.02 mean image
        # AUROC at every k; the mean of the top 1% patch scores tied the max at 1 and 4
        # images and lost to it at 16 (screw), the top 5% was worse, so the max is kept.
        # Use augment=none or hflip for parts whose orientation matters, rot10 for parts
        # that lie at any angle (screw, 16 images: 0.915 against 0.682 with flips).
        # Each image less its blurred grey level (intensity=highpass): 16 good images cannot
        # show every lighting; mean of 3 draws of 1 / 4 / 16 images, raw -> highpass:
        # magnetic tile 0.718 / 0.759 / 0.798 -> 0.774 / 0.797 / 0.845, welding 0.642 / 0.825 /
        # 0.958 -> 0.782 / 0.864 / 0.959, toothbrush 0.869 / 0.780 / 0.984 -> 0.863 / 0.795 /
        # 0.993. Not for an object on a plain background, whose silhouette it flattens:
        # screw, 16 images turned every 10 degrees, 0.929 raw -> 0.845 (one draw); there
        # use intensity=raw.
        "fewshot": {"augment": "flips", "full_bank_patches": FEWSHOT_FULL_BANK,
                    "intensity": "highpass"},
        # Finer patches for small defects: block group 1 (stride 4) joins groups 2 and 4,
        # so the patch grid is image_size / 4 (64 x 64 at 256 px) with 4 times the rows
        # in the bank; every image matched to the training images' brightness and contrast
        # (alone, the finer grid lost on magnetic tile, whose brightness varies); the image
        # score from the smoothed map. Measured in the README ("Finer patches").
        # Mirrored copies (left-right and top-bottom) of training sets of up to 100 images:
        # welding (37 images) 0.967 -> 0.984 image AUROC (mean of 3 coreset seeds),
        # toothbrush (60) 0.996 -> 0.999; with all 320 screw and 762 magnetic tile images
        # they lost 0.006 each (seed 0) and tripled the bank (magnetic tile: 0.5 images/s).
        # Use augment=none where a mirrored part would itself be a defect.
        "fine": {"stages": (1, 2, 4), "intensity": "matched", "image_score": "map_max",
                 "augment": "flips", "augment_max_images": 100},
    }
    default_preset = "default"

    def __init__(self, config: PatchCoreConfig | None = None):
        super().__init__(config)
        check_intensity(self.config.intensity)
        for key, choices in (("bank_dtype", _DTYPES), ("coreset", _CORESETS),
                             ("augment", AUGMENTATIONS), ("image_score", _IMAGE_SCORES)):
            _check_choice(key, getattr(self.config, key), choices)
        if not 0 < self.config.coreset_ratio <= 1:
            raise FlawscopeError(f"coreset_ratio={self.config.coreset_ratio}: must be in (0, 1]")
        if self.config.augment_max_images < 0:
            raise FlawscopeError(f"augment_max_images={self.config.augment_max_images}: must "
                                 "be 0 (any number of images) or more")
        if len(self.config.stages) < 1:
            raise FlawscopeError("stages: need at least one block group")
        backbone_names(self.config.backbone)  # a clear error for an unknown name, up front
        if not 0 < self.config.top_fraction <= 1:
            raise FlawscopeError(f"top_fraction={self.config.top_fraction}: must be in (0, 1]")
        if self.config.reweight and self.config.image_score != "max":
            raise FlawscopeError("reweight re-weights the max patch score: use it with "
                                 "image_score=max")
        self._extractor: FeatureExtractor | EnsembleExtractor | None = None
        self.memory_bank: torch.Tensor | None = None
        self._search: ClusteredBank | None = None
        #: Index (in the fitted dataset) of the image each bank row came from; None for models
        #: saved before it was recorded (they score as before, without leave-one-out).
        self.bank_source: torch.Tensor | None = None

    # ----------------------------------------------------------------- features
    @property
    def extractor(self) -> FeatureExtractor | EnsembleExtractor:
        if self._extractor is None:
            self._extractor = create_extractor(self.config.backbone, tuple(self.config.stages),
                                               channels_last=self.config.channels_last,
                                               intensity=self.config.intensity)
        return self._extractor

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> locally aware patch features ``(B, C, h, w)``."""
        return patch_features(self.extractor, images)

    # ----------------------------------------------------------------- fitting
    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        if len(images) == 0:
            raise FlawscopeError("patchcore needs at least one training image")
        self.extractor.fit_intensity(images)
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        views = self.views(len(images))
        if views is not AUGMENTATIONS[self.config.augment]:
            log.info("augment=%s not applied: %d training images, more than "
                     "augment_max_images=%d", self.config.augment, len(images),
                     self.config.augment_max_images)
        self._fit_features(self._view_features(tqdm(loader, desc="features", leave=False,
                                                    disable=None), views),
                           len(images) * len(views))

    def views(self, n_images: int) -> tuple[tuple[int, bool], ...]:
        """The views of each training image in a bank fitted on ``n_images`` images: those
        of ``augment``, or the image alone above ``augment_max_images``. k-fold
        cross-fitting asks with the whole training set's count, so its folds' banks are
        built like the final one."""
        limit = int(self.config.augment_max_images)
        if limit and n_images > limit:
            return AUGMENTATIONS["none"]
        return AUGMENTATIONS[self.config.augment]

    def _fit_features(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                      n_views: int) -> None:
        """Select the memory bank from the features of ``n_views`` image views (every view
        of every training image, as :meth:`_view_features` streams them)."""
        first = next(batches)
        n_patches = n_views * first[0].shape[2] * first[0].shape[3]
        keep_all = n_patches <= self.config.full_bank_patches
        method = self.config.coreset
        if keep_all:
            method = "exact"  # with every patch kept: no selection at all
        elif method == "auto":
            method = "exact" if n_patches <= AUTO_EXACT_PATCHES else "approx"
        log.info("selecting %s of %d patches (%s coreset)", 1.0 if keep_all else
                 self.config.coreset_ratio, n_patches, "none" if keep_all else method)
        self.bank_source = None
        if method == "exact":
            bank = self._exact_bank(itertools.chain([first], batches), n_patches, keep_all)
        else:
            bank = self._approx_bank(itertools.chain([first], batches))
        self._set_bank(bank.to(_DTYPES[self.config.bank_dtype]).contiguous())

    def _view_features(self, loader, views) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(features (B, C, h, w), source image index (B,))`` of every view of every
        batch: the batch's images, then each augmented copy of them."""
        first = 0
        for batch in loader:
            index = torch.arange(first, first + len(batch))
            for degrees, mirror in views:
                yield self.embed(augmented(batch, degrees, mirror)), index
            first += len(batch)

    @staticmethod
    def _rows(emb: torch.Tensor) -> torch.Tensor:
        return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])

    def _exact_bank(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                    n_patches: int, keep_all: bool = False) -> torch.Tensor:
        bank: torch.Tensor | None = None
        source = torch.empty(n_patches, dtype=torch.int32)  # each row's training image
        filled = 0
        for emb, index in batches:
            rows = self._rows(emb)
            if bank is None:  # one preallocated matrix: no list of batches plus a copy
                bank = torch.empty(n_patches, rows.shape[1])
            bank[filled:filled + len(rows)] = rows
            source[filled:filled + len(rows)] = index.repeat_interleave(
                emb.shape[2] * emb.shape[3])
            filled += len(rows)
        assert bank is not None and filled == len(bank)
        n_select = len(bank) if keep_all else max(1, math.ceil(self.config.coreset_ratio
                                                               * len(bank)))
        if n_select < len(bank):
            chosen = greedy_coreset(bank, n_select, self.config.projection_dim,
                                    seed=int(self.config.seed))
            bank, source = bank[chosen], source[chosen]
        self.bank_source = source
        return bank

    def _approx_bank(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                     ) -> torch.Tensor:
        stream = StreamingCoreset(self.config.coreset_ratio, seed=int(self.config.seed),
                                  projection_dim=self.config.projection_dim or None)
        for emb, index in batches:
            stream.add(self._rows(emb), index.repeat_interleave(emb.shape[2] * emb.shape[3]))
        bank, source = stream.result_with_sources()
        self.bank_source = source.to(torch.int32)
        return bank

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank
        self._search = ClusteredBank(bank)

    # ----------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._search is None:
            raise FlawscopeError("patchcore model is not fitted")
        return self.score_features(self.embed(images))

    @torch.inference_mode()
    def score_features(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`score_batch` from features already computed by :meth:`embed` (to score one
        test set against several banks without running the backbone again)."""
        if self._search is None:
            raise FlawscopeError("patchcore model is not fitted")
        c, h, w = emb.shape[1:]
        queries = emb.permute(0, 2, 3, 1).reshape(-1, c)
        patch = self._search.search(queries).view(-1, h * w)
        return scores_and_maps(patch, queries.view(-1, h * w, c), (h, w), self._search.bank,
                               self._search.bank_sq, self.config)

    def onnx_module(self) -> PatchCoreScorer:
        """The scoring as one fixed graph for export: same features, same score and map
        code as :meth:`score_batch`, the neighbour search done by brute force over blocks of
        the bank (the bank a constant of the graph)."""
        if self._search is None:
            raise FlawscopeError("patchcore model is not fitted")
        return PatchCoreScorer(self)

    # ----------------------------------------------------------------- cross-fitting
    @torch.inference_mode()
    def kfold_scores(self, images: torch.utils.data.Dataset, folds: Sequence[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """Each training image scored by a bank selected without its fold, from features
        computed once: a fit's cost is its feature pass, so k-fold cross-fitting costs two
        feature passes and ``k + 1`` coreset selections instead of ``k + 1`` fits (screw, 320
        images, one thread: see the README). The bank of a fold is selected by the same code
        from the same rows in the same order as a refit on the other folds' images would,
        so it is that refit's bank up to float rounding of the backbone on batches grouped
        differently. None (refit instead) where the features of every view of every image
        would exceed :data:`KFOLD_FEATURE_BYTES`.
        """
        n = len(images)
        views = self.views(n)
        identity = views.index((0, False))
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        features: list[tuple[torch.Tensor, torch.Tensor]] = []
        for emb, index in self._view_features(tqdm(loader, desc="k-fold features",
                                                   leave=False, disable=None), views):
            if not features and emb[0].numel() * 4 * n * len(views) > KFOLD_FEATURE_BYTES:
                return None
            features.append((emb, index))
        own = features[identity::len(views)]  # each batch's images as they are
        scores = np.zeros(n, dtype=np.float32)
        maps: np.ndarray | None = None
        for part in folds:
            held = torch.zeros(n, dtype=torch.bool)
            held[torch.as_tensor(part, dtype=torch.long)] = True
            keep = ~held
            renumber = torch.cumsum(keep, 0) - 1  # an image's index among the kept ones
            kept = ((emb[rows], renumber[index[rows]])
                    for emb, index in features if (rows := keep[index]).any())
            fold = type(self)(self.config)
            fold._fit_features(kept, int(keep.sum()) * len(views))
            for emb, index in own:
                mask = held[index]
                if mask.any():
                    s, m = fold.score_features(emb[mask])
                    if maps is None:
                        maps = np.zeros((n, *m.shape[1:]), dtype=np.float32)
                    scores[index[mask].numpy()] = s.float().numpy()
                    maps[index[mask].numpy()] = m.float().numpy()
        return scores, maps

    # ----------------------------------------------------------------- leave-one-out
    #: Both coresets keep each bank row's source image, which leave-one-out needs.
    supports_leave_one_out = True

    def auto_calibration(self) -> str:
        """``kfold`` where a coreset is selected, ``loo`` where the bank keeps every patch.

        Leave-one-out drops an image's own rows but keeps a coreset that was selected with
        that image among the training images: greedy k-center picks the patches farthest from
        the rest, so the image's unusual patches pulled rows near them into the bank, and its
        leave-one-out score comes out lower than a new good image's. Measured (default
        settings, AMD EPYC): the 95th percentile of the calibration scores was 21.35 by
        leave-one-out, 22.46 by 5-fold and 22.62 on test/good (screw); at a 5% target
        leave-one-out thresholds flagged 5 of 41 test/good screws and 18 of 190 magnetic tiles,
        5-fold 3 of 41 and 13 of 190. Without a coreset (the ``fewshot`` preset keeps every
        patch while ``full_bank_patches`` allows) leave-one-out equals a refit."""
        return "loo" if self.config.full_bank_patches else "kfold"

    @torch.inference_mode()
    def leave_one_out_scores(self, images: torch.utils.data.Dataset
                             ) -> tuple[np.ndarray, np.ndarray] | None:
        """Each training image scored against the bank without the rows taken from it.

        The rows of an image include those of its augmented copies. Exact and without
        refitting: the excluded rows get an infinite squared norm in a
        brute-force search, so they can never be the nearest neighbour (nor, with
        ``reweight``, one of the re-weighting neighbours). The rest of the bank is the same
        coreset, so this equals scoring against ``memory_bank[bank_source != i]``.
        """
        if self.bank_source is None or self._search is None:
            return None
        n = int(self.bank_source.max()) + 1 if len(self.bank_source) else 0
        if len(images) < n:
            raise FlawscopeError(f"leave-one-out needs the {n} images patchcore was fitted "
                                 f"on, got {len(images)}")
        if n < 2:
            raise FlawscopeError("leave-one-out needs at least 2 good images: without its "
                                 "only image the memory bank is empty")
        bank, bank_sq = self._search.bank, self._search.bank_sq
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        scores, maps, first = [], [], 0
        for batch in tqdm(loader, desc="leave-one-out", leave=False, disable=None):
            emb = self.embed(batch)
            b, c, h, w = emb.shape
            queries = emb.permute(0, 2, 3, 1).reshape(b, h * w, c)
            for j in range(b):
                masked = bank_sq.masked_fill(self.bank_source == first + j, math.inf)
                patch = nearest_distances(queries[j], bank, masked)[None]
                s, m = scores_and_maps(patch, queries[j][None], (h, w), bank, masked,
                                       self.config)
                scores.append(s)
                maps.append(m)
            first += b
        return torch.cat(scores).float().numpy(), torch.cat(maps).float().numpy()

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.memory_bank is None:
            raise FlawscopeError("patchcore model is not fitted")
        tensors = {"memory_bank": self.memory_bank,
                   **self.extractor.intensity_state()}
        if self.bank_source is not None:
            tensors["bank_source"] = self.bank_source
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "memory_bank" not in tensors:
            raise FlawscopeError("patchcore model file has no memory_bank tensor")
        self._set_bank(tensors["memory_bank"].to(_DTYPES[self.config.bank_dtype]))
        self.extractor.load_intensity_state(tensors, self.name)
        source = tensors.get("bank_source")
        self.bank_source = None if source is None else source.to(torch.int32)


def augmented(images: torch.Tensor, degrees: int, mirror: bool) -> torch.Tensor:
    """``(B, 3, S, S)`` rotated ``degrees`` counter-clockwise, then mirrored left-right if
    ``mirror``. Multiples of 90 are exact; other angles are resampled bilinearly, the
    corners filled by reflection."""
    if degrees % 90 == 0:
        turns = (degrees // 90) % 4
        images = torch.rot90(images, turns, dims=(-2, -1)) if turns else images
    else:
        a = math.radians(degrees)
        # output (x, y) samples the input at the inverse rotation; y points down in images
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0],
                              [math.sin(a), math.cos(a), 0.0]], dtype=images.dtype)
        grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape),
                             align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                               align_corners=False)
    return images.flip(-1) if mirror else images


def _check_choice(key: str, value: object, choices) -> None:
    """A clear error when the setting ``key`` is not one of ``choices``."""
    if value not in choices:
        names = list(choices)
        raise FlawscopeError(f"{key}={value!r}: choose "
                             f"{' or '.join(names) if len(names) == 2 else ', '.join(names)}")


def patch_features(extractor: FeatureExtractor | EnsembleExtractor,
                   images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` -> locally aware patch features ``(B, C, h, w)``: each group's map
    averaged over 3 x 3 neighbourhoods, brought to the finest map's size, concatenated."""
    features = extractor(images)
    features = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in features]
    size = features[0].shape[-2:]
    features = [f if f.shape[-2:] == size else
                F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                for f in features]
    return torch.cat(features, 1)


def scores_and_maps(patch: torch.Tensor, queries: torch.Tensor, grid: tuple[int, int],
                    bank: torch.Tensor, bank_sq: torch.Tensor,
                    config: PatchCoreConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch distances ``(B, h*w)`` -> image scores ``(B,)`` and maps ``(B, S, S)``.

    The one place where both the eager scoring and the exported graph turn distances into
    decisions, so the two can only differ by float rounding. ``queries`` ``(B, h*w, C)`` and
    the float32 ``bank`` (with its squared norms) serve the re-weighted score.
    """
    maps = upsample_and_smooth(patch.view(-1, *grid), int(config.image_size), config.sigma)
    if config.reweight and len(bank) > 1:
        scores = reweighted(patch, queries, bank, bank_sq, config.num_neighbors)
    elif config.image_score == "top":
        k = max(1, math.ceil(config.top_fraction * patch.shape[1]))
        scores = patch.topk(k, dim=1).values.mean(1)
    elif config.image_score == "map_max":
        scores = maps.flatten(1).amax(1)
    else:
        scores = patch.amax(1)
    return scores, maps


def reweighted(patch: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor,
               bank_sq: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """Eq. 7 of the paper: s * (1 - softmax of the distances from the worst patch to the
    ``num_neighbors`` bank neighbours of its nearest neighbour)[0].

    Written with gathers (no Python indexing by the batch size) so that it traces into a graph
    that holds for any batch size.
    """
    worst = patch.argmax(1, keepdim=True)                              # (B, 1)
    score = patch.gather(1, worst)[:, 0]
    c = queries.shape[-1]
    feats = queries.gather(1, worst[:, :, None].expand(-1, 1, c))[:, 0]  # (B, C)
    nearest = bank.index_select(0, nearest_indices(feats, bank, bank_sq))
    k = min(num_neighbors, len(bank))
    d2 = torch.addmm(bank_sq, nearest, bank.T, alpha=-2)
    support = d2.topk(k, dim=1, largest=False).indices                # includes the neighbour
    dist = (bank[support] - feats[:, None]).pow(2).sum(-1).sqrt()       # (B, k)
    weight = 1 - torch.softmax(dist, 1)[:, 0]
    return weight * score


class PatchCoreScorer(torch.nn.Module):
    """PatchCore's scoring as a fixed graph: the model's own backbone and post-processing
    (:func:`patch_features`, :func:`scores_and_maps`), the exact nearest-neighbour distance by
    :func:`flawscope.nnsearch.blocked_nearest_distances` (brute force: the clustered pruning
    depends on the data and stays in PyTorch). The memory bank is a float32 buffer, a constant
    of the exported file."""

    def __init__(self, model: PatchCoreModel):
        super().__init__()
        self.extractor = model.extractor
        self.config = model.config
        self.register_buffer("bank", model._search.bank.float().contiguous())
        self.register_buffer("bank_sq", model._search.bank_sq.float().contiguous())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = patch_features(self.extractor, images)
        c, h, w = emb.shape[1:]
        queries = emb.permute(0, 2, 3, 1).reshape(-1, c)
        patch = blocked_nearest_distances(queries, self.bank, self.bank_sq).view(-1, h * w)
        scores, maps = scores_and_maps(patch, queries.view(-1, h * w, c), (h, w), self.bank,
                                       self.bank_sq, self.config)
        return scores.float().reshape(-1), maps.float()
