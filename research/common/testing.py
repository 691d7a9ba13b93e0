"""Tiny sentencepiece models for tests, smoke runs and the demo.

The real tokenizer files (ChatGLM-6B's ice_text.model, ChatGLM2's and LLaMA's tokenizer.model)
cannot be downloaded here, and tests need tokenizers that behave the same way: the same
control and user-defined pieces, the same whitespace conventions, and byte fallback so any
text round-trips. `train_sentencepiece_model` builds any such layout; training is in-process,
single-threaded and unshuffled, so the same inputs give byte-identical files.
`train_tiny_ice_text_model` is the ice_text-style one (examples/tiny/ice_text.model),
`train_tiny_chatglm2_model` ChatGLM2's tokenizer.model-style one (examples/tiny/chatglm2_tokenizer.model),
`train_tiny_llama_model` LLaMA's (examples/tiny/llama_tokenizer.model, for MiniGPT-4).

Usage: python -m research.common.testing [--chatglm2 | --llama] OUT.model
"""
import io
import itertools
import os
import sys
import tempfile

import sentencepiece as spm

MAX_BLANK_LENGTH = 80
# ice_text.model's user-defined pieces. Order matters: it fixes the ids after the four control
# pieces (<unk> <s> </s> <pad>).
ICE_TEXT_PIECES = (
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


# (first word list, second word list, Chinese template, English template) of default_sentences().
_TEMPLATES = (
    (_COLOURS, _SHAPES, "问：图片里有什么形状？\n答：图片里有一个{0}的{1}。",
     "Q: What shape is in the picture?\nA: There is a {0} {1} in the picture."),
    (_OBJECTS, _PLACES, "问：这张图片的背景里有什么内容？\n答：一只{0}在{1}。", "Q: Describe this image.\nA: A {0} in the {1}."),
    (_WEATHER, _PLACES, "{1}今天是{0}，天气看起来很不错。", "The weather at the {1} is {0} today."),
    (_COLOURS, _OBJECTS, "这是一张照片，照片中间有{0}的{1}。", "This photo shows a {0} {1} in the middle."),
)


def default_sentences():
    """A small bilingual image-chat corpus generated from word lists (deterministic order)."""
    lines = list(_COVERAGE_LINES)
    for first, second, chinese, english in _TEMPLATES:
        for (a_zh, a_en), (b_zh, b_en) in itertools.product(first, second):
            lines.append(chinese.format(a_zh, b_zh))
            lines.append(english.format(a_en, b_en))
    return lines


def train_sentencepiece_model(output_path, sentences, vocab_size, user_defined_pieces=(),
                              unk_id=0, bos_id=1, eos_id=2, pad_id=-1, model_type="unigram"):
    """Train a `model_type` (unigram, or bpe as LLaMA's) model on `sentences` and write it
    atomically to `output_path`.

    The control pieces <unk> <s> </s> <pad> take the given ids (-1: absent), then come
    `user_defined_pieces` in order (ice_text's [gMASK] <sop> ..., or none for a LLaMA-style
    <unk> <s> </s> model). `vocab_size` is an upper bound: a small corpus yields fewer pieces
    (hard_vocab_limit off). Returns the absolute path of the written model.
    """
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # unigram barely samples, but pin it anyway
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,  # keeps temp paths out of the serialized trainer spec
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        # identity + kept whitespace: NFKC would fold full-width punctuation and
        # whitespace collapsing would eat leading/trailing spaces, breaking round trips.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=unk_id, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
        user_defined_symbols=list(user_defined_pieces),
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


def train_tiny_ice_text_model(output_path, sentences=None, vocab_size=DEFAULT_VOCAB_SIZE):
    """A tiny ice_text-style model (<unk> <s> </s> <pad>, then ICE_TEXT_PIECES) trained on
    `sentences` (default: default_sentences()) with newlines and tabs as the tokenizer feeds
    them (<n>, <|tab|>). Returns the absolute path of the written model."""
    sentences = default_sentences() if sentences is None else sentences
    return train_sentencepiece_model(
        output_path, [s.replace("\n", "<n>").replace("\t", "<|tab|>") for s in sentences],
        vocab_size, ICE_TEXT_PIECES, pad_id=3)


def train_tiny_chatglm2_model(output_path, sentences=None, vocab_size=DEFAULT_VOCAB_SIZE):
    """A tiny ChatGLM2 tokenizer.model-style model: <unk> <s> </s> and text pieces only (the
    tokenizer appends its special ids), raw newlines (byte pieces), trained on `sentences`
    (default: default_sentences() in ChatGLM2's "[Round 1]" layout). Returns the absolute path."""
    if sentences is None:
        sentences = [f"[Round 1]\n\n{line.replace(chr(10), chr(10) * 2)}" for line in default_sentences()]
    return train_sentencepiece_model(output_path, sentences, vocab_size)


# MiniGPT-4's chat layouts (upstream conversation.py): Vicuna v0 "###" turns and Llama-2 [INST] turns.
MINIGPT4_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
                   "once I provide it to you. Please answer my questions.")


def train_tiny_llama_model(output_path, sentences=None, vocab_size=1000):
    """A tiny LLaMA tokenizer.model-style model (BPE): <unk> 0, <s> 1, </s> 2, byte fallback, trained on
    `sentences` (default: default_sentences()' English lines in MiniGPT-4's chat layouts), at most
    `vocab_size` pieces (the tiny MiniGPT-4 has 1024 rows). "###" is a piece of its own (LLaMA
    spells it "▁###" or "##" "#"), so a tiny model cannot glue it to other text and miss its stop.
    Returns the absolute path."""
    if sentences is None:
        english = [line for line in default_sentences() if line.isascii()]
        sentences = list(_COVERAGE_LINES)
        for line in english:
            question, _, answer = line.partition("\nA: ")
            question = question.removeprefix("Q: ") if answer else "Describe this image in detail."
            answer = answer or line
            sentences.append(f"{MINIGPT4_SYSTEM}###Human: <Img><ImageHere></Img> {question}###Assistant: {answer}###")
            sentences.append(f"<s>[INST] <Img><ImageHere></Img> {question} [/INST] {answer}</s>")
    return train_sentencepiece_model(output_path, sentences, vocab_size, user_defined_pieces=["###"],
                                     model_type="bpe")


EXAMPLE_IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "examples", "visualglm", "shapes.png")


def images_in_every_mode(directory):
    """Grayscale, RGBA, CMYK and 16-bit files of examples/visualglm/shapes.png (the image modes
    a user's files come in); returns their paths."""
    import numpy as np
    from PIL import Image

    base = Image.open(EXAMPLE_IMAGE).convert("RGB").resize((80, 60))
    paths = []
    for name, image in (("gray.png", base.convert("L")), ("rgba.png", base.convert("RGBA")),
                        ("cmyk.jpg", base.convert("CMYK"))):
        paths.append(os.path.join(directory, name))
        image.save(paths[-1])
    sixteen = np.asarray(base.convert("L"), np.uint16) * 257
    paths.append(os.path.join(directory, "gray16.png"))
    Image.fromarray(sixteen).save(paths[-1])
    return paths


def main(argv=None):
    """Command line entry: build a tiny model at the given path (ice_text-style by default)."""
    argv = sys.argv[1:] if argv is None else argv
    build = train_tiny_ice_text_model
    builders = {"--chatglm2": train_tiny_chatglm2_model, "--llama": train_tiny_llama_model}
    if argv[:1] and argv[0] in builders:
        build, argv = builders[argv[0]], argv[1:]
    if len(argv) != 1:
        print("usage: python -m research.common.testing [--chatglm2 | --llama] OUT.model", file=sys.stderr)
        return 2
    print(build(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
