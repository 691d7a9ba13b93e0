"""MiniGPT-4's processor: images and chat turns to pixel values and prompt ids, laid out as upstream
`Chat.get_context_emb` does.

The prompt text is the template's (conversation_minigpt4: Vicuna v0 or Llama-2), split at its one
`<ImageHere>`; the first segment is encoded with bos, the second without, and `image_tokens`
placeholder ids (pad) go between them: the model writes the image embeddings over them.
`pre_image` is the index of the first placeholder. A question may instead be a whole prompt
(`raw=True`, as upstream's batch `MiniGPTBase.generate(images, texts)` takes them): it is used as
it is and must hold the placeholder.

The image processor is the shared BLIP one (224x224 bicubic, BLIP's mean/std: upstream
`blip2_image_eval`); the tokenizer is LlamaTokenizer.
"""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import REGISTRY_PREFIX, check_int
from research.common.errors import UserInputError
from research.common.image_processing import BlipImageProcessor
from research.common.runtime import resolve_path
from research.minigpt4.conversation_minigpt4 import IMAGE_PLACEHOLDER, fit_history, get_template, split_segments
from research.minigpt4.tokenization_minigpt4 import LlamaTokenizer

PROCESSOR = MindFormerModuleType.PROCESSOR
# MindFormers' llama YAMLs say LlamaTokenizer; the registry keeps MindFormers' own class under that name.
TOKENIZER_TYPES = ("LlamaTokenizer", REGISTRY_PREFIX + "LlamaTokenizer")
IMAGE_PROCESSOR_TYPES = ("BlipImageProcessor",)


@MindFormerRegister.register(PROCESSOR)
class MiniGPT4Processor:
    """Images + chat turns -> pixel values and prompt ids with the image's placeholders."""

    def __init__(self, image_processor, tokenizer, template="vicuna_v0", image_tokens=32):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.template_name = template
        self.template = get_template(template)
        self.image_tokens = check_int("image_tokens", image_tokens)

    def prompt_text(self, query, history=(), raw=False):
        """The prompt: `query` itself when `raw`, else the template's with the image in the first turn."""
        if raw:
            if not isinstance(query, str):
                raise UserInputError(f"the prompt must be a string, got {type(query).__name__}")
            return query
        if isinstance(query, str) and IMAGE_PLACEHOLDER in query:
            raise UserInputError(f"the question contains {IMAGE_PLACEHOLDER}: the template places the image "
                                 f"itself; ask the question alone, or pass the whole prompt as a raw prompt")
        return self.template.build_prompt(query, history)

    def encode_prompt(self, query, history=(), raw=False):
        """(ids, pre_image): encode(segment 0, with bos) + [pad] * image_tokens + encode(segment 1)."""
        before, after = self.tokenizer.encode_segments(split_segments(self.prompt_text(query, history, raw)))
        return before + [self.tokenizer.pad_token_id] * self.image_tokens + after, len(before)

    def fit_history(self, query, history, max_length, max_new_tokens):
        """(kept history, dropped turns): old turns dropped so that the prompt, its image and
        `max_new_tokens` fit in `max_length`; the system line and the image turn stay."""
        return fit_history(self.template, self.tokenizer, query, history, max_length=max_length,
                           max_new_tokens=max_new_tokens)

    def __call__(self, images, queries, histories=None, raw=False, max_length=None):
        """Batch inputs for generation: one image per query (a path, PIL image or array).

        Returns {"pixel_values": float32 [B,3,S,S], "input_ids": id lists (unpadded),
        "pre_image_lengths": ints, "prompts": prompt texts}. With `max_length`, a prompt must be
        shorter than it (room for one answer token)."""
        query_list = [queries] if isinstance(queries, str) else list(queries or [])
        if not query_list:
            raise UserInputError("give at least one question")
        image_list = self.image_processor.as_list(images)
        if len(image_list) != len(query_list):
            raise UserInputError(f"give one image per question: got {len(image_list)} image(s) and "
                                 f"{len(query_list)} question(s)")
        history_list = list(histories) if histories is not None else [()] * len(query_list)
        if len(history_list) != len(query_list):
            raise UserInputError(f"give one history per question: {len(query_list)} questions, "
                                 f"{len(history_list)} histories")
        input_ids, pre_images, prompts = [], [], []
        for index, (query, history) in enumerate(zip(query_list, history_list)):
            ids, pre_image = self.encode_prompt(query, history, raw)
            if max_length is not None and len(ids) >= max_length:
                raise UserInputError(f"prompt {index} has {len(ids)} positions ({self.image_tokens} of them the "
                                     f"image's); it must be shorter than {max_length} to leave room for the "
                                     f"answer: shorten the question or raise text_config.seq_length")
            input_ids.append(ids)
            pre_images.append(pre_image)
            prompts.append(self.prompt_text(query, history, raw))
        return {"pixel_values": self.image_processor(image_list), "input_ids": input_ids,
                "pre_image_lengths": pre_images, "prompts": prompts}


def build_processor(processor_node, image_tokens, source=None):
    """MiniGPT4Processor from a YAML `processor:` section:
    {type: MiniGPT4Processor, template: vicuna_v0 | vicuna_v0_space | llama2,
     image_processor: {type: BlipImageProcessor, image_size, [mean, std]},
     tokenizer: {type: LlamaTokenizer, vocab_file, ...}}."""
    where = f"{source.path}: " if source is not None else ""
    if not isinstance(processor_node, dict):
        raise UserInputError(f"{where}the processor section must be a mapping, got {processor_node!r}")
    node = dict(processor_node)
    kind = node.pop("type", "MiniGPT4Processor")
    if kind != "MiniGPT4Processor":
        raise UserInputError(f"{where}processor.type must be MiniGPT4Processor, got {kind!r}")
    template = node.pop("template", "vicuna_v0")
    image_node = dict(node.pop("image_processor", None) or {})
    tokenizer_node = dict(node.pop("tokenizer", None) or {})
    if node:
        raise UserInputError(f"{where}processor has unknown fields {sorted(node)}; known: type, template, "
                             f"image_processor, tokenizer")
    image_type = image_node.pop("type", "BlipImageProcessor")
    if image_type not in IMAGE_PROCESSOR_TYPES:
        raise UserInputError(f"{where}processor.image_processor.type must be one of {IMAGE_PROCESSOR_TYPES}, "
                             f"got {image_type!r}")
    tokenizer_type = tokenizer_node.pop("type", "LlamaTokenizer")
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserInputError(f"{where}processor.tokenizer.type must be one of {TOKENIZER_TYPES}, "
                             f"got {tokenizer_type!r}")
    if not tokenizer_node.get("vocab_file"):
        raise UserInputError(f"{where}processor.tokenizer.vocab_file is not set (Vicuna's tokenizer.model)")
    tokenizer_node["vocab_file"] = resolve_path(tokenizer_node["vocab_file"], "tokenizer vocab_file")
    try:
        return MiniGPT4Processor(BlipImageProcessor(**image_node), LlamaTokenizer(**tokenizer_node), template,
                                 image_tokens)
    except UserInputError as err:
        raise UserInputError(f"{where}{err}") from err
