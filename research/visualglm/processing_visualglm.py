"""VisualGLM processors: images to pixel tensors, chat turns to prompt ids, answers to text.

What upstream VisualGLM-6B's `chat()` (model/chat.py) and `BlipImageEvalProcessor`
(model/blip2.py) do, without torch or torchvision:

- image: `convert('RGB')`, PIL bicubic resize to size x size (no crop; torchvision's Resize on
  a PIL image calls exactly `image.resize((size, size), BICUBIC)`), /255, normalise with the
  CLIP mean and std, channels first;
- prompt: "<img></img>" + "问：{q}\\n答：{a}\\n" per past turn + "问：{q}\\n答：" (English Q:/A:);
  the ids are encode("<img>") + [pad] * image_length + encode("</img>问：...答：") + [gMASK, <sop>],
  and the model swaps the image embeddings in at the `pre_image` = len(encode("<img>")) slots;
- answer: strip, full-width punctuation next to Chinese, "[[训练时间]]" -> "2023年", and the text
  after the last "答：" / "A:".
"""
import os
import re
import struct
import sys
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError
from research.common.runtime import TOKENIZER, build_registered, resolve_path as _resolve_repo_path
from research.visualglm import tokenization_chatglm  # noqa: F401  (registers ChatGLMTokenizer)

PROCESSOR = MindFormerModuleType.PROCESSOR

# CLIP / BLIP-2 normalisation, as upstream BlipImageBaseProcessor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_START, IMAGE_END = "<img>", "</img>"

_CJK = r"[\u4e00-\u9fff]"
_FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What Pillow may raise while identifying or decoding a damaged file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_EXPECTED_IMAGE = "a file path, a PIL image or an HxWxC uint8 numpy array"


# ---- text ------------------------------------------------------------------------------------

def _check_history(history):
    """Past turns as a list of (question, answer) string pairs; anything else is a user error."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
        raise UserInputError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    turns = []
    for index, turn in enumerate(history):
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(part, str) for part in turn)):
            raise UserInputError(f"history turn {index} must be a (question, answer) pair of strings, "
                                 f"got {turn!r}")
        turns.append((turn[0], turn[1]))
    return turns


def chat_prompt(query, history=(), english=False):
    """The text part of a turn: past (question, answer) pairs, then the new question.

    Chinese: "问：{q}\\n答：{a}\\n" per past turn, then "问：{q}\\n答："; English uses Q:/A:.
    """
    if not isinstance(query, str):
        raise UserInputError(f"the query must be a string, got {type(query).__name__}")
    question, answer = ("Q:", "A:") if english else ("问：", "答：")
    turns = "".join(f"{question}{q}\n{answer}{a}\n" for q, a in _check_history(history))
    return f"{turns}{question}{query}\n{answer}"


def postprocess_response(text):
    """Strip, put back upstream's "[[训练时间]]" placeholder as "2023年", and make half-width
    punctuation next to a Chinese character full-width (upstream's process_response)."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for half, full in _FULL_WIDTH:
        text = re.sub(f"({_CJK}){half}", rf"\g<1>{full}", text)
        text = re.sub(f"{half}({_CJK})", rf"{full}\g<1>", text)
    return text


def extract_answer(decoded_text, english=False):
    """The answer in a decoded prompt + response: post-processed, then the text after the last
    "答：" ("A:" in English), stripped, as upstream chat() returns it. Text without the separator
    (a decoded answer alone) comes back post-processed."""
    separator = "A:" if english else "答："
    return postprocess_response(decoded_text).split(separator)[-1].strip()


# ---- images ----------------------------------------------------------------------------------

def load_image(path):
    """Open and fully decode an image file; returns an RGB PIL image.

    Every failure is a UserInputError naming the path: missing, a directory, empty, not an
    image, or truncated/corrupt (decoding is forced here with `load()`, so a damaged file fails
    now and not in the middle of preprocessing).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UserInputError(f"image path must be a string or os.PathLike, got {type(path).__name__}")
    name = repr(os.fspath(path))
    if not os.path.exists(path):
        raise UserInputError(f"image {name} does not exist")
    if os.path.isdir(path):
        raise UserInputError(f"image {name} is a directory, not an image file")
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise UserInputError(f"cannot read image {name}: {err.strerror or err}") from err
    if size == 0:
        raise UserInputError(f"image {name} is an empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, name)
    except UnidentifiedImageError as err:
        raise UserInputError(f"image {name} is not an image file Pillow can read "
                             f"(unrecognised format)") from err
    except PermissionError as err:
        raise UserInputError(f"cannot read image {name}: permission denied") from err
    except Image.DecompressionBombError as err:
        raise UserInputError(f"image {name} is too large to decode safely: {err}") from err
    except _DECODE_ERRORS as err:
        raise UserInputError(f"image {name} is truncated or corrupt: {err}") from err


def _to_8bit_gray(image, name):
    """16- and 32-bit integer and float images as an 8-bit "L" image, scaled, not clipped.

    Pillow's convert('RGB') would clip every value above 255 (a 16-bit photo turns almost all
    white), so the values are rescaled instead:
    - I;16 / I;16L / I;16B / I;16N (unsigned 16-bit): v * 255 / 65535;
    - I (signed 32-bit), by the range the values use: within 0..255 as 8-bit, within 0..65535
      as 16-bit (v * 255 / 65535), otherwise stretched from min..max to 0..255;
    - F (32-bit float): within 0..1 times 255, within 0..255 as is, otherwise stretched from
      min..max to 0..255; NaN or infinite values are an error.
    The result is rounded to 8 bits, so the rest of the pipeline is upstream's uint8 one.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        scaled = values * (255.0 / 65535.0)
    else:
        if not np.all(np.isfinite(values)):
            raise UserInputError(f"image {name} (mode {image.mode}) contains NaN or infinite values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = values
        elif image.mode == "I" and low >= 0.0 and high <= 65535.0:
            scaled = values * (255.0 / 65535.0)
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = np.full_like(values, min(max(low, 0.0), 255.0))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image, name=None):
    """Any PIL image as RGB, with the numbers upstream's `image.convert('RGB')` gives.

    Alpha is dropped, not composited (as convert does); palette images with transparency go
    through RGBA first, which gives the same RGB values without Pillow's warning. 16/32-bit
    integer and float images are rescaled to 8 bits instead of clipped (see _to_8bit_gray).
    EXIF orientation is deliberately NOT applied: upstream does not call exif_transpose, and
    the model was trained on images as stored.
    """
    name = name or repr(getattr(image, "filename", "") or "<PIL image>")
    if image.width <= 0 or image.height <= 0:
        raise UserInputError(f"image {name} is empty ({image.width}x{image.height} pixels)")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _to_8bit_gray(image, name).convert("RGB")
    if image.mode in ("P", "PA") and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise UserInputError(f"image {name} has PIL mode {image.mode!r}, which cannot be converted "
                             f"to RGB: {err}") from err


def _array_to_image(array, name):
    """An HxW or HxWxC (C = 1, 3, 4) uint8 array as a PIL image (4 channels = RGBA)."""
    if array.dtype != np.uint8:
        raise UserInputError(f"image {name} is a numpy array of dtype {array.dtype}; expected uint8 "
                             f"values 0..255 (HxWxC)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise UserInputError(f"image {name} is a numpy array of shape {array.shape}; expected HxWxC "
                             f"with C = 1, 3 or 4 (or HxW)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UserInputError(f"image {name} is an empty array of shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


@MindFormerRegister.register(PROCESSOR)
class VisualGLMImageProcessor:
    """Images -> float32 [B, 3, image_size, image_size], as upstream BlipImageEvalProcessor.

    `__call__` takes one image or a list; an image is a file path (str / os.PathLike), a PIL
    image (any mode; see `to_rgb`) or an HxWxC uint8 numpy array (C = 1, 3, 4; a 4-D
    [B, H, W, C] array is a batch). Steps: RGB, PIL bicubic resize to image_size x image_size
    (no crop, aspect ratio not kept), /255, (x - mean) / std in float32, channels first. EXIF
    orientation is not applied (upstream does not either).
    """

    def __init__(self, image_size=224, mean=CLIP_MEAN, std=CLIP_STD, **kwargs):
        kwargs.pop("type", None)  # YAML nodes carry their registry name
        if kwargs:
            raise UserInputError(f"VisualGLMImageProcessor got unknown fields {sorted(kwargs)}; "
                                 f"known: image_size, mean, std")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise UserInputError(f"VisualGLMImageProcessor image_size must be a positive integer, "
                                 f"got {image_size!r}")
        self.image_size = image_size
        self.mean = self._channels("mean", mean)
        self.std = self._channels("std", std)
        if np.any(self.std <= 0):
            raise UserInputError(f"VisualGLMImageProcessor std must be positive, got {list(std)}")

    @staticmethod
    def _channels(name, values):
        try:
            array = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"VisualGLMImageProcessor {name} must be 3 numbers, got {values!r}") from err
        if array.shape != (3,) or not np.all(np.isfinite(array)):
            raise UserInputError(f"VisualGLMImageProcessor {name} must be 3 finite numbers, got {values!r}")
        return array.reshape(3, 1, 1)

    @staticmethod
    def as_list(images):
        """One image or a sequence of them, as a list (a 4-D uint8 array is a batch)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        if isinstance(images, (list, tuple)):
            return list(images)
        return [images]

    def to_pil(self, image, index=0):
        """One input image as an RGB PIL image, or a UserInputError naming it."""
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        if isinstance(image, Image.Image):
            name = repr(getattr(image, "filename", "") or f"<PIL image {index}>")
            try:
                image.load()  # an Image.open() result may still be undecoded
            except _DECODE_ERRORS as err:
                raise UserInputError(f"image {name} cannot be decoded (truncated, corrupt or "
                                     f"already closed): {err}") from err
            return to_rgb(image, name)
        if isinstance(image, np.ndarray):
            return to_rgb(_array_to_image(image, f"<array {index}>"))
        raise UserInputError(f"image {index} has unsupported type {type(image).__name__}; "
                             f"expected {_EXPECTED_IMAGE}")

    def preprocess(self, rgb):
        """An RGB PIL image -> float32 [3, S, S] (the arithmetic torchvision does, in float32)."""
        resized = rgb.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        return (pixels.transpose(2, 0, 1) - self.mean) / self.std

    def __call__(self, images):
        batch = self.as_list(images)
        if not batch:
            raise UserInputError(f"no images given; expected {_EXPECTED_IMAGE}, or a list of them")
        return np.stack([self.preprocess(self.to_pil(image, i)) for i, image in enumerate(batch)])


# ---- prompts -------------------------------------------------------------------------------

@MindFormerRegister.register(PROCESSOR)
class VisualGLMProcessor:
    """Images + chat turns -> pixel values and prompt ids laid out as upstream chat() does.

    `image_length` is the number of image embeddings per image (the Q-Former's 32 queries):
    that many `pad_token_id` placeholders follow the ids of "<img>" and the model replaces
    their embeddings by the image's. `pre_image` is the index of the first placeholder.
    """

    def __init__(self, image_processor, tokenizer, image_length=32):
        if isinstance(image_length, bool) or not isinstance(image_length, int) or image_length < 1:
            raise UserInputError(f"image_length must be a positive integer, got {image_length!r}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_length = image_length

    @classmethod
    def from_config(cls, processor_node, image_length=32, resolve_path=None):
        """Build from a YAML `processor:` section (see build_processor)."""
        return build_processor(processor_node, image_length, resolve_path)

    @staticmethod
    def build_prompt(query, history=(), english=False, with_image=True):
        """The prompt text: "<img></img>" + past turns + the question (no "<img></img>" when
        `with_image` is False, i.e. plain text chat)."""
        text = chat_prompt(query, history, english)
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

        images: None (text only), one image or a list (see VisualGLMImageProcessor); queries:
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
    `resolve_path(path, what)` finds the vocab file (default: research.common.runtime's, i.e. as
    given, else relative to the repo root), as run_glm.build_glm does.
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
    tokenizer_node = dict(processor_node.get("tokenizer") or {})
    if not tokenizer_node.get("vocab_file"):
        raise UserInputError("processor.tokenizer.vocab_file is not set")
    tokenizer_node["vocab_file"] = resolve_path(tokenizer_node["vocab_file"], "tokenizer vocab_file")
    tokenizer = build_registered(TOKENIZER, tokenizer_node.pop("type", "ChatGLMTokenizer"), **tokenizer_node)
    return VisualGLMProcessor(image_processor, tokenizer, image_length)
