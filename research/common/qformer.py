"""The BLIP-2 Q-Former of VisualGLM and MiniGPT-4, in plain MindSpore, in SAT's layer order.

Read top to bottom: config, self-attention, cross-attention, MLP, layer, the Q-Former, then
parameter shapes (for counting without allocating) and the table from transformers'
`Blip2QFormerModel`.

BERT (LAVIS, transformers) writes the Q-Former post-LN, starting from LN(queries):

    h = LN_emb(queries)
    per layer:  a = LN_a(h + SelfAttn(h))
                c = LN_c(a + CrossAttn(a, image))      (layers 0, 2, 4, ...)
                h = LN_o(c + MLP(c))                   (c = a in layers without cross-attention)

SAT (VisualGLM) keeps the stream before each LayerNorm and applies the norm at the start of
the next step instead; the function is the same:

    x = queries
    per layer:  u = input_layernorm(x);        x = u + SelfAttn(u)
                v = post_attention_layernorm(x)
                (cross layers) x = v + CrossAttn(v, image); v = post_cross_attention_layernorm(x)
                x = v + MLP(v)
    output = final_layernorm(x)

so input_layernorm of layer 0 is LN_emb (HF `layernorm`), input_layernorm of layer i+1 is
LN_o of layer i (HF `layer.i.output_query.LayerNorm`), final_layernorm is LN_o of the last
layer, post_attention_layernorm is LN_a and post_cross_attention_layernorm is LN_c.
Queries only: the text branch of the Q-Former is not part of VisualGLM or MiniGPT-4.
"""
import dataclasses
import math
from typing import Literal

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import DTYPES, FieldError, ModelConfig
from research.common.convert import Row
from research.common.layers import ErfGeluMLP, LayerNormFP32, dense_layer, ms_dtype

@MindFormerRegister.register(MindFormerModuleType.CONFIG)
@dataclasses.dataclass
class QFormerConfig(ModelConfig):
    """Shapes and precision of the BLIP-2 Q-Former (DESIGN.md §4)."""

    num_hidden_layers: int = 12
    num_heads: int = 12
    hidden_size: int = 768
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    encoder_width: int = 1408
    query_length: int = 32
    cross_attention_freq: int = 2
    hidden_act: Literal["gelu", "GELU"] = "gelu"
    # Standard deviation of the query tokens at random initialisation.
    initializer_range: float = 0.02
    checkpoint_name_or_path: str = ""
    param_init_type: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"
    layernorm_compute_type: Literal["float32"] = "float32"  # LayerNormFP32 everywhere
    softmax_compute_type: DTYPES = "float32"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer_id):
        """Cross-attention in layers 0, freq, 2*freq, ... (BLIP-2: 0, 2, ..., 10)."""
        return layer_id % self.cross_attention_freq == 0

    def validate(self):
        for name in ("num_hidden_layers", "num_heads", "hidden_size", "intermediate_size",
                     "encoder_width", "query_length", "cross_attention_freq", "layer_norm_eps"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise FieldError("hidden_size", f"{self.hidden_size} is not divisible by "
                                            f"num_heads {self.num_heads}")


def _attend(query, key, value, num_heads, softmax_dtype):
    """Unmasked multi-head attention; query [B,S,H], key/value [B,T,H] -> [B,S,H]."""
    batch, length, width = query.shape
    head_dim = width // num_heads
    query = query.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)
    key = key.reshape(batch, key.shape[1], num_heads, head_dim).transpose(0, 2, 1, 3)
    value = value.reshape(batch, value.shape[1], num_heads, head_dim).transpose(0, 2, 1, 3)
    scores = ops.matmul(query, key.swapaxes(-1, -2)) * (1.0 / math.sqrt(head_dim))
    probs = ops.softmax(scores.astype(softmax_dtype), axis=-1).astype(value.dtype)
    return ops.matmul(probs, value).transpose(0, 2, 1, 3).reshape(batch, length, width)


class QFormerSelfAttention(nn.Cell):
    """Self-attention among the query tokens, fused [Q | K | V] (SAT's layout)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query_key_value = dense_layer(config.hidden_size, 3 * config.hidden_size, config)
        self.dense = dense_layer(config.hidden_size, config.hidden_size, config)
        self.softmax_dtype = ms_dtype(config.softmax_compute_type)

    def construct(self, hidden):
        query, key, value = ops.chunk(self.query_key_value(hidden), 3, axis=-1)
        return self.dense(_attend(query, key, value, self.num_heads, self.softmax_dtype))


class QFormerCrossAttention(nn.Cell):
    """Queries attend to the image features; key_value fused [K | V] from encoder_width."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = dense_layer(config.hidden_size, config.hidden_size, config)
        self.key_value = dense_layer(config.encoder_width, 2 * config.hidden_size, config)
        self.dense = dense_layer(config.hidden_size, config.hidden_size, config)
        self.softmax_dtype = ms_dtype(config.softmax_compute_type)

    def construct(self, hidden, image_features):
        key, value = ops.chunk(self.key_value(image_features), 2, axis=-1)
        context = _attend(self.query(hidden), key, value, self.num_heads, self.softmax_dtype)
        return self.dense(context)


class QFormerLayer(nn.Cell):
    """One layer in SAT's order (see the module docstring)."""

    def __init__(self, config: QFormerConfig, layer_id: int):
        super().__init__()
        eps, width = config.layer_norm_eps, (config.hidden_size,)
        self.cross = config.has_cross_attention(layer_id)
        self.input_layernorm = LayerNormFP32(width, epsilon=eps)
        self.attention = QFormerSelfAttention(config)
        self.post_attention_layernorm = LayerNormFP32(width, epsilon=eps)
        if self.cross:
            self.cross_attention = QFormerCrossAttention(config)
            self.post_cross_attention_layernorm = LayerNormFP32(width, epsilon=eps)
        self.mlp = ErfGeluMLP(config)

    def construct(self, hidden, image_features):
        attention_input = self.input_layernorm(hidden)
        hidden = attention_input + self.attention(attention_input)
        mlp_input = self.post_attention_layernorm(hidden)
        if self.cross:
            hidden = mlp_input + self.cross_attention(mlp_input, image_features)
            mlp_input = self.post_cross_attention_layernorm(hidden)
        return mlp_input + self.mlp(mlp_input)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class QFormer(nn.Cell):
    """image_features [B, N, encoder_width] -> query outputs [B, query_length, hidden]."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.query_tokens = Parameter(
            initializer(TruncatedNormal(config.initializer_range),
                        (config.query_length, config.hidden_size), ms_dtype(config.param_init_type)),
            name="query_tokens")
        self.layers = nn.CellList(
            [QFormerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = LayerNormFP32((config.hidden_size,), epsilon=config.layer_norm_eps)

    def construct(self, image_features):
        image_features = image_features.astype(self.compute_dtype)
        batch = image_features.shape[0]
        hidden = ops.broadcast_to(
            self.query_tokens.astype(self.compute_dtype).reshape(1, self.config.query_length, -1),
            (batch, self.config.query_length, self.config.hidden_size))
        for layer in self.layers:
            hidden = layer(hidden, image_features)
        return self.final_layernorm(hidden)


def parameter_shapes(config: QFormerConfig):
    """{parameter name: shape} of `QFormer(config)`, computed without building it."""
    h, m, e = config.hidden_size, config.intermediate_size, config.encoder_width
    shapes = {"query_tokens": (config.query_length, h)}
    for i in range(config.num_hidden_layers):
        prefix = f"layers.{i}."
        names = [("input_layernorm.gamma", (h,)), ("input_layernorm.beta", (h,)),
                 ("attention.query_key_value.weight", (3 * h, h)),
                 ("attention.query_key_value.bias", (3 * h,)),
                 ("attention.dense.weight", (h, h)), ("attention.dense.bias", (h,)),
                 ("post_attention_layernorm.gamma", (h,)), ("post_attention_layernorm.beta", (h,))]
        if config.has_cross_attention(i):
            names += [("cross_attention.query.weight", (h, h)), ("cross_attention.query.bias", (h,)),
                      ("cross_attention.key_value.weight", (2 * h, e)),
                      ("cross_attention.key_value.bias", (2 * h,)),
                      ("cross_attention.dense.weight", (h, h)), ("cross_attention.dense.bias", (h,)),
                      ("post_cross_attention_layernorm.gamma", (h,)),
                      ("post_cross_attention_layernorm.beta", (h,))]
        names += [("mlp.dense_h_to_4h.weight", (m, h)), ("mlp.dense_h_to_4h.bias", (m,)),
                  ("mlp.dense_4h_to_h.weight", (h, m)), ("mlp.dense_4h_to_h.bias", (h,))]
        shapes.update({prefix + name: shape for name, shape in names})
    shapes["final_layernorm.gamma"] = (h,)
    shapes["final_layernorm.beta"] = (h,)
    return shapes


def count_parameters(config: QFormerConfig):
    """Number of parameters of `QFormer(config)` (query tokens included)."""
    return sum(int(np.prod(shape)) for shape in parameter_shapes(config).values())


# transformers keeps query, key and value as separate Linears; a Row maps one tensor onto one
# parameter, so `fuse_hf_blip2_qformer` first adds these fused entries to the state dict.
HF_FUSED_QKV = "attention.attention.query_key_value"
HF_FUSED_KV = "crossattention.attention.key_value"


def fuse_hf_blip2_qformer(state_dict, config: QFormerConfig, prefix=""):
    """A copy of a transformers Q-Former state dict with q|k|v (self) and k|v (cross) fused.

    The separate entries are replaced by `{prefix}encoder.layer.N.` + HF_FUSED_QKV / HF_FUSED_KV
    (`.weight`, `.bias`), laid out [Q | K | V] and [K | V] as SAT and `QFormer` keep them.
    Values are converted to numpy arrays (torch tensors are accepted).
    """
    out = {name: _numpy(value) for name, value in state_dict.items()}
    for i in range(config.num_hidden_layers):
        base = f"{prefix}encoder.layer.{i}."
        groups = [("attention.attention.", ("query", "key", "value"), HF_FUSED_QKV)]
        if config.has_cross_attention(i):
            groups.append(("crossattention.attention.", ("key", "value"), HF_FUSED_KV))
        for part, pieces, fused in groups:
            for kind in ("weight", "bias"):
                names = [f"{base}{part}{piece}.{kind}" for piece in pieces]
                if all(name in out for name in names):
                    out[f"{base}{fused}.{kind}"] = np.concatenate([out.pop(n) for n in names])
    return out


def _numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def rows_from_hf_blip2_qformer(config: QFormerConfig, prefix="", query_tokens_key="query_tokens"):
    """Rows mapping a `fuse_hf_blip2_qformer`-ed transformers Q-Former onto `QFormer`.

    `prefix` is "qformer." for a full `Blip2ForConditionalGeneration` checkpoint, whose
    `query_tokens` [1, 32, hidden] sits at the top level (`query_tokens_key`; None leaves the
    query tokens out of the table). See the module docstring for the LayerNorm mapping.
    """
    h, m, e = config.hidden_size, config.intermediate_size, config.encoder_width
    rows = []
    if query_tokens_key is not None:
        rows.append(Row(query_tokens_key, "query_tokens", (1, config.query_length, h),
                        lambda value: value.reshape(value.shape[-2], value.shape[-1])))
    previous_norm = f"{prefix}layernorm"
    for i in range(config.num_hidden_layers):
        src, dst = f"{prefix}encoder.layer.{i}.", f"layers.{i}."
        table = [(previous_norm + ".weight", "input_layernorm.gamma", (h,)),
                 (previous_norm + ".bias", "input_layernorm.beta", (h,)),
                 (f"{src}{HF_FUSED_QKV}.weight", "attention.query_key_value.weight", (3 * h, h)),
                 (f"{src}{HF_FUSED_QKV}.bias", "attention.query_key_value.bias", (3 * h,)),
                 (f"{src}attention.output.dense.weight", "attention.dense.weight", (h, h)),
                 (f"{src}attention.output.dense.bias", "attention.dense.bias", (h,)),
                 (f"{src}attention.output.LayerNorm.weight", "post_attention_layernorm.gamma", (h,)),
                 (f"{src}attention.output.LayerNorm.bias", "post_attention_layernorm.beta", (h,))]
        if config.has_cross_attention(i):
            cross = f"{src}crossattention."
            table += [
                (f"{cross}attention.query.weight", "cross_attention.query.weight", (h, h)),
                (f"{cross}attention.query.bias", "cross_attention.query.bias", (h,)),
                (f"{src}{HF_FUSED_KV}.weight", "cross_attention.key_value.weight", (2 * h, e)),
                (f"{src}{HF_FUSED_KV}.bias", "cross_attention.key_value.bias", (2 * h,)),
                (f"{cross}output.dense.weight", "cross_attention.dense.weight", (h, h)),
                (f"{cross}output.dense.bias", "cross_attention.dense.bias", (h,)),
                (f"{cross}output.LayerNorm.weight", "post_cross_attention_layernorm.gamma", (h,)),
                (f"{cross}output.LayerNorm.bias", "post_cross_attention_layernorm.beta", (h,))]
        table += [(f"{src}intermediate_query.dense.weight", "mlp.dense_h_to_4h.weight", (m, h)),
                  (f"{src}intermediate_query.dense.bias", "mlp.dense_h_to_4h.bias", (m,)),
                  (f"{src}output_query.dense.weight", "mlp.dense_4h_to_h.weight", (h, m)),
                  (f"{src}output_query.dense.bias", "mlp.dense_4h_to_h.bias", (h,))]
        rows += [Row(source, dst + target, shape) for source, target, shape in table]
        previous_norm = f"{src}output_query.LayerNorm"
    rows.append(Row(previous_norm + ".weight", "final_layernorm.gamma", (h,)))
    rows.append(Row(previous_norm + ".bias", "final_layernorm.beta", (h,)))
    return rows


__all__ = ["QFormerConfig", "QFormer", "parameter_shapes", "count_parameters",
           "fuse_hf_blip2_qformer", "rows_from_hf_blip2_qformer"]


def rows_from_sat_qformer(config: QFormerConfig, prefix=""):
    """Rows mapping SAT's Q-Former (VisualGLM: `mixins.eva.model.qformer.`) onto `QFormer`.

    SAT keeps the query tokens as a vocabulary of `query_length` words (`word_embeddings`) and
    every layer under `transformer.` with our names and layer order (see the module docstring).
    """
    rows = [Row(f"{prefix}transformer.word_embeddings.weight", "query_tokens",
                (config.query_length, config.hidden_size))]
    torch_kind = {"gamma": "weight", "beta": "bias"}  # LayerNorm naming
    for name, shape in parameter_shapes(config).items():
        if name != "query_tokens":
            base, kind = name.rsplit(".", 1)
            rows.append(Row(f"{prefix}transformer.{base}.{torch_kind.get(kind, kind)}", name, shape))
    return rows


__all__ += ["rows_from_sat_qformer"]


def lavis_to_hf_qformer_names(state_dict, lavis_prefix="Qformer.bert.", hf_prefix="qformer."):
    """A copy of a LAVIS Q-Former state dict with transformers' Blip2QFormerModel names
    (notes/minigpt4.md §2.4: `embeddings.LayerNorm` -> `layernorm`, `attention.self` ->
    `attention.attention`, `crossattention.self` -> `crossattention.attention`), so that
    `fuse_hf_blip2_qformer` and `rows_from_hf_blip2_qformer` apply. Keys outside `lavis_prefix`
    are kept as they are."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(lavis_prefix):
            rest = key[len(lavis_prefix):]
            rest = rest.replace("embeddings.LayerNorm.", "layernorm.", 1) if rest.startswith("embeddings.") else rest
            key = hf_prefix + rest.replace("attention.self.", "attention.attention.")
        out[key] = value
    return out


__all__ += ["lavis_to_hf_qformer_names"]
