"""Images of any kind to BLIP-2 / CLIP pixel tensors, without torch or torchvision.

What upstream's `BlipImageEvalProcessor` (VisualGLM model/blip2.py; LAVIS's `blip2_image_eval`,
which MiniGPT-4 uses) does: `convert('RGB')`, PIL bicubic resize to size x size (no crop;
torchvision's Resize on a PIL image calls exactly `image.resize((size, size), BICUBIC)`), /255,
normalise with the CLIP mean and std, channels first. Images of any PIL mode are read; 16-bit
and float images are rescaled rather than clipped (see to_rgb).

`BlipImageTrainProcessor` is MiniGPT-4's training transform (`blip2_image_train`): torchvision's
RandomResizedCrop, re-implemented so that the crop is a function of a per-sample seed.
"""
import math
import os
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import check_int
from research.common.errors import UserInputError

# CLIP / BLIP-2 normalisation, as upstream BlipImageBaseProcessor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What Pillow may raise while identifying or decoding a damaged file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_EXPECTED_IMAGE = "a file path, a PIL image or an HxWxC uint8 numpy array"


def load_image(path):
    """Open and fully decode an image file; returns an RGB PIL image.

    Every failure is a UserInputError naming the path: missing, a directory, empty, not an
    image, or truncated/corrupt (decoding is forced here with `load()`, so a damaged file fails
    now and not in the middle of preprocessing).
    """
    return _decode(path, to_rgb)


def check_image(path):
    """load_image's checks, faster, for a whole dataset before training: JPEGs are decoded at
    reduced scale (every byte is still read, so a truncated or corrupt file fails)."""
    _decode(path, draft=(32, 32))


def _decode(path, finish=None, draft=None):
    """Open and decode `path` (JPEGs in draft mode at about `draft` pixels when given), then
    `finish(image, name)`; every failure is a UserInputError naming the file."""
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
            if draft:
                image.draft("RGB", draft)
            image.load()
            return finish(image, name) if finish else None
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
    the models were trained on images as stored.
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


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class BlipImageProcessor:
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
            raise UserInputError(f"image_processor got unknown fields {sorted(kwargs)}; "
                                 f"known: image_size, mean, std")
        self.image_size = check_int("image_processor image_size", image_size)
        self.mean = self._channels("mean", mean)
        self.std = self._channels("std", std)
        if np.any(self.std <= 0):
            raise UserInputError(f"image_processor std must be positive, got {list(std)}")

    @staticmethod
    def _channels(name, values):
        try:
            array = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"image_processor {name} must be 3 numbers, got {values!r}") from err
        if array.shape != (3,) or not np.all(np.isfinite(array)):
            raise UserInputError(f"image_processor {name} must be 3 finite numbers, got {values!r}")
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


# torchvision RandomResizedCrop's default aspect-ratio range (upstream does not change it).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class BlipImageTrainProcessor:
    """Training images -> float32 [3, S, S], as upstream MiniGPT-4's `blip2_image_train`, with
    the randomness drawn from a per-sample seed so that a resumed run crops exactly as the
    interrupted one would have.

    transform "random_resized_crop" (the seed's commit 22d8888): torchvision's
    RandomResizedCrop(S, scale, ratio (3/4, 4/3), BICUBIC) -> ToTensor -> Normalize, no flip.
    The crop box follows RandomResizedCrop.get_params (10 tries of an area in `scale` and a
    log-uniform aspect ratio, then a centre crop) with numpy's RandomState(seed) in place of
    torch's generator; crop and resize are torchvision's PIL path: `image.crop((left, top,
    left + w, top + h)).resize((S, S), BICUBIC)`. transform "resize" (upstream since 68d81af):
    Resize((S, S), BICUBIC), i.e. BlipImageProcessor; the seed is not used.
    Inputs are what BlipImageProcessor takes (path, PIL image, HxWxC uint8 array), one at a time.
    """

    TRANSFORMS = ("random_resized_crop", "resize")

    def __init__(self, image_size=224, mean=CLIP_MEAN, std=CLIP_STD, transform="random_resized_crop",
                 scale=(0.5, 1.0)):
        self.eval_processor = BlipImageProcessor(image_size, mean, std)
        if transform not in self.TRANSFORMS:
            raise UserInputError(f"image transform must be one of {', '.join(self.TRANSFORMS)}, "
                                 f"got {transform!r}")
        self.transform = transform
        if (not isinstance(scale, (list, tuple)) or len(scale) != 2
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale)
                or not 0 < scale[0] <= scale[1] <= 1):
            raise UserInputError(f"crop scale must be two numbers 0 < low <= high <= 1 (the share of "
                                 f"the image area kept), got {scale!r}")
        self.scale = (float(scale[0]), float(scale[1]))

    @staticmethod
    def _random_state(seed):
        """numpy's RandomState for a seed: an int or a sequence of ints in [0, 2**32). None (which
        numpy would fill from the OS) is refused: the crop must repeat on resume."""
        if seed is None:
            raise UserInputError("random_resized_crop needs a per-sample seed, e.g. (seed, epoch, index)")
        try:
            return np.random.RandomState(seed)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"a crop seed is an integer or a sequence of integers in [0, 2**32), "
                                 f"got {seed!r}") from err

    def crop_box(self, width, height, seed):
        """(top, left, h, w) of the crop for an image of width x height, as
        RandomResizedCrop.get_params draws it, from RandomState(seed)."""
        draw = self._random_state(seed)
        area = height * width
        log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        for _ in range(10):
            target_area = area * draw.uniform(*self.scale)
            aspect_ratio = math.exp(draw.uniform(log_low, log_high))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(draw.randint(0, height - h + 1))
                left = int(draw.randint(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height  # no try fitted: a centre crop at the nearest allowed ratio
        if in_ratio < min(CROP_RATIO):
            w, h = width, int(round(width / min(CROP_RATIO)))
        elif in_ratio > max(CROP_RATIO):
            w, h = int(round(height * max(CROP_RATIO))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image, seed):
        """One image -> float32 [3, S, S]; `seed` fixes the crop (e.g. (seed, epoch, index))."""
        rgb = self.eval_processor.to_pil(image)
        if self.transform == "random_resized_crop":
            top, left, h, w = self.crop_box(rgb.width, rgb.height, seed)
            rgb = rgb.crop((left, top, left + w, top + h))
        return self.eval_processor.preprocess(rgb)
