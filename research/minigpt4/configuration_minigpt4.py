"""MiniGPT-4's configs: `LlamaConfig` (its Vicuna / LLaMA decoder) and `MiniGPT4Config` (EVA-ViT-g,
the Q-Former, `llama_proj` and that decoder, each part with its own converted checkpoint).

LlamaConfig: the shapes, precision and decoding defaults of MiniGPT-4's Vicuna (LLaMA) decoder.

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
(the primary upstream model), "llama2-7b" and "tiny".

MiniGPT4Config (notes/minigpt4.md §2.1): image [B,3,224,224] -> EVA-ViT-g (39 blocks, no final
norm) -> ln_vision (eps 1e-5) -> Q-Former (32 queries) -> llama_proj Linear(768, H) -> 32
embeddings at `<ImageHere>`. The Llama-2-chat variant (`has_qformer: False`) drops the CLS token
and merges 4 neighbouring patches: [B,256,1408] -> [B,64,5632] -> llama_proj Linear(5632, 4096).
The four checkpoints: `vision_config.checkpoint_name_or_path` (eva_vit_g.pth converted),
`qformer_config.checkpoint_name_or_path` (ln_vision, query tokens and Q-Former of
blip2_pretrained_flant5xxl.pth), `text_config.checkpoint_name_or_path` (Vicuna) and the top-level
`checkpoint_name_or_path` (llama_proj: upstream's `ckpt`, pretrained_minigpt4.pth).
`MINIGPT4_PRESETS` / `MiniGPT4Config.from_name`: "minigpt4-7b", "minigpt4-13b",
"minigpt4-llama2-7b", "minigpt4-tiny", "minigpt4-llama2-tiny".
"""
import dataclasses
from typing import ClassVar, Literal, Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common import qformer, vision
from research.common.config import (REGISTRY_PREFIX, DTYPES, FieldError, ModelConfig, load_config, preset,
                                    resolve_config_path)
from research.common.memory import DTYPE_BYTES, DecoderShape, estimate_memory, parameter_count
from research.common.qformer import QFormerConfig
from research.common.vision import ViTConfig


@MindFormerRegister.register(MindFormerModuleType.CONFIG, alias=REGISTRY_PREFIX + "LlamaConfig")
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


def llama2_7b_chat():
    """Llama-2-7b-chat (MiniGPT-4's Llama-2 variant): Vicuna 7B's shapes with 32000 tokens,
    4096 positions and RMSNorm eps 1e-5 (its Hugging Face config.json)."""
    return LlamaConfig(vocab_size=32000, rms_norm_eps=1e-5, seq_length=4096)


# Named presets: name -> factory of a fresh config (the fields' defaults are Vicuna v0 7B).
PRESETS = {"7b": LlamaConfig, "13b": vicuna_13b, "llama2-7b": llama2_7b_chat, "tiny": llama_tiny}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
@dataclasses.dataclass
class MiniGPT4Config(ModelConfig):
    """The three sub-configs, the variant switch and llama_proj's checkpoint and precision;
    defaults are MiniGPT-4 with Vicuna v0 7B."""

    vision_config: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    qformer_config: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    text_config: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    # False: the Llama-2 variant (no Q-Former; 4 patches merged per image token).
    has_qformer: bool = True
    # llama_proj (upstream's `ckpt`: pretrained_minigpt4.pth converted).
    checkpoint_name_or_path: str = ""
    # Training (run_minigpt4_train.py): llama_proj always trains; upstream's freeze_vit and
    # freeze_qformer, and freeze_llama (upstream always freezes Vicuna), add their parts.
    freeze_vit: bool = True
    freeze_qformer: bool = True
    freeze_llama: bool = True
    # Precision of llama_proj (MindFormers' names).
    dtype: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"

    UNSUPPORTED_FIELDS = {
        "low_resource": "8-bit LLaMA loading (bitsandbytes) is not supported; use float16 weights "
                        "(text_config.param_init_type) and remove the field",
        "max_txt_len": "a training setting (#16); generation is bounded by text_config.seq_length; "
                       "remove the field",
        "num_query_token": "the image tokens are qformer_config.query_length; remove the field",
    }

    # Patches merged into one image token by the Llama-2 variant.
    MERGED_PATCHES: ClassVar[int] = 4

    @property
    def image_tokens(self):
        """Image embeddings per image: the Q-Former's queries, or the merged patches."""
        if self.has_qformer:
            return self.qformer_config.query_length
        return self.vision_config.num_patches // self.MERGED_PATCHES

    @property
    def projection_width(self):
        """llama_proj's input width: the Q-Former's hidden size, or 4 patches side by side."""
        if self.has_qformer:
            return self.qformer_config.hidden_size
        return self.MERGED_PATCHES * self.vision_config.hidden_size

    @classmethod
    def from_name(cls, name):
        """A fresh config of a named preset: one of MINIGPT4_PRESETS."""
        return preset(MINIGPT4_PRESETS, name)

    def parameter_count(self):
        """Parameters of MiniGPT4(self), from the shapes alone."""
        count = vision.count_parameters(self.vision_config)
        if self.has_qformer:
            count += qformer.count_parameters(self.qformer_config)
        count += (self.projection_width + 1) * self.text_config.hidden_size
        return count + self.text_config.parameter_count()

    def memory_estimate(self, batch_size=1):
        """research.common.memory's lower bound of answering `batch_size` pairs at once."""
        vit, query, text = self.vision_config, self.qformer_config, self.text_config
        image_bytes = vision.count_parameters(vit) * DTYPE_BYTES[vit.param_init_type]
        if self.has_qformer:
            image_bytes += qformer.count_parameters(query) * DTYPE_BYTES[query.param_init_type]
        image_bytes += (self.projection_width + 1) * text.hidden_size * DTYPE_BYTES[self.dtype]
        text_bytes = text.parameter_count() * DTYPE_BYTES[text.param_init_type]
        return estimate_memory(text.decoder_shape(), parameter_bytes=image_bytes + text_bytes,
                               batch_size=batch_size)

    def validate(self):
        if self.has_qformer and self.qformer_config.encoder_width != self.vision_config.hidden_size:
            raise FieldError("qformer_config.encoder_width",
                             f"{self.qformer_config.encoder_width} must equal vision_config.hidden_size "
                             f"({self.vision_config.hidden_size})")
        if not self.has_qformer and self.qformer_config != QFormerConfig():
            raise FieldError("qformer_config", "the Llama-2 variant (has_qformer: False) has no Q-Former, so "
                                               "nothing reads this section; remove it")
        if not self.has_qformer and self.vision_config.num_patches % self.MERGED_PATCHES:
            raise FieldError("vision_config.image_size",
                             f"the Llama-2 variant merges {self.MERGED_PATCHES} patches per image token; "
                             f"{self.vision_config.num_patches} patches do not divide")
        if self.image_tokens >= self.text_config.seq_length:
            raise FieldError("text_config.seq_length", f"{self.text_config.seq_length} must be longer than the "
                                                       f"{self.image_tokens} image tokens")


def minigpt4_13b():
    """MiniGPT-4 with Vicuna v0 13B, the primary upstream model (llama_proj 768 -> 5120)."""
    return MiniGPT4Config(text_config=vicuna_13b())


def minigpt4_llama2_7b():
    """MiniGPT-4's Llama-2-chat 7B variant: no Q-Former, 64 image tokens, llama_proj 5632 -> 4096."""
    return MiniGPT4Config(text_config=llama2_7b_chat(), has_qformer=False)


def _tiny_vision():
    return ViTConfig(image_size=56, patch_size=14, hidden_size=48, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=96)


def _tiny_text():
    """The tiny LLaMA with room for a chat (192 positions) and the shipped tiny tokenizer
    (examples/tiny/llama_tokenizer.model, under 1024 pieces)."""
    text = llama_tiny()
    text.vocab_size = 1024
    text.seq_length = text.max_decode_length = 192
    return text


def minigpt4_tiny():
    """MiniGPT-4's architecture (32 Q-Former queries) scaled down to run in seconds on a CPU,
    on 56x56 images."""
    return MiniGPT4Config(
        vision_config=_tiny_vision(),
        qformer_config=QFormerConfig(num_hidden_layers=2, num_heads=4, hidden_size=32,
                                     intermediate_size=64, encoder_width=48),
        text_config=_tiny_text())


def minigpt4_llama2_tiny():
    """The Llama-2 variant scaled down: 16 patches of 56x56 images merged into 4 image tokens."""
    return MiniGPT4Config(vision_config=_tiny_vision(), text_config=_tiny_text(), has_qformer=False)


# Named presets: name -> factory of a fresh config.
MINIGPT4_PRESETS = {"minigpt4-7b": MiniGPT4Config, "minigpt4-13b": minigpt4_13b,
                    "minigpt4-llama2-7b": minigpt4_llama2_7b, "minigpt4-tiny": minigpt4_tiny,
                    "minigpt4-llama2-tiny": minigpt4_llama2_tiny}


def load_minigpt4_config(config):
    """(YAML config, MiniGPT4Config) from a YAML path or a name in configs/minigpt4/."""
    yaml_config = load_config(resolve_config_path(config, "minigpt4"))
    model_node = yaml_config.get("model") or {}
    model_config = MiniGPT4Config.from_dict(model_node.get("model_config"), "model.model_config",
                                            yaml_config.source)
    return yaml_config, model_config
