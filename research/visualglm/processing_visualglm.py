"""VisualGLM's processor: images and chat turns to pixel values and prompt ids, as upstream chat()
(model/chat.py) lays them out.

It composes the shared pieces: the BLIP/CLIP image processor (research.common.image_processing,
registered here under MindFormers' name VisualGLMImageProcessor as well), ChatGLMTokenizer and
the VisualGLM prompt style (research.common.prompts). What is VisualGLM's own is the layout:
"<img></img>" + the prompt text, with ids encode("<img>") + [pad] * image_length +
encode("</img>" + prompt) + [gMASK, <sop>]; the model swaps the image embeddings in at the
`pre_image` = len(encode("<img>")) slots.
"""
import sys

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import check_int
from research.common.errors import UserInputError
from research.common.image_processing import BlipImageProcessor
from research.common.prompts import VisualGLMPrompt
from research.common.runtime import TOKENIZER, build_registered, resolve_path as _resolve_repo_path

PROCESSOR = MindFormerModuleType.PROCESSOR
IMAGE_START, IMAGE_END = "<img>", "</img>"

# MindFormers' YAML names VisualGLM's image processor VisualGLMImageProcessor.
MindFormerRegister.register_cls(BlipImageProcessor, PROCESSOR, alias="VisualGLMImageProcessor")


@MindFormerRegister.register(PROCESSOR)
class VisualGLMProcessor:
    """Images + chat turns -> pixel values and prompt ids laid out as upstream chat() does.

    `image_length` is the number of image embeddings per image (the Q-Former's 32 queries):
    that many `pad_token_id` placeholders follow the ids of "<img>" and the model replaces
    their embeddings by the image's. `pre_image` is the index of the first placeholder.
    """

    def __init__(self, image_processor, tokenizer, image_length=32):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_length = check_int("image_length", image_length)

    @staticmethod
    def build_prompt(query, history=(), english=False, with_image=True):
        """The prompt text: "<img></img>" + the VisualGLMPrompt text of the turns (no
        "<img></img>" when `with_image` is False, i.e. plain text chat)."""
        text = VisualGLMPrompt(english).build_prompt(query, history)
        return f"{IMAGE_START}{IMAGE_END}{text}" if with_image else text

    def _encode(self, text, add_special_tokens):
        # The length check is ours (check_length), over the whole prompt: lift the tokenizer's.
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens, max_length=sys.maxsize)

    def encode_prompt(self, query, history=(), english=False, with_image=True, max_length=None):
        """(ids, pre_image) of one prompt.

        With an image: encode("<img>") + [pad] * image_length + encode("</img>" + turns) +
        [gMASK, <sop>], pre_image = len(encode("<img>")). Upstream splits at
        `prompt.rfind("<img>") + 5`; here the split is right after the leading "<img>", which is
        the same unless a question itself contains "<img>" (then upstream would misplace it).
        Without an image: encode(turns) with [gMASK, <sop>], pre_image 0.
        `max_length`: see check_length.
        """
        prompt = self.build_prompt(query, history, english, with_image)
        if not with_image:
            ids, pre_image = self._encode(prompt, True), 0
        else:
            split = len(IMAGE_START)
            before = self._encode(prompt[:split], False)
            after = self._encode(prompt[split:], False)
            placeholders = [self.tokenizer.pad_token_id] * self.image_length
            ids = self.tokenizer.build_inputs_with_special_tokens(before + placeholders + after)
            pre_image = len(before)
        self.check_length(ids, with_image, max_length)
        return ids, pre_image

    def check_length(self, ids, with_image=True, max_length=None, index=None):
        """With `max_length` given (e.g. the model's seq_length), a prompt must be shorter than it
        so that at least one answer token fits; None checks nothing."""
        if max_length is not None and len(ids) >= max_length:
            which = "the prompt" if index is None else f"prompt {index}"
            image = (f", {self.image_length} of them the image's placeholders" if with_image else "")
            raise UserInputError(f"{which} has {len(ids)} tokens (with [gMASK] <sop>{image}); it must be "
                                 f"shorter than max_length {max_length} to leave room for the answer: shorten "
                                 f"the question or the history, or raise the model's seq_length")

    def __call__(self, images, queries, histories=None, english=False, max_length=None):
        """Batch inputs for generation.

        images: None (text only), one image or a list (see BlipImageProcessor); queries:
        one string or a list, as many as images; histories: None, one history (list of
        (question, answer) pairs) for a single query, or one history per query.
        Returns {"pixel_values": float32 [B, 3, S, S] or None, "input_ids": list of id lists
        (unpadded), "pre_image_lengths": list of int, "prompts": list of prompt texts}.
        """
        single = isinstance(queries, str)
        query_list = [queries] if single else list(queries) if isinstance(queries, (list, tuple)) else None
        if not query_list:
            raise UserInputError(f"queries must be a string or a non-empty list of strings, got {queries!r}")
        if histories is None:
            history_list = [()] * len(query_list)
        elif single:
            history_list = [histories]
        elif isinstance(histories, (list, tuple)) and len(histories) == len(query_list):
            history_list = list(histories)
        else:
            raise UserInputError(f"histories must give one history per query: {len(query_list)} queries, "
                                 f"histories {histories!r}")
        pixel_values = None
        if images is not None:
            image_list = self.image_processor.as_list(images)
            if len(image_list) != len(query_list):
                raise UserInputError(f"give one image per query: got {len(image_list)} image(s) and "
                                     f"{len(query_list)} {'query' if single else 'queries'}")
            pixel_values = self.image_processor(image_list)
        with_image = images is not None
        input_ids, pre_images, prompts = [], [], []
        for index, (query, history) in enumerate(zip(query_list, history_list)):
            ids, pre_image = self.encode_prompt(query, history, english, with_image)
            self.check_length(ids, with_image, max_length, index=None if single else index)
            input_ids.append(ids)
            pre_images.append(pre_image)
            prompts.append(self.build_prompt(query, history, english, with_image))
        return {"pixel_values": pixel_values, "input_ids": input_ids,
                "pre_image_lengths": pre_images, "prompts": prompts}


def build_processor(processor_node, image_length=32, resolve_path=None):
    """VisualGLMProcessor from a YAML `processor:` section.

    processor: {type: VisualGLMProcessor, image_processor: {type: VisualGLMImageProcessor,
    image_size, [mean, std]}, tokenizer: {type: ChatGLMTokenizer, vocab_file, max_length, ...}}.
    `resolve_path(path, what)` finds the vocab file (default: research.common.runtime's: a relative
    path is relative to the repository root).
    """
    resolve_path = resolve_path or _resolve_repo_path
    if not isinstance(processor_node, dict):
        raise UserInputError(f"the processor section must be a mapping, got {processor_node!r}")
    kind = processor_node.get("type", "VisualGLMProcessor")
    if kind != "VisualGLMProcessor":
        raise UserInputError(f"processor.type must be VisualGLMProcessor, got {kind!r}")
    image_node = dict(processor_node.get("image_processor") or {})
    image_type = image_node.pop("type", "VisualGLMImageProcessor")
    unknown = sorted(set(image_node) - {"image_size", "mean", "std"})
    if unknown:
        raise UserInputError(f"processor.image_processor has unknown fields {unknown}; "
                             f"known: type, image_size, mean, std")
    image_processor = build_registered(PROCESSOR, image_type, **image_node)
    tokenizer = build_tokenizer(processor_node.get("tokenizer"), resolve_path)
    return VisualGLMProcessor(image_processor, tokenizer, image_length)


def build_tokenizer(tokenizer_node, resolve_path=None):
    """The tokenizer of a YAML `processor.tokenizer` section ({type, vocab_file, ...})."""
    tokenizer_node = dict(tokenizer_node or {})
    if not tokenizer_node.get("vocab_file"):
        raise UserInputError("processor.tokenizer.vocab_file is not set")
    tokenizer_node["vocab_file"] = (resolve_path or _resolve_repo_path)(tokenizer_node["vocab_file"],
                                                                       "tokenizer vocab_file")
    return build_registered(TOKENIZER, tokenizer_node.pop("type", "ChatGLMTokenizer"), **tokenizer_node)
