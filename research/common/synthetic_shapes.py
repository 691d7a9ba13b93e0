"""Synthetic shape images for the demos and tests: one coloured shape, centred, on a plain
background, colours jittered by a numpy Generator (VisualGLM's Chinese and MiniGPT-4's English
demo sets draw the same pictures)."""
import numpy as np
from PIL import Image, ImageDraw

from research.common.errors import UserInputError

SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
COLOUR_JITTER = 12


def jitter(rng, rgb):
    """`rgb` with each channel moved by up to COLOUR_JITTER (numpy Generator `rng`)."""
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in rgb)


def render(kind, fill_rgb, background_rgb, rng, image_size=56):
    """One RGB image: a `kind` (SHAPE_KINDS) in `fill_rgb` on `background_rgb`, both jittered by
    `rng` (the background first). Returns (PIL image, {"x", "y", "size"}) in pixels.

    The shape is centred at a fixed size (0.7 of the image): a ViT of two 48-wide layers
    trained from scratch on 2000 images learns shapes at fixed positions in ~200 steps, but
    with even 1-pixel position jitter it stays near chance for minutes (measured), which
    is too slow for `make demo`.
    """
    image = Image.new("RGB", (image_size, image_size), jitter(rng, background_rgb))
    draw = ImageDraw.Draw(image)
    size = int(round(image_size * 0.7))
    half = size / 2
    x = y = image_size / 2
    fill = jitter(rng, fill_rgb)
    box = (x - half, y - half, x + half, y + half)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(x, y - half), (x + half, y), (x, y + half), (x - half, y)], fill=fill)
    else:
        raise UserInputError(f"unknown shape {kind!r}; known: {', '.join(SHAPE_KINDS)}")
    return image, {"x": round(x, 2), "y": round(y, 2), "size": size}
