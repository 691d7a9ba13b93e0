"""VisualGLMConfig: EVA-ViT-g + Q-Former + glm_proj + GLM-6B, as MindFormers' YAML spells it.

Each part names its own converted checkpoint (seed 001): `vision_config.checkpoint_name_or_path`
(ViT + ln_vision), the top-level `checkpoint_name_or_path` (Q-Former + glm_proj) and
`text_config.checkpoint_name_or_path` (GLM).
"""
import dataclasses

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import DTYPES, ModelConfig, load_config, resolve_config_path
from research.common.errors import UserInputError
from research.common.qformer import QFormerConfig
from research.common.vision import ViTConfig
from research.visualglm.configuration_glm import GLMConfig


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
@dataclasses.dataclass
class VisualGLMConfig(ModelConfig):
    """The three sub-configs plus the projection's precision; defaults are VisualGLM-6B."""

    vision_config: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    qformer_config: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    text_config: GLMConfig = dataclasses.field(default_factory=GLMConfig)
    # Q-Former + glm_proj weights.
    checkpoint_name_or_path: str = ""
    batch_size: int = 1
    # Training switches (#4): the ViT and the GLM stay frozen unless set to False.
    freeze_vision: bool = True
    freeze_text: bool = True
    max_txt_len: int = 32
    # Precision of glm_proj (MindFormers' names).
    dtype: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"
    layernorm_dtype: DTYPES = "float32"
    softmax_dtype: DTYPES = "float32"

    @property
    def image_length(self):
        """Image embeddings per image = Q-Former queries (32): the placeholders in the prompt."""
        return self.qformer_config.query_length

    def validate(self):
        if self.qformer_config.encoder_width != self.vision_config.hidden_size:
            raise UserInputError(
                f"qformer_config.encoder_width ({self.qformer_config.encoder_width}) must equal "
                f"vision_config.hidden_size ({self.vision_config.hidden_size})")
        if self.batch_size <= 0:
            raise UserInputError(f"batch_size must be positive, got {self.batch_size}")
        if self.image_length >= self.text_config.seq_length:
            raise UserInputError(
                f"text_config.seq_length ({self.text_config.seq_length}) must be longer than the "
                f"{self.image_length} image tokens")


def load_visualglm_config(config):
    """(YAML config, VisualGLMConfig) from a YAML path or a name in configs/visualglm/."""
    yaml_config = load_config(resolve_config_path(config, "visualglm"))
    model_node = yaml_config.get("model") or {}
    model_config = VisualGLMConfig.from_dict(model_node.get("model_config"), "model.model_config",
                                             yaml_config.source)
    return yaml_config, model_config
