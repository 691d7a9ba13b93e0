"""Synthetic fine-tuning data that a tiny VisualGLM can actually learn.

Small images of one coloured shape on a plain background, with a fixed Chinese question and a
fixed-template answer, so exact-match accuracy on held-out renders is a meaningful number:

    prompt: "这张图片里有什么？"
    label:  "一个红色的圆形，背景是白色。"

Layout written by `make_synthetic_dataset(directory, count, seed)`:

    directory/images/train_00000.png ...   training renders
    directory/images/test_00000.png ...    held-out renders (their own random stream: new
                                            sizes, positions and colour jitter)
    directory/dataset.json                 training split, upstream's fewshot format
                                            [{"img": "images/train_00000.png", "prompt", "label"}]
    directory/test.json                    held-out split, same format
    directory/style/dataset.json           one training image per (shape, colour) pair (20)
                                            answered in a new style ("图里是红色的圆形哦！"),
                                            for the LoRA demo
    directory/metadata.json                the attributes of every image, the held-out
                                            combinations and the generator settings

Image paths in the json files are relative to the json's own folder. Everything is a pure
function of (count, seed, image_size, test_count, holdout_combinations): the same arguments
write byte-identical files.

`build_synthetic_tokenizer(path)` trains a tiny ice_text-style sentencepiece model on exactly
this text (research.common.testing), so every label encodes without unknown or
byte-fallback pieces. Every content word (shape, colour, background) and every template word
around it is a piece of its own (`TEMPLATE_PIECES`): "一个|红色|的|圆形|，|背景是|白色|。" and
"图里是|红色|的|圆形|哦|！". So the style answer reuses the base model's content tokens at the
same positions, and LoRA only has to learn the words around them. (A tokenizer learned freely
merges "一个红色的" into one piece, "图里是红色的" into another that the base model never saw:
LoRA then has to relearn every colour, and loses the shape on held-out images.)

CLI: python -m research.visualglm.synthetic_data --output_dir DIR --count N --seed S
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np

from research.common import synthetic_shapes as shapes
from research.common.errors import UserInputError
from research.common.testing import (DEFAULT_VOCAB_SIZE, ICE_TEXT_PIECES,
                                     train_sentencepiece_model)

PROMPT = "这张图片里有什么？"
LABEL_TEMPLATE = "一个{colour}的{shape}，背景是{background}。"
STYLE_TEMPLATE = "图里是{colour}的{shape}哦！"
SHAPES = ("圆形", "正方形", "三角形", "菱形")
COLOURS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 80, 220),
           "黄色": (235, 205, 30), "紫色": (150, 60, 190)}
BACKGROUNDS = {"白色": (245, 245, 245), "黑色": (15, 15, 15), "灰色": (128, 128, 128)}
# The shapes as research.common.synthetic_shapes draws them.
SHAPE_KINDS = dict(zip(SHAPES, shapes.SHAPE_KINDS))
COMBINATIONS = tuple(itertools.product(SHAPES, COLOURS, BACKGROUNDS))  # (shape, colour, background)
# Pieces of their own in the tokenizer (see the module docstring).
TEMPLATE_PIECES = (SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS)
                   + ("一个", "的", "背景是", "图里是"))
_SPLIT_STREAMS = {"train": 0, "test": 1, "holdout": 2}
# metadata.json's "format": raised when the files or the tokenizer change, so `make demo`
# writes the set again and retrains (2: a piece per content word, 20 style examples).
FORMAT_VERSION = 2


def label_for(shape, colour, background):
    """The fixed-template answer for one image."""
    return LABEL_TEMPLATE.format(colour=colour, shape=shape, background=background)


def style_label_for(shape, colour):
    """The answer of the "style" set."""
    return STYLE_TEMPLATE.format(colour=colour, shape=shape)


def corpus():
    """Every text the datasets can contain, laid out as the model sees it (prompt, then answer)."""
    lines = []
    for shape, colour, background in COMBINATIONS:
        lines.append(f"<img></img>问：{PROMPT}\n答：{label_for(shape, colour, background)}")
    for shape, colour in itertools.product(SHAPES, COLOURS):
        lines.append(f"<img></img>问：{PROMPT}\n答：{style_label_for(shape, colour)}")
    return lines


def build_synthetic_tokenizer(path, sentences=None):
    """Train a tiny ice_text-style tokenizer on `sentences` (default: `corpus()`) and write it to
    `path`; returns the absolute path. Special ids as research.common.testing lays them out: unk 0,
    pad 3, [MASK] 4, [gMASK] 5, <sop> 8, <eop> 9; then TEMPLATE_PIECES, each always a piece of
    its own; byte fallback keeps any other text encodable."""
    sentences = corpus() if sentences is None else list(sentences)
    return train_sentencepiece_model(
        path, [s.replace("\n", "<n>").replace("\t", "<|tab|>") for s in sentences],
        DEFAULT_VOCAB_SIZE, list(ICE_TEXT_PIECES) + list(TEMPLATE_PIECES), pad_id=3)


# ---- rendering ---------------------------------------------------------------------------------

def render(shape, colour, background, rng, image_size=56):
    """One RGB image of `shape` (SHAPES) in `colour` on `background` (research.common.synthetic_shapes;
    unseen attribute combinations, `holdout_combinations`, test composition)."""
    if shape not in SHAPE_KINDS:
        raise UserInputError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return shapes.render(SHAPE_KINDS[shape], COLOURS[colour], BACKGROUNDS[background], rng, image_size)


def _balanced(combinations, count, rng):
    """`count` combinations, cycling through all of them in a fresh random order per cycle, so
    every combination appears count // len or count // len + 1 times."""
    picked = []
    while len(picked) < count:
        picked.extend(combinations[i] for i in rng.permutation(len(combinations)))
    return picked[:count]


def held_out_combinations(count, seed):
    """`count` (shape, colour, background) triples kept out of training, chosen so that each
    held-out triple's shape, colour and background each still appear in training; at most one
    held-out triple per (shape, colour) pair."""
    if count < 0 or count > len(COMBINATIONS) // 4:
        raise UserInputError(f"holdout_combinations must be between 0 and {len(COMBINATIONS) // 4}, got {count}")
    rng = np.random.default_rng([seed, _SPLIT_STREAMS["holdout"]])
    chosen, pairs = [], set()
    for index in rng.permutation(len(COMBINATIONS)):
        if len(chosen) == count:
            break
        shape, colour, background = COMBINATIONS[index]
        if (shape, colour) not in pairs:
            chosen.append(COMBINATIONS[index])
            pairs.add((shape, colour))
    return sorted(chosen)


def _write_split(directory, split, combinations, count, seed, image_size):
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    rows, attributes = [], []
    for number, (shape, colour, background) in enumerate(_balanced(combinations, count, rng)):
        image, geometry = render(shape, colour, background, rng, image_size)
        name = f"images/{split}_{number:05d}.png"
        image.save(os.path.join(directory, name), format="PNG", optimize=False)
        rows.append({"img": name, "prompt": PROMPT, "label": label_for(shape, colour, background)})
        attributes.append({"img": name, "shape": shape, "colour": colour, "background": background,
                           **geometry})
    return rows, attributes


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(data, stream, ensure_ascii=False, indent=1)
        stream.write("\n")


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def make_synthetic_dataset(directory, count, seed=0, image_size=56, test_count=None,
                           holdout_combinations=0):
    """Write the synthetic dataset (see the module docstring) and return a summary dict with the
    paths written and the split sizes.

    count: training images; test_count: held-out images (default max(count // 10, 1)), rendered
    from their own random stream and cycling through all 60 combinations (so with
    test_count >= 60 every combination, held-out ones included, is in the test split); holdout_combinations: how many (shape, colour, background)
    triples appear only in the test split (0 by default, so the test split measures
    generalisation to new renders; > 0 also measures new combinations of known attributes).
    """
    _check_count("count", count, 1)
    _check_count("seed", seed, 0)
    _check_count("image_size", image_size, 16)
    test_count = max(count // 10, 1) if test_count is None else _check_count("test_count", test_count, 1)
    held_out = held_out_combinations(_check_count("holdout_combinations", holdout_combinations, 0), seed)
    train_combinations = [c for c in COMBINATIONS if c not in held_out]
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    os.makedirs(os.path.join(directory, "style"), exist_ok=True)

    train_rows, train_attributes = _write_split(directory, "train", train_combinations, count, seed, image_size)
    test_rows, test_attributes = _write_split(directory, "test", list(COMBINATIONS), test_count, seed,
                                              image_size)
    # Style set: the first training image of every (shape, colour) pair, so the new style is
    # shown with every content word (20 examples when the training split has every pair).
    style_rows, seen = [], set()
    for row, attribute in zip(train_rows, train_attributes):
        pair = (attribute["shape"], attribute["colour"])
        if pair not in seen:
            seen.add(pair)
            style_rows.append({"img": "../" + row["img"], "prompt": PROMPT,
                               "label": style_label_for(*pair)})

    paths = {"train": os.path.join(directory, "dataset.json"), "test": os.path.join(directory, "test.json"),
             "style": os.path.join(directory, "style", "dataset.json"),
             "metadata": os.path.join(directory, "metadata.json")}
    _write_json(paths["train"], train_rows)
    _write_json(paths["test"], test_rows)
    _write_json(paths["style"], style_rows)
    _write_json(paths["metadata"], {
        "format": FORMAT_VERSION, "seed": seed, "count": count, "test_count": test_count,
        "image_size": image_size,
        "prompt": PROMPT, "label_template": LABEL_TEMPLATE, "style_template": STYLE_TEMPLATE,
        "shapes": list(SHAPES), "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS),
        "held_out_combinations": [list(c) for c in held_out],
        "train": train_attributes, "test": test_attributes})
    return {"directory": os.path.abspath(directory), "paths": paths, "train": len(train_rows),
            "test": len(test_rows), "style": len(style_rows), "held_out_combinations": held_out}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a synthetic coloured-shapes VisualGLM fine-tuning "
                                                 "dataset (fewshot dataset.json format) and its tokenizer.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--count", type=int, default=2000, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=56)
    parser.add_argument("--test_count", type=int, default=None, help="held-out images (default count // 10)")
    parser.add_argument("--holdout_combinations", type=int, default=0,
                        help="attribute combinations shown only in the test split")
    parser.add_argument("--tokenizer", default=None,
                        help="where to write the tokenizer (default OUTPUT_DIR/ice_text.model); 'none' skips it")
    args = parser.parse_args(argv)
    try:
        summary = make_synthetic_dataset(args.output_dir, args.count, args.seed, args.image_size,
                                         args.test_count, args.holdout_combinations)
        tokenizer = args.tokenizer or os.path.join(args.output_dir, "ice_text.model")
        if tokenizer.lower() != "none":
            tokenizer = build_synthetic_tokenizer(tokenizer)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = summary["paths"]
    print(f"wrote {summary['train']} training images -> {paths['train']}")
    print(f"wrote {summary['test']} held-out images -> {paths['test']}")
    print(f"wrote {summary['style']} style examples -> {paths['style']}")
    print(f"attributes -> {paths['metadata']}")
    if summary["held_out_combinations"]:
        print("combinations only in the test split: "
              + ", ".join("/".join(c) for c in summary["held_out_combinations"]))
    if tokenizer.lower() != "none":
        print(f"tokenizer -> {tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
