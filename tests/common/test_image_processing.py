"""BLIP/CLIP image preprocessing against transformers' BlipImageProcessor and torch, for every
PIL mode, and its answers to bad input."""
import io
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from research.common.errors import UserInputError
from research.common.image_processing import (
    CLIP_MEAN, CLIP_STD, BlipImageProcessor, BlipImageTrainProcessor, load_image, to_rgb)


def gradient_rgb(width=301, height=150):
    """A deterministic, non-square, non-224 RGB test image with detail in every channel."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 7 + y * 3) % 256
    green = (x * x // 5 + y) % 256
    blue = (np.sin(x / 9.0) * 100 + np.cos(y / 7.0) * 100 + 128).astype(int) % 256
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def images():
    return BlipImageProcessor(224)


# ---- image numbers ---------------------------------------------------------------------------

def torch_reference(image, size=224):
    """torchvision's Resize(BICUBIC) on PIL + ToTensor + Normalize, written with torch ops."""
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    tensor = torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub(mean).div(std).unsqueeze(0).numpy()


def test_matches_transformers_blip_image_processor(images):
    """transformers resizes through PIL too; the result is bit-identical (max |diff| 0.0 seen)."""
    from transformers import BlipImageProcessor as HFBlipImageProcessor
    image = gradient_rgb()
    expected = HFBlipImageProcessor(size={"height": 224, "width": 224}, resample=Image.Resampling.BICUBIC,
                                  image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)(
        image, return_tensors="np")["pixel_values"]
    ours = images(image)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_matches_torch_reference_and_is_not_trivial(images):
    image = gradient_rgb()
    ours = images(image)
    np.testing.assert_allclose(ours, torch_reference(image), rtol=0, atol=1e-6)
    # Not a constant or a plain nearest/bilinear result: bicubic differs from bilinear here.
    bilinear = image.resize((224, 224), Image.Resampling.BILINEAR)
    assert np.abs(ours - torch_reference(bilinear.resize((224, 224)))).max() > 1e-2
    assert ours.std() > 0.5


def test_path_pil_and_array_inputs_agree(images, tmp_path):
    image = gradient_rgb(97, 61)
    path = tmp_path / "g.png"
    image.save(path)
    from_pil = images(image)
    for source in (str(path), path, np.asarray(image), [np.asarray(image)], Image.open(path)):
        np.testing.assert_array_equal(images(source), from_pil)
    batch = images([str(path), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert batch.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(batch[0], from_pil[0])
    assert not np.array_equal(batch[0], batch[1])
    four_d = images(np.stack([np.asarray(image)] * 3))
    assert four_d.shape == (3, 3, 224, 224)


def test_image_size_is_configurable():
    out = BlipImageProcessor(56)(gradient_rgb())
    assert out.shape == (1, 3, 56, 56)
    np.testing.assert_allclose(out, torch_reference(gradient_rgb(), 56), rtol=0, atol=1e-6)


# ---- PIL modes -------------------------------------------------------------------------------

def all_modes():
    rgb = gradient_rgb(64, 40)
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(gray)
    palette_trns = rgb.convert("P")
    palette_trns.info["transparency"] = bytes(range(0, 256))
    sixteen = Image.fromarray((np.asarray(gray).astype(np.uint16) * 257))
    return {
        "L": gray, "LA": gray.convert("LA"), "P": rgb.convert("P"), "P+transparency": palette_trns,
        "RGBA": rgba, "CMYK": rgb.convert("CMYK"), "YCbCr": rgb.convert("YCbCr"), "1": gray.convert("1"),
        "I;16": sixteen, "I;16B": Image.frombytes("I;16B", sixteen.size, np.asarray(sixteen).astype(">u2").tobytes()),
        "I": Image.fromarray(np.asarray(sixteen).astype(np.int32)),
        "F": Image.fromarray(np.asarray(gray).astype(np.float32) / 255.0),
    }


@pytest.mark.filterwarnings("error")  # e.g. Pillow's palette-transparency warning
@pytest.mark.parametrize("mode", list(all_modes()))
def test_every_mode_gives_finite_rgb(images, mode):
    image = all_modes()[mode]
    assert image.mode == mode.split("+")[0]
    out = images(image)
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out.std() > 0.1  # a real picture, not a blank


def test_grayscale_equals_rgb_of_replicated_channels(images):
    gray = all_modes()["L"]
    replicated = Image.merge("RGB", [gray, gray, gray])
    np.testing.assert_array_equal(images(gray), images(replicated))
    np.testing.assert_array_equal(images(np.asarray(gray)), images(replicated))
    np.testing.assert_array_equal(images(np.asarray(gray)[:, :, None]), images(replicated))


def test_alpha_is_dropped_like_convert_rgb(images):
    modes = all_modes()
    np.testing.assert_array_equal(images(modes["RGBA"]), torch_reference(modes["RGBA"]))
    np.testing.assert_array_equal(images(modes["CMYK"]), torch_reference(modes["CMYK"]))
    trns = modes["P+transparency"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about convert("RGB") here; to_rgb avoids it
        expected = np.asarray(trns.copy().convert("RGB"))
    assert np.array_equal(np.asarray(to_rgb(trns)), expected)


def test_high_bit_depth_is_scaled_not_clipped():
    modes = all_modes()
    gray = np.asarray(modes["L"])
    for mode in ("I;16", "I;16B", "I", "F"):
        rgb = np.asarray(to_rgb(modes[mode]))
        np.testing.assert_array_equal(rgb[:, :, 0], gray, err_msg=mode)
    # Pillow's own convert would clip 16-bit values: almost everything becomes 255.
    assert (np.asarray(modes["I;16"].convert("RGB")) == 255).mean() > 0.9


def test_sixteen_bit_png_round_trips_into_a_sensible_range(images, tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (80, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.min() == 0 and rgb.max() == 255
    assert (rgb == 255).mean() < 0.02  # clipping would make ~99% of it white
    np.testing.assert_allclose(rgb[0, :, 0], np.linspace(0, 255, 300), atol=1)
    assert np.all(np.isfinite(images(str(path))))


def test_wide_range_int_and_float_images_are_stretched():
    wide = Image.fromarray(np.linspace(-1e6, 1e6, 100).reshape(10, 10).astype(np.int32))
    rgb = np.asarray(to_rgb(wide))
    assert rgb.min() == 0 and rgb.max() == 255
    floats = Image.fromarray(np.linspace(-3.0, 7.0, 100).reshape(10, 10).astype(np.float32))
    assert np.asarray(to_rgb(floats)).max() == 255
    with pytest.raises(UserInputError, match="NaN"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, np.float32)))


@pytest.mark.parametrize("name,save", [
    ("cmyk.jpg", lambda im, p: im.convert("CMYK").save(p, "JPEG", quality=95)),
    ("rgba.png", lambda im, p: _with_alpha(im).save(p, "PNG")),
    ("palette.gif", lambda im, p: im.convert("P").save(p, "GIF", transparency=0)),
])
def test_files_from_disk(images, tmp_path, name, save):
    path = tmp_path / name
    save(gradient_rgb(120, 90), path)
    with Image.open(path) as opened:
        expected_mode = {"cmyk.jpg": "CMYK", "rgba.png": "RGBA", "palette.gif": "P"}[name]
        assert opened.mode == expected_mode
        expected = torch_reference(opened.convert("RGBA").convert("RGB") if opened.mode == "P"
                                   else opened.convert("RGB"))
    out = images(str(path))
    assert out.shape == (1, 3, 224, 224) and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, expected)


def _with_alpha(image):
    image = image.copy()
    image.putalpha(128)
    return image


def test_exif_orientation_is_not_applied(images, tmp_path):
    """Upstream feeds the pixels as stored; a rotate-90 EXIF tag must not change them."""
    image = gradient_rgb(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif, quality=95)
    with Image.open(path) as opened:
        expected = torch_reference(opened)
    np.testing.assert_array_equal(images(str(path)), expected)


# ---- bad input -------------------------------------------------------------------------------

def _bad_files(tmp_path):
    good = io.BytesIO()
    gradient_rgb(200, 150).save(good, "PNG")
    jpeg = io.BytesIO()
    gradient_rgb(200, 150).save(jpeg, "JPEG")
    files = {
        "empty.png": (b"", "empty"),
        "notes.txt": ("just some text, not an image\n".encode(), "not an image"),
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated or corrupt"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 3], "truncated or corrupt"),
        "corrupt.png": (good.getvalue()[:60] + b"\x00" * 200 + good.getvalue()[260:], "truncated or corrupt"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {str(tmp_path / name): message for name, (_, message) in files.items()}


def test_bad_files_name_the_path(images, tmp_path):
    cases = _bad_files(tmp_path)
    cases[str(tmp_path / "missing.png")] = "does not exist"
    os.mkdir(tmp_path / "folder.png")
    cases[str(tmp_path / "folder.png")] = "is a directory"
    for path, message in cases.items():
        with pytest.raises(UserInputError, match=message) as info:
            images(path)
        assert path in str(info.value)
        with pytest.raises(UserInputError):
            load_image(pathlib.Path(path))


def test_truncated_file_fails_at_load_not_later(images, tmp_path):
    path = str(tmp_path / "truncated.png")
    _bad_files(tmp_path)
    with pytest.raises(UserInputError, match="truncated"):
        images([gradient_rgb(), path])
    lazy = Image.open(path)  # an undecoded PIL image fails the same way, naming its file
    with pytest.raises(UserInputError) as info:
        images(lazy)
    assert path in str(info.value)
    lazy.close()


@pytest.mark.parametrize("value,message", [
    (12, "unsupported type int"), (b"bytes", "unsupported type bytes"), (None, "unsupported type NoneType"),
    (np.zeros((8, 8, 3), np.float32), "dtype float32"), (np.zeros((8, 8, 2), np.uint8), "shape"),
    (np.zeros((0, 8, 3), np.uint8), "empty"), ([], "no images"),
])
def test_unsupported_objects(images, value, message):
    with pytest.raises(UserInputError, match=message):
        images(value)


def test_image_processor_arguments_are_checked():
    for kwargs in ({"image_size": 0}, {"image_size": True}, {"mean": (1, 2)}, {"std": (0.1, 0, 0.2)},
                   {"crop_size": 224}):
        with pytest.raises(UserInputError):
            BlipImageProcessor(**kwargs)


# ---- training transform (MiniGPT-4's blip2_image_train) -------------------------------------------

def test_train_crop_is_the_torchvision_pil_path():
    """torchvision's RandomResizedCrop on PIL for a given box is crop((left, top, left + w, top + h))
    then Resize BICUBIC: torch_reference's path (torchvision itself is not installable here: its
    PyPI wheel is a CUDA build)."""
    image = gradient_rgb()
    ours = BlipImageTrainProcessor(224)
    top, left, h, w = ours.crop_box(image.width, image.height, (1, 2, 3))
    expected = torch_reference(image.crop((left, top, left + w, top + h)))[0]
    np.testing.assert_allclose(ours(image, (1, 2, 3)), expected, rtol=0, atol=1e-6)
    assert (h, w) != (image.height, image.width)


def test_crop_boxes_follow_random_resized_crop_rules():
    """Area share in scale (0.5, 1), aspect ratio in (3/4, 4/3) up to rounding, inside the image,
    a function of the seed."""
    processor = BlipImageTrainProcessor(224)
    width, height = 301, 150
    boxes = [processor.crop_box(width, height, (0, 0, index)) for index in range(300)]
    assert boxes == [processor.crop_box(width, height, (0, 0, index)) for index in range(300)]
    assert len(set(boxes)) > 100  # some seeds fall back to the centre crop (0, 50, 150, 200)
    for top, left, h, w in boxes:
        assert 0 <= top <= height - h and 0 <= left <= width - w
        assert 0.5 - 0.02 <= h * w / (width * height) <= 1.0
        assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03
    assert {box[0] > 0 for box in boxes} == {True, False} and {box[1] > 0 for box in boxes} == {True, False}


def test_crop_falls_back_to_a_centre_crop():
    """No try fits a 400x10 strip: torchvision's fallback crops the centre at the nearest ratio."""
    processor = BlipImageTrainProcessor(224)
    assert processor.crop_box(400, 10, 5) == (0, 193, 10, 13)  # w = round(10 * 4/3)
    assert processor.crop_box(10, 400, 5) == (193, 0, 13, 10)  # h = round(10 / (3/4))


def test_resize_transform_is_the_eval_transform():
    image = gradient_rgb()
    resized = BlipImageTrainProcessor(56, transform="resize")(image, (1, 2, 3))
    np.testing.assert_array_equal(resized, BlipImageProcessor(56)(image)[0])


def test_train_processor_arguments_are_checked():
    for kwargs, message in (({"transform": "flip"}, "random_resized_crop, resize"),
                            ({"scale": (0, 1)}, "crop scale"), ({"scale": (0.9, 0.5)}, "crop scale"),
                            ({"image_size": 0}, "image_size")):
        with pytest.raises(UserInputError, match=message):
            BlipImageTrainProcessor(**kwargs)
    for seed in (None, -1, 1.5, (1, 2 ** 32)):
        with pytest.raises(UserInputError, match="seed"):
            BlipImageTrainProcessor(32)(gradient_rgb(), seed)
