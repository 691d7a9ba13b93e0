"""A loss curve as a PNG, drawn with Pillow alone (axes, tick labels, axis titles, the curve)."""
import math

from PIL import Image, ImageDraw, ImageFont

from research.common.atomic import atomic_write

WIDTH, HEIGHT = 800, 480
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 80, 20, 40, 60


def _ticks(low, high, count=5):
    """`count` evenly spaced values from low to high."""
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def write_loss_png(path, steps, losses, title="training loss", width=WIDTH, height=HEIGHT):
    """Draw loss against step into `path` (written to a temp name, then renamed).

    Non-finite losses are left out of the curve; with no points the axes are drawn empty.
    """
    points = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top = _MARGIN_LEFT, _MARGIN_TOP
    right, bottom = width - _MARGIN_RIGHT, height - _MARGIN_BOTTOM
    draw.text((left, 12), title, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    draw.text(((left + right) // 2 - 12, height - 22), "step", fill="black", font=font)
    draw.text((8, top - 28), "loss", fill="black", font=font)

    if points:
        x_low, x_high = min(s for s, _ in points), max(s for s, _ in points)
        y_low, y_high = min(l for _, l in points), max(l for _, l in points)
        if x_high == x_low:
            x_high = x_low + 1
        if y_high == y_low:
            y_low, y_high = y_low - 0.5, y_high + 0.5

        def to_pixel(step, loss):
            x = left + (step - x_low) / (x_high - x_low) * (right - left)
            y = bottom - (loss - y_low) / (y_high - y_low) * (bottom - top)
            return x, y

        for value in _ticks(x_low, x_high):
            x, _ = to_pixel(value, y_low)
            draw.line([(x, bottom), (x, bottom + 5)], fill="black")
            draw.text((x - 10, bottom + 8), f"{value:.0f}", fill="black", font=font)
        for value in _ticks(y_low, y_high):
            _, y = to_pixel(x_low, value)
            draw.line([(left - 5, y), (left, y)], fill="black")
            draw.line([(left + 1, y), (right, y)], fill=(230, 230, 230))
            draw.text((6, y - 6), f"{value:.4g}", fill="black", font=font)
        pixels = [to_pixel(s, l) for s, l in points]
        if len(pixels) == 1:
            x, y = pixels[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
        else:
            draw.line(pixels, fill=(31, 119, 180), width=2)
    else:
        draw.text((left + 20, top + 20), "no finite loss values yet", fill="black", font=font)

    with atomic_write(path) as stream:
        image.save(stream, format="PNG")
