"""ChatGLM-6B v1 / VisualGLM tokenizer on the tiny ice_text-style model."""
import pytest
import sentencepiece as spm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError
from research.common.testing import train_sentencepiece_model
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
    return train_sentencepiece_model(str(path), ["a cat and a dog", "红色的圆形"] * 20, 400, user_defined,
                                     pad_id=pad_id)


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
    assert tok.piece_id("[sMASK]") == sp.piece_to_id("[sMASK]")
    assert tok.bos_token_id == sp.piece_to_id("<sop>")
    assert tok.eos_token_id == sp.piece_to_id("<eop>")
    assert tok.pad_token_id == sp.piece_to_id("<pad>") == 3
    assert tok.unk_token_id == sp.piece_to_id("<unk>") == 0
    assert tok.vocab_size == sp.get_piece_size()


def test_special_ids_follow_the_file_not_fixed_numbers(tmp_path):
    reordered = ["<eop>", "<sop>", "[gMASK]", "[MASK]"]
    tok = ChatGLMTokenizer(_train(tmp_path / "reordered.model", reordered))
    assert [tok.eos_token_id, tok.bos_token_id, tok.gmask_token_id, tok.mask_token_id] == [4, 5, 6, 7]
    assert tok.piece_id("[sMASK]") is None


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


# ---- bad input ------------------------------------------------------------------------------

def test_model_without_required_pieces(tmp_path):
    path = _train(tmp_path / "plain.model", ["[MASK]", "<eop>"])
    with pytest.raises(UserInputError, match=r"lacks the special pieces \[gMASK\], <sop>") as err:
        ChatGLMTokenizer(path)
    assert path in str(err.value)


def test_unknown_fields_are_refused(tiny_ice_text_model):
    with pytest.raises(UserInputError, match=r"unknown fields \['bos_token'\]"):
        ChatGLMTokenizer(tiny_ice_text_model, bos_token="<sop>")
    assert ChatGLMTokenizer(tiny_ice_text_model, type="ChatGLMTokenizer").max_length == 2048


# ---- MindFormers integration ----------------------------------------------------------------

def test_registered_and_buildable_from_config(tiny_ice_text_model):
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ChatGLMTokenizer") is ChatGLMTokenizer
    from mindformers.models.build_tokenizer import build_tokenizer
    tok = build_tokenizer({"type": "ChatGLMTokenizer", "vocab_file": tiny_ice_text_model, "max_length": 64})
    assert isinstance(tok, ChatGLMTokenizer) and tok.max_length == 64
