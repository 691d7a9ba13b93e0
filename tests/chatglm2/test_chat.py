"""Chat as upstream users know it, and what upstream lacks, on a tiny random ChatGLM2:
batch chat equals one by one, a conversation continued on the KV cache gives the tokens of
re-encoding it, the history budget drops whole old rounds, streaming, the loop and NaN guards."""
import warnings

import numpy as np
import pytest
import mindspore as ms

from research.chatglm2.inference import HistoryTruncatedWarning, load_chatglm2
from research.common.errors import UserInputError
from research.common.generation import Conversation, GenerationConfig, generate
from tests.chatglm2.chatglm2_fixtures import tiny_yaml_with_weights

GREEDY = dict(do_sample=False, max_new_tokens=6)
HISTORY = [("图片里有什么", "一个红色的圆形"), ("Describe this image.", "A cat in the park.")]


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return load_chatglm2(tiny_yaml_with_weights(str(tmp_path_factory.mktemp("glm2chat"))), seq_length=128)


def test_batch_chat_equals_one_by_one(glm):
    queries = ["你好", "图片里有什么形状？", "hi"]
    histories = [[], HISTORY, HISTORY[:1]]
    batched = glm.batch_chat(queries, histories, **GREEDY)
    alone = [glm.batch_chat([q], [h], **GREEDY)[0] for q, h in zip(queries, histories)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in batched}) == 3  # the rows really differ
    assert [r.history for r in batched] == [h + [(q, r.response)] for q, h, r in zip(queries, histories, batched)]


def test_chat_returns_upstreams_pair(glm):
    response, history = glm.chat("你好", HISTORY[:1], **GREEDY)
    reply = glm.batch_chat(["你好"], [HISTORY[:1]], **GREEDY)[0]
    assert response == reply.response == glm.tokenizer.prompt_style.postprocess(glm.tokenizer.decode(reply.token_ids))
    assert history == HISTORY[:1] + [("你好", response)]


def test_conversation_on_the_cache_equals_re_encoding(glm, monkeypatch):
    """Each turn prefills only its own round (cache_index > 0), and its tokens equal generating on
    the whole conversation from scratch."""
    prefills = []
    original = type(glm.model).prefill

    def spy(model, **inputs):
        prefills.append((inputs["input_ids"].shape[1], inputs.get("cache_index", 0)))
        return original(model, **inputs)

    monkeypatch.setattr(type(glm.model), "prefill", spy)
    conversation = Conversation(glm.model, glm.tokenizer.pad_token_id)
    settings = glm.chat_config(do_sample=False, max_new_tokens=5)
    style, tok = glm.tokenizer.prompt_style, glm.tokenizer
    turns = [tok.encode_chat("你好"), tok.encode_continuation(style.next_round("图片里有什么", 2)),
             tok.encode_continuation(style.next_round("hi", 3))]
    turns_seen = []
    for new_ids in turns:
        before = conversation.tokens
        answer = list(conversation.reply_steps(new_ids, settings))
        assert conversation.tokens == before + new_ids + answer
        turns_seen.append((before + new_ids, answer))
    # the first turn encodes its prompt from slot 0; later ones only the previous answer's last
    # token (generated, never fed) and their round
    assert [start for _, start in prefills] == [0] + [len(seen) - len(new) - 1 for (seen, _), new in zip(turns_seen[1:], turns[1:])]
    assert all(width < len(seen) for (width, _), (seen, _) in zip(prefills[1:], turns_seen[1:]))
    for prompt, answer in turns_seen:  # a fresh cache each (the conversation's is replaced)
        assert generate(glm.model, [prompt], settings)[0] == answer


def test_stream_chat_continues_on_its_past(glm):
    history, past = [], None
    for query in ("你好", "图片里有什么"):
        pieces = list(glm.stream_chat(query, history, past=past, return_past=True, **GREEDY))
        assert all(later[0].startswith(earlier[0][:-1]) for earlier, later in zip(pieces, pieces[1:]))
        response, history, past = pieces[-1]
        assert history[-1] == (query, response)
    assert past.tokens[:len(glm.tokenizer.encode_chat("你好"))] == glm.tokenizer.encode_chat("你好")
    assert glm.tokenizer.decode(past.tokens).count("[Round") == 2


def test_history_budget_drops_whole_old_rounds(glm):
    history = [(f"第{i}个问题是什么", f"答案{i}") for i in range(12)]
    settings = glm.chat_config(do_sample=False, max_new_tokens=8)
    ids, kept, dropped = glm.fit_prompt("你好", history, settings)
    assert dropped > 0 and kept == history[dropped:]
    assert ids == glm.tokenizer.encode_chat("你好", kept)
    assert len(ids) + 8 <= glm.config.seq_length < len(glm.tokenizer.encode_chat("你好", history[dropped - 1:])) + 8
    with pytest.warns(HistoryTruncatedWarning, match=f"dropped the {dropped} oldest"):
        _, new_history = glm.chat("你好", history, do_sample=False, max_new_tokens=8)
    assert new_history[:-1] == kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoryTruncatedWarning)
        glm.chat("你好", history[-1:], **GREEDY)  # fits: nothing dropped, no warning


def test_a_query_longer_than_the_model_is_refused_not_cut(glm):
    with pytest.raises(UserInputError, match="the query alone encodes to"):
        glm.chat("图片里有一个红色的圆形。" * 60, **GREEDY)


def test_repetition_stop_ends_a_loop(glm):
    """Zero weights make the model repeat one token: the guard stops after three."""
    settings = glm.chat_config(do_sample=False, max_new_tokens=10)
    ids = glm.tokenizer.encode_chat("你好")
    weights = {p.name: p.asnumpy() for p in glm.model.get_parameters()}
    try:
        for p in glm.model.get_parameters():
            if "layernorm" not in p.name:
                p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
        looping = generate(glm.model, [ids], settings)[0]
        guarded = generate(glm.model, [ids], GenerationConfig(**{**settings.__dict__, "repetition_stop": 4}))[0]
    finally:
        for p in glm.model.get_parameters():
            p.set_data(ms.Tensor(weights[p.name]))
    assert len(looping) == 10 and len(set(looping)) == 1
    assert guarded == looping[:3]


def test_nan_logits_give_upstreams_token_5(glm):
    """upstream's InvalidScoreLogitsProcessor: a row with NaN/Inf logits gets token 5."""

    class NaNModel:
        seq_length = glm.model.seq_length

        def __getattr__(self, name):
            return getattr(glm.model, name)

        def prefill(self, **inputs):
            logits = glm.model.prefill(**inputs)
            logits[0, 3] = np.nan  # row 0 only
            return logits

    ids = [glm.tokenizer.encode_chat("你好"), glm.tokenizer.encode_chat("hi")]
    settings = glm.chat_config(do_sample=False, max_new_tokens=1)
    guarded = generate(NaNModel(), ids, settings)
    assert guarded[0] == [5] and guarded[1] == generate(glm.model, ids[1:], settings)[0] != [5]


def test_generating_keeps_the_parameter_names(glm):
    """The KV cache wraps the model without renaming its parameters, so it saves and loads by name."""
    glm.chat("你好", **GREEDY)
    assert all(p.name.startswith("transformer.") for p in glm.model.get_parameters())
