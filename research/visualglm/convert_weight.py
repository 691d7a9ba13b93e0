"""Weight conversion for VisualGLM: SAT or Hugging Face checkpoints -> MindSpore checkpoints.

    python -m research.visualglm.convert_weight --torch_path TORCH_CKPT \\
        --vit_mindspore_path VIT.ckpt --qformer_mindspore_path QFORMER.ckpt \\
        --glm_mindspore_path GLM.ckpt

`--torch_path` is a SAT checkpoint (`mp_rank_00_model_states.pt`, or its directory with a
`latest` file) or a Hugging Face visualglm-6b directory / index json (`.bin` or
`.safetensors` shards); which one it is follows from the key names. The outputs are the ViT
(+ ln_vision), the Q-Former (+ glm_proj), the GLM, and `glm_6b_for_lite.ckpt` beside the GLM
file with only the word embeddings (the Lite runner embeds the prompt with it).

Every source tensor goes through an explicit table: every parameter of our model, the key it
comes from and the shape that key must have. SAT checkpoints keep the GLM's fused qkv rows
contiguous ([Q | K | V]), as our model does; HF ChatGLM-6B / visualglm-6b files interleave
them per head and are permuted on the way in.

The conversion streams: a first pass reads only shapes (index and safetensors headers, or an
mmap of each torch file) and checks every key and shape before anything is written; the
second pass opens one shard at a time and appends each converted tensor straight to its
output file, so memory stays near the largest shard, not the whole 7.8B-parameter model.
"""
import argparse
import collections.abc
import contextlib
import dataclasses
import json
import os
import time
import zipfile

import numpy as np

from research.common.convert import (CheckpointWriter, Row, apply_table, check_table,
                                     per_head_qkv_to_contiguous)
from research.common.errors import UserInputError
from research.common.progress import Progress
from research.common.qformer import rows_from_sat_qformer
from research.common.runtime import cli_main
from research.common.vision import rows_from_sat_eva_vit
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.configuration_visualglm import VisualGLMConfig, load_visualglm_config

GLM_LAYOUTS = ("sat", "hf")


def glm_rows(config: GLMConfig, layout: str):
    """The GLM conversion table for `layout` ('sat' or 'hf')."""
    if layout not in GLM_LAYOUTS:
        raise ValueError(f"layout must be one of {GLM_LAYOUTS}, got {layout!r}")
    hidden, inner = config.hidden_size, config.num_heads * config.head_dim
    ffn, heads = config.inner_hidden_size, config.num_heads

    def qkv(value):
        return per_head_qkv_to_contiguous(value, heads) if layout == "hf" else value

    rows = [Row("transformer.word_embeddings.weight", "transformer.word_embeddings.embedding_table",
                (config.vocab_size, hidden))]
    for i in range(config.num_layers):
        src, dst = f"transformer.layers.{i}.", f"transformer.layers.{i}."
        rows += [
            Row(src + "input_layernorm.weight", dst + "input_layernorm.gamma", (hidden,)),
            Row(src + "input_layernorm.bias", dst + "input_layernorm.beta", (hidden,)),
            Row(src + "attention.query_key_value.weight", dst + "attention.query_key_value.weight",
                (3 * inner, hidden), qkv),
            Row(src + "attention.query_key_value.bias", dst + "attention.query_key_value.bias",
                (3 * inner,), qkv),
            Row(src + "attention.dense.weight", dst + "attention.dense.weight", (hidden, inner)),
            Row(src + "attention.dense.bias", dst + "attention.dense.bias", (hidden,)),
            Row(src + "post_attention_layernorm.weight", dst + "post_attention_layernorm.gamma", (hidden,)),
            Row(src + "post_attention_layernorm.bias", dst + "post_attention_layernorm.beta", (hidden,)),
            Row(src + "mlp.dense_h_to_4h.weight", dst + "mlp.dense_h_to_4h.weight", (ffn, hidden)),
            Row(src + "mlp.dense_h_to_4h.bias", dst + "mlp.dense_h_to_4h.bias", (ffn,)),
            Row(src + "mlp.dense_4h_to_h.weight", dst + "mlp.dense_4h_to_h.weight", (hidden, ffn)),
            Row(src + "mlp.dense_4h_to_h.bias", dst + "mlp.dense_4h_to_h.bias", (hidden,)),
        ]
    rows += [
        Row("transformer.final_layernorm.weight", "transformer.final_layernorm.gamma", (hidden,)),
        Row("transformer.final_layernorm.bias", "transformer.final_layernorm.beta", (hidden,)),
        Row("mixins.chatglm-final.lm_head.weight" if layout == "sat" else "lm_head.weight",
            "lm_head.weight", (config.vocab_size, hidden)),
    ]
    return rows


def glm_ignored_keys(config: GLMConfig, layout: str):
    """Rotary inverse-frequency buffers: the model recomputes them (HF keeps one per layer)."""
    if layout == "hf":
        return tuple(f"transformer.layers.{i}.attention.rotary_emb.inv_freq"
                     for i in range(config.num_layers))
    return ("mixins.chatglm-attn.rotary_emb.inv_freq",)


def convert_glm_state_dict(state_dict, config: GLMConfig, layout: str, strict=True):
    """{source key: array} of a GLM-6B checkpoint -> {our parameter name: array}."""
    return apply_table(state_dict, glm_rows(config, layout), glm_ignored_keys(config, layout),
                       what=f"GLM weights ({layout} layout)", strict=strict)


DEFAULT_CONFIG = "run_visualglm_6b_image_to_text_generation.yaml"
LITE_CHECKPOINT = "glm_6b_for_lite.ckpt"
LITE_PARAMETER = "transformer.word_embeddings.embedding_table"
SAT_FILE = "mp_rank_00_model_states.pt"
HF_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
            "model.safetensors", "pytorch_model.bin")

# Where each layout keeps the image model (EVA-ViT, Q-Former, glm_proj) and lm_head.
IMAGE_PREFIXES = {"sat": "mixins.eva.model.", "hf": "transformer.image_encoder."}
LM_HEAD_KEYS = {"sat": "mixins.chatglm-final.lm_head.weight", "hf": "lm_head.weight"}
LAYOUT_NAMES = {"sat": "SAT (SwissArmyTransformer) VisualGLM-6B",
                "hf": "Hugging Face THUDM/visualglm-6b"}
DEFAULT_QKV_LAYOUTS = {"sat": "contiguous", "hf": "per_head"}
QKV_LAYOUTS = ("auto", "contiguous", "per_head")
OUTPUT_DTYPES = ("keep", "float32", "float16")
PART_NAMES = {"vit": "ViT + ln_vision", "qformer": "Q-Former + glm_proj", "glm": "GLM",
              "lite": "GLM embeddings (Lite)"}


def glm_rows_with_qkv(config: GLMConfig, layout: str, qkv_layout: str):
    """`glm_rows` with the key names of `layout` but the fused-qkv order `qkv_layout`.

    For checkpoints whose qkv order is not the one their key names suggest (`--qkv_layout`).
    """
    qkv_transforms = {row.target: row.transform
                      for row in glm_rows(config, "hf" if qkv_layout == "per_head" else "sat")}
    return [dataclasses.replace(row, transform=qkv_transforms[row.target])
            for row in glm_rows(config, layout)]


def visualglm_tables(config: VisualGLMConfig, layout: str, qkv_layout: str):
    """{output part: rows} for 'vit', 'qformer' (with glm_proj), 'glm' and 'lite'.

    Targets are the parameter names the checkpoints are loaded with: `visual_encoder.` +
    EvaViT's, `qformer.` + QFormer's and `glm_proj.*`, GLMForConditionalGeneration's.
    """
    image = IMAGE_PREFIXES[layout]

    def under(prefix, rows):
        return [dataclasses.replace(row, target=prefix + row.target) for row in rows]

    text_hidden, query_hidden = config.text_config.hidden_size, config.qformer_config.hidden_size
    glm = glm_rows_with_qkv(config.text_config, layout, qkv_layout)
    return {
        "vit": under("visual_encoder.", rows_from_sat_eva_vit(config.vision_config, image + "vit.")),
        "qformer": under("qformer.", rows_from_sat_qformer(config.qformer_config, image + "qformer."))
        + [Row(image + "glm_proj.weight", "glm_proj.weight", (text_hidden, query_hidden)),
           Row(image + "glm_proj.bias", "glm_proj.bias", (text_hidden,))],
        "glm": glm,
        "lite": [row for row in glm if row.target == LITE_PARAMETER],
    }


def detect_layout(keys):
    """'sat' or 'hf', from where the checkpoint keeps its image model and lm_head."""
    found = {layout for layout, prefix in IMAGE_PREFIXES.items()
             if any(key.startswith(prefix) for key in keys)}
    found |= {layout for layout, key in LM_HEAD_KEYS.items() if key in keys}
    if len(found) == 1:
        return found.pop()
    if found:
        markers = list(IMAGE_PREFIXES.values()) + list(LM_HEAD_KEYS.values())
        raise UserInputError(f"the checkpoint mixes SAT and Hugging Face key names ({', '.join(markers)})")
    raise UserInputError(
        f"not a VisualGLM checkpoint: no key starts with {' or '.join(IMAGE_PREFIXES.values())} and "
        f"there is no {' or '.join(LM_HEAD_KEYS.values())} (first keys: {', '.join(sorted(keys)[:5])})")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One input file: `.safetensors`, or anything else `torch.load` reads (`.pt`, `.bin`)."""

    path: str

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
            yield _load_torch_state_dict(self.path)
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


def _load_torch_state_dict(path):
    """{key: tensor} of a torch file: SAT's `module` entry, or a Hugging Face state dict."""
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
        raise UserInputError(f"cannot read {path} as a PyTorch checkpoint ({_one_line(err)})") from err
    state_dict = checkpoint.get("module", checkpoint) if isinstance(checkpoint, dict) else None
    if not (isinstance(state_dict, dict) and state_dict
            and all(isinstance(value, torch.Tensor) for value in state_dict.values())):
        found = (", ".join(map(str, list(checkpoint)[:10])) if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise UserInputError(
            f"{path} holds no weights: expected a SAT checkpoint (tensors under 'module') or a "
            f"Hugging Face {{name: tensor}} state dict, found top-level entries: {found or 'none'}")
    return state_dict


def _one_line(err):
    """The telling line of an exception (torch's weights-only refusals span many lines)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # the reason follows this marker
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no details'}"


def find_shards(torch_path):
    """The input files of `--torch_path`, in the order they are converted."""
    if not os.path.exists(torch_path):
        raise UserInputError(f"--torch_path not found: {torch_path}")
    path = _checkpoint_in_directory(torch_path) if os.path.isdir(torch_path) else torch_path
    if not path.endswith(".json"):
        return [Shard(path)]
    try:
        with open(path, encoding="utf-8") as stream:
            weight_map = json.load(stream)["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserInputError(
            f"{path} is not a checkpoint index with a 'weight_map' ({_one_line(err)})") from err
    shards = [Shard(os.path.join(os.path.dirname(path), name)) for name in files]
    absent = [shard.path for shard in shards if not os.path.isfile(shard.path)]
    if absent:
        raise UserInputError(f"{path} names shard file(s) that do not exist: {', '.join(absent)}")
    return shards


def _checkpoint_in_directory(directory):
    latest = os.path.join(directory, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as stream:
            tag = stream.read().strip()
        path = os.path.join(directory, tag, SAT_FILE)
        if not os.path.isfile(path):
            raise UserInputError(f"{latest} names iteration {tag!r}, but {path} does not exist")
        return path
    for name in (SAT_FILE,) + HF_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise UserInputError(f"{directory} holds no checkpoint: looked for 'latest' (SAT), "
                         f"{', '.join((SAT_FILE,) + HF_FILES)}")


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


def _to_numpy(value):
    """A torch tensor or numpy array as numpy; bfloat16 (which numpy lacks) becomes float32."""
    if isinstance(value, np.ndarray):
        return value
    if str(value.dtype) == "torch.bfloat16":
        value = value.float()
    return value.numpy()


def _cast(value, dtype):
    """`value` as `dtype` ('keep' or a numpy float name); non-float tensors are left alone."""
    if dtype == "keep" or not np.issubdtype(value.dtype, np.floating):
        return value
    return value.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class WrittenCheckpoint:
    """What one output file received."""

    part: str
    path: str
    num_tensors: int
    num_parameters: int
    dtypes: tuple


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """The summary printed at the end of a conversion."""

    layout: str
    qkv_layout: str
    num_input_files: int
    outputs: tuple
    seconds: float

    def lines(self):
        lines = [f"input: {self.num_input_files} file(s), {LAYOUT_NAMES[self.layout]} layout, "
                 f"GLM qkv {self.qkv_layout}"]
        for out in self.outputs:
            lines.append(f"{PART_NAMES[out.part]:<22} {out.num_tensors:5d} tensors "
                         f"{out.num_parameters:>15,d} parameters  {'/'.join(out.dtypes)}  -> {out.path}")
        lines.append(f"converted in {self.seconds:.1f} s")
        return lines


def convert_visualglm(torch_path, vit_path, qformer_path, glm_path, config: VisualGLMConfig,
                      qkv_layout="auto", dtype="keep"):
    """Convert `torch_path` into the ViT, Q-Former and GLM checkpoints (+ the Lite embeddings).

    Every key and shape is checked before anything is written; outputs appear only when the
    whole conversion succeeded.
    """
    if qkv_layout not in QKV_LAYOUTS:
        raise UserInputError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")
    if dtype not in OUTPUT_DTYPES:
        raise UserInputError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    start = time.monotonic()
    paths = {"vit": vit_path, "qformer": qformer_path, "glm": glm_path,
             "lite": os.path.join(os.path.dirname(os.path.abspath(glm_path)), LITE_CHECKPOINT)}
    if len({os.path.abspath(path) for path in paths.values()}) < len(paths):
        raise UserInputError(f"output paths must all differ (the Lite file is {paths['lite']}): "
                             f"{', '.join(paths.values())}")
    for path in paths.values():
        if os.path.isdir(path):
            raise UserInputError(f"output path is a directory, expected a .ckpt file name: {path}")

    shards = find_shards(torch_path)
    shapes, keys_by_shard = read_shapes(shards)
    layout = detect_layout(shapes)
    qkv_layout = DEFAULT_QKV_LAYOUTS[layout] if qkv_layout == "auto" else qkv_layout
    print(f"detected layout: {LAYOUT_NAMES[layout]}; GLM qkv {qkv_layout}")
    tables = visualglm_tables(config, layout, qkv_layout)
    check_table(shapes, tables["vit"] + tables["qformer"] + tables["glm"],
                glm_ignored_keys(config.text_config, layout),
                what=f"{LAYOUT_NAMES[layout]} checkpoint {torch_path}")

    with contextlib.ExitStack() as stack:
        writers = {part: stack.enter_context(CheckpointWriter(path)) for part, path in paths.items()}
        progress = stack.enter_context(
            Progress(sum(len(rows) for rows in tables.values()), "converting", unit="tensors"))
        for shard in shards:
            _convert_shard(shard, keys_by_shard[shard.path], tables, writers, dtype, progress)
    outputs = tuple(WrittenCheckpoint(part, paths[part], writer.num_tensors, writer.num_elements,
                                      tuple(sorted(writer.dtypes)))
                    for part, writer in writers.items())
    return ConversionReport(layout, qkv_layout, len(shards), outputs, time.monotonic() - start)


def _convert_shard(shard, keys, tables, writers, dtype, progress):
    """Convert the rows whose source is in `shard` and append them to their writers.

    A function of its own so that nothing of this shard is referenced once it returns, before
    the next shard is opened.
    """
    with shard.tensors() as tensors:
        for part, rows in tables.items():
            for row in rows:
                if row.source in keys:
                    value = row.apply(_to_numpy(tensors[row.source]))
                    writers[part].write(row.target, _cast(value, dtype))
                    progress.update()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a VisualGLM-6B checkpoint (SAT or Hugging Face) into the MindSpore "
                    "checkpoints of the ViT, the Q-Former (+ glm_proj) and the GLM.")
    parser.add_argument("--torch_path", required=True,
                        help="SAT mp_rank_00_model_states.pt or its directory (with 'latest'), or a "
                             "Hugging Face visualglm-6b directory, index json, .bin or .safetensors")
    parser.add_argument("--vit_mindspore_path", required=True, help="output: EVA-ViT + ln_vision .ckpt")
    parser.add_argument("--qformer_mindspore_path", required=True,
                        help="output: Q-Former + glm_proj .ckpt")
    parser.add_argument("--glm_mindspore_path", required=True,
                        help=f"output: GLM .ckpt; {LITE_CHECKPOINT} is written beside it")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="model YAML (a name in configs/visualglm/ or a path) whose shapes the "
                             "checkpoint must have")
    parser.add_argument("--qkv_layout", choices=QKV_LAYOUTS, default="auto",
                        help="order of the GLM's fused qkv rows in the source; auto: contiguous "
                             "for SAT, per_head for Hugging Face")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="keep",
                        help="float dtype written; keep: float16 and float32 stay, bfloat16 "
                             "becomes float32")
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    _, config = load_visualglm_config(args.config)
    report = convert_visualglm(args.torch_path, args.vit_mindspore_path,
                               args.qformer_mindspore_path, args.glm_mindspore_path, config,
                               qkv_layout=args.qkv_layout, dtype=args.dtype)
    print("\n".join(report.lines()))
    return report


if __name__ == "__main__":
    main()
