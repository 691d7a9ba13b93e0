"""VisualGLM and its GLM-6B as a library: build a model from a YAML plus keyword overrides,
then answer batches of (image, question) pairs. The run scripts, the terminal chat, the demo,
the Lite runner and the benchmarks all call these.

    from research.visualglm.inference import load_visualglm
    chat = load_visualglm("run_visualglm_tiny_image_to_text_generation.yaml", use_past=True)
    replies = chat.answer([("examples/visualglm/shapes.png", "描述这张图片。")])
"""
import argparse
import dataclasses
import os
import sys
from typing import List, Optional, Sequence, Tuple

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.checkpoint import read_checkpoint
from research.common.config import load_config, resolve_config_path
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate, in_batches
from research.common.image_processing import check_image
from research.common.lora import load_lora_checkpoint, merge_lora
from research.common.memory import check_memory
from research.common.prompts import VisualGLMPrompt
from research.common.runtime import (MODELS, add_generation_arguments, build_registered,
                                     init_context, load_weights, resolve_path, str2bool)
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.modeling_visualglm import (VisualGLMImageToTextGeneration, add_glm_lora,
                                                   checkpoint_paths)
from research.visualglm.processing_visualglm import build_processor, build_tokenizer

DEFAULT_CONFIG = "run_visualglm_6b_image_to_text_generation.yaml"
DEFAULT_GLM_CONFIG = "run_glm_6b_text_generation.yaml"
DEFAULT_IMAGE = "examples/visualglm/shapes.png"
DEFAULT_PROMPT = "描述这张图片。"


@dataclasses.dataclass
class Reply:
    prompt: str  # the prompt text as the model saw it ("<img></img>问：...\n答：")
    answer: str  # post-processed, as upstream's chat() returns it
    token_ids: List[int]  # the new ids (eos included when it stopped there)


def check_special_ids(config: GLMConfig, tokenizer):
    """The model's special ids must be the tokenizer's, or prompts would be mis-positioned."""
    pairs = [("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
             ("mask_token_id", tokenizer.mask_token_id), ("gmask_token_id", tokenizer.gmask_token_id)]
    wrong = [f"{name}: config {getattr(config, name)}, tokenizer {value}"
             for name, value in pairs if getattr(config, name) != value]
    if wrong:
        raise UserInputError("model_config special ids do not match the tokenizer file: "
                             + "; ".join(wrong))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserInputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {config.vocab_size}")


def generation_config(config: GLMConfig, tokenizer, max_new_tokens=None) -> GenerationConfig:
    """The YAML's decoding defaults, with upstream VisualGLM's sampling rule (SAT's)."""
    return GenerationConfig.from_model_config(config, tokenizer, max_new_tokens=max_new_tokens)


def image_prompt_pairs(images: Optional[Sequence[str]], prompts: Optional[Sequence[str]]):
    """(image, prompt) pairs as MindFormers' scripts take them: repeated or comma-separated
    values; one prompt is used for every image."""
    images = [p for value in (images or [DEFAULT_IMAGE]) for p in value.split(",") if p]
    prompts = list(prompts or [DEFAULT_PROMPT])
    if len(prompts) == 1 and len(images) > 1 and len(prompts[0].split(",")) == len(images):
        prompts = prompts[0].split(",")
        print(f"note: the one --prompt was split at its commas into {len(prompts)} questions, one "
              f"per image, as MindFormers' script does; repeat --prompt to keep a comma in a "
              f"question", file=sys.stderr)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise UserInputError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, "
                             f"or one per image")
    return list(zip(images, prompts))


def add_model_arguments(parser, default_config=DEFAULT_CONFIG):
    """The flags of load_visualglm's keywords (seed 001's names)."""
    add_generation_arguments(parser, default_config, "configs/visualglm/")
    parser.add_argument("--seq_length", type=int, default=None,
                        help="text tokens; the GLM length is this + the image tokens (overrides YAML)")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--english", type=str2bool, default=False, help="Q:/A: prompt format")


def add_input_arguments(parser):
    """--image_path / --prompt pairs and --batch_size, as MindFormers' scripts take them."""
    parser.add_argument("--image_path", action="append", default=None,
                        help=f"image file (default {DEFAULT_IMAGE}); repeat or comma-separate for several")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"question (default {DEFAULT_PROMPT}); one per image")
    parser.add_argument("--batch_size", type=int, default=1, help="pairs per forward pass")


def visualglm_parser(description, default_config=DEFAULT_CONFIG):
    """An argument parser with the model flags and the --image_path/--prompt inputs."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default_config)
    add_input_arguments(parser)
    return parser


def load_from_arguments(args, lora_checkpoint=None, inputs=None):
    """load_visualglm with the flags of add_model_arguments."""
    return load_visualglm(args.config, device_id=args.device_id, seq_length=args.seq_length,
                          use_past=args.use_past, do_sample=args.do_sample, top_k=args.top_k,
                          top_p=args.top_p, lora_checkpoint=lora_checkpoint, inputs=inputs,
                          english=args.english,
                          batch_size=min(args.batch_size, len(inputs)) if inputs else 1)


def pairs_and_model_from_arguments(args, lora_checkpoint=None):
    """The --image_path/--prompt pairs and the model of a script's flags (visualglm_parser);
    the pairs are checked before any weights are read."""
    pairs = image_prompt_pairs(args.image_path, args.prompt)
    return pairs, load_from_arguments(args, lora_checkpoint=lora_checkpoint, inputs=pairs)


@dataclasses.dataclass
class VisualGLMChat:
    """A loaded VisualGLM with its processor: `answer` pairs, `chat` one turn with history."""

    config: object  # VisualGLMConfig
    yaml: object  # the MindFormerConfig it came from
    model: VisualGLMImageToTextGeneration
    processor: object  # VisualGLMProcessor
    loaded: List[str]
    device: str

    def describe_weights(self):
        if len(self.loaded) >= 3:
            return "weights: " + ", ".join(self.loaded)
        missing = 3 - len(self.loaded)
        return (f"weights: {', '.join(self.loaded) or 'none'}; {missing} part(s) without a checkpoint "
                f"keep their random initialisation (UNTRAINED: the answers are noise)")

    def generation_config(self, max_new_tokens=None):
        return generation_config(self.config.text_config, self.processor.tokenizer, max_new_tokens)

    def answer(self, pairs: Sequence[Tuple[str, str]], *, batch_size=1, english=False,
               histories=None, settings: Optional[GenerationConfig] = None,
               max_new_tokens=None, on_tokens=None) -> List[Reply]:
        """Replies to (image, question) pairs, `batch_size` pairs per forward pass."""
        settings = settings or self.generation_config(max_new_tokens)
        style = VisualGLMPrompt(english=english)
        replies = []
        for first, chunk in zip(range(0, len(pairs), batch_size), in_batches(list(pairs), batch_size)):
            inputs = self.processor([p[0] for p in chunk], [p[1] for p in chunk],
                                    histories=histories and histories[first:first + batch_size],
                                    english=english,
                                    max_length=self.config.text_config.seq_length)
            outputs = self.model.generate(inputs["input_ids"], inputs["pre_image_lengths"],
                                          inputs["pixel_values"], settings, on_tokens=on_tokens)
            replies += [Reply(prompt, style.postprocess(self.processor.tokenizer.decode(ids)), ids)
                        for prompt, ids in zip(inputs["prompts"], outputs)]
        return replies

    def merge_lora(self, path):
        """Fold LoRA into the GLM weights and write them as a plain GLM checkpoint; returns the
        number of merged layers."""
        from research.common.convert import save_checkpoint_atomic

        merged = merge_lora(self.model.llm_model)
        glm = {p.name[len("llm_model."):]: p.asnumpy() for p in self.model.llm_model.get_parameters()}
        save_checkpoint_atomic(glm, path)
        return merged


@MindFormerRegister.register(MindFormerModuleType.PIPELINE)
class VisualGLMImageToTextGenerationPipeline:
    """MindFormers' pipeline shape: {"image": path(s), "prompt": text(s)} ->
    ["<img></img>问：...\n答：answer", ...], `batch_size` pairs per forward pass."""

    def __init__(self, chat: VisualGLMChat, batch_size=1, english=False, max_new_tokens=None):
        self.chat, self.batch_size, self.english = chat, batch_size, english
        self.max_new_tokens = max_new_tokens

    def __call__(self, inputs):
        images, prompts = inputs["image"], inputs["prompt"]
        images = [images] if isinstance(images, str) else list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        replies = self.chat.answer(list(zip(images, prompts)), batch_size=self.batch_size,
                                   english=self.english, max_new_tokens=self.max_new_tokens)
        return [reply.prompt + reply.answer for reply in replies]


def load_visualglm(config=DEFAULT_CONFIG, *, device_id=0, seq_length=None, use_past=None,
                   do_sample=None, top_k=None, top_p=None, lora_checkpoint=None, inputs=None,
                   english=False, batch_size=1) -> VisualGLMChat:
    """VisualGLM from a YAML (path or a name in configs/visualglm/) with its checkpoints.

    `seq_length` is the text length as in MindFormers (the GLM's static length is it plus the
    32 image tokens); the other keywords override the YAML when given. With `lora_checkpoint`
    (a trainable-only checkpoint from fine-tuning), LoRA as `text_config.pet_config` describes
    it is added to the GLM and loaded from that file. `inputs`, (image, question) pairs to be
    answered (with the `english` prompt), are checked together with every checkpoint path
    before the model is built: a bad image, a prompt longer than seq_length or a missing file
    is reported without waiting for a 6B model to load. A model that cannot fit in memory
    when answering `batch_size` pairs at once is refused before anything is allocated.
    """
    yaml_config, model_config = load_visualglm_config(config)
    device = init_context(yaml_config, device_id)
    text = model_config.text_config
    if seq_length is not None:
        if seq_length <= 0:
            raise UserInputError(f"seq_length must be positive, got {seq_length}")
        text.seq_length = seq_length + model_config.image_length
    for field, value in dict(use_past=use_past, do_sample=do_sample, top_k=top_k, top_p=top_p).items():
        if value is not None:
            setattr(text, field, value)
    text.validate()
    model_config.validate()
    check_memory(model_config.memory_estimate(batch_size), yaml_config.source.path)
    processor = build_processor(yaml_config.get("processor") or {}, model_config.image_length)
    if processor.image_processor.image_size != model_config.vision_config.image_size:
        raise UserInputError(
            f"processor.image_processor.image_size ({processor.image_processor.image_size}) must "
            f"equal vision_config.image_size ({model_config.vision_config.image_size})")
    check_special_ids(text, processor.tokenizer)
    for index, (image, query) in enumerate(inputs or ()):  # cheap checks: answer() decodes for real
        check_image(image)
        ids, _ = processor.encode_prompt(query, english=english)
        processor.check_length(ids, max_length=text.seq_length, index=index if len(inputs) > 1 else None)
    if lora_checkpoint and not text.pet_config:
        raise UserInputError(f"{yaml_config.source.path}: text_config.pet_config is not set; it "
                             f"must describe the LoRA that {lora_checkpoint} was trained with")
    if lora_checkpoint and not os.path.exists(lora_checkpoint):
        raise UserInputError(f"LoRA checkpoint not found: {lora_checkpoint}")
    for what, path in checkpoint_paths(model_config):
        if path:
            resolve_path(path, what)
    model = VisualGLMImageToTextGeneration(model_config)
    model.set_train(False)
    loaded = model.load_checkpoints()
    if lora_checkpoint:
        add_glm_lora(model, yaml_config.source)
        load_lora_checkpoint(model, read_checkpoint(lora_checkpoint, "LoRA checkpoint"),
                             f"LoRA checkpoint {lora_checkpoint}")
        loaded.append("LoRA checkpoint")
    return VisualGLMChat(model_config, yaml_config, model, processor, loaded, device)


@dataclasses.dataclass
class GLMChat:
    """The GLM-6B language model of VisualGLM alone, for text chat."""

    config: GLMConfig
    model: object  # GLMForConditionalGeneration
    tokenizer: object  # ChatGLMTokenizer
    loaded: bool
    device: str

    def answer(self, queries: Sequence[str], *, english=False, max_new_tokens=None) -> List[Reply]:
        """Replies to text questions, all in one batch."""
        style = VisualGLMPrompt(english=english)
        prompts = [style.build_prompt(query) for query in queries]
        settings = generation_config(self.config, self.tokenizer, max_new_tokens)
        outputs = generate(self.model, [self.tokenizer.encode(p) for p in prompts], settings)
        return [Reply(prompt, style.postprocess(self.tokenizer.decode(ids)), ids)
                for prompt, ids in zip(prompts, outputs)]


def load_glm(config=DEFAULT_GLM_CONFIG, *, device_id=0, seq_length=None, use_past=None,
             do_sample=None, checkpoint=None) -> GLMChat:
    """The GLM named by a YAML's `model` section (MindFormers' layout), its checkpoint
    (`checkpoint` overrides the YAML's) and tokenizer."""
    config_path = resolve_config_path(config, "visualglm")
    yaml_config = load_config(config_path)
    device = init_context(yaml_config, device_id)
    model_node = yaml_config.get("model") or {}
    glm_config = GLMConfig.from_dict(model_node.get("model_config"), "model.model_config",
                                     yaml_config.source)
    for field, value in dict(use_past=use_past, seq_length=seq_length, do_sample=do_sample).items():
        if value is not None:
            setattr(glm_config, field, value)
    if checkpoint is not None:
        glm_config.checkpoint_name_or_path = checkpoint
    glm_config.validate()
    check_memory(glm_config.memory_estimate(), config_path)
    arch = (model_node.get("arch") or {}).get("type", "GLMForConditionalGeneration")
    model = build_registered(MODELS, arch, glm_config)
    model.set_train(False)
    loaded = load_weights(model, glm_config.checkpoint_name_or_path, "GLM checkpoint")
    try:
        tokenizer = build_tokenizer((yaml_config.get("processor") or {}).get("tokenizer"))
    except UserInputError as err:
        raise UserInputError(f"{config_path}: {err}") from err
    check_special_ids(glm_config, tokenizer)
    return GLMChat(glm_config, model, tokenizer, loaded, device)
