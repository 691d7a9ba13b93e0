"""VisualGLM-6B: EVA-ViT-g -> Q-Former -> glm_proj gives 32 image embeddings, which replace
the 32 placeholder tokens between `<img>` and `</img>` in the GLM's input embeddings.

- `VisualGLMModel`: the image side (upstream's BLIP2 module): pixel_values [B,3,S,S] ->
  image embeddings [B,32,GLM hidden]. It is its own cell so that it compiles (and exports
  to MindIR) on its own.
- `VisualGLMImageToTextGeneration`: the image side plus the GLM of modeling_glm; `construct`
  is the full forward with the splice done in the graph (training), `generate` answers a
  batch of (image, prompt) pairs through the shared generation loop.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common import qformer as qformer_module
from research.common import vision as vision_module
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate
from research.common.image_splice import splice_image_embeddings, splice_prompt_embeddings
from research.common.layers import ms_dtype, next_token_loss
from research.common.runtime import load_weights
from research.visualglm.configuration_visualglm import VisualGLMConfig
from research.visualglm.convert_visualglm import glm_rows
from research.visualglm.modeling_glm import GLMForConditionalGeneration


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class VisualGLMModel(nn.Cell):
    """pixel_values [B,3,S,S] float32 -> image embeddings [B, query_length, GLM hidden]."""

    def __init__(self, config: VisualGLMConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = vision_module.EvaViT(config.vision_config)
        self.qformer = qformer_module.QFormer(config.qformer_config)
        self.glm_proj = nn.Dense(config.qformer_config.hidden_size, config.text_config.hidden_size,
                                 dtype=ms_dtype(config.dtype))
        if config.compute_dtype != "float32":
            self.glm_proj.to_float(ms_dtype(config.compute_dtype))

    def construct(self, pixel_values):
        return self.glm_proj(self.qformer(self.visual_encoder(pixel_values)))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
def checkpoint_paths(config: VisualGLMConfig):
    """(what, path) of the three converted checkpoints a config names, in loading order."""
    return [("ViT checkpoint (vision_config.checkpoint_name_or_path)",
             config.vision_config.checkpoint_name_or_path),
            ("Q-Former checkpoint (model_config.checkpoint_name_or_path)", config.checkpoint_name_or_path),
            ("GLM checkpoint (text_config.checkpoint_name_or_path)",
             config.text_config.checkpoint_name_or_path)]


class VisualGLMImageToTextGeneration(nn.Cell):
    """VisualGLM-6B for image-grounded chat.

    Parameters live under `image_encoder.` (`visual_encoder.*`, `qformer.*`, `glm_proj.*`) and
    `llm_model.` (the GLM's own names), so each converted checkpoint loads into its part.
    """

    def __init__(self, config: VisualGLMConfig):
        super().__init__()
        self.config = config
        self.image_encoder = VisualGLMModel(config)
        self.llm_model = GLMForConditionalGeneration(config.text_config)

    def construct(self, input_ids, position_ids, attention_mask, pixel_values, image_mask):
        """Logits [B,S,V] for input_ids [B,S] whose `image_mask` positions hold the image."""
        image_embeds = self.image_encoder(pixel_values)
        text_embeds = self.llm_model.embed_tokens(input_ids)
        embeds = splice_image_embeddings(text_embeds, image_embeds, image_mask)
        logits, _, _ = self.llm_model(input_ids, position_ids, attention_mask, embeds)
        return logits

    def load_checkpoints(self):
        """Load the three converted checkpoints the config names; returns the parts loaded."""
        cells = [(self.image_encoder, ("qformer.", "glm_proj."), "image_encoder."),
                 (self.image_encoder, ("visual_encoder.",), "image_encoder."),
                 (self.llm_model, (), "llm_model.")]
        loaded = []
        for (what, path), (cell, allow_missing, prefix) in zip(checkpoint_paths(self.config), cells):
            if load_weights(cell, path, what, allow_missing=allow_missing, prefix=prefix):
                loaded.append(what.split(" (")[0])
        return loaded

    def save_checkpoints(self, vit_path, qformer_path, glm_path):
        """Write the model's weights as the three checkpoints `load_checkpoints` reads (the
        layout convert_weight.py writes); LoRA weights must be merged or left out first."""
        from research.common.convert import save_checkpoint_atomic

        parts = {vit_path: ("image_encoder.", ("image_encoder.visual_encoder.",)),
                 qformer_path: ("image_encoder.", ("image_encoder.qformer.", "image_encoder.glm_proj.")),
                 glm_path: ("llm_model.", ("llm_model.",))}
        params = {p.name: p for p in self.get_parameters()}
        for path, (prefix, scopes) in parts.items():
            save_checkpoint_atomic({name[len(prefix):]: param.asnumpy() for name, param in params.items()
                                    if name.startswith(scopes)}, path)

    def image_embeddings(self, pixel_values):
        """Image embeddings [B,32,H] (numpy) for pixel_values [B,3,S,S]."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise UserInputError(f"pixel_values must be [batch, 3, {size}, {size}], "
                                 f"got {list(pixel_values.shape)}")
        return self.image_encoder(Tensor(pixel_values, ms.float32)).asnumpy()

    def prompt_embeddings(self, prompts, pre_image_lengths, image_embeds):
        """Left-padded prompt embeddings [B,P,H] with each row's image spliced in after `<img>`."""
        return splice_prompt_embeddings(
            prompts, pre_image_lengths, image_embeds,
            lambda ids: self.llm_model.embed_tokens(Tensor(ids)).asnumpy(),
            self.config.text_config.pad_token_id)

    def generate(self, prompts, pre_image_lengths, pixel_values, settings: GenerationConfig,
                 on_tokens=None):
        """New token ids for each (image, prompt) row, all rows in one batch."""
        if len(prompts) != len(pixel_values) or len(prompts) != len(pre_image_lengths):
            raise UserInputError(f"{len(pixel_values)} images for {len(prompts)} prompts")
        embeds = self.prompt_embeddings(prompts, pre_image_lengths,
                                        self.image_embeddings(pixel_values))
        return generate(self.llm_model, prompts, settings, prompt_embeds=embeds, on_tokens=on_tokens)


def count_parameters(config: VisualGLMConfig):
    """Parameters of VisualGLMImageToTextGeneration(config), from shapes (nothing allocated)."""
    proj = (config.qformer_config.hidden_size + 1) * config.text_config.hidden_size
    glm = sum(int(np.prod(row.shape)) for row in glm_rows(config.text_config, "sat"))
    return (vision_module.count_parameters(config.vision_config)
            + qformer_module.count_parameters(config.qformer_config) + proj + glm)


class VisualGLMForTraining(nn.Cell):
    """The language-modelling loss of VisualGLM: logits at t predict labels at t+1, -100 ignored.

    Built with auto_prefix=False so parameter names stay those of the wrapped model.
    """

    def __init__(self, model: VisualGLMImageToTextGeneration):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, image, input_ids, labels, position_ids, attention_mask, image_mask):
        return next_token_loss(self.model(input_ids, position_ids, attention_mask, image, image_mask), labels)


def select_trainable(model: VisualGLMImageToTextGeneration):
    """Mark what fine-tuning updates and return it.

    With `text_config.pet_config` (LoRA) only the LoRA matrices train (seed 001); otherwise the
    Q-Former and glm_proj train, plus the ViT unless `freeze_vision` and the GLM unless
    `freeze_text` (full fine-tuning).
    """
    from research.common.lora import freeze_all_but_lora

    config = model.config
    if config.text_config.pet_config:
        return freeze_all_but_lora(model)
    frozen = (("image_encoder.visual_encoder.",) if config.freeze_vision else ()) + \
        (("llm_model.",) if config.freeze_text else ())
    trainable = []
    for param in model.get_parameters():
        param.requires_grad = not param.name.startswith(frozen)
        if param.requires_grad:
            trainable.append(param)
    return trainable


# LoRA targets of the GLM when pet_config.target_modules is empty (seed 001: the attention's
# fused query_key_value and its output dense; exclude_layers keeps the MLP out).
GLM_LORA_TARGETS = r"attention\.(query_key_value|dense)$"


def add_glm_lora(model: VisualGLMImageToTextGeneration, source=None):
    """Apply `text_config.pet_config` LoRA to the GLM; call before the first forward pass
    (GRAPH mode compiles the cell tree it sees first). Returns the adapted cell names."""
    from research.common.lora import LoRAConfig, apply_lora

    text = model.config.text_config
    lora = LoRAConfig.from_dict(text.pet_config, "model.model_config.text_config.pet_config", source)
    return apply_lora(model.llm_model, lora, GLM_LORA_TARGETS, ms_dtype(text.compute_dtype))
