"""run_chatglm2.py and cli_demo.py as users run them, and bad input: one line, exit code 2."""
import io
import json
import os

import mindspore as ms
import pytest
import yaml

from research.chatglm2 import cli_demo, run_chatglm2
from research.chatglm2.inference import load_chatglm2
from research.common.convert import save_checkpoint_atomic
from tests.chatglm2.chatglm2_fixtures import TINY_YAML, tiny_yaml_with_weights
from tests.config_files import write_yaml

HISTORY = [["图片里有什么", "一个红色的圆形"]]


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory):
    return tiny_yaml_with_weights(str(tmp_path_factory.mktemp("glm2scripts")), **{"model.model_config.seq_length": 128})


def test_run_chatglm2_batch_with_history_equals_batch_chat(yaml_path, tmp_path, capsys):
    history_file = tmp_path / "history.json"
    history_file.write_text(json.dumps([HISTORY, []]), encoding="utf-8")
    answers = run_chatglm2.main(["--config", yaml_path, "--prompt", "你好", "--prompt", "hi", "--batch_size", "2",
                                 "--history_file", str(history_file), "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    glm = load_chatglm2(yaml_path)
    expected = glm.batch_chat(["你好", "hi"], [HISTORY, []], settings=glm.generation_config(max_new_tokens=5))
    assert answers == [r.response for r in expected]
    assert f"问：你好\n答：{answers[0]}" in out and "batch_size=2" in out


def test_cli_demo_streams_turns_clear_and_stop(yaml_path, capsys):
    stdin = io.StringIO("你好\n图片里有什么\nclear\nhi\nstop\n")
    stdout = io.StringIO()
    history = cli_demo.main(["--config", yaml_path, "--do_sample", "False", "--max_new_tokens", "4"],
                            stdin=stdin, stdout=stdout)
    assert [q for q, _ in history] == ["hi"]  # clear forgot the first two turns
    glm = load_chatglm2(yaml_path)
    first = list(glm.stream_chat("你好", do_sample=False, max_new_tokens=4))[-1][0]
    assert f"ChatGLM：{first}\n" in stdout.getvalue()
    assert "clear 清空对话历史" in capsys.readouterr().out


class InterruptingOutput(io.StringIO):
    """Ctrl-C arrives while the second piece of the first answer is printed."""

    def __init__(self):
        super().__init__()
        self.pieces = 0

    def write(self, text):
        if text and not text.startswith("\n"):
            self.pieces += 1
            if self.pieces == 3:  # "ChatGLM：", piece 1, then piece 2
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_program(yaml_path):
    stdout = InterruptingOutput()
    history = cli_demo.main(["--config", yaml_path, "--do_sample", "False", "--max_new_tokens", "6"],
                            stdin=io.StringIO("你好\nhi\nstop\n"), stdout=stdout)
    assert "[stopped]" in stdout.getvalue()
    assert [q for q, _ in history] == ["你好", "hi"]  # the program went on to the next turn
    assert history[0][1]  # the piece shown before Ctrl-C is kept


def refused(capsys, argv, main=run_chatglm2.main):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(yaml_path, tmp_path, capsys, tiny_ice_text_model):
    before = set(os.listdir(tmp_path))
    missing = write_yaml(tmp_path / "missing_tok.yaml", yaml_path, {"processor.tokenizer.vocab_file": str(tmp_path / "none.model")})
    assert "tokenizer vocab_file" in refused(capsys, ["--config", missing])
    foreign = write_yaml(tmp_path / "foreign_tok.yaml", yaml_path, {"processor.tokenizer.vocab_file": tiny_ice_text_model})
    assert "ice_text.model" in refused(capsys, ["--config", foreign])
    assert "the query alone encodes to" in refused(capsys, ["--config", yaml_path, "--prompt", "红色的圆形。" * 80])
    wrong_type = write_yaml(tmp_path / "wrong_type.yaml", yaml_path, {"model.model_config.num_layers": "two"})
    message = refused(capsys, ["--config", wrong_type])
    assert message.startswith(f"error: {wrong_type}:") and "expected int" in message
    glm_ckpt = tmp_path / "visualglm_glm.ckpt"
    save_checkpoint_atomic({"transformer.word_embeddings.embedding_table": __import__("numpy").zeros((640, 64), "float32")},
                           str(glm_ckpt))
    assert "does not fit this model" in refused(capsys, ["--config", yaml_path, "--checkpoint", str(glm_ckpt)])
    bad_history = tmp_path / "history.json"
    bad_history.write_text("[[\"q\", ", encoding="utf-8")
    assert "not valid JSON" in refused(capsys, ["--config", yaml_path, "--history_file", str(bad_history)])
    mindformers_arch = write_yaml(tmp_path / "arch.yaml", TINY_YAML, {"model.arch.type": "LlamaForCausalLM"})
    assert "is not a ChatGLM2 model" in refused(capsys, ["--config", mindformers_arch])
    assert set(os.listdir(tmp_path)) - before == {"missing_tok.yaml", "foreign_tok.yaml", "wrong_type.yaml",
                                                  "visualglm_glm.ckpt", "history.json", "arch.yaml"}


def test_a_mindformers_glm2_yaml_runs_as_it_is(yaml_path, tmp_path, capsys):
    """MindFormers r1.0 configs/glm2/run_glm2_6b.yaml's layout (its type names, model_config.batch_size,
    the GLMProcessor node with the tokenizer's *_token fields, trainer sections), at tiny sizes."""
    with open(yaml_path, encoding="utf-8") as stream:
        ours = yaml.safe_load(stream)
    model_config = {**ours["model"]["model_config"], "type": "ChatGLM2Config", "batch_size": 2,
                    "pre_seq_len": "None", "prefix_projection": False}  # YAML `None` is a string
    mindformers = {
        "seed": 0, "run_mode": "train", "output_dir": "./output", "load_checkpoint": "", "auto_trans_ckpt": False,
        "only_save_strategy": False, "resume_training": False,
        "context": {"mode": 0, "device_target": "CPU", "enable_graph_kernel": False,
                    "graph_kernel_flags": "--disable_expand_ops=Softmax,Dropout --enable_parallel_fusion=true",
                    "max_call_depth": 10000, "max_device_memory": "30GB", "save_graphs": False, "device_id": 0},
        "model": {"model_config": model_config, "arch": {"type": "ChatGLM2ForConditionalGeneration"}},
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "glm2_6b"},
        "processor": {"return_tensors": "ms", "type": "GLMProcessor", "tokenizer": {
            "type": "ChatGLM2Tokenizer", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
            "mask_token": "[MASK]", "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>",
            "vocab_file": ours["processor"]["tokenizer"]["vocab_file"]}},
        "runner_config": {"epochs": 1, "batch_size": 8, "sink_mode": True, "sink_size": 4},
        "lr_schedule": {"type": "polynomial", "learning_rate": 5.e-5, "lr_end": 1.e-6, "warmup_steps": 0,
                        "total_steps": -1},
        "optimizer": {"type": "FP32StateAdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1.e-8,
                      "weight_decay": 0.1},
        "use_parallel": False, "parallel": {"parallel_mode": 1, "full_batch": True},
        "parallel_config": {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1},
        "recompute_config": {"recompute": True}, "profile": False,
        "callbacks": [{"type": "MFLossMonitor"}, {"type": "CheckpointMointor", "prefix": "glm2-6b"}],
    }
    path = tmp_path / "run_glm2_6b.yaml"
    path.write_text(yaml.safe_dump(mindformers, allow_unicode=True, sort_keys=False), encoding="utf-8")
    answers = run_chatglm2.main(["--config", str(path), "--prompt", "你好", "--prompt", "hi", "--max_new_tokens", "3"])
    assert f"note: {path}:2: run_mode is 'train';" in capsys.readouterr().err  # the script's task is 'predict'
    assert ms.get_context("max_call_depth") == 10000  # the context settings reach MindSpore
    assert answers == run_chatglm2.main(["--config", yaml_path, "--prompt", "你好", "--prompt", "hi",
                                         "--max_new_tokens", "3"])


def test_checkpoint_flags_are_relative_to_the_current_folder(yaml_path, tmp_path, monkeypatch):
    """A command-line path is read as the shell completes it (from the current folder), unlike a
    YAML's, which is relative to the repository (the demo prints such relative flags)."""
    checkpoint = yaml.safe_load(open(yaml_path, encoding="utf-8"))["model"]["model_config"]["checkpoint_name_or_path"]
    monkeypatch.chdir(os.path.dirname(checkpoint))
    prompt = ["--prompt", "你好", "--max_new_tokens", "3"]
    assert (run_chatglm2.main(["--config", yaml_path, "--checkpoint", os.path.basename(checkpoint), *prompt])
            == run_chatglm2.main(["--config", yaml_path, *prompt]))
