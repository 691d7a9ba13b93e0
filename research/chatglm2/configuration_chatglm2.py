"""ChatGLM2Config: the shapes, precision and decoding defaults of ChatGLM2-6B.

Field names are MindFormers r1.0's `configs/glm2/run_glm2_6b.yaml` `model_config` (DESIGN.md §5,
notes/chatglm2.md §2.7), so a MindFormers glm2 YAML reads here. Every field is either used by
the code or accepts only the values the code implements: HF chatglm2-6b's architecture switches
(`rmsnorm`, `post_layer_norm`, `add_bias_linear`, ...) are Literal types pinned to the one
architecture there is, and what this port does not implement (quantization, flash attention) is refused with the
reason. Defaults are the 6B model; `PRESETS` /
`ChatGLM2Config.from_name` name "6b", "tiny" and "tiny_demo".

Registered in MindFormers' registry as `ResearchChatGLM2Config` (not `ChatGLM2Config`, which
would silently replace MindFormers' own class).
"""
import dataclasses
from typing import ClassVar, Literal, Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import (REGISTRY_PREFIX, DTYPES, FieldError, ModelConfig, load_config, preset,
                                    resolve_config_path)
from research.common.memory import DTYPE_BYTES, DecoderShape, estimate_memory, parameter_count

# MindFormers' run_glm2_6b_lora.yaml pet_config, what a ChatGLM2 pet_config leaves out.
LORA_DEFAULTS = dict(pet_type="lora", lora_rank=8, lora_alpha=32.0, lora_dropout=0.1,
                     target_modules=r"query_key_value")


@MindFormerRegister.register(MindFormerModuleType.CONFIG, alias=REGISTRY_PREFIX + "ChatGLM2Config")
@dataclasses.dataclass
class ChatGLM2Config(ModelConfig):
    """ChatGLM2-6B (HF THUDM/chatglm2-6b config.json) with MindFormers' YAML field names."""

    # Upstream ChatGLM2 decodes with transformers' logits processors.
    sampling_rule: ClassVar[str] = "hf"

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    # Static length of every graph: the rotary table has this many positions, the KV cache at
    # most this many slots. HF's 32768 is the trained context; YAMLs choose what a run needs.
    seq_length: int = 32768
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    # MindFormers 1.9's RoPE base multiplier (the 32k variants use 50; chatglm2-6b: 1).
    rope_ratio: float = 1.0
    # The architecture switches of HF's config.json: only chatglm2-6b's values exist here.
    rmsnorm: Literal[True] = True
    apply_residual_connection_post_layernorm: Literal[False] = False
    post_layer_norm: Literal[True] = True
    add_bias_linear: Literal[False] = False
    add_qkv_bias: Literal[True] = True
    # A fusion of the implementation, not of the function: either value computes the same.
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    # Divides the scores by the layer number and multiplies back around the float32 softmax:
    # the same function either way (DESIGN.md §5).
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: Literal[True] = True
    fp32_residual_connection: Literal[False] = False
    quantization_bit: int = 0
    # P-Tuning v2 (upstream ptuning/): this many trainable prefix keys/values per layer (None or 0: off),
    # optionally through upstream's Linear-Tanh-Linear projection, with dropout on the prefix.
    pre_seq_len: Optional[int] = None
    prefix_projection: bool = False
    prefix_dropout: float = 0.1
    param_init_type: DTYPES = "float16"
    compute_dtype: DTYPES = "float16"
    layernorm_compute_type: Literal["float32"] = "float32"
    softmax_compute_type: Literal["float32"] = "float32"
    use_past: bool = False
    use_flash_attention: Literal[False] = False
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Decoding defaults (MindFormers r1.0's YAML: top_k 1, so greedy though do_sample is True).
    repetition_penalty: float = 1.0
    max_decode_length: int = 256
    do_sample: bool = True
    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0
    checkpoint_name_or_path: str = ""
    # LoRA (MindFormers' glm2 LoRA YAMLs): research.common.lora.LoRAConfig's fields; the defaults
    # for ChatGLM2 are LORA_DEFAULTS.
    pet_config: Optional[dict] = None
    # MindFormers' rows per forward pass: here the run scripts' default --batch_size (the graphs
    # take any batch).
    batch_size: int = 1

    UNSUPPORTED_FIELDS = {
        "is_sample_acceleration": "it selects MindFormers' Ascend sampling inside the graph; here "
                                  "research/common/generation.py samples; remove the field",
        "qkv_concat": "the fused query_key_value is the only layout here (MindFormers 1.9's "
                      "wq/wk/wv split is not); remove the field",
        "mlp_concat": "the fused dense_h_to_4h is the only layout here; remove the field",
        "use_rearrange_rope": "RoPE rotates interleaved pairs as upstream does, on the weights "
                              "as published; remove the field",
    }

    @property
    def kv_heads(self):
        """Key/value heads computed and cached: the groups of multi-query attention."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self):
        """Rows of the fused query_key_value: [Q heads*d | K groups*d | V groups*d]."""
        return (self.num_attention_heads + 2 * self.kv_heads) * self.kv_channels

    @property
    def rotary_dim(self):
        """Dims of each head that rotate (the first half, as interleaved pairs)."""
        return self.kv_channels // 2

    @classmethod
    def from_name(cls, name):
        """A fresh config of a named preset: one of PRESETS ("6b", "tiny", "tiny_demo")."""
        return preset(PRESETS, name)

    def parameter_count(self):
        """Parameters of ChatGLM2ForConditionalGeneration(self), from the shapes alone."""
        from research.chatglm2.modeling_chatglm2 import parameter_shapes  # it imports this module

        return parameter_count(parameter_shapes, self, "num_layers")

    def decoder_shape(self):
        """The sizes research.common.memory estimates the KV cache and activations from."""
        return DecoderShape(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=2 * self.ffn_hidden_size, num_heads=self.num_attention_heads,
            kv_heads=self.kv_heads, head_dim=self.kv_channels, vocab_size=self.padded_vocab_size,
            seq_length=self.seq_length, max_length=self.max_decode_length, use_past=self.use_past,
            compute_dtype=self.compute_dtype, scores_dtype=self.softmax_compute_type,
            rotary_width=self.rotary_dim // 2)

    def memory_estimate(self, batch_size=1):
        """research.common.memory's lower bound of generating `batch_size` answers at once."""
        return estimate_memory(self.decoder_shape(),
                               parameter_bytes=self.parameter_count() * DTYPE_BYTES[self.param_init_type],
                               batch_size=batch_size)

    def validate(self):
        for name in ("batch_size", "num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size",
                     "kv_channels", "num_attention_heads", "multi_query_group_num", "seq_length",
                     "max_decode_length", "layernorm_epsilon", "rope_ratio"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"must be positive, got {getattr(self, name)}")
        if self.kv_channels % 4:
            raise FieldError("kv_channels", f"{self.kv_channels} must be a multiple of 4 (RoPE "
                                            f"rotates pairs in the first half of each head)")
        if self.num_attention_heads % self.kv_heads:
            raise FieldError("multi_query_group_num",
                             f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"{self.kv_heads} key/value groups")
        if self.quantization_bit != 0:
            raise FieldError("quantization_bit",
                             f"{self.quantization_bit}: int4/int8 ChatGLM2 (HF model.quantize) is "
                             f"not supported; use the float16 weights and quantization_bit: 0")
        if self.pre_seq_len is not None and self.pre_seq_len < 0:
            raise FieldError("pre_seq_len", f"must be >= 0 (0 or null: no P-Tuning prefix), got {self.pre_seq_len}")
        if self.pet_config and self.pet_config.get("pet_type") == "ptuning2":
            self._take_ptuning2_pet_config()
        if self.pet_config and self.pre_seq_len:
            raise FieldError("pet_config", "LoRA and a P-Tuning prefix (pre_seq_len) together: choose one")
        for name in ("hidden_dropout", "attention_dropout", "prefix_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FieldError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.padded_vocab_size:
                raise FieldError(name, f"{getattr(self, name)} is outside the vocabulary "
                                       f"(0..{self.padded_vocab_size - 1})")


    def _take_ptuning2_pet_config(self):
        """MindFormers' run_glm2_6b_ptuning2.yaml describes the prefix in `pet_config` (pet_type
        ptuning2, pre_seq_len, prefix_projection, projection_dim, dropout_prob); here those are
        model_config.pre_seq_len / prefix_projection / prefix_dropout, upstream's names."""
        pet = dict(self.pet_config)
        pet.pop("pet_type")
        unknown = sorted(set(pet) - {"pre_seq_len", "prefix_projection", "projection_dim", "dropout_prob"})
        if unknown:
            raise FieldError("pet_config", f"unknown ptuning2 field(s) {unknown}; known: pre_seq_len, "
                                           f"prefix_projection, projection_dim, dropout_prob")
        projection_dim = pet.get("projection_dim")
        if pet.get("prefix_projection") and projection_dim not in (None, self.hidden_size):
            raise FieldError("pet_config", f"projection_dim {projection_dim}: upstream's prefix projection is "
                                           f"hidden_size ({self.hidden_size}) wide, the only width here")
        for name, field in (("pre_seq_len", "pre_seq_len"), ("prefix_projection", "prefix_projection"),
                            ("dropout_prob", "prefix_dropout")):
            if name in pet:
                setattr(self, field, pet[name])
        self.pet_config = None
        self.validate()


def chatglm2_tiny():
    """The tiny ChatGLM2 of configs/chatglm2/run_glm2_tiny.yaml: ChatGLM2-6B's architecture
    (2 KV groups, RoPE on half of each head, SwiGLU, untied output) in 2 layers of 64, with a
    head width (4 x 24) unlike hidden_size, for trying things and testing on a CPU."""
    return ChatGLM2Config(num_layers=2, padded_vocab_size=640, hidden_size=64, ffn_hidden_size=128,
                          kv_channels=24, num_attention_heads=4, multi_query_group_num=2,
                          seq_length=64, max_decode_length=64, param_init_type="float32",
                          compute_dtype="float32", use_past=True, do_sample=False)


def chatglm2_tiny_demo():
    """The model of `make demo`'s ChatGLM2 stage (configs/chatglm2/run_glm2_tiny_demo_*.yaml): 2
    layers of 128 (4 heads of 32, 2 KV groups) over the demo tokenizer's 405 ids, rows of 67 tokens."""
    return ChatGLM2Config(num_layers=2, padded_vocab_size=448, hidden_size=128, ffn_hidden_size=256,
                          kv_channels=32, num_attention_heads=4, multi_query_group_num=2,
                          seq_length=67, max_decode_length=67, param_init_type="float32",
                          compute_dtype="float32", use_past=True, do_sample=False)


# Named presets: name -> factory of a fresh config (the fields' defaults are ChatGLM2-6B).
PRESETS = {"6b": ChatGLM2Config, "tiny": chatglm2_tiny, "tiny_demo": chatglm2_tiny_demo}


def load_chatglm2_config(config):
    """(YAML config, ChatGLM2Config) from a YAML path or a name in configs/chatglm2/.

    `model_config.type` is not checked, so MindFormers' own glm2 YAMLs (`type: ChatGLM2Config`)
    read as well as ours (`type: ResearchChatGLM2Config`)."""
    yaml_config = load_config(resolve_config_path(config, "chatglm2"))
    model_node = yaml_config.get("model") or {}
    model_config = ChatGLM2Config.from_dict(model_node.get("model_config"), "model.model_config",
                                            yaml_config.source)
    return yaml_config, model_config
