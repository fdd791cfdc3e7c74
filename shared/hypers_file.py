"""The hyperparameter file pair written by ``HyperParams.save``.

``STEM.npz`` holds the free arrays (keys ``g0``,
``g1``, ... in group order) and ``STEM.json`` the description (format and
version, layout via ``ParamLayout.to_json``, ``n_iters``, per group its name,
transform, shape and key, the tuned names, the coverage (absent in older files:
all), and the SHA-256 of the ``.npz`` so
that a pair written by different saves is detected). Both are written
atomically (temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from shared.errors import ConfigError
from shared.hypergroup import HyperGroup
from shared.layout import ParamLayout
from shared.records import write_bytes_atomic

FILE_FORMAT = "hyperparams"
FILE_VERSION = 1


def file_paths(path) -> tuple:
    """(STEM.npz, STEM.json) for ``STEM``, ``STEM.npz`` or ``STEM.json``."""
    p = Path(os.fspath(path))
    stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return stem.parent / (stem.name + ".npz"), stem.parent / (stem.name + ".json")


def save(hypers, path) -> None:
    """Write ``STEM.npz`` (free arrays) and ``STEM.json`` (description), atomically."""
    npz_path, json_path = file_paths(path)
    buf = io.BytesIO()
    np.savez(buf, **{f"g{i}": g.free for i, g in enumerate(hypers.groups)})
    data = buf.getvalue()
    desc = {"format": FILE_FORMAT, "version": FILE_VERSION,
            "layout": hypers.layout.to_json(), "n_iters": hypers.n_iters,
            "groups": [{"name": g.name, "transform": g.transform, "shape": g.shape, "key": f"g{i}"}
                       for i, g in enumerate(hypers.groups)],
            "tuned": list(hypers.tuned), "cover": dict(hypers.cover),
            "npz": npz_path.name, "npz_sha256": hashlib.sha256(data).hexdigest()}
    write_bytes_atomic(npz_path, data)
    write_bytes_atomic(json_path, (json.dumps(desc, indent=1) + "\n").encode())

def load(cls, path, layout: Optional[ParamLayout] = None):
    """Read a container written by ``save`` (an instance of ``cls``, ``HyperParams``);
    ConfigError naming the file on any problem.

    With ``layout`` given, the stored layout must equal it.
    """
    npz_path, json_path = file_paths(path)
    try:
        desc = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"hyperparameter file {json_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"hyperparameter file {json_path} is corrupt: {e}") from None
    try:
        if desc.get("format") != FILE_FORMAT or desc.get("version") != FILE_VERSION:
            raise ValueError(f"not a {FILE_FORMAT} v{FILE_VERSION} description "
                             f"(format {desc.get('format')!r}, version {desc.get('version')!r})")
        stored_layout = ParamLayout.from_json(desc["layout"])
        n_iters = desc["n_iters"]
        specs = [(d["name"], d["transform"], d["shape"], d["key"]) for d in desc["groups"]]
        tuned = tuple(desc["tuned"])
        cover = dict(desc.get("cover", {}))      # files written before coverage existed: all
        sha = desc["npz_sha256"]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"hyperparameter file {json_path} is corrupt: {e}") from None
    if layout is not None and layout != stored_layout:
        raise ConfigError(f"hyperparameter file {json_path} was saved for layout {stored_layout.to_json()}, "
                          f"expected {layout.to_json()}")
    try:
        data = npz_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"hyperparameter file {npz_path} is missing") from None
    except OSError as e:
        raise ConfigError(f"hyperparameter file {npz_path} cannot be read: {e}") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise ConfigError(f"hyperparameter file {npz_path} does not match {json_path} "
                          f"(checksum differs: corrupt, or written by another save)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {key: z[key] for _, _, _, key in specs}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"hyperparameter file {npz_path} is corrupt: {e}") from None
    for name, _, _, key in specs:
        if arrays[key].dtype.kind not in "biuf":
            raise ConfigError(f"hyperparameter file {npz_path}: group {name!r} holds {arrays[key].dtype} "
                              "values, not real numbers")
    try:
        groups = tuple(HyperGroup(n, tr, sh, arrays[k]) for n, tr, sh, k in specs)
        return cls(stored_layout, n_iters, groups, tuned, cover)
    except ConfigError as e:
        raise ConfigError(f"hyperparameter files {json_path}/{npz_path.name}: {e}") from None
