"""Reading PyTorch checkpoints for conversion: files, shapes, and a streamed shard-by-shard loop.

A model's converter names its files (`SourceFormat`), finds the input files (`find_shards`: a
`.pt`/`.pth`/`.bin`/`.safetensors` file, a directory, or an index json of shards), reads
every key's shape without loading the weights (`read_shapes`: safetensors headers, an mmap of
each torch zip file), checks them against its tables (`convert.check_table`), then writes
with `stream_convert`: one shard open at a time, each tensor appended to its output
`CheckpointWriter` as soon as it is converted, so memory stays near the largest shard.
Torch files are read with `weights_only=True`; torch and safetensors are imported only here
and only when a file is read (they are needed for conversion, not at run time).
"""
import collections.abc
import contextlib
import dataclasses
import json
import os
import re
import zipfile
from typing import Optional, Sequence

import numpy as np

from research.common.convert import CheckpointWriter, Row
from research.common.errors import UserInputError
from research.common.progress import Progress

OUTPUT_DTYPES = ("keep", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """Where a model family keeps its torch weights.

    `file_names` are looked for, in order, in a directory given as the input. `wrapper_keys`
    are top-level entries of a torch file whose value is the state dict (SAT/DeepSpeed
    `module`, LAVIS `model`); a file with none of them is the state dict itself. With
    `latest_file` (SAT/DeepSpeed), a directory's `latest` file names the iteration folder
    that holds it. `expected` says, in an error, what a file should hold.
    """

    file_names: tuple
    expected: str
    wrapper_keys: tuple = ()
    latest_file: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Shard:
    """One input file: `.safetensors`, or anything `torch.load` reads (`.pt`, `.pth`, `.bin`)."""

    path: str
    source_format: SourceFormat

    @property
    def is_safetensors(self):
        return self.path.endswith(".safetensors")

    def shapes(self):
        """{key: shape}, from the safetensors header or an mmap of a torch zip file."""
        if self.is_safetensors:
            with _open_safetensors(self.path) as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        with self.tensors() as tensors:
            return {key: tuple(value.shape) for key, value in tensors.items()}

    @contextlib.contextmanager
    def tensors(self):
        """{key: tensor} of this file for the `with` block, read on access where the format allows.

        Torch zip files are mmap'ed (legacy non-zip files are read whole); safetensors tensors
        are read one `[key]` at a time, bfloat16 ones through torch since numpy lacks the type.
        """
        if not self.is_safetensors:
            yield _load_torch_state_dict(self.path, self.source_format)
            return
        with _open_safetensors(self.path) as handle:
            bfloat16 = any(handle.get_slice(key).get_dtype() == "BF16" for key in handle.keys())
        with _open_safetensors(self.path, "pt" if bfloat16 else "numpy") as handle:
            yield _SafetensorsTensors(handle)


class _SafetensorsTensors(collections.abc.Mapping):
    """An open safetensors file as a mapping that reads a tensor when it is looked up."""

    def __init__(self, handle):
        self._handle = handle

    def __getitem__(self, key):
        return self._handle.get_tensor(key)

    def __iter__(self):
        return iter(self._handle.keys())

    def __len__(self):
        return len(self._handle.keys())


@contextlib.contextmanager
def _open_safetensors(path, framework="numpy"):
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework=framework)
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise UserInputError(f"cannot read {path} as a safetensors file ({_one_line(err)})") from err
    with handle:
        yield handle


def _load_torch_state_dict(path, source_format: SourceFormat):
    """{key: tensor} of a torch file: the entry under a wrapper key, or the file's own dict."""
    import torch

    # SAT files may also hold numpy RNG states: allow numpy's array unpickling, nothing else:
    # its reconstruct function (numpy.core or numpy._core, by version), ndarray and the dtypes.
    numpy_array_globals = [np.ndarray.__reduce__(np.zeros(0))[0], np.ndarray, np.dtype]
    numpy_array_globals += [type(np.dtype(code))
                            for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]]
    try:
        with torch.serialization.safe_globals(numpy_array_globals):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True,
                                    mmap=zipfile.is_zipfile(path))
    except Exception as err:  # pickle, zip and torch errors alike: the file is unusable
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        if blocked:
            raise UserInputError(
                f"refused {path}: loading it would call or build {blocked.group(1)}, which is not "
                f"a tensor (a pickle that runs code when opened, or holds other objects); only "
                f"tensors are read from torch files. Save a plain state_dict or safetensors "
                f"instead") from err
        raise UserInputError(f"cannot read {path} as a PyTorch checkpoint ({_one_line(err)})") from err
    state_dict = None
    if isinstance(checkpoint, dict):
        wrapped = [checkpoint[key] for key in source_format.wrapper_keys if key in checkpoint]
        state_dict = wrapped[0] if wrapped else checkpoint
    if not (isinstance(state_dict, dict) and state_dict
            and all(isinstance(value, torch.Tensor) for value in state_dict.values())):
        found = (", ".join(map(str, list(checkpoint)[:10])) if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise UserInputError(f"{path} holds no weights: expected {source_format.expected}, "
                             f"found top-level entries: {found or 'none'}")
    return state_dict


def _one_line(err):
    """The first line of an exception's text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no details'}"


def find_shards(path, source_format: SourceFormat, what="checkpoint path"):
    """The input files of `path` (`what` names it in errors), in the order they are converted."""
    if not os.path.exists(path):
        raise UserInputError(f"{what} not found: {path}")
    if os.path.isdir(path):
        path = _checkpoint_in_directory(path, source_format)
    if not path.endswith(".json"):
        return [Shard(path, source_format)]
    try:
        with open(path, encoding="utf-8") as stream:
            weight_map = json.load(stream)["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserInputError(
            f"{path} is not a checkpoint index with a 'weight_map' ({_one_line(err)})") from err
    shards = [Shard(os.path.join(os.path.dirname(path), name), source_format) for name in files]
    absent = [shard.path for shard in shards if not os.path.isfile(shard.path)]
    if absent:
        raise UserInputError(f"{path} names shard file(s) that do not exist: {', '.join(absent)}")
    return shards


def _checkpoint_in_directory(directory, source_format: SourceFormat):
    latest = os.path.join(directory, "latest")
    if source_format.latest_file and os.path.isfile(latest):
        with open(latest, encoding="utf-8") as stream:
            tag = stream.read().strip()
        path = os.path.join(directory, tag, source_format.latest_file)
        if not os.path.isfile(path):
            raise UserInputError(f"{latest} names iteration {tag!r}, but {path} does not exist")
        return path
    for name in source_format.file_names:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    looked_for = ((["'latest' (SAT)"] if source_format.latest_file else [])
                  + list(source_format.file_names))
    raise UserInputError(f"{directory} holds no checkpoint: looked for {', '.join(looked_for)}")


def read_shapes(shards):
    """First pass: {key: shape} of all shards, and {shard path: its keys}."""
    shapes, keys_by_shard = {}, {}
    with Progress(len(shards), "reading shapes", unit="files") as progress:
        for shard in shards:
            shard_shapes = shard.shapes()
            repeated = sorted(shard_shapes.keys() & shapes.keys())
            if repeated:
                raise UserInputError(f"{shard.path}: key(s) also found in an earlier shard: "
                                     f"{', '.join(repeated[:10])}")
            shapes.update(shard_shapes)
            keys_by_shard[shard.path] = set(shard_shapes)
            progress.update()
    return shapes, keys_by_shard


def check_outputs(paths, dtype, note=""):
    """The output paths all differ and none is a directory; `dtype` is one of OUTPUT_DTYPES.

    `note` follows "output paths must all differ" (e.g. which path the caller derived).
    """
    if dtype not in OUTPUT_DTYPES:
        raise UserInputError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if len({os.path.abspath(path) for path in paths}) < len(paths):
        raise UserInputError(f"output paths must all differ{note}: {', '.join(paths)}")
    for path in paths:
        if os.path.isdir(path):
            raise UserInputError(f"output path is a directory, expected a .ckpt file name: {path}")


def to_numpy(value):
    """A torch tensor or numpy array as numpy; bfloat16 (which numpy lacks) becomes float32."""
    if isinstance(value, np.ndarray):
        return value
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
        value = value.float()
    return value.numpy()


def _cast(value, dtype):
    """`value` as `dtype` ('keep' or a numpy float name); non-float tensors are left alone."""
    if dtype == "keep" or not np.issubdtype(value.dtype, np.floating):
        return value
    return value.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class Output:
    """One checkpoint a conversion writes: its name in the report, its path and its rows; with
    `shard_paths`, its rows are taken from those input files only (a conversion of several
    upstream files whose key names could meet)."""

    label: str
    path: str
    rows: Sequence[Row]
    shard_paths: Optional[frozenset] = None


@dataclasses.dataclass(frozen=True)
class WrittenCheckpoint:
    """What one output file received."""

    label: str
    path: str
    num_tensors: int
    num_parameters: int
    dtypes: tuple


@dataclasses.dataclass(frozen=True)
class ConvertedOutput:
    """A checkpoint whose tensors are converted in memory already ({name: array}): for sources
    that need several tensors per parameter (LAVIS' q/v biases, its separate q/k/v)."""

    label: str
    path: str
    arrays: dict


def stream_convert(shards, keys_by_shard, outputs: Sequence[Output], dtype="keep",
                   converted: Sequence[ConvertedOutput] = ()):
    """Second pass: write the `converted` outputs, then convert every row of `outputs` shard by
    shard; returns WrittenCheckpoints (the converted ones first).

    Call it after the tables were checked against `read_shapes`. `dtype` is one of
    OUTPUT_DTYPES. The outputs appear only when every one of them is complete.
    """
    with contextlib.ExitStack() as stack:
        ready = [stack.enter_context(CheckpointWriter(output.path)) for output in converted]
        writers = [stack.enter_context(CheckpointWriter(output.path)) for output in outputs]
        total = sum(len(output.arrays) for output in converted) + sum(len(output.rows) for output in outputs)
        progress = stack.enter_context(Progress(total, "converting", unit="tensors"))
        for output, writer in zip(converted, ready):
            for name, value in output.arrays.items():
                writer.write(name, _cast(np.asarray(value), dtype))
                progress.update()
        for shard in shards:
            _convert_shard(shard, keys_by_shard[shard.path], outputs, writers, dtype, progress)
    return tuple(WrittenCheckpoint(output.label, output.path, writer.num_tensors,
                                   writer.num_elements, tuple(sorted(writer.dtypes)))
                 for output, writer in zip(list(converted) + list(outputs), ready + writers))


def _convert_shard(shard, keys, outputs, writers, dtype, progress):
    """Convert the rows whose source is in `shard` and append them to their writers.

    A function of its own so that nothing of this shard is referenced once it returns, before
    the next shard is opened.
    """
    with shard.tensors() as tensors:
        for output, writer in zip(outputs, writers):
            if output.shard_paths is not None and shard.path not in output.shard_paths:
                continue
            for row in output.rows:
                if row.source in keys:
                    value = row.apply(to_numpy(tensors[row.source]))
                    writer.write(row.target, _cast(value, dtype))
                    progress.update()


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """The summary printed at the end of a conversion; `source` describes the input."""

    source: str
    num_input_files: int
    outputs: tuple
    seconds: float

    def lines(self):
        lines = [f"input: {self.num_input_files} file(s), {self.source}"]
        for out in self.outputs:
            lines.append(f"{out.label:<22} {out.num_tensors:5d} tensors "
                         f"{out.num_parameters:>15,d} parameters  {'/'.join(out.dtypes)}  -> {out.path}")
        lines.append(f"converted in {self.seconds:.1f} s")
        return lines
