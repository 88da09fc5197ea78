"""Saving and loading fitted models: safetensors weights plus a JSON manifest.

A model directory holds ``weights.safetensors`` and ``manifest.json``. The manifest names the
model, its config and preset, the flawscope version and format version, the decision
threshold, the image geometry (:mod:`flawscope.geometry`; absent means ``resize``) and a
SHA-256 of the weights file. Loading checks the checksum and the format
version and never executes code from the files (no pickle anywhere). Saving is atomic: the
new directory is written beside the old one (other files of the old one, such as training
pictures, are hard-linked into it, so the old one is never touched) and swapped in with two
renames. A crash between those renames leaves the old directory under a hidden name, which
the next load or save renames back, so a crash at any point leaves the previous model intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import FlawscopeError, ModelFileError
from .models import AnomalyModel, get_model_class

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recover(directory: Path) -> None:
    """Undo a save that crashed between moving the old directory aside and moving the new
    one in; and remove half-written leftovers of crashed saves."""
    if not directory.exists():
        olds = sorted(directory.parent.glob(f".{directory.name}.old-*"),
                      key=lambda p: p.stat().st_mtime)
        if olds and (olds[-1] / MANIFEST).is_file():
            log.warning("%s: restoring the previous model after an interrupted save", directory)
            os.replace(olds[-1], directory)
    if directory.exists():
        for leftover in directory.parent.glob(f".{directory.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (file or folder) to ``dst``, copying where links are impossible."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(str(src), str(dst))


def save_model(model: AnomalyModel, directory: str | Path,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically; ``extra`` adds manifest fields
    (e.g. ``threshold``, ``calibration``, ``fit_info``)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_tensors().items()}
    save_file(tensors, str(tmp / WEIGHTS))
    manifest = {
        "format_version": FORMAT_VERSION,
        "flawscope_version": __version__,
        "model": model.name,
        "preset": model.preset,
        "image_size": model.image_size,
        "config": model.config_dict(),
        "extra_state": model.extra_state(),
        "weights_sha256": _sha256(tmp / WEIGHTS),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Keep fields that belong to the directory (threshold, calibration) across re-saves.
    if (directory / MANIFEST).is_file():
        try:
            old = json.loads((directory / MANIFEST).read_text())
            for key in ("threshold", "calibration", "fit_info"):
                if key in old:
                    manifest.setdefault(key, old[key])
        except (OSError, json.JSONDecodeError):
            pass
    manifest.update(extra or {})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    # safetensors writes its file owner-only (0600); whoever may read the manifest (another
    # service account reading a copied model) must be able to read the weights too.
    os.chmod(tmp / WEIGHTS, (tmp / MANIFEST).stat().st_mode & 0o777)
    # Carry over files other tools left in the model dir (training pictures, checkpoints).
    if directory.is_dir():
        for item in directory.iterdir():
            if item.name not in (WEIGHTS, MANIFEST) and not (tmp / item.name).exists():
                _link_or_copy(item, tmp / item.name)
    old_dir = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old_dir)
    os.replace(tmp, directory)
    shutil.rmtree(old_dir, ignore_errors=True)
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of a model directory."""
    directory = Path(directory)
    _recover(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelFileError(f"{directory}: not a flawscope model directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or "model" not in manifest:
        raise ModelFileError(f"{path}: manifest has no 'model' field")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format {version!r} is newer than this "
                             f"flawscope ({__version__}) understands (format {FORMAT_VERSION}); "
                             "upgrade flawscope to load it")
    return manifest


def update_manifest(directory: str | Path, **fields: Any) -> None:
    """Change manifest fields in place (atomically), e.g. a new threshold."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest.update(fields)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


def load_model(directory: str | Path) -> tuple[AnomalyModel, dict[str, Any]]:
    """Load a saved model and its manifest, verifying the weights' checksum."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"{directory}: missing {WEIGHTS}")
    if _sha256(weights) != manifest.get("weights_sha256"):
        raise ModelFileError(f"{weights}: checksum does not match the manifest "
                             "(file corrupt or modified)")
    cls = get_model_class(manifest["model"])
    try:
        config = cls.Config(**manifest.get("config", {}))
    except TypeError as exc:
        raise ModelFileError(f"{directory / MANIFEST}: config does not fit model "
                             f"{cls.name!r} ({exc})") from None
    model = cls(config)
    model.preset = manifest.get("preset")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{weights}: unreadable weights ({exc})") from None
    try:
        model.load_state_tensors(tensors)
    except ModelFileError:
        raise
    except FlawscopeError as exc:
        raise ModelFileError(f"{weights}: {exc}") from None
    model.load_extra_state(manifest.get("extra_state", {}))
    return model, manifest


