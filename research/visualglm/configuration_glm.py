"""GLMConfig: the ChatGLM-6B (v1) language model inside VisualGLM.

Field names follow MindFormers' `GLMConfig` YAML (seed 001), so its configs load unchanged.
Defaults are the 6B model (DESIGN.md §4).
"""
import dataclasses
from typing import Literal, Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import DTYPES, ModelConfig
from research.common.errors import UserInputError

@MindFormerRegister.register(MindFormerModuleType.CONFIG)
@dataclasses.dataclass
class GLMConfig(ModelConfig):
    """Shapes, special ids, precision and decoding defaults of the GLM-6B language model."""

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
    embedding_dropout_prob: float = 0.0
    attention_dropout_rate: float = 0.0
    hidden_dropout_rate: float = 0.0
    use_past: bool = False
    param_init_type: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"
    layernorm_compute_type: DTYPES = "float32"
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
    # Accepted so MindFormers' YAML files load; they select Ascend-only fused kernels there.
    is_enhanced_encoder: bool = True
    is_sample_acceleration: bool = False
    batch_size: int = 1

    @property
    def head_dim(self):
        return self.hidden_size_per_attention_head or self.hidden_size // self.num_heads

    def validate(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "inner_hidden_size",
                    "seq_length", "batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserInputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size_per_attention_head is None and self.hidden_size % self.num_heads:
            raise UserInputError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise UserInputError(
                f"head dim {self.head_dim} must be a multiple of 4 (two rotary halves of pairs)")
        for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id",
                     "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserInputError(
                    f"{name}={getattr(self, name)} is outside the vocabulary (0..{self.vocab_size - 1})")
