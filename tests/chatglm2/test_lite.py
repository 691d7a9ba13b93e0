"""export_lite_model.py + run_chatglm2_infer_lite.py on the tiny ChatGLM2 with seeded random
weights (tests.chatglm2.chatglm2_fixtures): the exported graphs give run_chatglm2.py
--use_past True's answers and token ids (the same ChatGLM2Chat code over
research.common.lite.runtime.GraphCausalLM), with or without the incremental graph, and bad
files or flags are refused with one line and exit code 2."""
import argparse
import contextlib
import io
import os
import shlex
import shutil

import numpy as np
import pytest

from research.chatglm2 import export_lite_model, run_chatglm2, run_chatglm2_infer_lite as lite
from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.inference import ChatGLM2Chat, load_chatglm2
from research.chatglm2.lite_chatglm2 import LITE_PARAMETER, load_lite_chatglm2
from research.common.checkpoint import read_checkpoint
from research.common.convert import save_checkpoint_atomic
from research.common.lite.graphs import read_graph_inputs
from research.common.lite.runtime import Graph
from tests.chatglm2.chatglm2_fixtures import random_weights

CONFIG = "run_glm2_tiny.yaml"
SEQ = 64
BATCH = 2
PROMPTS = ("你好", "晚上睡不着应该怎么办")  # different lengths: the first is left-padded
NEW_TOKENS = 10


@contextlib.contextmanager
def recorded_replies():
    """The ChatReply lists ChatGLM2Chat.batch_chat returns meanwhile (run_chatglm2.py's and the
    Lite runner's, whose model is a ChatGLM2Chat too), and what is printed."""
    replies, out = [], io.StringIO()
    original = ChatGLM2Chat.batch_chat

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        replies.extend(result)
        return result

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(ChatGLM2Chat, "batch_chat", recording)
        yield replies, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random checkpoint, the graphs exported from it (batch 2, use_past True) with the
    command the export printed, and run_chatglm2.py --use_past True's replies to PROMPTS."""
    root = tmp_path_factory.mktemp("lite_chatglm2")
    checkpoint = str(root / "glm2_tiny.ckpt")
    params = random_weights(ChatGLM2Config.from_name("tiny"))
    save_checkpoint_atomic(params, checkpoint)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        written = export_lite_model.main(["--mode", "export", "--config", CONFIG, "--use_past", "True",
                                          "--device_id", "0", "--seq_length", str(SEQ), "--batch_size",
                                          str(BATCH), "--checkpoint", checkpoint,
                                          "--output_dir", str(root / "output")])
    printed = out.getvalue()
    command = shlex.split(printed.split("run them with:\n", 1)[1].strip())
    decoding = ["--max_new_tokens", str(NEW_TOKENS)] + [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    with recorded_replies() as (replies, out):
        answers = run_chatglm2.main(["--config", CONFIG, "--use_past", "True", "--seq_length", str(SEQ),
                                     "--batch_size", str(BATCH), "--checkpoint", checkpoint] + decoding)
    return argparse.Namespace(root=root, checkpoint=checkpoint, params=params, written=written, printed=printed,
                              command=command, decoding=decoding, answers=answers, replies=replies,
                              reference_out=out.getvalue())


def lite_argv(exported, inc=True, extra=(), prompts=None):
    """The command export_lite_model.py printed (PROMPT replaced), without --inc_model_path
    when inc is False, with run_chatglm2.py's decoding flags."""
    argv = list(exported.command[3:])  # after `python -m research.chatglm2.run_chatglm2_infer_lite`
    argv = argv[:argv.index("--prompt")]
    if not inc:
        at = argv.index("--inc_model_path")
        del argv[at:at + 2]
    decoding = exported.decoding if prompts is None else \
        ["--max_new_tokens", str(NEW_TOKENS)] + [arg for prompt in prompts for arg in ("--prompt", prompt)]
    return argv + decoding + list(extra)


def test_export_writes_both_graphs_and_the_embeddings(exported):
    output = str(exported.root / "output")
    full = f"{output}/mindir_full_checkpoint_bs_{BATCH}_{SEQ}/rank_0_graph.mindir"
    inc = f"{output}/mindir_inc_checkpoint_bs_{BATCH}_{SEQ}/rank_0_graph.mindir"
    lite_checkpoint = f"{output}/mindir_full_checkpoint_bs_{BATCH}_{SEQ}/glm2_6b_for_lite.ckpt"
    assert exported.written == {"full": full, "inc": inc}  # main() returns the graphs, as VisualGLM's
    shapes = {kind: [(item.name, item.shape) for item in read_graph_inputs(path, kind)]
              for kind, path in (("full", full), ("inc", inc))}
    assert shapes["full"] == [("input_embeds", (BATCH, SEQ, 64)), ("position_ids", (BATCH, SEQ)),
                              ("attention_mask", (BATCH, 1, SEQ, SEQ)), ("logits_index", (BATCH,))]
    cache = (2, BATCH, 2, SEQ, 24)  # layers, batch, KV groups (multi-query), length, head dim
    assert shapes["inc"] == [("input_ids", (BATCH, 1)), ("position_ids", (BATCH, 1)),
                             ("attention_mask", (BATCH, 1, 1, SEQ)), ("key_cache", cache),
                             ("value_cache", cache), ("cache_index", ())]
    table = read_checkpoint(lite_checkpoint)
    assert list(table) == [LITE_PARAMETER]
    assert np.array_equal(table[LITE_PARAMETER], exported.params[LITE_PARAMETER])
    assert f"weights: {exported.checkpoint}" in exported.printed
    for path in (full, inc, lite_checkpoint):
        assert f"{path}" in exported.printed
    assert exported.command[:3] == ["python", "-m", "research.chatglm2.run_chatglm2_infer_lite"]
    assert exported.command[-2:] == ["--prompt", "PROMPT"]
    assert os.path.abspath(exported.command[exported.command.index("--full_model_path") + 1]) == full
    assert os.path.abspath(exported.command[exported.command.index("--inc_model_path") + 1]) == inc


@pytest.mark.parametrize("case", ["inc", "no_inc", "use_past_false"])
def test_lite_runner_gives_run_chatglm2s_answers_and_tokens(exported, case):
    expected = exported.replies
    assert len(expected) == 2 and all(len(reply.token_ids) > 3 for reply in expected)
    assert expected[0].token_ids != expected[1].token_ids, "two prompts must give two answers"
    extra = ["--use_past", "False"] if case == "use_past_false" else []
    argv = lite_argv(exported, inc=case != "no_inc", extra=extra)
    with recorded_replies() as (replies, out):
        answers = lite.main(argv)
    assert answers == exported.answers
    assert [reply.token_ids for reply in replies] == [reply.token_ids for reply in expected]
    assert [reply.response for reply in replies] == [reply.response for reply in expected]
    printed = out.getvalue()
    def answer_lines(text):
        return [line for line in text.splitlines() if line.startswith(("问：", "答："))]

    assert answer_lines(printed) == answer_lines(exported.reference_out)
    assert "runtime: MindSpore (mindspore.load + nn.GraphCell)" in printed
    assert f"use_past={case == 'inc'}" in printed
    if case != "inc":
        assert "the full graph re-runs for every new token" in printed


def test_fewer_rows_than_the_batch_are_filled(exported):
    """Three prompts on batch-2 graphs: the second batch has one row, run with it repeated."""
    prompts = PROMPTS + PROMPTS[:1]
    with recorded_replies() as (replies, _):
        answers = lite.main(lite_argv(exported, prompts=prompts))
    assert answers == exported.answers + exported.answers[:1]
    assert [reply.token_ids for reply in replies] == [reply.token_ids for reply in exported.replies[:2]
                                                      + exported.replies[:1]]


def write_declared_graph(path, inputs):
    """A MindIR file that declares only graph inputs [(name, shape, MindIR type)] (what the
    runner reads before loading anything), e.g. another model's graph."""
    from mindspore.train import mind_ir_pb2

    model = mind_ir_pb2.ModelProto()
    model.graph.name = "graph"
    for name, shape, type_name in inputs:
        item = model.graph.input.add()
        item.name = f"graph:{name}"
        tensor = item.tensor.add()
        tensor.dims.extend(shape)
        tensor.data_type = mind_ir_pb2.TensorProto.DataType.Value(type_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(model.SerializeToString())
    return path


def full_graph_inputs(batch=BATCH, length=SEQ, hidden=64, positions=None):
    return [("input_embeds", (batch, length, hidden), "FLOAT"),
            ("position_ids", positions or (batch, length), "INT32"),
            ("attention_mask", (batch, 1, length, length), "FLOAT"), ("logits_index", (batch,), "INT32")]


def inc_graph_inputs(batch):
    cache = (2, batch, 2, SEQ, 24)
    return [("input_ids", (batch, 1), "INT32"), ("position_ids", (batch, 1), "INT32"),
            ("attention_mask", (batch, 1, 1, SEQ), "FLOAT"), ("key_cache", cache, "FLOAT"),
            ("value_cache", cache, "FLOAT"), ("cache_index", (), "INT32")]


def bad_argv(exported, case):
    """(argv, words the error must hold) for each refused input."""
    root = exported.root / "bad"
    written = exported.written
    argv = lite_argv(exported)

    def replace(flag, value):
        argv[argv.index(flag) + 1] = value
        return argv

    if case == "visualglm_graph":  # GLM-6B's 2D positions [B,2,S]: the same input names
        path = write_declared_graph(str(root / "mindir_full_checkpoint_bs_2_64" / "rank_0_graph.mindir"),
                                    full_graph_inputs(positions=(BATCH, 2, SEQ)))
        return replace("--full_model_path", path), ["is not a ChatGLM2 full (prefill) graph", "[2, 2, 64]"]
    if case == "missing_file":
        missing = str(root / "nowhere" / "rank_0_graph.mindir")
        return replace("--full_model_path", missing), ["full (prefill) graph not found", missing]
    if case == "inc_as_full":
        return replace("--full_model_path", written["inc"]), ["is not a ChatGLM2 full (prefill) graph",
                                                              "it is the incremental"]
    if case == "another_batch_size":
        return replace("--batch_size", "1"), ["--batch_size 1 was asked", "exported with batch_size 2 and "
                                                                          "seq_length 64"]
    if case == "another_seq_length":
        return replace("--seq_length", "32"), ["--seq_length 32 was asked", "exported with batch_size 2"]
    if case == "inc_of_another_export":
        path = write_declared_graph(str(root / "mindir_inc_checkpoint_bs_1_64" / "rank_0_graph.mindir"),
                                    inc_graph_inputs(1))
        return replace("--inc_model_path", path), ["not exported together", "batch size 1"]
    if case == "another_model":  # the YAML's hidden size is not the graph's
        path = write_declared_graph(str(root / "mindir_full_checkpoint_bs_2_64_h48" / "rank_0_graph.mindir"),
                                    full_graph_inputs(hidden=48))
        argv = lite_argv(exported, inc=False)
        return replace("--full_model_path", path), ["exported from another model", "hidden_size 48"]
    if case == "prompt_too_long":
        return lite_argv(exported, prompts=["晚上睡不着应该怎么办" * 8]), ["the query alone encodes to",
                                                                  "seq_length 64"]
    if case == "missing_lite_checkpoint":  # a full graph copied without the embeddings beside it
        copied = root / "copied" / "rank_0_graph.mindir"
        copied.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written["full"], copied)
        argv = lite_argv(exported, inc=False)
        return replace("--full_model_path", str(copied)), [
            "glm2_6b_for_lite.ckpt (the ChatGLM2 word embeddings for Lite) not found",
            f"{copied.parent / 'glm2_6b_for_lite.ckpt'} (beside the full graph)"]
    if case == "checkpoint_flag":
        return argv + ["--checkpoint", exported.checkpoint], ["--checkpoint", "leave it out"]
    raise AssertionError(case)


def listing(root):
    return sorted((path, os.path.getsize(os.path.join(path, name)), name)
                  for path, _, names in os.walk(root) for name in names)


@pytest.mark.parametrize("case", ["visualglm_graph", "missing_file", "inc_as_full", "another_batch_size",
                                  "another_seq_length", "inc_of_another_export", "another_model",
                                  "prompt_too_long", "missing_lite_checkpoint", "checkpoint_flag"])
def test_bad_input_is_one_line_and_exit_code_2(exported, case, capsys, monkeypatch):
    """Each is refused before any graph is loaded, with nothing written."""
    argv, words = bad_argv(exported, case)
    before = listing(exported.root)

    def no_loading(graph, runtime):
        raise AssertionError(f"{graph.path} was loaded")

    monkeypatch.setattr(Graph, "load", no_loading)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        lite.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err
    assert "答：" not in captured.out
    assert listing(exported.root) == before  # nothing written


def test_export_refuses_a_bad_batch_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_lite_model.main(["--config", CONFIG, "--batch_size", "0", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--batch_size must be positive" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_multi_turn_stream_chat_on_the_graphs_equals_the_model(exported):
    """The graphs cannot continue a cache (their prefill writes from slot 0), so each turn
    re-encodes the conversation: the same answers as the in-graph model's cache reuse."""
    full, inc = (exported.written[kind] for kind in ("full", "inc"))
    graphs = load_lite_chatglm2(CONFIG, full, inc_model_path=inc, seq_length=SEQ, batch_size=BATCH)
    model = load_chatglm2(CONFIG, seq_length=SEQ, checkpoint=exported.checkpoint)
    answers = []
    for glm in (graphs, model):
        history, past, turns = [], None, []
        for query in ("你好", "hi"):
            *_, (response, history, past) = glm.stream_chat(query, history, past=past, return_past=True,
                                                             do_sample=False, max_new_tokens=4)
            turns.append(response)
        answers.append((turns, past.tokens))
    assert answers[0] == answers[1]
