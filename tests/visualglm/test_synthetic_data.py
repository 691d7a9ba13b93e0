"""Synthetic coloured-shapes dataset: byte-for-byte determinism, the fewshot json schema, the
held-out split, the style set, its tokenizer, the CLI and the generation speed."""
import itertools
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from research.common.errors import UserInputError
from research.common.image_processing import BlipImageProcessor
from research.visualglm import synthetic_data
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.dataset_visualglm import VisualGLMDataLoader
from research.visualglm.processing_visualglm import VisualGLMProcessor
from research.visualglm.synthetic_data import (
    BACKGROUNDS, COLOURS, COMBINATIONS, FORMAT_VERSION, PROMPT, SHAPES, TEMPLATE_PIECES,
    build_synthetic_tokenizer, label_for, make_synthetic_dataset, style_label_for)
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer


def files_of(directory):
    """{relative path: bytes} of every file under directory."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as stream:
                out[os.path.relpath(path, directory)] = stream.read()
    return out


def read_json(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("synthetic"))
    summary = make_synthetic_dataset(directory, count=120, seed=3, test_count=60, holdout_combinations=4)
    return directory, summary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ChatGLMTokenizer(build_synthetic_tokenizer(str(tmp_path_factory.mktemp("tok") / "ice_text.model")))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = files_of(make_synthetic_dataset(str(tmp_path / "a"), 30, seed=5)["directory"])
    second = files_of(make_synthetic_dataset(str(tmp_path / "b"), 30, seed=5)["directory"])
    other = files_of(make_synthetic_dataset(str(tmp_path / "c"), 30, seed=6)["directory"])
    assert len(first) == 30 + 3 + 4  # images (train + test), dataset/test/style json, metadata
    assert first == second
    assert sorted(first) == sorted(other)
    assert first["images/train_00000.png"] != other["images/train_00000.png"]


def test_fewshot_schema_and_labels(dataset):
    directory, summary = dataset
    rows = read_json(os.path.join(directory, "dataset.json"))
    metadata = read_json(os.path.join(directory, "metadata.json"))
    assert len(rows) == summary["train"] == 120
    for row, attributes in zip(rows, metadata["train"]):
        assert set(row) == {"img", "prompt", "label"} and all(isinstance(v, str) for v in row.values())
        assert not os.path.isabs(row["img"]) and row["img"] == attributes["img"]
        assert row["prompt"] == PROMPT == "这张图片里有什么？"
        assert row["label"] == label_for(attributes["shape"], attributes["colour"], attributes["background"])
        with Image.open(os.path.join(directory, row["img"])) as image:
            assert image.size == (56, 56) and image.mode == "RGB"
    assert label_for("圆形", "红色", "白色") == "一个红色的圆形，背景是白色。"


def test_images_show_their_attributes(dataset):
    """The centre pixel of the shape has the shape's colour; a corner has the background's."""
    directory, _ = dataset
    for attributes in read_json(os.path.join(directory, "metadata.json"))["train"][:40]:
        pixels = np.asarray(Image.open(os.path.join(directory, attributes["img"])), np.int32)
        centre = pixels[int(attributes["y"]), int(attributes["x"])]
        corner_candidates = [pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]
        background = np.array(BACKGROUNDS[attributes["background"]])
        assert np.abs(centre - np.array(COLOURS[attributes["colour"]])).max() <= 12
        assert min(np.abs(c - background).max() for c in corner_candidates) <= 12


def test_held_out_split(dataset):
    directory, summary = dataset
    metadata = read_json(os.path.join(directory, "metadata.json"))
    held_out = {tuple(c) for c in metadata["held_out_combinations"]}
    assert len(held_out) == 4 and held_out == set(summary["held_out_combinations"])
    combo = lambda a: (a["shape"], a["colour"], a["background"])
    train = [combo(a) for a in metadata["train"]]
    test = [combo(a) for a in metadata["test"]]
    assert not held_out & set(train)
    assert set(test) == set(COMBINATIONS)  # 60 test images: every combination once
    # Every attribute value of a held-out combination is still seen in training.
    for shape, colour, background in held_out:
        assert any(s == shape for s, _, _ in train) and any(c == colour for _, c, _ in train)
        assert any(b == background for _, _, b in train)
    # Balanced: each training combination appears 2 or 3 times (120 over 56).
    counts = [train.count(c) for c in set(train)]
    assert len(set(train)) == len(COMBINATIONS) - 4 and min(counts) >= 2 and max(counts) <= 3
    # Test images are new renders, never copies of training images.
    train_bytes = {open(os.path.join(directory, a["img"]), "rb").read() for a in metadata["train"]}
    assert not any(open(os.path.join(directory, a["img"]), "rb").read() in train_bytes for a in metadata["test"])
    test_rows = read_json(os.path.join(directory, "test.json"))
    assert [r["img"] for r in test_rows] == [a["img"] for a in metadata["test"]]


def test_style_set(dataset):
    """One training image per (shape, colour) pair: the new style is shown with every content word."""
    directory, summary = dataset
    rows = read_json(os.path.join(directory, "style", "dataset.json"))
    metadata = read_json(os.path.join(directory, "metadata.json"))
    assert len(rows) == summary["style"] == len(SHAPES) * len(COLOURS) == 20
    attributes = {a["img"]: a for a in metadata["train"]}
    pairs = set()
    for row in rows:
        assert row["prompt"] == PROMPT
        image = attributes[os.path.relpath(row["img"], "..")]
        assert row["label"] == style_label_for(image["shape"], image["colour"])
        pairs.add((image["shape"], image["colour"]))
        assert os.path.isfile(os.path.join(directory, "style", row["img"]))
    assert pairs == set(itertools.product(SHAPES, COLOURS))
    assert style_label_for("圆形", "红色") == "图里是红色的圆形哦！"
    assert metadata["format"] == FORMAT_VERSION


def test_tokenizer_encodes_every_text_without_unknown_pieces(tokenizer):
    special = (tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.gmask_token_id,
               tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (3, 4, 5, 8, 9, 0)
    texts = ([label_for(*c) for c in COMBINATIONS] + [style_label_for(s, c) for s in SHAPES for c in COLOURS]
             + [PROMPT, "</img>问：" + PROMPT + "\n答：", "<img>"])
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert 0 not in ids, text
        assert not any(p.startswith("<0x") for p in pieces), (text, pieces)  # no byte fallback
        assert tokenizer.decode(ids) == text
    # Every attribute word has its own id sequence: labels differing in one word encode differently.
    assert len({tuple(tokenizer.encode(label_for(*c), add_special_tokens=False)) for c in COMBINATIONS}) == 60
    assert tokenizer.vocab_size <= 704  # the tiny demo model's vocab_size


def test_content_words_are_pieces_the_style_reuses(tokenizer):
    """Each content and template word is one piece, so the style answer carries the base answer's
    colour and shape ids at the same positions: LoRA learns the words around them only."""
    for word in TEMPLATE_PIECES:
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(word, add_special_tokens=False))[-1] == word
    for shape, colour, background in COMBINATIONS:
        base = tokenizer.convert_ids_to_tokens(
            tokenizer.encode(label_for(shape, colour, background), add_special_tokens=False))
        style = tokenizer.convert_ids_to_tokens(
            tokenizer.encode(style_label_for(shape, colour), add_special_tokens=False))
        assert base[1:5] == ["一个", colour, "的", shape] and base[6:8] == ["背景是", background]
        assert style[1:5] == ["图里是", colour, "的", shape]


def test_loader_reads_the_synthetic_dataset(dataset, tokenizer):
    directory, _ = dataset
    processor = VisualGLMProcessor(BlipImageProcessor(56), tokenizer)
    config = GLMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                       inner_hidden_size=64, seq_length=128, bos_token_id=8, eos_token_id=9,
                       mask_token_id=4, gmask_token_id=5)
    train = VisualGLMDataLoader(os.path.join(directory, "dataset.json"), processor, 64, 32, config)
    style = VisualGLMDataLoader(os.path.join(directory, "style", "dataset.json"), processor, 64, 32, config)
    assert (len(train), len(style)) == (120, 20)
    sample = style[0]
    answer = tokenizer.encode(read_json(os.path.join(directory, "style", "dataset.json"))[0]["label"],
                              add_special_tokens=False)
    labels = sample["labels"][sample["labels"] != -100].tolist()
    assert labels == [8] + answer + [9]


def test_bad_arguments(tmp_path):
    with pytest.raises(UserInputError, match="count must be an integer >= 1"):
        make_synthetic_dataset(str(tmp_path), 0)
    with pytest.raises(UserInputError, match="holdout_combinations must be between 0 and 15"):
        make_synthetic_dataset(str(tmp_path), 10, holdout_combinations=16)


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert synthetic_data.main(["--output_dir", out, "--count", "12", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 12 training images" in printed and "wrote 1 held-out images" in printed
    style = read_json(os.path.join(out, "style", "dataset.json"))
    assert f"wrote {len(style)} style examples" in printed and os.path.join(out, "ice_text.model") in printed
    assert 1 <= len(style) <= 12 and len({row["label"] for row in style}) == len(style)
    assert len(read_json(os.path.join(out, "dataset.json"))) == 12
    assert os.path.isfile(os.path.join(out, "ice_text.model"))
    assert synthetic_data.main(["--output_dir", out, "--count", "0"]) == 2


def test_two_thousand_images_in_under_ten_seconds(tmp_path):
    start = time.perf_counter()
    summary = make_synthetic_dataset(str(tmp_path), 2000, seed=0)
    assert time.perf_counter() - start < 10
    assert summary["train"] == 2000 and summary["test"] == 200
