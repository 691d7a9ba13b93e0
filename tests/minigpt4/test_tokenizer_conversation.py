"""MiniGPT-4's LLaMA tokenizer and chat format on a tiny LLaMA-style sentencepiece model built at
test time (<unk> 0, <s> 1, </s> 2, byte fallback). Expected prompt strings are written out from
notes/minigpt4.md §2.7 (upstream conversation.py at the seed commit and later), not from the code."""
import pytest
import sentencepiece as spm

from research.common.errors import UserInputError
from research.common.generation import ends_with_any
from research.common.testing import default_sentences, train_sentencepiece_model
from research.minigpt4 import conversation_minigpt4 as conv
from research.minigpt4.tokenization_minigpt4 import LlamaTokenizer

SYSTEM_TEXT = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
               "once I provide it to you. Please answer my questions.")
CHAT_LINES = [
    SYSTEM_TEXT + "###Human: <Img><ImageHere></Img> What is this?###Assistant: A red circle.###",
    "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: A cat in the park.###",
    "<s>[INST] <Img><ImageHere></Img> What colour is it? [/INST] It is blue.</s>",
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llamatok") / "tokenizer.model"
    return train_sentencepiece_model(str(path), default_sentences() + CHAT_LINES * 4, 1200)


@pytest.fixture(scope="module")
def tok(model_file):
    return LlamaTokenizer(model_file)


@pytest.fixture(scope="module")
def sp(model_file):
    return spm.SentencePieceProcessor(model_file=model_file)


# ---- tokenizer -------------------------------------------------------------------------------


def test_special_ids_come_from_the_file_as_llamas(tok, sp):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert tok.pad_token_id == tok.eos_token_id  # upstream v1: pad_token = eos_token
    assert tok.vocab_size == sp.get_piece_size()


def test_round_trips(tok):
    for text in ["A red circle in the park.", "###Human: <Img>x</Img> q###Assistant: a###",
                 "图片里有一个红色的圆形。", "emoji 🙂 and tab\tand\nnewline", "  two leading spaces"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_bos_only_with_special_tokens(tok, sp):
    text = "What is this?"
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.encode("") == [1]
    assert tok.build_inputs_with_special_tokens([7], [8]) == [1, 7, 1, 8]  # HF LlamaTokenizer pairs


def test_literal_bos_eos_text_becomes_their_ids(tok, sp):
    ids = tok.encode("sys<s>[INST] hi [/INST] ok</s>", add_special_tokens=False)
    assert ids == sp.encode("sys") + [1] + sp.encode("[INST] hi [/INST] ok") + [2]


def test_segments_first_with_bos_rest_without(tok, sp):
    segments = ["Give the following image###Human: <Img>", "</Img> What is this?###Assistant:", "tail"]
    ids = tok.encode_segments(segments)
    assert ids[0] == [1] + sp.encode(segments[0])
    assert ids[1] == sp.encode(segments[1])
    assert ids[2] == sp.encode(segments[2])
    with pytest.raises(UserInputError):
        tok.encode_segments("not a list")


def test_decode_drops_special_ids(tok):
    ids = [1] + tok.encode("A cat.", add_special_tokens=False) + [2, 0]
    assert tok.decode(ids) == "A cat."
    with pytest.raises(UserInputError):
        tok.decode([tok.vocab_size])


def test_left_padding_uses_eos(tok):
    batch = tok(["hi", "What is this?"], padding=True, return_tensors="np")
    short, long = len(tok.encode("hi")), len(tok.encode("What is this?"))
    assert batch["input_ids"].shape == (2, long)
    assert batch["input_ids"][0, :long - short].tolist() == [2] * (long - short)
    assert batch["attention_mask"][0].tolist() == [0] * (long - short) + [1] * short


def test_bad_files_and_fields(tmp_path, model_file):
    with pytest.raises(UserInputError, match="does not exist"):
        LlamaTokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="not a valid sentencepiece"):
        LlamaTokenizer(str(bad))
    with pytest.raises(UserInputError, match="unknown fields"):
        LlamaTokenizer(model_file, legacy=False)


# ---- templates -------------------------------------------------------------------------------


def test_vicuna_v0_seed_commit_prompt():
    style = conv.VicunaV0Prompt()
    assert conv.SYSTEM == SYSTEM_TEXT
    assert style.build_prompt("What is this?") == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
        "it to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is this?###Assistant:")
    assert style.build_prompt("What colour?", [("What is this?", " A cat. ")]) == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
        "it to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is this?###Assistant: "
        "A cat.###Human: What colour?###Assistant:")
    assert style.build_prompt("hi", image=False) == SYSTEM_TEXT + "###Human: hi###Assistant:"


def test_vicuna_v0_later_trailing_space_prompt():
    style = conv.get_template("vicuna_v0_space")
    assert style.build_prompt("What is this?") == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
        "it to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is this?###Assistant: ")
    assert style.build_prompt("What colour?", [("What is this?", "A cat.")]) == (
        SYSTEM_TEXT + "###Human: <Img><ImageHere></Img> What is this?###Assistant: A cat.###Human: "
        "What colour?###Assistant: ")
    assert conv.get_template("vicuna_v0").build_prompt("q").endswith("###Assistant:")
    with pytest.raises(UserInputError, match="unknown MiniGPT-4 template"):
        conv.get_template("vicuna_v1")
    with pytest.raises(UserInputError):
        conv.VicunaV0Prompt(trailing_space="yes")


def test_llama2_prompt():
    style = conv.get_template("llama2")
    assert style.build_prompt("What is this?") == (
        SYSTEM_TEXT + "<s>[INST] <Img><ImageHere></Img> What is this? [/INST] ")
    assert style.build_prompt("What colour?", [("What is this?", "A cat.")]) == (
        SYSTEM_TEXT + "<s>[INST] <Img><ImageHere></Img> What is this? [/INST] A cat.<s>[INST] What colour? [/INST] ")
    assert style.image_tokens == 64


def test_split_segments_at_image_here(tok):
    prompt = conv.VicunaV0Prompt().build_prompt("What is this?")
    before, after = conv.split_segments(prompt)
    assert before == SYSTEM_TEXT + "###Human: <Img>"
    assert after == "</Img> What is this?###Assistant:"
    assert conv.split_segments("no image here", num_images=0) == ["no image here"]
    length = conv.prompt_length(tok, prompt)
    assert length == 1 + len(tok.encode(before, add_special_tokens=False)) + 32 + len(
        tok.encode(after, add_special_tokens=False))


def test_image_without_placeholder_is_a_user_error():
    with pytest.raises(UserInputError, match="no <ImageHere> placeholder"):
        conv.split_segments("###Human: What is this?###Assistant:", num_images=1)
    with pytest.raises(UserInputError, match="placeholders for 1 images"):
        conv.split_segments("<ImageHere> and <ImageHere>", num_images=1)


# ---- stopping ---------------------------------------------------------------------------------


def test_per_row_stop_on_both_spellings():
    """Both spellings of "###" end a row at their first occurrence; "##" and "#" apart do not."""
    rows = [[10, 835, 5, 6], [11, 2277, 6, 29937, 8, 2277, 29937, 1], [12, 2277, 7, 29937, 835]]
    ends = [next((end for end in range(1, len(row) + 1) if ends_with_any(row[:end], conv.STOP_SEQUENCES)), None)
            for row in rows]
    assert ends == [2, 7, 5]
    assert [conv.cut_at_stop(row) for row in rows] == [[10], [11, 2277, 6, 29937, 8], [12, 2277, 7, 29937]]
    assert conv.cut_at_stop([9, 2, 835], eos_token_id=2) == [9]
    assert conv.cut_at_stop([9, 8]) == [9, 8]


def test_stop_ids_upstream_and_tiny(tok):
    style = conv.VicunaV0Prompt()
    assert style.stop_ids() == ((835,), (2277, 29937))
    spellings = style.stop_ids(tok)
    assert spellings and all(tok.decode(list(s)).strip() == "###" for s in spellings)
    generated = tok.encode(" A red circle###Human: next", add_special_tokens=False)
    answer_ids = conv.cut_at_stop(generated, spellings)
    assert tok.decode(answer_ids) == " A red circle"
    # a piece that merges "###" with text before it (this tiny model has ".###") is no stop
    # sequence; the text cleanup still cuts the answer there
    merged = tok.encode(" A red circle.###Human: next", add_special_tokens=False)
    assert conv.decode_answer(tok, merged, stop_sequences=spellings) == "A red circle."


# ---- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("generated, answer", [
    (" A red circle.###Human: what", "A red circle."),
    ("Assistant: A cat.###", "A cat."),
    ("  It is blue.  ", "It is blue."),
    ("###Human: nothing", ""),
    ("A: x Assistant: y###z", "y"),
])
def test_answer_extraction_as_upstream(generated, answer):
    assert conv.VicunaV0Prompt().extract_answer(generated) == answer


def test_decode_answer_cuts_at_stop_and_drops_specials(tok):
    ids = [0] + tok.encode(" A cat in the park.", add_special_tokens=False) + [835, 9, 9]
    assert conv.decode_answer(tok, ids) == "A cat in the park."
    ids = tok.encode("It is blue.", add_special_tokens=False) + [2, 5]
    assert conv.decode_answer(tok, ids, conv.Llama2Prompt()) == "It is blue."


def test_defaults_are_upstreams():
    assert (conv.MAX_NEW_TOKENS, conv.TOP_P, conv.TEMPERATURE, conv.REPETITION_PENALTY, conv.NUM_BEAMS) == (
        300, 0.9, 1.0, 1.0, 1)
    assert conv.GENERATION_DEFAULTS["max_length"] == 2000 and conv.GENERATION_DEFAULTS["do_sample"]


# ---- context budget ---------------------------------------------------------------------------------


def test_budget_drops_old_turns_but_keeps_system_and_image(tok):
    style = conv.VicunaV0Prompt()
    history = [(f"Question number {i} about the cat in the park?", f"Answer number {i}: a red circle.")
               for i in range(12)]
    full = conv.prompt_length(tok, style.build_prompt("Last question?", history))
    budget = full - 1  # one position short: something must go
    kept, dropped = conv.fit_history(style, tok, "Last question?", history, max_length=budget + 10,
                                     max_new_tokens=10)
    assert dropped >= 1 and kept == [history[0]] + history[1 + dropped:]
    prompt = style.build_prompt("Last question?", kept)
    assert prompt.startswith(SYSTEM_TEXT + "###Human: <Img><ImageHere></Img> Question number 0 ")
    assert prompt.endswith("###Human: Last question?###Assistant:")
    assert conv.prompt_length(tok, prompt) + 10 <= budget + 10
    # a tight budget keeps only the image turn; fits as is -> nothing dropped
    pinned = conv.prompt_length(tok, style.build_prompt("Last question?", history[:1]))
    assert conv.fit_history(style, tok, "Last question?", history, max_length=pinned, max_new_tokens=0) == (
        history[:1], 11)
    assert conv.fit_history(style, tok, "Last question?", history, max_length=full, max_new_tokens=0) == (
        history, 0)
    with pytest.raises(UserInputError, match="more than max_length"):
        conv.fit_history(style, tok, "Last question?", history, max_length=pinned - 1, max_new_tokens=0)
