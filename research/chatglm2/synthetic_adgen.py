"""Synthetic ADGEN-like data that a tiny ChatGLM2 can learn: attribute strings in ADGEN's
`key#value*key#value` form and a description that is a fixed function of them.

    content: "类型#上衣*颜色#红色*风格#休闲"
    summary: "这款上衣，红色的配色，休闲风格，日常穿着很舒适。"

Every row has a 类型 (garment) and one to three other attributes, always in ATTRIBUTES' order;
the summary is "这款{类型}，" + one phrase per other attribute + the garment's closing phrase.
Which attributes a row has is drawn from `random.Random(seed)`, so the same (count, seed)
writes byte-identical files.

CLI: python -m research.chatglm2.synthetic_adgen --output_dir DIR [--train N] [--dev N] [--seed S]
writes DIR/train.json and DIR/dev.json (one JSON object a line, as AdvertiseGen).
"""
import argparse
import json
import os
import random
import sys

from research.common.atomic import atomic_write
from research.common.errors import UserInputError

GARMENTS = {"上衣": "日常穿着很舒适", "裙": "走路时很有灵动感", "裤": "修饰腿型很显高", "外套": "秋冬保暖又有型"}
# Attribute -> (values, phrase template), in the order they appear in content and summary.
ATTRIBUTES = {
    "材质": (("棉", "牛仔布", "丝绸", "针织"), "采用{}面料"),
    "颜色": (("红色", "白色", "黑色", "蓝色"), "{}的配色"),
    "图案": (("条纹", "格子", "碎花", "纯色"), "{}图案"),
    "风格": (("休闲", "简约", "复古", "甜美"), "{}风格"),
}


def describe(attributes):
    """The summary of {key: value} attributes (with 类型)."""
    parts = [f"这款{attributes['类型']}"]
    parts += [ATTRIBUTES[key][1].format(attributes[key]) for key in ATTRIBUTES if key in attributes]
    return "，".join(parts + [GARMENTS[attributes["类型"]]]) + "。"


def list_values(attributes):
    """The demo's base task: the attribute values listed, garment first ("上衣：红色、休闲。")."""
    values = [attributes[key] for key in ATTRIBUTES if key in attributes]
    return f"{attributes['类型']}：{'、'.join(values)}。"


def make_example(rng, answer=describe):
    """One {"content", "summary"} row drawn from `rng` (a random.Random); `answer` writes the
    summary from the attributes."""
    keys = set(rng.sample(sorted(ATTRIBUTES), rng.randint(1, 3)))
    attributes = {"类型": rng.choice(sorted(GARMENTS))}
    attributes.update({key: rng.choice(ATTRIBUTES[key][0]) for key in ATTRIBUTES if key in keys})
    content = "*".join(f"{key}#{value}" for key, value in attributes.items())
    return {"content": content, "summary": answer(attributes)}


def generate_adgen(count, seed=0, answer=describe):
    """`count` rows, a pure function of (count, seed, answer)."""
    rng = random.Random(seed)
    return [make_example(rng, answer) for _ in range(count)]


def write_rows(path, rows):
    """One JSON object a line, as AdvertiseGen, written atomically."""
    with atomic_write(path, "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_adgen(directory, train=1000, dev=100, seed=0):
    """DIR/train.json and DIR/dev.json (dev from its own stream, seed + 1); returns their paths."""
    for name, value in (("train", train), ("dev", dev)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"the {name} row count must be a positive integer, got {value!r}")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, count, split_seed in (("train", train, seed), ("dev", dev, seed + 1)):
        paths.append(write_rows(os.path.join(directory, f"{name}.json"), generate_adgen(count, split_seed)))
    return tuple(paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        for path in write_adgen(args.output_dir, args.train, args.dev, args.seed):
            print(path)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
