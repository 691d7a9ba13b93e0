"""MiniGPT-4 as a library: build the model from a YAML plus keyword overrides, then answer batches
of (image, question) pairs, each with its own history. run_minigpt4.py, cli_demo.py and the tests
call these.

    from research.minigpt4.inference import load_minigpt4
    chat = load_minigpt4("run_minigpt4_tiny.yaml")
    replies = chat.answer([("examples/visualglm/shapes.png", "Describe this image in detail.")])

Decoding defaults are upstream `Chat.answer`'s (do_sample, top_p 0.9, temperature 1.0,
repetition_penalty 1.0, max_new_tokens 300, max_length 2000: the YAML's text_config fields and
MAX_NEW_TOKENS), capped by text_config.seq_length. What upstream lacks: a batch of different
images and prompts in one forward pass where each row stops on its own "###" (either spelling) or
eos, and a context budget that drops old turns but never the system line or the image.
"""
import argparse
import dataclasses
from typing import List, Optional, Sequence, Tuple

from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, in_batches
from research.common.image_processing import check_image
from research.common.memory import check_memory
from research.common.runtime import add_generation_arguments, init_context, resolve_path, str2bool
from research.minigpt4.configuration_minigpt4 import LlamaConfig, MiniGPT4Config, load_minigpt4_config
from research.minigpt4.conversation_minigpt4 import MAX_NEW_TOKENS, TEMPLATES, decode_answer
from research.minigpt4.modeling_minigpt4 import MiniGPT4, checkpoint_paths
from research.minigpt4.processing_minigpt4 import MiniGPT4Processor, build_processor

DEFAULT_CONFIG = "run_minigpt4_7b.yaml"
DEFAULT_IMAGE = "examples/visualglm/shapes.png"
DEFAULT_PROMPT = "Describe this image in detail."
MODEL_TYPES = ("MiniGPT4",)


@dataclasses.dataclass
class Reply:
    prompt: str  # the prompt text as the model saw it (with <ImageHere>)
    answer: str  # post-processed as upstream's Chat.answer
    token_ids: List[int]  # the new ids (the stop sequence or eos included when it stopped there)
    dropped_turns: int  # old turns left out of the prompt to fit the length
    history: list  # the turns the prompt kept, then (question, answer): the next turn's history


def check_special_ids(config: LlamaConfig, tokenizer):
    """The model's bos/eos must be the tokenizer's, and its vocabulary must hold every piece."""
    wrong = [f"{name}: config {getattr(config, name)}, tokenizer {value}"
             for name, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id))
             if getattr(config, name) != value]
    if wrong:
        raise UserInputError("text_config special ids do not match the tokenizer file: " + "; ".join(wrong))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserInputError(f"the tokenizer has {tokenizer.vocab_size} pieces but text_config.vocab_size is "
                             f"{config.vocab_size}")


@dataclasses.dataclass
class MiniGPT4Chat:
    """A loaded MiniGPT-4 with its processor: `answer` (image, question) pairs."""

    config: MiniGPT4Config
    yaml: object  # the MindFormerConfig it came from
    model: MiniGPT4
    processor: MiniGPT4Processor
    loaded: List[str]
    device: str

    def describe_weights(self):
        parts = 4 if self.config.has_qformer else 3
        if len(self.loaded) >= parts:
            return "weights: " + ", ".join(self.loaded)
        return (f"weights: {', '.join(self.loaded) or 'none'}; {parts - len(self.loaded)} part(s) without a "
                f"checkpoint keep their random initialisation (UNTRAINED: the answers are noise)")

    def generation_config(self, max_new_tokens=MAX_NEW_TOKENS, **overrides) -> GenerationConfig:
        """The YAML's decoding fields (upstream Chat.answer's defaults), stopping each row on the
        template's "###" spellings or eos, then the overrides that are not None."""
        tokenizer = self.processor.tokenizer
        settings = GenerationConfig.from_model_config(self.config.text_config, tokenizer,
                                                      max_new_tokens=max_new_tokens, **overrides)
        return dataclasses.replace(settings, stop_sequences=self.processor.template.stop_ids(tokenizer))

    def answer(self, pairs: Sequence[Tuple[object, str]], *, batch_size=1, histories=None, raw=False,
               settings: Optional[GenerationConfig] = None, on_tokens=None) -> List[Reply]:
        """Replies to (image, question) pairs, `batch_size` pairs per forward pass. `histories`
        gives each pair its earlier (question, answer) turns; old turns that do not fit are left
        out (Reply.dropped_turns). With `raw`, each question is a whole prompt with <ImageHere>."""
        settings = settings or self.generation_config()
        pairs = list(pairs)
        histories = [()] * len(pairs) if histories is None else list(histories)
        if len(histories) != len(pairs):
            raise UserInputError(f"{len(pairs)} questions but {len(histories)} histories: give one per question")
        text = self.config.text_config
        limit = min(text.seq_length, settings.max_length or text.seq_length)
        room = min(settings.max_new_tokens or 1, limit - 1)
        kept = [self.processor.fit_history(query, history, limit, room) if history and not raw else (history, 0)
                for (_, query), history in zip(pairs, histories)]
        tokenizer, template = self.processor.tokenizer, self.processor.template
        replies = []
        for first, chunk in zip(range(0, len(pairs), max(batch_size, 1)), in_batches(pairs, batch_size)):
            chunk_kept = kept[first:first + len(chunk)]
            inputs = self.processor([image for image, _ in chunk], [query for _, query in chunk],
                                    histories=[history for history, _ in chunk_kept], raw=raw,
                                    max_length=text.seq_length)
            outputs = self.model.generate(inputs["input_ids"], inputs["pre_image_lengths"], inputs["pixel_values"],
                                          settings, on_tokens=on_tokens)
            for prompt, ids, (_, query), (history, dropped) in zip(inputs["prompts"], outputs, chunk, chunk_kept):
                answer = decode_answer(tokenizer, ids, template, settings.stop_sequences)
                replies.append(Reply(prompt, answer, ids, dropped, list(history) + [(query, answer)]))
        return replies


def load_minigpt4(config=DEFAULT_CONFIG, *, device_id=None, use_past=None, do_sample=None, top_p=None,
                  temperature=None, template=None, llama_proj_checkpoint=None, inputs=None, raw=False,
                  batch_size=1) -> MiniGPT4Chat:
    """MiniGPT-4 from a YAML (path or a name in configs/minigpt4/) with its checkpoints.

    The keywords override the YAML when given (`template`: processor.template;
    `llama_proj_checkpoint`: model_config.checkpoint_name_or_path, e.g. a training checkpoint). `inputs`, (image path, question) pairs to be
    answered, are checked with every checkpoint path before the model is built, so a bad image,
    a prompt without its placeholder or a missing file is reported without waiting for 7B
    weights; a model that cannot fit in memory for `batch_size` rows is refused first."""
    yaml_config, model_config = load_minigpt4_config(config)
    arch = ((yaml_config.get("model") or {}).get("arch") or {}).get("type", MODEL_TYPES[0])
    if arch not in MODEL_TYPES:
        raise UserInputError(f"{yaml_config.source.where('model.arch.type')}: {arch!r} is not MiniGPT-4's; "
                             f"expected {', '.join(MODEL_TYPES)}")
    device = init_context(yaml_config, device_id)
    if llama_proj_checkpoint is not None:
        model_config.checkpoint_name_or_path = llama_proj_checkpoint
    text = model_config.text_config
    for field, value in dict(use_past=use_past, do_sample=do_sample, top_p=top_p, temperature=temperature).items():
        if value is not None:
            setattr(text, field, value)
    text.validate()
    model_config.validate()
    check_memory(model_config.memory_estimate(batch_size), yaml_config.source.path)
    processor_node = dict(yaml_config.get("processor") or {})
    if template is not None:
        processor_node["template"] = template
    processor = build_processor(processor_node, model_config.image_tokens, yaml_config.source)
    if processor.image_processor.image_size != model_config.vision_config.image_size:
        raise UserInputError(f"{yaml_config.source.path}: processor.image_processor.image_size "
                             f"({processor.image_processor.image_size}) must equal vision_config.image_size "
                             f"({model_config.vision_config.image_size})")
    check_special_ids(text, processor.tokenizer)
    for index, (image, query) in enumerate(inputs or ()):  # cheap checks first: answer() decodes for real
        if isinstance(image, str):
            check_image(image)
        ids, _ = processor.encode_prompt(query, raw=raw)
        if len(ids) >= text.seq_length:
            raise UserInputError(f"prompt {index} has {len(ids)} positions with the image; text_config.seq_length "
                                 f"is {text.seq_length}")
    for what, path in checkpoint_paths(model_config):
        if path:
            resolve_path(path, what)
    model = MiniGPT4(model_config)
    model.set_train(False)
    loaded = model.load_checkpoints()
    return MiniGPT4Chat(model_config, yaml_config, model, processor, loaded, device)


def add_model_arguments(parser, default_config=DEFAULT_CONFIG):
    """The flags of load_minigpt4's keywords and of decoding (upstream demo's names)."""
    add_generation_arguments(parser, default_config, "configs/minigpt4/")
    parser.set_defaults(max_new_tokens=MAX_NEW_TOKENS)
    parser.add_argument("--num_beams", type=int, default=1, help="1 only: beam search is not implemented")
    parser.add_argument("--temperature", type=float, default=None, help="default: the YAML's (upstream 1.0)")
    parser.add_argument("--top_p", type=float, default=None, help="default: the YAML's (upstream 0.9)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="conversation template (default: the YAML's processor.template)")
    parser.add_argument("--ckpt", default=None,
                        help="llama_proj checkpoint (upstream's ckpt; a training checkpoint_trainable file works), "
                             "instead of the YAML's model_config.checkpoint_name_or_path")


def minigpt4_parser(description):
    """An argument parser with the model flags and the --image_path/--prompt inputs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image_path", action="append", default=None,
                        help=f"image file (default {DEFAULT_IMAGE}); repeat or comma-separate for several")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"question (default {DEFAULT_PROMPT!r}); one, or one per image")
    parser.add_argument("--raw_prompt", type=str2bool, default=False,
                        help="each --prompt is a whole prompt with <ImageHere> (upstream's batch generate), "
                             "not a question for the template")
    parser.add_argument("--batch_size", type=int, default=1, help="pairs per forward pass")
    return parser


def image_prompt_pairs(images, prompts):
    """(image, prompt) pairs: repeated or comma-separated images; one prompt for all, or one each."""
    images = [path for value in (images or [DEFAULT_IMAGE]) for path in value.split(",") if path]
    prompts = list(prompts or [DEFAULT_PROMPT])
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise UserInputError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, or one per image")
    return list(zip(images, prompts))


def load_from_arguments(args, inputs=None):
    """load_minigpt4 with the flags of add_model_arguments."""
    if args.num_beams != 1:
        raise UserInputError(f"--num_beams {args.num_beams}: only 1 is supported (upstream's default; beam "
                             f"search is not implemented)")
    return load_minigpt4(args.config, device_id=args.device_id, use_past=args.use_past, do_sample=args.do_sample,
                         top_p=args.top_p, temperature=args.temperature, template=args.template,
                         llama_proj_checkpoint=args.ckpt, inputs=inputs,
                         raw=getattr(args, "raw_prompt", False),
                         batch_size=min(getattr(args, "batch_size", 1), len(inputs)) if inputs else 1)
