"""Refuse, before anything is allocated, a model config that cannot fit in this machine's memory.

Without this check a huge `seq_length`, `num_layers` or `hidden_size` grows the process for
minutes until numpy raises a MemoryError traceback or the kernel kills it. Each model config's
`memory_estimate` (GLMConfig, VisualGLMConfig) describes its decoder (`DecoderShape`) and its
parameters, and `estimate_memory` adds up what a run surely holds at the same time:

- parameters: every parameter at its param dtype (`parameter_count` counts them from the
  model's `parameter_shapes`, with no more work for 10^5 layers than for 2);
- position tables: the rotary cos and sin tables, float32, seq_length x rotary_width each,
  built with the model;
- KV cache (generation with use_past): layers x 2 x batch x slots x kv_heads x head_dim x
  compute dtype, where slots is the cache a full-length answer takes: min(seq_length,
  max_length) rounded up as research.common.kv_cache.bucket_length does;
- activations of one forward over `tokens` query positions and `length` key positions:
  batch x tokens x (hidden + ffn_hidden) x compute dtype (the MLP's input and its widened
  middle) + batch x heads x tokens x length x the softmax's dtype (one layer's attention
  scores) + batch x logit rows x vocab x 4 (float32 logits). Generation with the cache:
  tokens = 1 (a decode step), length = slots, one logit row, plus the float32
  [batch, 1, slots, slots] attention mask generate() builds on the host; without the cache
  every step runs the whole seq_length (tokens = length = slots = seq_length). Training:
  tokens = length = the padded sample length, logits at every position;
- optimizer (training): gradients and AdamWeightDecay's two moments, each the size and dtype
  of the trainable parameters (research.common.trainer keeps no float32 master copy);
- layer objects: the Python and MindSpore objects of each layer's cells and parameters, about
  96 KiB a decoder layer whatever its width (measured on ChatGLM2's: 1000 tiny layers took
  262 MiB for 166 MiB of parameters); LAYER_OBJECT_BYTES is a little under that.

Temporaries, the backward's saved activations, compiled graphs and MindSpore's pools are left
out, so this is a lower bound: a refused config cannot fit; one that passes may still not.
`check_memory` compares the total with `available_memory` (MemAvailable, or less under
`ulimit -v`) and refuses in one line.
"""
import dataclasses
import math

import psutil

from research.common.errors import UserInputError
from research.common.kv_cache import bucket_length

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FLOAT32_BYTES = 4
LAYER_OBJECT_BYTES = 80 * 1024
UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parameter_count(parameter_shapes, config, layers_field, period=1):
    """The number of parameters of `parameter_shapes(config)` ({name: shape}) without listing
    every layer: layers repeat every `period` layers (the Q-Former's cross-attention), so the
    shapes of `rest` and `rest + period` layers (rest = layers % period) give one period's size.
    Python integers, so absurd sizes do not overflow."""
    layers = getattr(config, layers_field)
    rest = layers % period

    def count(num_layers):
        shapes = parameter_shapes(dataclasses.replace(config, **{layers_field: num_layers}))
        return sum(math.prod(shape) for shape in shapes.values())

    first = count(rest)
    return first + layers // period * (count(rest + period) - first)


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes a decoder's KV cache, activations and position tables grow with."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    seq_length: int
    max_length: int  # where generate() stops by default, prompt included (max_decode_length)
    use_past: bool
    compute_dtype: str
    scores_dtype: str = "float32"  # of the attention scores (the softmax's dtype)
    rotary_width: int = 0  # columns of the rotary cos and sin tables; 0: none


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes a run holds at once, by kind (see the module docstring)."""

    parameters: int
    position_tables: int = 0
    kv_cache: int = 0
    activations: int = 0
    optimizer: int = 0
    layer_objects: int = 0

    LABELS = {"parameters": "parameters", "position_tables": "position tables",
              "kv_cache": "KV cache", "activations": "activations", "optimizer": "optimizer",
              "layer_objects": "layer objects"}

    @property
    def total(self):
        return sum(dataclasses.astuple(self))

    def describe(self):
        """'parameters 1.2 GiB, KV cache 3.0 TiB, ...' (the kinds that are not zero)."""
        return ", ".join(f"{label} {format_bytes(getattr(self, name))}"
                         for name, label in self.LABELS.items() if getattr(self, name))


def estimate_memory(decoder: DecoderShape, *, parameter_bytes, batch_size=1, training_length=None,
                    trainable_bytes=0):
    """The MemoryEstimate of generation (training_length None) or of training on samples padded
    to `training_length`, with `trainable_bytes` of trainable parameters."""
    compute = DTYPE_BYTES[decoder.compute_dtype]
    tables = 2 * decoder.seq_length * decoder.rotary_width * FLOAT32_BYTES
    if training_length is not None:
        tokens = length = logit_rows = training_length
        cache = mask = 0
        optimizer = 3 * trainable_bytes
    else:
        if decoder.use_past:
            length = bucket_length(min(decoder.seq_length, decoder.max_length), decoder.seq_length)
            tokens = 1
            cache = (decoder.num_layers * 2 * batch_size * length * decoder.kv_heads
                     * decoder.head_dim * compute)
        else:
            tokens = length = decoder.seq_length
            cache = 0
        logit_rows = 1
        mask = batch_size * length * length * FLOAT32_BYTES
        optimizer = 0
    scores = DTYPE_BYTES[decoder.scores_dtype]
    activations = (batch_size * tokens * (decoder.hidden_size + decoder.ffn_hidden_size) * compute
                   + batch_size * decoder.num_heads * tokens * length * scores
                   + batch_size * logit_rows * decoder.vocab_size * FLOAT32_BYTES + mask)
    return MemoryEstimate(parameter_bytes, tables, cache, activations, optimizer,
                          decoder.num_layers * LAYER_OBJECT_BYTES)


def available_memory():
    """Bytes this process can still allocate: the machine's available memory (psutil:
    MemAvailable on Linux), or less under an address-space limit (`ulimit -v`)."""
    available = psutil.virtual_memory().available
    if hasattr(psutil, "RLIMIT_AS"):  # Linux and FreeBSD
        process = psutil.Process()
        limit, _ = process.rlimit(psutil.RLIMIT_AS)
        if limit != psutil.RLIM_INFINITY:
            available = min(available, limit - process.memory_info().vms)
    return available


def format_bytes(count):
    """A byte count in binary units: '512 bytes', '1.5 GiB'."""
    power = 0
    while power < len(UNITS) - 1 and count >= 1024 ** (power + 1):
        power += 1
    return f"{count} bytes" if power == 0 else f"{count / 1024 ** power:.1f} {UNITS[power]}"


def check_memory(estimate: MemoryEstimate, config_path):
    """Raise a one-line UserInputError when `estimate` exceeds the available memory; call it
    once the config and its command-line overrides are known, before the model is built."""
    available = available_memory()
    if estimate.total > available:
        raise UserInputError(
            f"{config_path}: model_config needs about {format_bytes(estimate.total)} "
            f"({estimate.describe()}) but only {format_bytes(available)} is available; "
            f"lower seq_length / num_layers / hidden_size / batch_size")
