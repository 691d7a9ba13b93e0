"""LlamaConfig: the shapes, precision and decoding defaults of MiniGPT-4's Vicuna (LLaMA) decoder.

Field names are MindFormers' llama YAML `model_config` names (`num_layers`, `num_heads`,
`n_kv_heads`, `theta`, `multiple_of`, ...; notes/minigpt4.md §6 quotes r1.0's
`text_config`), so a MindFormers llama `model_config` reads here. Hugging Face LlamaConfig
calls them num_hidden_layers, num_attention_heads, num_key_value_heads and rope_theta.
Architecture switches this port does not implement are Literal types pinned to LLaMA's one
value (no qkv bias, untied lm_head, float32 norms, softmax and rotary tables).

Defaults are Vicuna v0 7B: 32 layers of 4096, 32 heads, SwiGLU 11008, RMSNorm eps 1e-6, RoPE
base 10000 over the whole head, vocab 32001 (v0's config says 32001, its tokenizer has 32000
pieces; the converter checks the checkpoint's row count against `vocab_size`). Decoding
defaults are upstream MiniGPT-4's `Chat.answer` (do_sample, top_p 0.9, temperature 1.0,
repetition_penalty 1.0, max_length 2000). `PRESETS` / `LlamaConfig.from_name`: "7b", "13b"
(the primary upstream model) and "tiny".

Nothing is registered in MindFormers' registry yet.
"""
import dataclasses
from typing import ClassVar, Literal, Optional

from research.common.config import DTYPES, FieldError, ModelConfig, preset
from research.common.memory import DTYPE_BYTES, DecoderShape, estimate_memory, parameter_count


@dataclasses.dataclass
class LlamaConfig(ModelConfig):
    """LLaMA / Vicuna decoder with MindFormers' llama YAML field names."""

    # Upstream MiniGPT-4 decodes with transformers' logits processors.
    sampling_rule: ClassVar[str] = "hf"

    num_layers: int = 32
    vocab_size: int = 32001
    hidden_size: int = 4096
    num_heads: int = 32
    # Key/value heads (grouped-query attention); None: one per query head, as LLaMA-1 and Vicuna.
    n_kv_heads: Optional[int] = None
    # SwiGLU width; None: MindFormers' rule from hidden_size, multiple_of and ffn_dim_multiplier.
    intermediate_size: Optional[int] = 11008
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rms_norm_eps: float = 1e-6
    theta: float = 10000.0  # RoPE base (HF rope_theta)
    # Static length of every graph: the rotary tables have this many positions, the KV cache
    # at most this many slots (LLaMA-1 was trained on 2048).
    seq_length: int = 2048
    qkv_has_bias: Literal[False] = False
    attn_proj_has_bias: Literal[False] = False
    tie_word_embeddings: Literal[False] = False
    param_init_type: DTYPES = "float16"
    compute_dtype: DTYPES = "float16"
    layernorm_compute_type: Literal["float32"] = "float32"
    softmax_compute_type: Literal["float32"] = "float32"
    rotary_dtype: Literal["float32"] = "float32"
    use_past: bool = False
    use_flash_attention: Literal[False] = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Label of positions without loss; research.common.layers.next_token_loss ignores -100 only.
    ignore_token_id: Literal[-100] = -100
    # Decoding defaults: upstream MiniGPT-4's Chat.answer.
    repetition_penalty: float = 1.0
    max_decode_length: int = 2000
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 0.9
    temperature: float = 1.0
    checkpoint_name_or_path: str = ""
    # MindFormers' rows per forward pass: the run scripts' default --batch_size.
    batch_size: int = 1

    UNSUPPORTED_FIELDS = {
        "qkv_concat": "wq/wk/wv are separate weights here, as in the Hugging Face checkpoints; remove the field",
        "extend_method": "RoPE scaling (NTK, PI) is not implemented; LLaMA-1/Vicuna use none; remove the field",
        "quant_config": "quantized LLaMA is not supported; use the float16 weights and remove the field",
        "max_position_embedding": "seq_length sizes the rotary tables here; remove the field",
    }

    @property
    def kv_heads(self):
        """Key/value heads computed and cached."""
        return self.n_kv_heads or self.num_heads

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self):
        """The SwiGLU width: intermediate_size, or MindFormers' FeedForward rule (4h * 2/3,
        times ffn_dim_multiplier, rounded up to multiple_of: 11008 for 4096, 13824 for 5120)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = 4 * self.hidden_size
        if self.ffn_dim_multiplier is not None:
            width = int((self.ffn_dim_multiplier + 0.01) * width)
        width = int(2 * width / 3)
        return self.multiple_of * ((width + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name):
        """A fresh config of a named preset: one of PRESETS ("7b", "13b", "tiny")."""
        return preset(PRESETS, name)

    def parameter_count(self):
        """Parameters of LlamaForCausalLM(self), from the shapes alone."""
        from research.minigpt4.modeling_minigpt4 import parameter_shapes  # it imports this module

        return parameter_count(parameter_shapes, self, "num_layers")

    def decoder_shape(self):
        """The sizes research.common.memory estimates the KV cache and activations from."""
        return DecoderShape(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=2 * self.ffn_hidden_size,  # gate and up outputs are alive together
            num_heads=self.num_heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab_size, seq_length=self.seq_length, max_length=self.max_decode_length,
            use_past=self.use_past, compute_dtype=self.compute_dtype, scores_dtype=self.softmax_compute_type,
            rotary_width=self.head_dim // 2)

    def memory_estimate(self, batch_size=1):
        """research.common.memory's lower bound of generating `batch_size` answers at once."""
        return estimate_memory(self.decoder_shape(),
                               parameter_bytes=self.parameter_count() * DTYPE_BYTES[self.param_init_type],
                               batch_size=batch_size)

    def validate(self):
        for name in ("batch_size", "num_layers", "vocab_size", "hidden_size", "num_heads", "multiple_of",
                     "seq_length", "max_decode_length", "rms_norm_eps", "theta"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "intermediate_size", "ffn_dim_multiplier"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise FieldError(name, f"must be positive or null, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise FieldError("num_heads", f"hidden_size {self.hidden_size} is not divisible by "
                                          f"{self.num_heads} heads")
        if self.head_dim % 2:
            raise FieldError("num_heads", f"head width {self.head_dim} (hidden_size / num_heads) must be even: "
                                          f"RoPE rotates its two halves against each other")
        if self.num_heads % self.kv_heads:
            raise FieldError("n_kv_heads", f"num_heads {self.num_heads} is not divisible by "
                                           f"{self.kv_heads} key/value heads")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise FieldError(name, f"{getattr(self, name)} is outside the vocabulary "
                                       f"(0..{self.vocab_size - 1})")


def vicuna_13b():
    """Vicuna v0 13B, the primary upstream MiniGPT-4 model: 40 layers of 5120, 40 heads, SwiGLU 13824."""
    return LlamaConfig(num_layers=40, hidden_size=5120, num_heads=40, intermediate_size=13824)


def llama_tiny():
    """LLaMA's architecture in 2 layers of 64 (4 heads of 16) with 2 key/value heads, so the
    grouped-query path is exercised, for tests and trying things on a CPU."""
    return LlamaConfig(num_layers=2, vocab_size=320, hidden_size=64, num_heads=4, n_kv_heads=2,
                       intermediate_size=128, seq_length=64, max_decode_length=64,
                       param_init_type="float32", compute_dtype="float32", use_past=True, do_sample=False)


# Named presets: name -> factory of a fresh config (the fields' defaults are Vicuna v0 7B).
PRESETS = {"7b": LlamaConfig, "13b": vicuna_13b, "tiny": llama_tiny}
