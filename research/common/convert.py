"""Checkpoint conversion helpers shared by the three models.

A conversion is an explicit table of rows (source name, target name, expected shape,
transform), as in nanoGPT's `from_pretrained`: every source key must be claimed by a row or
listed as ignorable, every row must find its key with the expected shape, and anything else
is an error that lists the offending names.
"""
import dataclasses
import os
import tempfile
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from research.common.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Row:
    """One source tensor -> one target parameter."""

    source: str
    target: str
    shape: tuple  # shape expected in the source checkpoint
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None


def apply_table(source: Mapping[str, np.ndarray], rows: Sequence[Row], ignore: Sequence[str] = (),
                what="checkpoint", strict=True):
    """Convert `source` by `rows`; returns {target: array}.

    With `strict`, keys of `source` that no row claims (and that are not in `ignore`) are an
    error; callers that convert one part of a bigger checkpoint pass strict=False and check
    the leftovers themselves with `unclaimed_keys`.
    """
    missing = [row.source for row in rows if row.source not in source]
    if missing:
        raise UserInputError(
            f"{what}: {len(missing)} expected key(s) missing: {_listing(missing)}")
    bad_shapes = [f"{row.source}: expected {tuple(row.shape)}, found {tuple(source[row.source].shape)}"
                  for row in rows if tuple(source[row.source].shape) != tuple(row.shape)]
    if bad_shapes:
        raise UserInputError(
            f"{what}: {len(bad_shapes)} tensor(s) have the wrong shape (is this checkpoint for "
            f"another model size?): {_listing(bad_shapes)}")
    if strict:
        unknown = unclaimed_keys(source, [rows], ignore)
        if unknown:
            raise UserInputError(f"{what}: {len(unknown)} unknown key(s): {_listing(unknown)}")
    converted = {}
    for row in rows:
        value = np.asarray(source[row.source])
        converted[row.target] = row.transform(value) if row.transform else value
    return converted


def unclaimed_keys(source, tables, ignore=()):
    """Keys of `source` claimed by no row of any table and not in `ignore`."""
    claimed = {row.source for rows in tables for row in rows} | set(ignore)
    return sorted(key for key in source if key not in claimed)


def _listing(names, limit=20):
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def per_head_qkv_to_contiguous(value, num_heads):
    """Fused qkv rows from per-head [heads, 3, d] (HF ChatGLM-6B) to contiguous [3, heads, d]."""
    rest = value.shape[1:]
    head_dim = value.shape[0] // (3 * num_heads)
    value = value.reshape(num_heads, 3, head_dim, *rest)
    return np.ascontiguousarray(np.swapaxes(value, 0, 1)).reshape(3 * num_heads * head_dim, *rest)


def save_checkpoint_atomic(params: Mapping[str, np.ndarray], path, dtype=None):
    """Write a MindSpore checkpoint through a temp file and a rename, so no half file is left."""
    import mindspore as ms

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    entries = []
    for name, value in params.items():
        value = np.asarray(value)
        if dtype is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        entries.append({"name": name, "data": ms.Tensor(value)})
    handle, tmp_path = tempfile.mkstemp(suffix=".tmp.ckpt", dir=directory)
    os.close(handle)
    try:
        ms.save_checkpoint(entries, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
