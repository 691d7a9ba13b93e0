"""GLMConfig: the ChatGLM-6B (v1) language model inside VisualGLM.

Field names follow MindFormers' `GLMConfig` YAML (seed 001); its fields that this port does
not implement are refused with the reason (`UNSUPPORTED_FIELDS`). Defaults are the 6B model
(DESIGN.md §4); `PRESETS` / `GLMConfig.from_name` name the 6B and the tiny model.
"""
import dataclasses
from typing import ClassVar, Literal, Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import DTYPES, FieldError, ModelConfig, preset
from research.common.memory import DTYPE_BYTES, DecoderShape, estimate_memory, parameter_count


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
@dataclasses.dataclass
class GLMConfig(ModelConfig):
    """Shapes, special ids, precision and decoding defaults of the GLM-6B language model."""

    # Upstream VisualGLM samples with SwissArmyTransformer's BaseStrategy (not a YAML field).
    sampling_rule: ClassVar[str] = "sat"

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    inner_hidden_size: int = 16384
    hidden_size_per_attention_head: Optional[int] = None
    # Static length of every graph: prompts are padded to it and the KV cache has this many slots.
    seq_length: int = 512
    max_decode_length: int = 2048
    layernorm_epsilon: float = 1e-5
    layernorm_order: Literal["post"] = "post"
    use_final_layernorm: Literal[True] = True
    activation_func: Literal["GELU", "gelu"] = "GELU"
    position_encoding_2d: Literal[True] = True
    rotary_base: float = 10000.0
    # Dropout while training (SAT's places); inference runs without it.
    embedding_dropout_prob: float = 0.0
    attention_dropout_rate: float = 0.0
    hidden_dropout_rate: float = 0.0
    use_past: bool = False
    param_init_type: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"
    layernorm_compute_type: Literal["float32"] = "float32"  # LayerNormFP32 everywhere
    softmax_compute_type: DTYPES = "float32"
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    # Decoding defaults (generation_config); upstream VisualGLM chat samples with these.
    do_sample: bool = False
    top_k: int = 30
    top_p: float = 0.7
    temperature: float = 0.95
    repetition_penalty: float = 1.2
    checkpoint_name_or_path: str = ""
    # Parameter-efficient fine-tuning (seed 001's LoRA: pet_type, lora_rank, lora_alpha, ...).
    pet_config: Optional[dict] = None

    UNSUPPORTED_FIELDS = {
        "batch_size": "the batch is not part of the model here: run scripts take --batch_size "
                      "and fine-tuning reads runner_config.batch_size; remove the field",
        "is_enhanced_encoder": "it selects a branch of MindFormers' own GLM generation and "
                               "evaluation code, which this port does not use; remove the field",
        "is_sample_acceleration": "it selects MindFormers' Ascend sampling inside the graph; "
                                  "here research/common/generation.py samples; remove the field",
    }

    @property
    def head_dim(self):
        return self.hidden_size_per_attention_head or self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name):
        """A fresh config of a named preset: one of PRESETS ("glm-6b", "glm-tiny")."""
        return preset(PRESETS, name)

    def decoder_shape(self):
        """The sizes research.common.memory estimates the KV cache and activations from; the
        rotary tables have head_dim / 2 columns (2D positions: each half of a head rotates)."""
        return DecoderShape(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.inner_hidden_size, num_heads=self.num_heads,
            kv_heads=self.num_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
            seq_length=self.seq_length, max_length=self.max_decode_length, use_past=self.use_past,
            compute_dtype=self.compute_dtype, scores_dtype=self.softmax_compute_type,
            rotary_width=self.head_dim // 2)

    def parameter_bytes(self):
        """Bytes of GLMForConditionalGeneration's parameters (LayerNorms counted at the param
        dtype too: a lower bound), from the shapes alone."""
        from research.visualglm.modeling_glm import parameter_shapes  # it imports this module

        count = parameter_count(parameter_shapes, self, "num_layers")
        return count * DTYPE_BYTES[self.param_init_type]

    def memory_estimate(self, batch_size=1):
        """research.common.memory's lower bound of generating `batch_size` answers at once."""
        return estimate_memory(self.decoder_shape(), parameter_bytes=self.parameter_bytes(),
                               batch_size=batch_size)

    def validate(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "inner_hidden_size",
                    "seq_length", "max_decode_length", "layernorm_epsilon")
        for name in positive:
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be positive, got {getattr(self, name)}")
        per_head = self.hidden_size_per_attention_head
        if per_head is not None and per_head <= 0:
            raise FieldError("hidden_size_per_attention_head", f"must be positive, got {per_head}")
        if per_head is None and self.hidden_size % self.num_heads:
            raise FieldError("hidden_size", f"{self.hidden_size} is not divisible by "
                                            f"num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise FieldError("hidden_size_per_attention_head" if per_head else "hidden_size",
                             f"head dim {self.head_dim} must be a multiple of 4 "
                             f"(two rotary halves of pairs)")
        for name in ("embedding_dropout_prob", "attention_dropout_rate", "hidden_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FieldError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id",
                     "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise FieldError(name, f"{getattr(self, name)} is outside the vocabulary "
                                       f"(0..{self.vocab_size - 1})")


def glm_tiny():
    """The tiny GLM of configs/visualglm/run_*tiny*.yaml: GLM-6B's architecture in 2 layers of
    64, with the special ids of examples/tiny/ice_text.model; for trying things on a CPU."""
    return GLMConfig(vocab_size=704, hidden_size=64, num_layers=2, num_heads=4,
                     inner_hidden_size=256, seq_length=64, max_decode_length=64,
                     bos_token_id=8, eos_token_id=9, mask_token_id=4, gmask_token_id=5,
                     pad_token_id=3)


# Named presets: name -> factory of a fresh config (the fields' defaults are GLM-6B).
PRESETS = {"glm-6b": GLMConfig, "glm-tiny": glm_tiny}
