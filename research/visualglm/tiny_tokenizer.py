"""Build a tiny sentencepiece model laid out like ChatGLM-6B's ice_text.model.

The real ice_text.model cannot be downloaded here, and tests and smoke runs need a
tokenizer that behaves the same way: the same control and user-defined pieces, the same
newline/tab/blank conventions, and byte fallback so any text round-trips. Training is
in-process, single-threaded and unshuffled, so the same inputs give byte-identical files.

Usage: python -m research.visualglm.tiny_tokenizer OUT.model
"""
import io
import itertools
import os
import sys
import tempfile

import sentencepiece as spm

MAX_BLANK_LENGTH = 80
# Order matters: it fixes the ids after the four control pieces (<unk> <s> </s> <pad>).
USER_DEFINED_PIECES = (
    ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>",
     "<n>", "<|tab|>"]
    + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK_LENGTH + 1)]
)
DEFAULT_VOCAB_SIZE = 1200

_COLOURS = [("红色", "red"), ("蓝色", "blue"), ("绿色", "green"), ("黄色", "yellow"),
            ("白色", "white"), ("黑色", "black"), ("紫色", "purple"), ("橙色", "orange")]
_SHAPES = [("圆形", "circle"), ("方形", "square"), ("三角形", "triangle"), ("星形", "star"),
           ("心形", "heart"), ("椭圆", "oval")]
_OBJECTS = [("猫", "cat"), ("狗", "dog"), ("汽车", "car"), ("房子", "house"), ("树", "tree"),
            ("花", "flower"), ("鸟", "bird"), ("船", "boat"), ("桌子", "table"), ("杯子", "cup")]
_WEATHER = [("晴天", "sunny"), ("下雨", "rainy"), ("下雪", "snowy"), ("多云", "cloudy"),
            ("有雾", "foggy"), ("刮风", "windy")]
_PLACES = [("公园", "park"), ("海边", "beach"), ("山上", "mountain"), ("街道", "street"),
           ("厨房", "kitchen"), ("草地", "meadow")]
# Guarantees every ASCII letter, digit and common punctuation mark is a piece of its own.
_COVERAGE_LINES = [
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "，。！？；：、“”‘’（）《》【】…—·",
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。",
]


def default_sentences():
    """A small bilingual image-chat corpus generated from word lists (deterministic order)."""
    lines = list(_COVERAGE_LINES)
    for (c_zh, c_en), (s_zh, s_en) in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"问：图片里有什么形状？\n答：图片里有一个{c_zh}的{s_zh}。")
        lines.append(f"Q: What shape is in the picture?\nA: There is a {c_en} {s_en} in the picture.")
    for (o_zh, o_en), (p_zh, p_en) in itertools.product(_OBJECTS, _PLACES):
        lines.append(f"问：这张图片的背景里有什么内容？\n答：一只{o_zh}在{p_zh}。")
        lines.append(f"Q: Describe this image.\nA: A {o_en} in the {p_en}.")
    for (w_zh, w_en), (p_zh, p_en) in itertools.product(_WEATHER, _PLACES):
        lines.append(f"{p_zh}今天是{w_zh}，天气看起来很不错。")
        lines.append(f"The weather at the {p_en} is {w_en} today.")
    for (c_zh, c_en), (o_zh, o_en) in itertools.product(_COLOURS, _OBJECTS):
        lines.append(f"这是一张照片，照片中间有{c_zh}的{o_zh}。")
        lines.append(f"This photo shows a {c_en} {o_en} in the middle.")
    return lines


def _as_model_text(sentence):
    """Map newlines and tabs to their pieces, as the tokenizer does before encoding."""
    return sentence.replace("\n", "<n>").replace("\t", "<|tab|>")


def train_tiny_ice_text_model(output_path, sentences=None, vocab_size=DEFAULT_VOCAB_SIZE):
    """Train a tiny ice_text-style unigram model and write it atomically to `output_path`.

    `vocab_size` is an upper bound: a small corpus yields fewer pieces (hard_vocab_limit off).
    Returns the absolute path of the written model.
    """
    sentences = default_sentences() if sentences is None else list(sentences)
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # unigram barely samples, but pin it anyway
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter([_as_model_text(s) for s in sentences]),
        model_writer=model,  # keeps temp paths out of the serialized trainer spec
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        # identity + kept whitespace: NFKC would fold full-width punctuation and
        # whitespace collapsing would eat leading/trailing spaces, breaking round trips.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=USER_DEFINED_PIECES,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    output_path = os.path.abspath(output_path)
    out_dir = os.path.dirname(output_path)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp_dir:
        tmp_path = os.path.join(tmp_dir, "tiny.model")
        with open(tmp_path, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp_path, output_path)
    return output_path


def main(argv=None):
    """Command line entry: build one model at the given path."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m research.visualglm.tiny_tokenizer OUT.model", file=sys.stderr)
        return 2
    print(train_tiny_ice_text_model(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
