"""How an image of any size and shape becomes model inputs, and how maps come back.

Every model in flawscope scores square ``S x S`` tensors (``S`` = the model's ``image_size``).
A :class:`Geometry`, saved in the model's manifest, says how an image is brought to them:

- ``resize`` (the default, and what a manifest without ``geometry`` means): the whole image
  squashed to ``S x S``. Fast (one model input per image) but distorts elongated parts and
  shrinks small defects: a 4-px defect on a 1024-px photo is 1 px at 256.
- ``keep_aspect``: the image scaled so that its longer side is ``max_side`` (default ``S``),
  the shorter by the same factor, then covered by ``S x S`` tiles.
- ``tile``: the image at a working resolution (its own when ``max_side`` is 0, the default;
  else longer side = ``max_side``) cut into ``S x S`` tiles that overlap by ``overlap``.

``keep_aspect`` and ``tile`` are the same machinery with different working sizes. Every model
keeps seeing ``S x S`` tensors, so every model (PaDiM's per-patch-position statistics
included) and every exported ONNX graph works unchanged (except PaDiM with statistics per
tile position, below, which needs each tile's place and is not exported); no model gets
non-square tensors, whose batching would need grouping by size. Along a side shorter than
``S`` the image is padded to ``S`` by mirroring its own content
(``numpy.pad(mode="symmetric")``): a mirrored part looks like a part to a feature model,
where a constant border would be an edge it never saw in training.
The padded pixels are cut off every tile's map before stitching, so padding can never score.

Stitching: each tile's map is weighted by a window that is 1 in its interior and ramps down
as a raised cosine across the overlap (Preibisch et al. 2009's blending of overlapping
tiles), and the weighted maps are divided by the summed weights. A pixel seen by one tile
keeps that tile's value exactly; where tiles overlap, the tile that sees the pixel farther
from its own border (where a CNN's zero padding distorts features) counts more.

Image score (tiled modes), ``score="tile_max"`` (the default): the maximum over the tiles of
the model's own image score (PatchCore's largest patch distance, or its re-weighted score;
PaDiM's map maximum). A single tile without padding then scores exactly as ``resize`` scores
the same pixels. The alternative ``score="map_max"``, the maximum of the stitched map, was
measured worse: on MVTec toothbrush (512 px, square, so ``keep_aspect`` at 256 px is one tile
holding the very input ``resize`` sees), PatchCore's image AUROC fell from 0.950 to 0.931,
because the map is smoothed (Gaussian, sigma 4) and the smoothing lowers a narrow peak more
than a broad good-image bump. Tile scores do include padded pixels and tile borders, but the
model was fitted on tiles padded and bordered the same way, so those are normal to it; and
mirror padding repeats only pixels of the image (for a model whose map is the pixel values,
the tile maximum is exactly the image maximum; tested).

Fitting in tiled modes runs the model on the tiles of the good images, as if each tile were
an image: PatchCore gets one memory bank over all tiles (the coreset ratio applies to that
larger bank); PaDiM's Gaussian at a position is by default shared by the same position of
every tile, which suits unaligned parts (a tile may show any part of the object) but does not
model where in the image a tile lies. A model may instead keep statistics per tile position
(PaDiM's ``tile_statistics="per_position"``, for aligned parts): the training set is then a
:class:`TileDataset`, which says where each tile lies (:attr:`TileDataset.positions`,
:meth:`TileDataset.common_grid`), and scoring passes each tile's place in the image's
:class:`TileGrid` to :meth:`~flawscope.models.base.AnomalyModel.score_tiles`, which every
model has (the default ignores it).

Example::

    from flawscope.geometry import Geometry, score_image
    g = Geometry("tile", max_side=0, overlap=32)      # native resolution, 32-px overlap
    score, amap = score_image(model, pil_image, g)  # amap: (H, W) at the working resolution
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import as_image, image_to_tensor, open_checked
from .errors import FlawscopeError, TileGridError

MODES = ("resize", "keep_aspect", "tile")
#: Image score of a tiled geometry: the largest tile score, or the stitched map's maximum.
SCORES = ("tile_max", "map_max")


@dataclass(frozen=True)
class Geometry:
    """How images become model inputs (see the module docstring).

    ``max_side``: longer side of the working image in pixels, 0 = the image's own size;
    None = the mode's default (``S`` for ``keep_aspect``, 0 for ``tile``). ``overlap``:
    pixels shared by neighbouring tiles; None = a quarter of the tile. ``score``: the image
    score of a tiled geometry (see the module docstring).
    """

    mode: str = "resize"
    max_side: int | None = None
    overlap: int | None = None
    score: str = "tile_max"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FlawscopeError(f"geometry {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.max_side is not None and (not isinstance(self.max_side, int)
                                          or self.max_side < 0):
            raise FlawscopeError(f"max_side={self.max_side!r}: a number of pixels >= 0 "
                                 "(0 = the image's own size)")
        if self.overlap is not None and (not isinstance(self.overlap, int) or self.overlap < 0):
            raise FlawscopeError(f"overlap={self.overlap!r}: a number of pixels >= 0")
        if self.score not in SCORES:
            raise FlawscopeError(f"score={self.score!r}: choose one of {', '.join(SCORES)}")

    @property
    def tiled(self) -> bool:
        return self.mode != "resize"

    def resolved(self, tile: int) -> Geometry:
        """This geometry with its defaults filled in for tiles of ``tile`` pixels."""
        if not self.tiled:
            return self
        max_side = self.max_side
        if max_side is None:
            max_side = tile if self.mode == "keep_aspect" else 0
        overlap = tile // 4 if self.overlap is None else self.overlap
        if overlap >= tile:
            raise FlawscopeError(f"overlap={overlap}: must be smaller than the tile ({tile} px)")
        return Geometry(self.mode, max_side, overlap, self.score)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Geometry:
        """The manifest's geometry; none recorded (model files before geometry) = resize."""
        record = manifest.get("geometry")
        if record is None:
            return cls()
        if not isinstance(record, dict):
            raise FlawscopeError(f"manifest geometry {record!r}: expected an object")
        unknown = set(record) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise FlawscopeError(f"manifest geometry has unknown fields {sorted(unknown)}")
        return cls(**record)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image the tiles are cut from."""
        if not self.max_side:
            return width, height
        scale = self.max_side / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the tiles along one side of ``length`` pixels: the first at 0, the last
    flush with the end, evenly spaced, neighbours sharing at least ``overlap`` pixels. One
    tile (padded) when the side is not longer than a tile."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(v) for v in np.linspace(0, length - tile, n)]


def _ramp(tile: int, valid: int, overlap: int) -> np.ndarray:
    """Blending weights along one side of a tile: a raised-cosine ramp over ``overlap``
    pixels at each end, 1 between, over the ``valid`` (unpadded) pixels."""
    w = np.ones(valid, dtype=np.float64)
    if overlap > 0 and valid == tile:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w


def working_array(im: Image.Image, geometry: Geometry) -> np.ndarray:
    """The RGB image at the working resolution, float32 ``(H, W, 3)`` in [0, 1] (resampled
    as :func:`flawscope.data.image_to_tensor` does: bilinear, antialiased)."""
    size = geometry.working_size(im.width, im.height)
    if im.size != size:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def layout(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(top, left) of every tile of an image of the working size, row by row."""
    return [(y, x) for y in tile_starts(height, tile, overlap)
            for x in tile_starts(width, tile, overlap)]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie: its working size and every tile's (top, left), row
    by row, as :func:`layout` gives them. Two images have the same grid exactly when they have
    the same working size; a model with statistics per tile position is fitted for one grid
    and scores only images with that grid.

    Example::

        grid = TileGrid.of(1024, 1024, tile=256, overlap=64)
        grid.describe()  # '5 x 5 tiles of 256 px over 1024 x 1024 px'
    """

    height: int
    width: int
    tile: int
    starts: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, height: int, width: int, tile: int, overlap: int) -> TileGrid:
        return cls(height, width, tile, tuple(layout(height, width, tile, overlap)))

    def describe(self) -> str:
        rows = len({y for y, _ in self.starts})
        cols = len({x for _, x in self.starts})
        return (f"{rows} x {cols} tiles of {self.tile} px over {self.width} x {self.height} px")

    def to_dict(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "tile": self.tile,
                "starts": [list(s) for s in self.starts]}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TileGrid:
        return cls(int(record["height"]), int(record["width"]), int(record["tile"]),
                   tuple((int(y), int(x)) for y, x in record["starts"]))


def image_grid(geometry: Geometry, tile: int, width: int, height: int) -> TileGrid:
    """The tile grid of an image of ``width`` x ``height`` pixels in a tiled geometry."""
    g = geometry.resolved(tile)
    w, h = g.working_size(width, height)
    return TileGrid.of(h, w, tile, g.overlap)


def grid_mismatch(grid: TileGrid, fitted: TileGrid) -> str:
    """Why an image with ``grid`` cannot be scored by a model tied to ``fitted``."""
    return (f"its working size ({grid.width} x {grid.height} px) gives {grid.describe()}, but "
            f"the model keeps statistics per tile position for {fitted.describe()}: give "
            "images of the training images' size (parts in the same pose and framing), or "
            "refit with statistics shared by all tiles")


def check_grid(model, geometry: Geometry, width: int, height: int, where: object) -> None:
    """A :class:`~flawscope.errors.TileGridError` naming ``where`` if ``model`` is tied to a
    tile grid (``model.tile_grid``) that an image of ``width`` x ``height`` does not have;
    nothing for every other model. Lets callers refuse such an image before scoring it."""
    fitted = getattr(model, "tile_grid", None)
    if fitted is None or not geometry.tiled:
        return
    grid = image_grid(geometry, model.image_size, width, height)
    if grid != fitted:
        raise TileGridError(f"{where}: {grid_mismatch(grid, fitted)}")


def cut_tile(arr: np.ndarray, top: int, left: int, tile: int) -> torch.Tensor:
    """One ``(3, tile, tile)`` tensor; a side shorter than ``tile`` is mirror-padded."""
    piece = arr[top:top + tile, left:left + tile]
    pad_h, pad_w = tile - piece.shape[0], tile - piece.shape[1]
    if pad_h or pad_w:
        piece = np.pad(piece, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    return torch.from_numpy(np.ascontiguousarray(piece)).permute(2, 0, 1).contiguous()


def stitch(maps: torch.Tensor, starts: Sequence[tuple[int, int]], height: int, width: int,
           overlap: int) -> torch.Tensor:
    """Blend ``(T, S, S)`` tile maps placed at ``starts`` into one ``(height, width)`` map."""
    tile = maps.shape[-1]
    total = torch.zeros(height, width, dtype=torch.float64)
    weight = torch.zeros(height, width, dtype=torch.float64)
    for m, (y, x) in zip(maps, starts, strict=True):
        vh, vw = min(tile, height - y), min(tile, width - x)
        w = torch.from_numpy(np.outer(_ramp(tile, vh, overlap), _ramp(tile, vw, overlap)))
        total[y:y + vh, x:x + vw] += w * m[:vh, :vw].double()
        weight[y:y + vh, x:x + vw] += w
    return (total / weight).float()


@torch.no_grad()
def score_image(model, im: Image.Image, geometry: Geometry, engine=None,
                batch_size: int = 16) -> tuple[float, torch.Tensor]:
    """Score one RGB image with a tiled geometry: ``(score, map (H, W))`` at the working
    resolution (the score as ``geometry.score`` says; see the module docstring)."""
    tile = model.image_size
    g = geometry.resolved(tile)
    arr = working_array(im, g)
    height, width = arr.shape[:2]
    grid = TileGrid.of(height, width, tile, g.overlap)
    starts = grid.starts
    scores, maps = [], []
    for i in range(0, len(starts), batch_size):
        batch = torch.stack([cut_tile(arr, y, x, tile) for y, x in starts[i:i + batch_size]])
        positions = torch.arange(i, i + len(batch))
        s, m = model.score_tiles(batch, grid, positions, engine)
        scores.append(s)
        maps.append(m)
    stitched = stitch(torch.cat(maps), starts, height, width, g.overlap)
    score = stitched.max() if g.score == "map_max" else torch.cat(scores).max()
    return float(score), stitched


@torch.no_grad()
def score_images(model, images: Sequence[Image.Image], geometry: Geometry, engine=None,
                 batch_size: int = 16) -> list[tuple[float, torch.Tensor]]:
    """``(score, map)`` of each RGB image, the map at the working resolution (``S x S`` for
    ``resize``, where the images are scored as one batch exactly as before geometries)."""
    if not geometry.tiled:
        if not images:
            return []
        batch = torch.stack([image_to_tensor(im, model.image_size) for im in images])
        scores, maps = model.score_tensor(batch, engine)
        return [(float(s), m) for s, m in zip(scores, maps, strict=True)]
    return [score_image(model, im, geometry, engine, batch_size) for im in images]


def _image_size(source) -> tuple[int, int]:
    """(width, height) of an image source, from the file header where it is a path."""
    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, np.ndarray):
        return source.shape[1], source.shape[0]
    with open_checked(source, source, min_side=1) as im:
        return im.size


def _describe(source, i: int) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "filename", "") or f"training image {i} (given in memory)"


class TileDataset(torch.utils.data.Dataset):
    """The tiles of images (paths, PIL images or arrays) as ``(3, S, S)`` tensors, image by
    image, each image's tiles in its grid's order: what a model is fitted on in a tiled
    geometry. The last decoded image is cached, so a sequential pass decodes each image once.

    ``grids[i]`` is image ``i``'s :class:`TileGrid`; ``positions[k]`` the index of tile ``k``
    in its image's grid (what a model with statistics per tile position needs).
    """

    def __init__(self, sources: Sequence, geometry: Geometry, size: int):
        self.sources = list(sources)
        self.size = size
        self.geometry = geometry.resolved(size)
        self.index: list[tuple[int, int, int]] = []
        self.positions: list[int] = []
        self.grids: list[TileGrid] = []
        for i, source in enumerate(self.sources):
            width, height = self.geometry.working_size(*_image_size(source))
            grid = TileGrid.of(height, width, size, self.geometry.overlap)
            self.grids.append(grid)
            self.index += [(i, y, x) for y, x in grid.starts]
            self.positions += range(len(grid.starts))
        self._cached: tuple[int, np.ndarray] | None = None

    def common_grid(self) -> TileGrid:
        """The tile grid all the images share; a :class:`~flawscope.errors.TileGridError`
        naming the first image whose grid differs from the first image's."""
        first = self.grids[0]
        for i, grid in enumerate(self.grids):
            if grid != first:
                raise TileGridError(
                    f"{_describe(self.sources[i], i)}: its working size gives "
                    f"{grid.describe()}, but {_describe(self.sources[0], 0)} gives "
                    f"{first.describe()}; statistics per tile position need every image at "
                    "the same size (parts in the same pose and framing)")
        return first

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> torch.Tensor:
        i, y, x = self.index[index]
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, working_array(as_image(self.sources[i]), self.geometry))
        return cut_tile(self._cached[1], y, x, self.size)


def training_dataset(sources: Sequence, geometry: Geometry, size: int):
    """What a model is fitted on: whole images squashed to ``size`` (``resize``) or tiles."""
    from .data import ImageDataset

    if not geometry.tiled:
        return ImageDataset(sources, size)
    return TileDataset(sources, geometry, size)
