"""EVA-ViT-g, the frozen image encoder of VisualGLM and MiniGPT-4, in plain MindSpore.

Read top to bottom: config, attention, MLP, block, the encoder, then the parameter shapes
(for counting without allocating) and the conversion table from transformers'
`Blip2VisionModel`.

EVA-ViT-g (DESIGN.md §4): patch 14 conv, a class token, learned absolute position
embeddings (257 for 224/14), 39 pre-LN blocks (`h = h + Attn(LN(h)); h = h + MLP(LN(h))`),
fused query_key_value laid out [Q | K | V] with a bias (EVA has no key bias: its K slice
is zero in every real checkpoint), exact (erf) GELU, and the final LayerNorm `ln_vision`
applied to every token, with its own eps (1e-5, torch's default, where the blocks use 1e-6).
Output [B, 257, hidden].

Parameter names follow SAT's (`layers.N.attention.query_key_value`, `mlp.dense_h_to_4h`,
...), so the SAT converter maps `mixins.eva.model.vit.*` onto them row by row.
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
class ViTConfig(ModelConfig):
    """Shapes and precision of EVA-ViT-g; field names follow MindFormers' ViT YAML (seed 001)."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    intermediate_size: int = 6144
    qkv_bias: Literal[True] = True
    hidden_act: Literal["gelu", "GELU"] = "gelu"
    # The blocks' LayerNorms; `ln_vision` is built apart from the ViT upstream
    # (VisualGLM's blip2.py, LAVIS, MiniGPT-4: `nn.LayerNorm(hidden)`) with torch's default eps.
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5
    # Standard deviation of the class token and position embeddings at random initialisation.
    initializer_range: float = 0.02
    # MindFormers' ViT options; EVA-ViT-g is frozen upstream and has none of them, so only
    # the values that switch them off are accepted.
    post_layernorm_residual: bool = False
    use_mean_pooling: bool = False
    attention_probs_dropout_prob: float = 0.0
    hidden_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    checkpoint_name_or_path: str = ""
    param_init_type: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"
    layernorm_compute_type: Literal["float32"] = "float32"  # LayerNormFP32 everywhere
    softmax_compute_type: DTYPES = "float32"

    UNSUPPORTED_FIELDS = {
        "encoder_stride": "it sizes the pixel decoder of SimMIM pre-training, which EVA-ViT-g "
                          "here does not have; remove the field",
    }

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self):
        """Patches plus the class token: 257 for 224 / 14."""
        return self.num_patches + 1

    def validate(self):
        for name in ("image_size", "patch_size", "num_channels", "hidden_size",
                     "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "layer_norm_eps", "ln_vision_eps"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise FieldError("hidden_size", f"{self.hidden_size} is not divisible by "
                                            f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise FieldError("image_size", f"{self.image_size} is not a multiple of "
                                           f"patch_size {self.patch_size}")
        for name in ("post_layernorm_residual", "use_mean_pooling"):
            if getattr(self, name):
                raise FieldError(name, "EVA-ViT-g has no post-LN residual and no mean pooling "
                                       "(every token goes to the Q-Former); set it to False")
        for name in ("attention_probs_dropout_prob", "hidden_dropout_prob", "drop_path_rate"):
            if getattr(self, name) != 0:
                raise FieldError(name, f"EvaViT implements no dropout or drop path (upstream "
                                       f"trains with the ViT frozen); set it to 0, got "
                                       f"{getattr(self, name)}")


class ViTAttention(nn.Cell):
    """Bidirectional self-attention with a fused [Q | K | V] projection."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query_key_value = dense_layer(config.hidden_size, 3 * config.hidden_size, config)
        self.dense = dense_layer(config.hidden_size, config.hidden_size, config)
        self.softmax_dtype = ms_dtype(config.softmax_compute_type)
        # q @ k^T without materialising k^T
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, hidden):
        batch, length, width = hidden.shape
        qkv = self.query_key_value(hidden).reshape(batch, length, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, heads, S, d]
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = self.scores_matmul(query * self.scale, key)
        probs = ops.softmax(scores.astype(self.softmax_dtype), axis=-1).astype(value.dtype)
        context = ops.matmul(probs, value).transpose(0, 2, 1, 3).reshape(batch, length, width)
        return self.dense(context)


class ViTBlock(nn.Cell):
    """Pre-LN block: h = h + Attn(LN(h)); h = h + MLP(LN(h))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.input_layernorm = LayerNormFP32((config.hidden_size,), epsilon=eps)
        self.attention = ViTAttention(config)
        self.post_attention_layernorm = LayerNormFP32((config.hidden_size,), epsilon=eps)
        self.mlp = ErfGeluMLP(config)

    def construct(self, hidden):
        hidden = hidden + self.attention(self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class EvaViT(nn.Cell):
    """EVA-ViT-g with `ln_vision`: pixel_values [B, C, H, W] float32 -> [B, 257, hidden].

    H and W must equal `config.image_size` (the position embeddings are not interpolated).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = ms_dtype(config.compute_dtype)
        param_dtype = ms_dtype(config.param_init_type)
        hidden = config.hidden_size
        self.patch_embedding = _PatchEmbedding(config)
        self.cls_token = Parameter(
            initializer(TruncatedNormal(config.initializer_range), (1, hidden), param_dtype),
            name="cls_token")
        self.position_embeddings = Parameter(
            initializer(TruncatedNormal(config.initializer_range),
                        (config.num_positions, hidden), param_dtype),
            name="position_embeddings")
        self.layers = nn.CellList([ViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_vision = LayerNormFP32((hidden,), epsilon=config.ln_vision_eps)

    def construct(self, pixel_values):
        size = self.config.image_size
        if pixel_values.shape[-2] != size or pixel_values.shape[-1] != size:
            raise ValueError(f"EvaViT expects {size}x{size} images, got "
                             f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]}")
        patches = self.patch_embedding(pixel_values.astype(self.compute_dtype))  # [B, P, hidden]
        batch = patches.shape[0]
        cls = ops.broadcast_to(self.cls_token.astype(self.compute_dtype).reshape(1, 1, -1),
                               (batch, 1, patches.shape[2]))
        hidden = ops.cat((cls, patches), axis=1)
        hidden = hidden + self.position_embeddings.astype(self.compute_dtype).reshape(
            1, self.config.num_positions, -1)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.ln_vision(hidden)


class _PatchEmbedding(nn.Cell):
    """The patch conv (kernel = stride = patch size), flattened to [B, patches, hidden].

    Computed as one matmul of the non-overlapping patches with the conv weight [hidden, C*p*p]
    (the same sums as the convolution): MindSpore's CPU Conv2d takes most of the ViT's time
    for this shape (734 of 1256 ms for 4 images at 224 px, 6 blocks of 384; the matmul, 12 ms).
    The weights stay the conv's parameters (`proj.weight` [hidden, C, p, p], `proj.bias`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                              stride=config.patch_size, pad_mode="valid", has_bias=True,
                              dtype=ms_dtype(config.param_init_type))
        self.compute_dtype = ms_dtype(config.compute_dtype)

    def construct(self, pixel_values):
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = pixel_values.reshape(batch, channels, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * cols, channels * p * p).astype(self.compute_dtype)
        weight = self.proj.weight.astype(self.compute_dtype).reshape(self.proj.weight.shape[0], -1)
        return ops.matmul(patches, weight.swapaxes(0, 1)) + self.proj.bias.astype(self.compute_dtype)


def parameter_shapes(config: ViTConfig):
    """{parameter name: shape} of `EvaViT(config)`, computed without building it."""
    h, m, c, p = config.hidden_size, config.intermediate_size, config.num_channels, config.patch_size
    shapes = {
        "patch_embedding.proj.weight": (h, c, p, p),
        "patch_embedding.proj.bias": (h,),
        "cls_token": (1, h),
        "position_embeddings": (config.num_positions, h),
    }
    for i in range(config.num_hidden_layers):
        prefix = f"layers.{i}."
        shapes.update({
            prefix + "input_layernorm.gamma": (h,),
            prefix + "input_layernorm.beta": (h,),
            prefix + "attention.query_key_value.weight": (3 * h, h),
            prefix + "attention.query_key_value.bias": (3 * h,),
            prefix + "attention.dense.weight": (h, h),
            prefix + "attention.dense.bias": (h,),
            prefix + "post_attention_layernorm.gamma": (h,),
            prefix + "post_attention_layernorm.beta": (h,),
            prefix + "mlp.dense_h_to_4h.weight": (m, h),
            prefix + "mlp.dense_h_to_4h.bias": (m,),
            prefix + "mlp.dense_4h_to_h.weight": (h, m),
            prefix + "mlp.dense_4h_to_h.bias": (h,),
        })
    shapes["ln_vision.gamma"] = (h,)
    shapes["ln_vision.beta"] = (h,)
    return shapes


def count_parameters(config: ViTConfig, include_ln_vision=True):
    """Number of parameters of `EvaViT(config)` (optionally without `ln_vision`)."""
    return sum(int(np.prod(shape)) for name, shape in parameter_shapes(config).items()
               if include_ln_vision or not name.startswith("ln_vision."))


def rows_from_hf_blip2_vision(config: ViTConfig, prefix=""):
    """Rows mapping a transformers `Blip2VisionModel` state dict onto `EvaViT` parameters.

    `prefix` is "vision_model." for a full `Blip2ForConditionalGeneration` checkpoint.
    HF's `qkv` is [Q | K | V] like ours; its bias is q_bias | 0 | v_bias. HF's
    `post_layernorm` is `ln_vision` (its last_hidden_state already includes it), though HF
    computes it with the blocks' eps (1e-6) where LAVIS, whose weights these are, uses 1e-5.
    """
    h, m, c, p = config.hidden_size, config.intermediate_size, config.num_channels, config.patch_size
    flat = lambda value: value.reshape(value.shape[-2], value.shape[-1])  # noqa: E731
    rows = [
        Row(f"{prefix}embeddings.patch_embedding.weight", "patch_embedding.proj.weight", (h, c, p, p)),
        Row(f"{prefix}embeddings.patch_embedding.bias", "patch_embedding.proj.bias", (h,)),
        Row(f"{prefix}embeddings.class_embedding", "cls_token", (1, 1, h), flat),
        Row(f"{prefix}embeddings.position_embedding", "position_embeddings",
            (1, config.num_positions, h), flat),
    ]
    for i in range(config.num_hidden_layers):
        src, dst = f"{prefix}encoder.layers.{i}.", f"layers.{i}."
        for hf_name, ours, shape in (
                ("layer_norm1.weight", "input_layernorm.gamma", (h,)),
                ("layer_norm1.bias", "input_layernorm.beta", (h,)),
                ("self_attn.qkv.weight", "attention.query_key_value.weight", (3 * h, h)),
                ("self_attn.qkv.bias", "attention.query_key_value.bias", (3 * h,)),
                ("self_attn.projection.weight", "attention.dense.weight", (h, h)),
                ("self_attn.projection.bias", "attention.dense.bias", (h,)),
                ("layer_norm2.weight", "post_attention_layernorm.gamma", (h,)),
                ("layer_norm2.bias", "post_attention_layernorm.beta", (h,)),
                ("mlp.fc1.weight", "mlp.dense_h_to_4h.weight", (m, h)),
                ("mlp.fc1.bias", "mlp.dense_h_to_4h.bias", (m,)),
                ("mlp.fc2.weight", "mlp.dense_4h_to_h.weight", (h, m)),
                ("mlp.fc2.bias", "mlp.dense_4h_to_h.bias", (h,))):
            rows.append(Row(src + hf_name, dst + ours, shape))
    rows.append(Row(f"{prefix}post_layernorm.weight", "ln_vision.gamma", (h,)))
    rows.append(Row(f"{prefix}post_layernorm.bias", "ln_vision.beta", (h,)))
    return rows


def eva_qkv_bias(q_bias, v_bias):
    """Fused [Q | K | V] bias from EVA's separate q_bias and v_bias (LAVIS keys): K is zero."""
    q_bias, v_bias = np.asarray(q_bias), np.asarray(v_bias)
    return np.concatenate([q_bias, np.zeros_like(q_bias), v_bias])


__all__ = ["ViTConfig", "EvaViT", "parameter_shapes", "count_parameters",
           "rows_from_hf_blip2_vision", "eva_qkv_bias"]


def rows_from_sat_eva_vit(config: ViTConfig, prefix=""):
    """Rows mapping SAT's EVA-ViT (VisualGLM: `mixins.eva.model.vit.`) onto `EvaViT` parameters.

    SAT keeps the class token as a one-word vocabulary (`word_embeddings`, [1, hidden]), the
    patch conv and `ln_vision` in mixins, and the blocks under `transformer.` with our names.
    """
    h, c, p = config.hidden_size, config.num_channels, config.patch_size
    rows = [
        Row(f"{prefix}mixins.patch_embedding.proj.weight", "patch_embedding.proj.weight", (h, c, p, p)),
        Row(f"{prefix}mixins.patch_embedding.proj.bias", "patch_embedding.proj.bias", (h,)),
        Row(f"{prefix}transformer.word_embeddings.weight", "cls_token", (1, h)),
        Row(f"{prefix}transformer.position_embeddings.weight", "position_embeddings",
            (config.num_positions, h)),
    ]
    torch_kind = {"gamma": "weight", "beta": "bias"}  # LayerNorm naming
    for name, shape in parameter_shapes(config).items():
        if name.startswith("layers."):
            base, kind = name.rsplit(".", 1)
            rows.append(Row(f"{prefix}transformer.{base}.{torch_kind.get(kind, kind)}", name, shape))
    rows.append(Row(f"{prefix}mixins.cls.ln_vision.weight", "ln_vision.gamma", (h,)))
    rows.append(Row(f"{prefix}mixins.cls.ln_vision.bias", "ln_vision.beta", (h,)))
    return rows


__all__ += ["rows_from_sat_eva_vit"]


# LAVIS keeps EVA's q and v biases apart (qkv has no bias); `fuse_lavis_eva_vit` adds this fused
# [q | 0 | v] entry per block so that one row maps it onto our fused bias.
LAVIS_FUSED_QKV_BIAS = "attn.qkv_bias"


def fuse_lavis_eva_vit(state_dict, config: ViTConfig, prefix=""):
    """A copy of a LAVIS EVA-ViT state dict ({key: array}) with each block's `attn.q_bias` and
    `attn.v_bias` replaced by the fused LAVIS_FUSED_QKV_BIAS entry (missing pairs are left as
    they are, for the table to report)."""
    out = dict(state_dict)
    for i in range(config.num_hidden_layers):
        q_key, v_key = f"{prefix}blocks.{i}.attn.q_bias", f"{prefix}blocks.{i}.attn.v_bias"
        if q_key in out and v_key in out:
            out[f"{prefix}blocks.{i}.{LAVIS_FUSED_QKV_BIAS}"] = eva_qkv_bias(out.pop(q_key), out.pop(v_key))
    return out


def rows_from_lavis_eva_vit(config: ViTConfig, prefix=""):
    """Rows mapping a `fuse_lavis_eva_vit`-ed LAVIS EVA-ViT (eva_vit_g.pth; MiniGPT-4's
    `visual_encoder.`) onto `EvaViT` parameters, ln_vision excepted (LAVIS builds it apart and
    BLIP-2's checkpoint holds it)."""
    h, m, c, p = config.hidden_size, config.intermediate_size, config.num_channels, config.patch_size
    flat = lambda value: value.reshape(value.shape[-2], value.shape[-1])  # noqa: E731
    rows = [Row(f"{prefix}patch_embed.proj.weight", "patch_embedding.proj.weight", (h, c, p, p)),
            Row(f"{prefix}patch_embed.proj.bias", "patch_embedding.proj.bias", (h,)),
            Row(f"{prefix}cls_token", "cls_token", (1, 1, h), flat),
            Row(f"{prefix}pos_embed", "position_embeddings", (1, config.num_positions, h), flat)]
    for i in range(config.num_hidden_layers):
        src, dst = f"{prefix}blocks.{i}.", f"layers.{i}."
        for lavis_name, ours, shape in (
                ("norm1.weight", "input_layernorm.gamma", (h,)),
                ("norm1.bias", "input_layernorm.beta", (h,)),
                ("attn.qkv.weight", "attention.query_key_value.weight", (3 * h, h)),
                (LAVIS_FUSED_QKV_BIAS, "attention.query_key_value.bias", (3 * h,)),
                ("attn.proj.weight", "attention.dense.weight", (h, h)),
                ("attn.proj.bias", "attention.dense.bias", (h,)),
                ("norm2.weight", "post_attention_layernorm.gamma", (h,)),
                ("norm2.bias", "post_attention_layernorm.beta", (h,)),
                ("mlp.fc1.weight", "mlp.dense_h_to_4h.weight", (m, h)),
                ("mlp.fc1.bias", "mlp.dense_h_to_4h.bias", (m,)),
                ("mlp.fc2.weight", "mlp.dense_4h_to_h.weight", (h, m)),
                ("mlp.fc2.bias", "mlp.dense_4h_to_h.bias", (h,))):
            rows.append(Row(src + lavis_name, dst + ours, shape))
    return rows


__all__ += ["fuse_lavis_eva_vit", "rows_from_lavis_eva_vit"]
