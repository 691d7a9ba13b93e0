"""ChatGLM-6B v1 / VisualGLM tokenizer on the tiny ice_text-style model."""
import io
import os

import numpy as np
import pytest
import sentencepiece as spm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError
from research.visualglm import tiny_tokenizer
from research.visualglm.tiny_tokenizer import USER_DEFINED_PIECES, train_tiny_ice_text_model
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer

ROUND_TRIP_TEXTS = [
    "这张图片的背景是蒙蒙细雨。",
    "There is a red circle in the picture.",
    "问：图片里有什么？\n答：一只猫在公园。 A cat in the park!",
    "line one\nline two\n\n",
    "\nstarts with a newline",
    "col1\tcol2\t\tcol3",
    " leading and trailing spaces ",
    "two  spaces",
    "three   spaces",
    "ten" + " " * 10 + "spaces",
    "eighty" + " " * 80 + "spaces",
    "eighty-one" + " " * 81 + "spaces",
    "def f():\n    return 1\n",
    "emoji 😀, Ω and 龘 go through byte fallback，全角标点！",
]


@pytest.fixture(scope="module")
def sp(tiny_ice_text_model):
    return spm.SentencePieceProcessor(model_file=tiny_ice_text_model)


@pytest.fixture(scope="module")
def tok(tiny_ice_text_model):
    return ChatGLMTokenizer(tiny_ice_text_model)


def _train(path, user_defined, pad_id=3):
    """A minimal ice_text-like model with a chosen set of special pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(["a cat and a dog", "红色的圆形"] * 20), model_writer=model,
        vocab_size=400, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=pad_id, user_defined_symbols=user_defined,
        num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return str(path)


# ---- round trips and whitespace pieces --------------------------------------------------

@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text  # the special tokens are skipped


def test_newline_and_tab_use_their_pieces(tok, sp):
    ids = tok.encode("a\nb\tc", add_special_tokens=False)
    assert sp.piece_to_id("<n>") in ids
    assert sp.piece_to_id("<|tab|>") in ids
    assert "<0x0A>" not in tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("run,pieces", [
    (2, ["<|blank_2|>"]), (3, ["<|blank_3|>"]), (10, ["<|blank_10|>"]), (80, ["<|blank_80|>"]),
    (81, ["<|blank_80|>", "▁"]), (82, ["<|blank_80|>", "<|blank_2|>"]),
])
def test_space_runs_use_blank_pieces_longest_first(tok, run, pieces):
    tokens = tok.tokenize("x" + " " * run + "y")
    assert tokens[-len(pieces) - 1:-1] == pieces


def test_max_blank_length_limits_blank_pieces(tiny_ice_text_model):
    tok = ChatGLMTokenizer(tiny_ice_text_model, max_blank_length=4)
    assert tok.tokenize("x" + " " * 6 + "y")[-3:-1] == ["<|blank_4|>", "<|blank_2|>"]
    assert tok.decode(tok.encode("x" + " " * 9 + "y", add_special_tokens=False)) == "x" + " " * 9 + "y"


def test_tokenize_and_convert_agree_with_encode(tok):
    text = "问：图片里有什么？\nA: a   cat"
    tokens = tok.tokenize(text)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids(tokens) == ids
    assert tok.convert_ids_to_tokens(ids) == tokens
    assert tok.convert_tokens_to_ids("[gMASK]") == tok.gmask_token_id
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == "<sop>"


# ---- special tokens -------------------------------------------------------------------------

def test_special_ids_come_from_the_model_file(tok, sp):
    assert tok.mask_token_id == sp.piece_to_id("[MASK]")
    assert tok.gmask_token_id == sp.piece_to_id("[gMASK]")
    assert tok.smask_token_id == sp.piece_to_id("[sMASK]")
    assert tok.bos_token_id == sp.piece_to_id("<sop>")
    assert tok.eos_token_id == sp.piece_to_id("<eop>")
    assert tok.pad_token_id == sp.piece_to_id("<pad>") == 3
    assert tok.unk_token_id == sp.piece_to_id("<unk>") == 0
    assert tok.vocab_size == sp.get_piece_size()


def test_special_ids_follow_the_file_not_fixed_numbers(tmp_path):
    reordered = ["<eop>", "<sop>", "[gMASK]", "[MASK]"]
    tok = ChatGLMTokenizer(_train(tmp_path / "reordered.model", reordered))
    assert [tok.eos_token_id, tok.bos_token_id, tok.gmask_token_id, tok.mask_token_id] == [4, 5, 6, 7]
    assert tok.smask_token_id is None


def test_pad_falls_back_to_eop_without_pad_piece(tmp_path):
    tok = ChatGLMTokenizer(_train(tmp_path / "nopad.model", ["[MASK]", "[gMASK]", "<sop>", "<eop>"], pad_id=-1))
    assert tok.pad_token_id == tok.eos_token_id
    assert tok(["a", "a cat"], padding=True)["input_ids"][0][0] == tok.eos_token_id


def test_encode_appends_gmask_sop(tok):
    text = "这张图片的背景里有什么内容？"
    ids = tok.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False) + [tok.gmask_token_id, tok.bos_token_id]


def test_build_inputs_with_pair(tok):
    assert tok.build_inputs_with_special_tokens([10, 11]) == [10, 11, tok.gmask_token_id, tok.bos_token_id]
    assert tok.build_inputs_with_special_tokens([10], [20, 21]) == [
        10, tok.gmask_token_id, tok.bos_token_id, 20, 21, tok.eos_token_id]


def test_decode_skips_special_tokens_only_when_asked(tok):
    ids = [tok.pad_token_id] * 2 + tok.encode("a cat")
    assert tok.decode(ids) == "a cat"
    kept = tok.decode(ids, skip_special_tokens=False)
    assert kept.startswith("a cat") and "[gMASK]" in kept and "<sop>" in kept


# ---- image-token offset ----------------------------------------------------------------

def test_image_token_offset_shifts_ids(tiny_ice_text_model, tok):
    shifted = ChatGLMTokenizer(tiny_ice_text_model, num_image_tokens=20000)
    text = ROUND_TRIP_TEXTS[2]
    plain = tok.encode(text)
    ids = shifted.encode(text)
    assert ids == [i + 20000 for i in plain]
    assert shifted.gmask_token_id == tok.gmask_token_id + 20000
    assert shifted.pad_token_id == tok.pad_token_id + 20000
    assert shifted.vocab_size == tok.vocab_size + 20000
    assert shifted.decode(ids) == text
    assert shifted.decode([0, 5, 19999] + ids) == text  # image ids carry no text
    assert shifted.convert_ids_to_tokens([5, ids[0]]) == ["<image_5>", tok.convert_ids_to_tokens(plain[0])]
    assert shifted.convert_tokens_to_ids("<image_5>") == 5


# ---- batching and padding ------------------------------------------------------------------

BATCH = ["a cat", "问：图片里有什么形状？\n答：", "There is a blue triangle in the picture."]


def test_left_padding_of_a_batch(tok):
    out = tok(BATCH, padding=True)
    singles = [tok.encode(t) for t in BATCH]
    width = max(map(len, singles))
    assert len(set(map(len, singles))) == 3
    for row, mask, single in zip(out["input_ids"], out["attention_mask"], singles):
        pad = width - len(single)
        assert len(row) == len(mask) == width
        assert row[:pad] == [tok.pad_token_id] * pad
        assert mask == [0] * pad + [1] * len(single)
        assert row[pad:] == single
    assert tok.batch_encode(BATCH) == out


def test_padding_to_max_length_and_tensors(tok):
    out = tok.batch_encode(BATCH, max_length=64)
    assert all(len(row) == 64 for row in out["input_ids"])
    arrays = tok(BATCH, padding="max_length", max_length=64, return_tensors="np")
    assert arrays["input_ids"].shape == (3, 64) and arrays["input_ids"].dtype == np.int32
    assert arrays["input_ids"].tolist() == out["input_ids"]
    assert arrays["attention_mask"].tolist() == out["attention_mask"]


def test_right_padding_and_single_text(tiny_ice_text_model):
    tok = ChatGLMTokenizer(tiny_ice_text_model, padding_side="right")
    out = tok(BATCH[:2], padding=True)
    short = tok.encode(BATCH[0])
    assert out["input_ids"][0][:len(short)] == short
    assert out["input_ids"][0][len(short):] == [tok.pad_token_id] * (len(out["input_ids"][1]) - len(short))
    single = tok(BATCH[0])
    assert single == {"input_ids": short, "attention_mask": [1] * len(short)}


def test_unpadded_batch_is_ragged(tok):
    out = tok(BATCH)
    assert out["input_ids"] == [tok.encode(t) for t in BATCH]
    with pytest.raises(UserInputError, match="equal lengths"):
        tok(BATCH, return_tensors="np")


# ---- bad input ------------------------------------------------------------------------------

def test_missing_vocab_file(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(UserInputError, match="does not exist") as err:
        ChatGLMTokenizer(path)
    assert path in str(err.value) and "sentencepiece" in str(err.value)


def test_non_sentencepiece_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("this is not a sentencepiece model\n")
    with pytest.raises(UserInputError, match="not a valid sentencepiece model") as err:
        ChatGLMTokenizer(str(path))
    assert str(path) in str(err.value)


def test_model_without_required_pieces(tmp_path):
    path = _train(tmp_path / "plain.model", ["[MASK]", "<eop>"])
    with pytest.raises(UserInputError, match=r"lacks the special pieces \[gMASK\], <sop>") as err:
        ChatGLMTokenizer(path)
    assert path in str(err.value)


def test_too_long_text(tiny_ice_text_model):
    tok = ChatGLMTokenizer(tiny_ice_text_model, max_length=16)
    text = "There is a red circle in the picture. " * 3
    full = tok.encode(text, add_special_tokens=False, max_length=1000)
    n = len(full)
    with pytest.raises(UserInputError, match=rf"{n} tokens plus 2 special tokens, more than max_length 16"):
        tok.encode(text)
    with pytest.raises(UserInputError, match="more than max_length 16"):
        tok([text, "a"], padding=True)
    with pytest.raises(UserInputError, match="more than max_length 40"):
        tok.encode(text, max_length=40)
    cut = tok.encode(text, truncation=True)
    assert len(cut) == 16 and cut[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert cut[:-2] == full[:14]
    assert tok.encode(text, add_special_tokens=False, truncation=True) == full[:16]


def test_bad_ids_and_options(tok, tiny_ice_text_model):
    with pytest.raises(UserInputError, match=r"\[-100\] are outside the vocabulary"):
        tok.decode([5, -100])
    with pytest.raises(UserInputError, match="padding must be"):
        tok("a", padding="left")
    with pytest.raises(UserInputError, match="padding_side"):
        ChatGLMTokenizer(tiny_ice_text_model, padding_side="middle")
    with pytest.raises(UserInputError, match="max_blank_length"):
        ChatGLMTokenizer(tiny_ice_text_model, max_blank_length=1)


# ---- MindFormers integration ----------------------------------------------------------------

def test_registered_and_buildable_from_config(tiny_ice_text_model):
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ChatGLMTokenizer") is ChatGLMTokenizer
    from mindformers.models.build_tokenizer import build_tokenizer
    tok = build_tokenizer({"type": "ChatGLMTokenizer", "vocab_file": tiny_ice_text_model, "max_length": 64})
    assert isinstance(tok, ChatGLMTokenizer) and tok.max_length == 64


# ---- tiny model builder ----------------------------------------------------------------------

def test_tiny_model_layout(sp):
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [sp.id_to_piece(4 + i) for i in range(len(USER_DEFINED_PIECES))] == list(USER_DEFINED_PIECES)
    assert USER_DEFINED_PIECES[-1] == "<|blank_80|>"


def test_tiny_model_build_is_deterministic_and_atomic(tmp_path, tiny_ice_text_model):
    first = train_tiny_ice_text_model(str(tmp_path / "a" / "one.model"))
    assert tiny_tokenizer.main([str(tmp_path / "b" / "two.model")]) == 0
    with open(first, "rb") as f1, open(tmp_path / "b" / "two.model", "rb") as f2, \
            open(tiny_ice_text_model, "rb") as f3:
        assert f1.read() == f2.read() == f3.read()
    assert os.listdir(tmp_path / "a") == ["one.model"]  # no temp files left behind


def test_tiny_model_takes_custom_sentences(tmp_path, sp):
    path = train_tiny_ice_text_model(str(tmp_path / "custom.model"), sentences=["zebra\tzone\nzoo"] * 30,
                                     vocab_size=400)
    custom = spm.SentencePieceProcessor(model_file=path)
    assert sp.piece_to_id("zoo") == 0 and custom.piece_to_id("zoo") > 0  # learnt from these sentences
    assert custom.piece_to_id("\n") == custom.piece_to_id("\t") == 0  # trained on <n> / <|tab|> instead
    tok = ChatGLMTokenizer(path)
    assert tok.decode(tok.encode("zebra\tzone\nzoo")) == "zebra\tzone\nzoo"
