"""VisualGLMConfig: EVA-ViT-g + Q-Former + glm_proj + GLM-6B, as MindFormers' YAML spells it.

Each part names its own converted checkpoint (seed 001): `vision_config.checkpoint_name_or_path`
(ViT + ln_vision), the top-level `checkpoint_name_or_path` (Q-Former + glm_proj) and
`text_config.checkpoint_name_or_path` (GLM). Defaults are VisualGLM-6B; `PRESETS` /
`VisualGLMConfig.from_name` name the 6B and the tiny models that configs/visualglm/ use.
"""
import dataclasses

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common import qformer, vision
from research.common.config import (DTYPES, FieldError, ModelConfig, load_config, preset,
                                    resolve_config_path)
from research.common.memory import DTYPE_BYTES, estimate_memory, parameter_count
from research.common.qformer import QFormerConfig
from research.common.vision import ViTConfig
from research.visualglm.configuration_glm import GLMConfig, glm_tiny


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
@dataclasses.dataclass
class VisualGLMConfig(ModelConfig):
    """The three sub-configs plus the projection's precision; defaults are VisualGLM-6B."""

    vision_config: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    qformer_config: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    text_config: GLMConfig = dataclasses.field(default_factory=GLMConfig)
    # Q-Former + glm_proj weights.
    checkpoint_name_or_path: str = ""
    # Training switches (#4): the ViT and the GLM stay frozen unless set to False.
    freeze_vision: bool = True
    freeze_text: bool = True
    # Precision of glm_proj (MindFormers' names).
    dtype: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"

    UNSUPPORTED_FIELDS = {
        "batch_size": "the batch is not part of the model here: run scripts take --batch_size "
                      "and fine-tuning reads runner_config.batch_size; remove the field",
        "max_txt_len": "BLIP-2's text length for its OPT/T5 decoders; VisualGLM's text length is "
                       "text_config.seq_length (fine-tuning: train_dataset.max_source_length and "
                       "max_target_length); remove the field",
        "layernorm_dtype": "glm_proj has no LayerNorm (the sub-configs' LayerNorms compute in "
                           "float32); remove the field",
        "softmax_dtype": "glm_proj has no softmax (set the sub-configs' softmax_compute_type); "
                         "remove the field",
    }

    @property
    def image_length(self):
        """Image embeddings per image = Q-Former queries (32): the placeholders in the prompt."""
        return self.qformer_config.query_length

    @classmethod
    def from_name(cls, name):
        """A fresh config of a named preset: one of PRESETS ("visualglm-6b", ...)."""
        return preset(PRESETS, name)

    def memory_estimate(self, batch_size=1, training_length=None):
        """research.common.memory's lower bound of generating `batch_size` answers at once, or
        of training on batches of `batch_size` samples padded to `training_length`.

        Trainable in training: the Q-Former and glm_proj, plus the ViT / GLM unless frozen;
        with LoRA (text_config.pet_config) only the LoRA matrices, counted as nothing."""
        vit, query, text = self.vision_config, self.qformer_config, self.text_config
        parts = {
            "vision": parameter_count(vision.parameter_shapes, vit, "num_hidden_layers")
            * DTYPE_BYTES[vit.param_init_type],
            "qformer": parameter_count(qformer.parameter_shapes, query, "num_hidden_layers",
                                       query.cross_attention_freq)
            * DTYPE_BYTES[query.param_init_type],
            "glm_proj": (query.hidden_size + 1) * text.hidden_size * DTYPE_BYTES[self.dtype],
            "text": text.parameter_bytes(),
        }
        trainable = 0
        if not text.pet_config:
            frozen = [part for part, flag in (("vision", self.freeze_vision),
                                              ("text", self.freeze_text)) if flag]
            trainable = sum(size for part, size in parts.items() if part not in frozen)
        return estimate_memory(text.decoder_shape(), parameter_bytes=sum(parts.values()),
                               batch_size=batch_size, training_length=training_length,
                               trainable_bytes=trainable)

    def validate(self):
        if self.qformer_config.encoder_width != self.vision_config.hidden_size:
            raise FieldError("qformer_config.encoder_width",
                             f"{self.qformer_config.encoder_width} must equal "
                             f"vision_config.hidden_size ({self.vision_config.hidden_size})")
        if self.image_length >= self.text_config.seq_length:
            raise FieldError("text_config.seq_length",
                             f"{self.text_config.seq_length} must be longer than the "
                             f"{self.image_length} image tokens")


def visualglm_tiny(patch_size=14):
    """The tiny VisualGLM of run_visualglm_tiny_image_to_text_generation.yaml: VisualGLM-6B's
    architecture (32 queries) scaled down to run in seconds on a CPU, on 56x56 images."""
    text = glm_tiny()
    text.seq_length = text.max_decode_length = 128
    return VisualGLMConfig(
        vision_config=ViTConfig(image_size=56, patch_size=patch_size, hidden_size=48,
                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        qformer_config=QFormerConfig(num_hidden_layers=2, num_heads=4, hidden_size=32,
                                     intermediate_size=64, encoder_width=48),
        text_config=text)


def visualglm_tiny_demo():
    """The tiny VisualGLM that `make demo` trains (run_visualglm_tiny_{finetune,lora,demo}.yaml):
    patch 7, as the synthetic shapes need more than 4x4 patches at 56x56."""
    return visualglm_tiny(patch_size=7)


# Named presets: name -> factory of a fresh config.
PRESETS = {"visualglm-6b": VisualGLMConfig, "visualglm-tiny": visualglm_tiny,
           "visualglm-tiny-demo": visualglm_tiny_demo}


def load_visualglm_config(config):
    """(YAML config, VisualGLMConfig) from a YAML path or a name in configs/visualglm/."""
    yaml_config = load_config(resolve_config_path(config, "visualglm"))
    model_node = yaml_config.get("model") or {}
    model_config = VisualGLMConfig.from_dict(model_node.get("model_config"), "model.model_config",
                                             yaml_config.source)
    return yaml_config, model_config
