"""Checkpoint conversion helpers shared by the three models.

A conversion is an explicit table of rows (source name, target name, expected shape,
transform), as in nanoGPT's `from_pretrained`: every source key must be claimed by a row or
listed as ignorable, every row must find its key with the expected shape, and anything else
is an error that lists the offending names.

`check_table` runs those checks on {key: shape} alone, so a converter can validate a whole
checkpoint from its headers before reading any weights, then convert shard by shard and
stream the results into a `.ckpt` with `CheckpointWriter`. `check_names_and_shapes` is the one
names-and-shapes checker behind it and behind loading parameters into a network
(`checkpoint.copy_params`).
"""
import contextlib
import dataclasses
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from research.common.atomic import atomic_write
from research.common.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Row:
    """One source tensor -> one target parameter."""

    source: str
    target: str
    shape: tuple  # shape expected in the source checkpoint
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def apply(self, value):
        """The target value for source `value`."""
        return self.transform(value) if self.transform else value


def apply_table(source: Mapping[str, np.ndarray], rows: Sequence[Row], ignore: Sequence[str] = (),
                what="checkpoint", strict=True):
    """Convert `source` by `rows`; returns {target: array}.

    With `strict`, keys of `source` that no row claims (and that are not in `ignore`) are an
    error; callers that convert one part of a bigger checkpoint pass strict=False and check
    the leftovers themselves with `unclaimed_keys` (claimed: the rows' sources).
    """
    check_table({key: tuple(value.shape) for key, value in source.items()}, rows, ignore,
                what=what, strict=strict)
    return {row.target: row.apply(np.asarray(source[row.source])) for row in rows}


def check_table(shapes: Mapping[str, tuple], rows: Sequence[Row], ignore: Sequence[str] = (),
                what="checkpoint", strict=True):
    """One UserInputError naming every missing key, wrong shape and (with `strict`) unknown key.

    `shapes` is {source key: shape}; no tensor data is needed.
    """
    check_names_and_shapes({row.source: row.shape for row in rows}, shapes, what, CHECKPOINT_KEYS,
                           ignore=ignore, strict=strict)


@dataclasses.dataclass(frozen=True)
class MismatchWords:
    """How an error of `check_names_and_shapes` words its three lists, after their counts."""

    wrong_shape: str
    missing: str
    unknown: str
    expected_side: str  # names the expected shape of a mismatch
    found_side: str  # names the shape found


# A source checkpoint checked against a conversion table.
CHECKPOINT_KEYS = MismatchWords(
    wrong_shape="tensor(s) have the wrong shape (is this checkpoint for another model size?)",
    missing="expected key(s) missing", unknown="unknown key(s)",
    expected_side="expected", found_side="found")
# A checkpoint's parameters checked against a network's (callers name the checkpoint
# in found_side).
MODEL_PARAMETERS = MismatchWords(
    wrong_shape="shape mismatch(es)", missing="model parameter(s) missing",
    unknown="name(s) the model does not have", expected_side="model", found_side="checkpoint")


def check_names_and_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], title: str,
                           words: MismatchWords, optional: Sequence[str] = (),
                           ignore: Sequence[str] = (), strict=True):
    """One UserInputError, starting with `title`, that names every wrong shape, every missing
    name and (with `strict`) every unknown name of `found` against `expected` ({name: shape}).

    Names starting with a prefix in `optional` may be missing; names in `ignore` are not unknown.
    """
    bad_shapes = [f"{name}: {words.expected_side} {tuple(shape)}, "
                  f"{words.found_side} {tuple(found[name])}"
                  for name, shape in expected.items()
                  if name in found and tuple(found[name]) != tuple(shape)]
    missing = [name for name in expected
               if name not in found and not name.startswith(tuple(optional))]
    unknown = unclaimed_keys(found, expected, ignore) if strict else []
    problems = [f"{len(names)} {label}: {_listing(names)}"
                for names, label in ((bad_shapes, words.wrong_shape), (missing, words.missing),
                                     (unknown, words.unknown)) if names]
    if problems:
        raise UserInputError(f"{title}: " + "; ".join(problems))


def unclaimed_keys(source, claimed, ignore=()):
    """Keys of `source`, sorted, that are neither in `claimed` nor in `ignore`."""
    claimed = set(claimed) | set(ignore)
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


# MindSpore's own slice size: each protobuf entry stays far below protobuf's 2 GiB limit.
SLICE_BYTES = 512 * 1024 * 1024

# numpy dtype -> `tensor_type` string of MindSpore's checkpoint (str() of the MindSpore dtype).
_CKPT_TENSOR_TYPES = {np.dtype(np.float16): "Float16", np.dtype(np.float32): "Float32",
                      np.dtype(np.float64): "Float64", np.dtype(np.int8): "Int8",
                      np.dtype(np.int16): "Int16", np.dtype(np.int32): "Int32",
                      np.dtype(np.int64): "Int64", np.dtype(np.uint8): "UInt8",
                      np.dtype(np.bool_): "Bool"}


class CheckpointWriter:
    """Appends tensors one at a time to a MindSpore `.ckpt`, so no whole model is held in memory.

    A `.ckpt` is the protobuf `Checkpoint { repeated Value value }`; serialized one-entry
    messages concatenate into a valid file, and MindSpore's loader joins consecutive entries
    with the same tag, so a large tensor goes out in slices as `ms.save_checkpoint` writes it.
    The data goes through `atomic_write`: a failed run never leaves a half checkpoint (or
    clobbers an older one) under the final name.
    """

    def __init__(self, path, slice_bytes=SLICE_BYTES):
        self.path = path
        self.slice_bytes = slice_bytes
        self.num_tensors = 0
        self.num_elements = 0
        self.dtypes = set()
        self._names = set()
        self._checkpoint_message = None
        self._file = None
        self._open_file = contextlib.ExitStack()

    def __enter__(self):
        from mindspore.train.checkpoint_pb2 import Checkpoint

        self._checkpoint_message = Checkpoint
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = self._open_file.enter_context(atomic_write(self.path))
        return self

    def write(self, name, value):
        """Append `value` (a numpy array) as parameter `name`."""
        value = np.ascontiguousarray(value)
        tensor_type = _CKPT_TENSOR_TYPES.get(value.dtype)
        if tensor_type is None:
            raise ValueError(f"{name}: dtype {value.dtype} cannot be written to a MindSpore "
                             f"checkpoint (supported: {sorted(map(str, _CKPT_TENSOR_TYPES))})")
        if name in self._names:
            raise ValueError(f"{name} is written twice to {self.path}")
        self._names.add(name)
        data = memoryview(value.reshape(-1).view(np.uint8))
        for start in range(0, max(len(data), 1), self.slice_bytes):
            message = self._checkpoint_message()
            entry = message.value.add()
            entry.tag = name
            entry.tensor.dims.extend(value.shape)
            entry.tensor.tensor_type = tensor_type
            entry.tensor.tensor_content = data[start:start + self.slice_bytes].tobytes()
            self._file.write(message.SerializeToString())
        self.num_tensors += 1
        self.num_elements += value.size
        self.dtypes.add(str(value.dtype))

    def __exit__(self, exc_type, exc_value, traceback):
        return self._open_file.__exit__(exc_type, exc_value, traceback)


def save_checkpoint_atomic(params: Mapping[str, np.ndarray], path, dtype=None):
    """Write {name: array} as a MindSpore checkpoint, floating arrays cast to `dtype` if given."""
    with CheckpointWriter(path) as writer:
        for name, value in params.items():
            value = np.asarray(value)
            if dtype is not None and np.issubdtype(value.dtype, np.floating):
                value = value.astype(dtype)
            writer.write(name, value)
