"""Small building blocks shared by the GLM, the vision tower and the Q-Former."""
import zlib

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

# Added to masked attention scores (float32) by the 1-D-position decoders (ChatGLM2, LLaMA): exp
# underflows to exactly 0, and a row with nothing to attend (a padding query, never read) stays finite.
MASKED_SCORE = float(np.finfo(np.float32).min)


def next_token_loss(logits, labels):
    """The causal LM loss: logits [B,S,V] at t predict labels [B,S] at t+1; -100 is ignored;
    the mean over the counted tokens, in float32 (upstream's CrossEntropyLoss on shifted logits)."""
    vocab = logits.shape[-1]
    logits = logits[:, :-1].reshape(-1, vocab).astype(ms.float32)
    targets = labels[:, 1:].reshape(-1).astype(ms.int32)
    return ops.cross_entropy(logits, targets, ignore_index=-100, reduction="mean")


def causal_positions_and_mask(batch, length):
    """Positions 0..L-1 [B,L] int32 and a causal mask [B,1,L,L] (1 = attend), in the graph: the
    training inputs of right-padded rows (padding comes after the text, so no real token sees it)."""
    position_ids = ops.broadcast_to(ops.arange(length, dtype=ms.int32).reshape(1, length), (batch, length))
    causal = ops.tril(ops.ones((length, length), ms.float32))
    return position_ids, ops.broadcast_to(causal.reshape(1, 1, length, length), (batch, 1, length, length))


def ms_dtype(name):
    """MindSpore dtype from a config string such as 'float16'."""
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


class SkinnyDense(nn.Dense):
    """nn.Dense that, on CPU, multiplies 4-16 input rows as (W @ x^T)^T.

    A decode step of a batch of 4-16 sequences sends 4-16 rows through each weight matrix;
    MindSpore's CPU MatMul kernel runs that shape up to 2.8x faster with the weight as the
    left operand (a GLM decode step at batch 8: 160 ms instead of 207 ms; at 1-2 rows the
    usual order is faster). Same parameters, same results up to summation order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_first = ms.get_context("device_target") == "CPU"
        self.weight_times_rows = ops.MatMul(transpose_b=True)

    def construct(self, x):
        rows = x.size // x.shape[-1]
        if not (self.weight_first and 4 <= rows <= 16):
            return super().construct(x)
        y = self.weight_times_rows(self.weight, x.reshape(rows, x.shape[-1])).T
        if self.has_bias:
            y = y + self.bias
        return y.reshape(x.shape[:-1] + (y.shape[-1],))


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the compute dtype; returns the input dtype."""

    def construct(self, x):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)


def dense_layer(in_features, out_features, config, has_bias=True):
    """nn.Dense with parameters in `config.param_init_type`, computing in `config.compute_dtype`."""
    dense = nn.Dense(in_features, out_features, has_bias=has_bias,
                     dtype=ms_dtype(config.param_init_type))
    if config.compute_dtype != "float32":
        dense.to_float(ms_dtype(config.compute_dtype))
    return dense


class ErfGeluMLP(nn.Cell):
    """dense_h_to_4h -> exact (erf) GELU -> dense_4h_to_h (EVA-ViT and BLIP-2 Q-Former)."""

    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = dense_layer(config.hidden_size, config.intermediate_size, config)
        self.dense_4h_to_h = dense_layer(config.intermediate_size, config.hidden_size, config)

    def construct(self, x):
        return self.dense_4h_to_h(ops.gelu(self.dense_h_to_4h(x), approximate="none"))


# The training step, set by the trainer before each step: StepDropout's masks are a function of
# it, so a resumed run draws the masks the uninterrupted run drew at the same step. (MindSpore's
# CPU dropout keeps its RNG state inside the compiled kernel, out of reach of a checkpoint.)
DROPOUT_STEP = Parameter(Tensor(np.int32(0)), name="dropout_step", requires_grad=False)


def _int32(value):
    return Tensor(np.array(value & 0xFFFFFFFF, np.uint32).astype(np.int32))


_SHIFT = ops.RightShift()
_HASH_CONSTANTS = tuple(_int32(c) for c in (0x7FEB352D, 0x846CA68B, 0x9E3779B1, 0x632BE5AB))


def _mix32(h):
    """lowbias32 (a well-mixed 32-bit integer hash) on wrapping int32, logical shifts by masking."""
    h = ops.bitwise_xor(h, ops.bitwise_and(_SHIFT(h, ops.full_like(h, 16)), ops.full_like(h, 0xFFFF)))
    h = h * _HASH_CONSTANTS[0]
    h = ops.bitwise_xor(h, ops.bitwise_and(_SHIFT(h, ops.full_like(h, 15)), ops.full_like(h, 0x1FFFF)))
    h = h * _HASH_CONSTANTS[1]
    return ops.bitwise_xor(h, ops.bitwise_and(_SHIFT(h, ops.full_like(h, 16)), ops.full_like(h, 0xFFFF)))


class StepDropout(nn.Cell):
    """Dropout whose keep mask is a hash of (its key, DROPOUT_STEP, the element's index): the same
    masks at the same step in an uninterrupted and in a resumed run. `key` names the cell among
    the network's dropouts (set_dropout_keys gives each its own)."""

    def __init__(self, p):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.key = 0

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        step_key = _mix32(DROPOUT_STEP * _HASH_CONSTANTS[3] + self.key)
        index = ops.arange(x.size, dtype=ms.int32).reshape(x.shape)
        bits = _mix32(index * _HASH_CONSTANTS[2] + step_key)
        uniform = ops.bitwise_and(bits, ops.full_like(bits, 0xFFFFFF)).astype(ms.float32) * (1.0 / (1 << 24))
        return ops.select(uniform >= self.p, x / (1.0 - self.p), ops.zeros_like(x))


def set_dropout_keys(network, seed):
    """Give each StepDropout of `network` a key from the run's seed and its name in the network,
    the same in every process that builds the same network."""
    for name, cell in network.cells_and_names():
        if isinstance(cell, StepDropout):
            cell.key = zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF
