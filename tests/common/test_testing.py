"""The tiny sentencepiece model builders of research.common.testing."""
import os

import sentencepiece as spm

from research.common import testing
from research.common.testing import ICE_TEXT_PIECES, train_sentencepiece_model, train_tiny_ice_text_model
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer


def test_tiny_model_layout(tiny_ice_text_model):
    sp = spm.SentencePieceProcessor(model_file=tiny_ice_text_model)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [sp.id_to_piece(4 + i) for i in range(len(ICE_TEXT_PIECES))] == list(ICE_TEXT_PIECES)
    assert ICE_TEXT_PIECES[-1] == "<|blank_80|>"


def test_tiny_model_build_is_deterministic_and_atomic(tmp_path, tiny_ice_text_model):
    first = train_tiny_ice_text_model(str(tmp_path / "a" / "one.model"))
    assert testing.main([str(tmp_path / "b" / "two.model")]) == 0
    with open(first, "rb") as f1, open(tmp_path / "b" / "two.model", "rb") as f2, \
            open(tiny_ice_text_model, "rb") as f3:
        assert f1.read() == f2.read() == f3.read()
    assert os.listdir(tmp_path / "a") == ["one.model"]  # no temp files left behind


def test_tiny_model_takes_custom_sentences(tmp_path, tiny_ice_text_model):
    sp = spm.SentencePieceProcessor(model_file=tiny_ice_text_model)
    path = train_tiny_ice_text_model(str(tmp_path / "custom.model"), sentences=["zebra\tzone\nzoo"] * 30,
                                     vocab_size=400)
    custom = spm.SentencePieceProcessor(model_file=path)
    assert sp.piece_to_id("zoo") == 0 and custom.piece_to_id("zoo") > 0  # learnt from these sentences
    assert custom.piece_to_id("\n") == custom.piece_to_id("\t") == 0  # trained on <n> / <|tab|> instead
    tok = ChatGLMTokenizer(path)
    assert tok.decode(tok.encode("zebra\tzone\nzoo")) == "zebra\tzone\nzoo"


def test_other_layouts_llama_and_chatglm2_style(tmp_path):
    """The same builder makes LLaMA's <unk> <s> </s> layout (no pad) or any special pieces."""
    llama = spm.SentencePieceProcessor(model_file=train_sentencepiece_model(
        str(tmp_path / "llama.model"), ["a cat and a dog"] * 20, 300))
    assert [llama.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert llama.pad_id() == -1 and not llama.is_control(3)
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    glm2 = spm.SentencePieceProcessor(model_file=train_sentencepiece_model(
        str(tmp_path / "glm2.model"), ["a cat and a dog"] * 20, 300, specials))
    assert [glm2.id_to_piece(3 + i) for i in range(5)] == specials
    assert {"[gMASK]", "sop"} <= set(glm2.encode("a dog[gMASK]sop", out_type=str))  # never split
