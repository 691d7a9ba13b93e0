"""ADGEN data for ChatGLM2 fine-tuning: upstream ptuning/main.py's train and eval preprocessing,
checked against ids computed here from the sentencepiece model itself; skipped rows, line-numbered
errors, MindFormers' YAML fields, the trainer's dataset interface and the synthetic generator."""
import io
import json
import os

import mindspore as ms
import numpy as np
import pytest
import sentencepiece as spm
import yaml
from mindspore import nn, ops

from research.chatglm2.dataset_chatglm2 import (ADGenDataConfig, ADGenTrainDataset, EvalSample,
                                                build_eval_samples, build_train_arrays, load_adgen,
                                                read_adgen)
from research.chatglm2.synthetic_adgen import ATTRIBUTES, GARMENTS, generate_adgen, main, write_adgen
from research.chatglm2.tokenization_chatglm2 import ChatGLM2Tokenizer
from research.common.config import REPO_ROOT, load_config
from research.common.errors import UserInputError
from research.common.trainer import Trainer, TrainingArguments

VOCAB = os.path.join(REPO_ROOT, "examples", "tiny", "chatglm2_tokenizer.model")
SHORT = {"content": "类型#上衣*颜色#红色*风格#休闲", "summary": "这件上衣很好看。"}
EMPTY = {"content": "类型#裤*颜色#蓝色", "summary": ""}
NULL = {"content": None, "summary": "没有提示的一行。"}
LONG = {"content": "类型#裙*材质#丝绸*图案#碎花*风格#复古*裙长#长裙*领型#V领",
        "summary": "这款复古碎花长裙采用丝绸面料，V领设计修饰脸型，走路时裙摆飘逸，非常适合夏天穿着。"}


@pytest.fixture(scope="module")
def tok():
    return ChatGLM2Tokenizer(VOCAB)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=VOCAB)


def specials(sp):
    """[gMASK], sop, eos, pad as ChatGLM2 lays them out: [gMASK] and sop are the 2nd and 4th ids
    after the file's pieces; eos is </s>, pad is <unk>."""
    n = sp.get_piece_size()
    return n + 1, n + 3, sp.piece_to_id("</s>"), sp.piece_to_id("<unk>")


def round_prompt(query, history=()):
    past = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1))
    return f"{past}[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def expected_train_row(sp, query, answer, ms_len, mt_len, history=()):
    gmask, sop, eos, pad = specials(sp)
    a_ids = [gmask, sop] + sp.encode(round_prompt(query, history))[:ms_len - 2]
    b_ids = sp.encode(answer)[:mt_len]
    length = ms_len + mt_len + 1
    input_ids = a_ids + b_ids + [eos]
    labels = [-100] * len(a_ids) + b_ids + [eos]
    return (input_ids + [pad] * (length - len(input_ids)), labels + [-100] * (length - len(labels)))


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as stream:
        for line in lines:
            stream.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return str(path)


def test_train_rows_are_upstreams_preprocessing(tmp_path, tok, sp):
    path = write_lines(tmp_path / "train.json", [SHORT, EMPTY, "", LONG, NULL])
    data = read_adgen(path)
    assert [row.line for row in data.rows] == [1, 4]
    assert data.skipped == [2, 5]  # empty summary, null content; the blank line 3 is no row
    assert "2 rows; skipped 2" in data.summary() and "(lines 2, 5)" in data.summary()

    ms_len, mt_len = 24, 20
    # the long row is cut on both sides: its prompt loses "答：", its answer its end
    assert len(sp.encode(round_prompt(LONG["content"]))) > ms_len - 2
    assert len(sp.encode(LONG["summary"])) > mt_len
    input_ids, labels = build_train_arrays(tok, data.rows, ms_len, mt_len)
    assert input_ids.dtype == labels.dtype == np.int32
    assert input_ids.shape == labels.shape == (2, ms_len + mt_len + 1)
    for i, row in enumerate((SHORT, LONG)):
        want_ids, want_labels = expected_train_row(sp, row["content"], row["summary"], ms_len, mt_len)
        assert input_ids[i].tolist() == want_ids
        assert labels[i].tolist() == want_labels
    # the long row fills the whole length: prompt, answer and eos, no padding
    assert input_ids[1, -1] == specials(sp)[2] and (labels[1] != -100).sum() == mt_len + 1


def test_history_column_builds_the_round_prompt(tmp_path, tok, sp):
    chat = [{"prompt": "推荐一件外套", "response": "这件黑色外套很保暖。", "history": []},
            {"prompt": "有红色的吗", "response": "有的，红色也很好看。",
             "history": [["你好", "你好！"], ["推荐一件外套", "这件黑色外套很保暖。"]]},
            {"prompt": "谢谢", "response": "不客气。", "history": None}]
    path = write_lines(tmp_path / "chat.json", chat)
    data = read_adgen(path, "prompt", "response", "history")
    assert [row.history for row in data.rows] == [[], [("你好", "你好！"), ("推荐一件外套", "这件黑色外套很保暖。")], []]
    input_ids, labels = build_train_arrays(tok, data.rows, 200, 40)
    for i, row in enumerate(chat):
        want = expected_train_row(sp, row["prompt"], row["response"], 200, 40, row["history"] or ())
        assert (input_ids[i].tolist(), labels[i].tolist()) == want
    # without history_column the history is not read (upstream: no --history_column)
    assert read_adgen(path, "prompt", "response").rows[1].history == []


def test_eval_samples_are_upstreams_preprocess_function_eval(tmp_path, tok, sp):
    gmask, sop, _, _ = specials(sp)
    path = write_lines(tmp_path / "dev.json", [SHORT, EMPTY, LONG])
    samples = build_eval_samples(tok, read_adgen(path).rows, 24, 20)
    assert [s.line for s in samples] == [1, 3]
    for sample, row in zip(samples, (SHORT, LONG)):
        assert isinstance(sample, EvalSample)
        assert sample.prompt_ids == [gmask, sop] + sp.encode(round_prompt(row["content"]))[:22]
        answer = sp.encode(row["summary"])[:18]  # tokenizer(text_target=..., max_length=20): with [gMASK] sop
        assert sample.label_ids == [gmask, sop] + answer
        assert sample.label == sp.decode(answer)
    assert samples[0].label == SHORT["summary"]


def test_labels_keep_pad_without_ignore_pad_token_for_loss(tmp_path, tok, sp):
    _, _, _, pad = specials(sp)
    rows = read_adgen(write_lines(tmp_path / "train.json", [SHORT])).rows
    _, with_ignore = build_train_arrays(tok, rows, 24, 20)
    _, without = build_train_arrays(tok, rows, 24, 20, ignore_pad_token_for_loss=False)
    assert without.tolist() == np.where(with_ignore == -100, pad, with_ignore).tolist()


def test_source_prefix_goes_before_the_round_prompt(tmp_path, tok, sp):
    gmask, sop, _, _ = specials(sp)
    rows = read_adgen(write_lines(tmp_path / "train.json", [SHORT])).rows
    input_ids, _ = build_train_arrays(tok, rows, 60, 20, source_prefix="广告：")
    prompt = [gmask, sop] + sp.encode("广告：" + round_prompt(SHORT["content"]))
    assert input_ids[0, :len(prompt)].tolist() == prompt


# ---- bad input -------------------------------------------------------------------------------------

def one_line_error(call, *args):
    with pytest.raises(UserInputError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("bad, why", [('{"content": "类型#裤", "summary": "好"', "not valid JSON"),
                                      ('["类型#裤", "好"]', "expected a JSON object, got a JSON list"),
                                      ('{"content": "类型#裤", "summary": 3}', "field 'summary' must be a string")])
def test_malformed_line_names_its_line(tmp_path, bad, why):
    path = write_lines(tmp_path / "train.json", [SHORT, LONG, bad, SHORT])
    message = one_line_error(read_adgen, path)
    assert message.startswith(f"{path}:3: ") and why in message


def test_non_utf8_line_names_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(json.dumps(SHORT).encode() + b"\n" + '{"content": "类型"}'.encode("gbk") + b"\n")
    assert one_line_error(read_adgen, str(path)).startswith(f"{path}:2: not UTF-8 text")


def test_missing_column_is_a_one_line_user_error(tmp_path):
    path = write_lines(tmp_path / "train.json", [SHORT, {"content": "类型#裤"}])
    message = one_line_error(read_adgen, path)
    assert message.startswith(f"{path}:2: the row has no 'summary' field") and "origin_columns" in message
    # chat data read with ADGEN's default columns
    chat = write_lines(tmp_path / "chat.json", [{"prompt": "你好", "response": "你好！", "history": []}])
    assert one_line_error(read_adgen, chat).startswith(f"{chat}:1: the row has no 'content' field")
    message = one_line_error(read_adgen, path, "content", "summary", "history")
    assert message.startswith(f"{path}:1: the row has no 'history' field")


def test_malformed_history_names_its_line(tmp_path):
    path = write_lines(tmp_path / "chat.json", [{"prompt": "你好", "response": "好", "history": [["只有问题"]]}])
    message = one_line_error(read_adgen, path, "prompt", "response", "history")
    assert message.startswith(f"{path}:1: field 'history': history turn 0 must be a (question, answer) pair")


def test_missing_file_and_no_usable_rows(tmp_path):
    assert "does not exist" in one_line_error(read_adgen, str(tmp_path / "absent.json"))
    path = write_lines(tmp_path / "train.json", [EMPTY, NULL])
    assert one_line_error(read_adgen, path) == f"{path}: no usable rows (2 with an empty prompt or answer)"


# ---- YAML and the trainer ---------------------------------------------------------------------------

def write_config(tmp_path, data_path, train=None, loader=None, **top):
    """A YAML with MindFormers' glm2 train_dataset / eval_dataset fields (run_glm2_6b.yaml)."""
    section = {"data_loader": {"type": "ADGenDataLoader", "dataset_dir": data_path, "shuffle": True,
                               "phase": "train", "version": 2, "origin_columns": ["content", "summary"],
                               **(loader or {})},
               "input_columns": ["input_ids", "labels"], "max_source_length": 24, "max_target_length": 20,
               "ignore_pad_token_for_loss": True, "drop_remainder": True, "batch_size": 2, **(train or {})}
    evaluation = {**section, "data_loader": {**section["data_loader"], "phase": "eval", "shuffle": False}}
    path = tmp_path / "adgen.yaml"
    path.write_text(yaml.safe_dump({"seed": 7, **top, "train_dataset": section, "eval_dataset": evaluation},
                                   allow_unicode=True), encoding="utf-8")
    return load_config(str(path))


@pytest.fixture
def synthetic_file(tmp_path):
    return write_adgen(str(tmp_path / "adgen"), train=40, dev=5, seed=3)[0]


def test_yaml_sections_with_mindformers_fields(tmp_path, tok, sp, synthetic_file):
    config = write_config(tmp_path, synthetic_file)
    train = ADGenDataConfig.from_yaml(config)
    assert (train.seed, train.seq_length, train.data_loader.prompt_column) == (7, 45, "content")
    stream = io.StringIO()
    dataset = load_adgen(train, tok, stream)
    assert stream.getvalue() == f"{synthetic_file}: 40 rows\n"
    assert isinstance(dataset, ADGenTrainDataset) and len(dataset) == 40 and dataset.seq_length == 45
    assert dataset.columns == ("input_ids", "labels")
    sample = dataset[5]
    row = generate_adgen(40, seed=3)[5]
    assert [sample[c].tolist() for c in dataset.columns] == list(
        expected_train_row(sp, row["content"], row["summary"], 24, 20))
    # shuffle: a permutation fixed by (seed, epoch)
    assert sorted(dataset.order(0)) == list(range(40)) and dataset.order(0) == dataset.order(0)
    assert dataset.order(0) != dataset.order(1) and dataset.order(0) != list(range(40))
    evaluation = load_adgen(ADGenDataConfig.from_yaml(config, "eval_dataset"), tok, io.StringIO())
    assert len(evaluation) == 40 and all(isinstance(s, EvalSample) for s in evaluation)


@pytest.mark.parametrize("train, loader, message", [
    ({}, {"type": "VisualGLMDataLoader"}, "'VisualGLMDataLoader' is not an ADGEN loader"),
    ({}, {"column_names": ["a", "b"]}, "unknown field(s) ['column_names']"),
    ({}, {"phase": "dev"}, "train_dataset.data_loader.phase: expected Literal['train', 'eval']"),
    ({}, {"version": 1}, "train_dataset.data_loader.version: expected Literal[2]"),
    ({}, {"origin_columns": ["content"]}, "origin_columns: must be the two distinct field names"),
    ({}, {"dataset_dir": "no/such/train.json"}, "train_dataset.data_loader.dataset_dir not found"),
    ({"tokenizer": {"type": "ChatGLM2Tokenizer"}}, {}, "not supported by ADGenDataConfig: samples are built"),
    ({"num_parallel_workers": 8}, {}, "a MindSpore dataset pipeline setting"),
    ({"input_columns": ["input_ids"]}, {}, "input_columns: the samples' columns are ['input_ids', 'labels']"),
    ({"max_source_length": 2}, {}, "max_source_length: must be at least 3"),
])
def test_yaml_refusals_name_the_field(tmp_path, synthetic_file, train, loader, message):
    config = write_config(tmp_path, synthetic_file, train, loader)
    with pytest.raises(UserInputError) as info:
        ADGenDataConfig.from_yaml(config)
    assert message in str(info.value)
    if "not found" not in message:
        assert str(tmp_path / "adgen.yaml") + ":" in str(info.value)  # file:line of the field


class ShiftedCrossEntropy(nn.Cell):
    """A bigram 'language model': logits of the next token from an embedding of the current one;
    the loss shifts the labels as upstream's model does (logits[:, :-1] against labels[:, 1:])."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, vocab_size)

    def construct(self, input_ids, labels):
        logits = self.embedding(input_ids)[:, :-1]
        return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100)


def test_the_trainer_consumes_the_training_set(tmp_path, tok, synthetic_file):
    dataset = load_adgen(ADGenDataConfig.from_yaml(write_config(tmp_path, synthetic_file)), tok, io.StringIO())
    net = ShiftedCrossEntropy(tok.vocab_size)
    args = TrainingArguments(epochs=1, batch_size=4, prefix="adgen",
                             lr_schedule={"learning_rate": 0.5, "decay_style": "constant", "auto_warmup_steps": 0})
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        history = Trainer(net, net.trainable_params(), args, output_dir=str(tmp_path / "out"),
                          stream=io.StringIO()).train(dataset)
    finally:
        ms.set_context(mode=previous)
    assert len(history) == 10 and history[-1]["loss"] < history[0]["loss"]


# ---- synthetic data ----------------------------------------------------------------------------------

def test_synthetic_rows_follow_their_attributes():
    rows = generate_adgen(200, seed=1)
    assert rows == generate_adgen(200, seed=1) and rows != generate_adgen(200, seed=2)
    for row in rows:
        pairs = [part.split("#") for part in row["content"].split("*")]
        attributes = dict(pairs)
        assert pairs[0][0] == "类型" and 2 <= len(pairs) <= 4
        assert [key for key, _ in pairs[1:]] == [key for key in ATTRIBUTES if key in attributes]
        assert row["summary"].startswith(f"这款{attributes['类型']}，")
        assert row["summary"].endswith(GARMENTS[attributes["类型"]] + "。")
        assert all(value in row["summary"] for value in attributes.values())


def test_synthetic_files_are_adgen_files(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "a"), "--train", "30", "--dev", "6", "--seed", "4"]) == 0
    train, dev = capsys.readouterr().out.split()
    assert [len(read_adgen(p).rows) for p in (train, dev)] == [30, 6]
    assert read_adgen(train).rows[0].response == generate_adgen(30, seed=4)[0]["summary"]
    write_adgen(str(tmp_path / "b"), train=30, dev=6, seed=4)
    for name in ("train.json", "dev.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(UserInputError, match="the dev row count must be a positive integer"):
        write_adgen(str(tmp_path / "c"), dev=0)
