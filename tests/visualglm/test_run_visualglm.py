"""run_visualglm.py / run_visualglm_pipeline.py / cli_demo.py on the tiny preset, and their
errors on bad input (exit code 2 and a message naming the problem)."""
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from research.common.config import REPO_ROOT
from research.common.convert import save_checkpoint_atomic
from research.common.testing import images_in_every_mode
from research.visualglm import cli_demo, run_visualglm, run_visualglm_pipeline
from research.visualglm.inference import image_prompt_pairs

TINY = os.path.join(REPO_ROOT, "configs", "visualglm", "run_visualglm_tiny_image_to_text_generation.yaml")
EXAMPLE = os.path.join(REPO_ROOT, "examples", "visualglm", "shapes.png")
FAST = ["--max_new_tokens", "6"]


def write_config(directory, vision="", qformer="", glm="", mode=0):
    """A copy of the tiny preset naming the given checkpoints."""
    with open(TINY, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    model = config["model"]["model_config"]
    model["checkpoint_name_or_path"] = qformer
    model["vision_config"]["checkpoint_name_or_path"] = vision
    model["text_config"]["checkpoint_name_or_path"] = glm
    config["context"]["mode"] = mode
    path = os.path.join(directory, "tiny.yaml")
    with open(path, "w", encoding="utf-8") as stream:
        yaml.safe_dump(config, stream, allow_unicode=True)
    return path


def run_exit_code(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_any_image_mode_runs_batched_and_equals_one_by_one(tmp_path):
    paths = images_in_every_mode(str(tmp_path))
    argv = ["--config", TINY, "--image_path", ",".join(paths), "--prompt", "描述这张图片。"] + FAST
    one_by_one = run_visualglm.main(argv)
    batched = run_visualglm.main(argv + ["--batch_size", "4"])
    assert len(one_by_one) == 4 and batched == one_by_one
    assert all(text.startswith("<img></img>问：描述这张图片。\n答：") for text in batched)
    piped = run_visualglm_pipeline.main(argv + ["--batch_size", "3"])
    assert piped == one_by_one


def test_demo_command_says_the_weights_are_untrained():
    result = subprocess.run(
        [sys.executable, "-m", "research.visualglm.run_visualglm", "--config",
         "run_visualglm_tiny_image_to_text_generation.yaml", "--image_path", EXAMPLE,
         "--prompt", "描述这张图片。", "--max_new_tokens", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNTRAINED" in result.stdout
    assert "['<img></img>问：描述这张图片。\\n答：" in result.stdout


def test_cli_demo_streams_a_multi_turn_chat():
    stdout = io.StringIO()
    history = cli_demo.main(["--config", TINY, "--image_path", EXAMPLE] + FAST,
                            stdin=io.StringIO("描述这张图片。\n还有呢？\nstop\n"), stdout=stdout)
    assert [query for query, _ in history] == ["描述这张图片。", "还有呢？"]
    streamed = [line for line in stdout.getvalue().split("\n") if line]
    assert len(streamed) == 2 and all(reply for _, reply in history)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"this is text, not an image", "image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
])
def test_bad_image_files(tmp_path, capsys, content, message):
    path = tmp_path / "picture.png"
    if content is not None:
        path.write_bytes(content)
    code, err = run_exit_code(run_visualglm.main, ["--config", TINY, "--image_path", str(path)]
                              + FAST, capsys)
    assert code == 2 and str(path) in err and message in err.lower()


def test_prompt_longer_than_seq_length(capsys):
    code, err = run_exit_code(run_visualglm.main, ["--config", TINY, "--image_path", EXAMPLE,
                                                   "--prompt", "描述这张图片。" * 20,
                                                   "--seq_length", "16"] + FAST, capsys)
    assert code == 2 and "48" in err  # the limit: 16 text + 32 image tokens


def test_checkpoint_that_does_not_exist(tmp_path, capsys):
    config = write_config(str(tmp_path), glm=str(tmp_path / "missing" / "glm_6b.ckpt"))
    code, err = run_exit_code(run_visualglm.main, ["--config", config, "--image_path", EXAMPLE]
                              + FAST, capsys)
    assert code == 2 and "GLM checkpoint" in err and "not found" in err


def test_checkpoint_of_another_model(tmp_path, capsys):
    """A GLM checkpoint given as the ViT one is refused with the names that do not fit."""
    glm_like = str(tmp_path / "glm_6b.ckpt")
    save_checkpoint_atomic({"transformer.word_embeddings.embedding_table":
                            np.zeros((704, 64), np.float32)}, glm_like)
    config = write_config(str(tmp_path), vision=glm_like)
    code, err = run_exit_code(run_visualglm.main, ["--config", config, "--image_path", EXAMPLE]
                              + FAST, capsys)
    assert code == 2 and "ViT checkpoint" in err and "does not fit" in err
    assert "transformer.word_embeddings.embedding_table" in err


@pytest.mark.parametrize("argv, message", [
    (["--image_path", "no/such/picture.png"], "does not exist"),
    (["--image_path", EXAMPLE, "--prompt", "描述这张图片。" * 20, "--seq_length", "16"], "48"),
])
def test_bad_input_is_refused_before_any_checkpoint_is_read(tmp_path, monkeypatch, capsys, argv, message):
    """Issue #12: a typo in an image path or an over-long prompt costs no checkpoint load."""
    from research.common import runtime

    checkpoint = str(tmp_path / "glm_6b.ckpt")
    save_checkpoint_atomic({"unused": np.zeros(1, np.float32)}, checkpoint)
    config = write_config(str(tmp_path), glm=checkpoint)
    opened = []
    monkeypatch.setattr(runtime, "read_checkpoint", lambda *args: opened.append(args))
    code, err = run_exit_code(run_visualglm.main, ["--config", config] + argv + FAST, capsys)
    assert code == 2 and message in err and opened == []


def test_one_prompt_split_at_commas_is_said(capsys):
    pairs = image_prompt_pairs([f"{EXAMPLE},{EXAMPLE}"], ["这是什么,背景是什么"])
    assert [prompt for _, prompt in pairs] == ["这是什么", "背景是什么"]
    assert "split at its commas into 2 questions" in capsys.readouterr().err


def test_ctrl_c_in_the_terminal_chat_exits_130_with_one_line():
    """SIGINT while the chat waits for a question: exit code 130, one line, no traceback."""
    chat = subprocess.Popen(
        [sys.executable, "-m", "research.visualglm.cli_demo", "--config", TINY, "--image_path", EXAMPLE],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while not seen.endswith("用户：".encode()):
        byte = chat.stdout.read(1)
        assert byte, f"the chat ended before asking: {seen!r} {chat.stderr.read()!r}"
        seen += byte
    chat.send_signal(signal.SIGINT)
    _, err = chat.communicate(timeout=60)
    assert chat.returncode == 130
    assert err.decode().strip() == "interrupted"


def test_mismatched_images_and_prompts(capsys):
    code, err = run_exit_code(run_visualglm.main, ["--config", TINY, "--image_path",
                                                   f"{EXAMPLE},{EXAMPLE}", "--prompt", "a",
                                                   "--prompt", "b", "--prompt", "c"], capsys)
    assert code == 2 and "2 images but 3 prompts" in err


def test_sat_checkpoint_converts_and_runs_with_and_without_kv_cache(tmp_path):
    """A tiny VisualGLM in SAT's key layout -> convert_weight.py -> run_visualglm.py."""
    from research.visualglm import convert_weight
    from tests.visualglm.visualglm_fixtures import (sat_visualglm_state_dict, tiny_visualglm_config,
                                          write_sat_checkpoint)

    state_dict = sat_visualglm_state_dict(tiny_visualglm_config(), seed=4, std=0.3)
    sat_path = write_sat_checkpoint(state_dict, str(tmp_path / "visualglm-6b"))
    out = tmp_path / "converted"
    paths = {name: str(out / f"{name}.ckpt") for name in ("visualglm_vit", "visualglm_qformer", "glm_6b")}
    convert_weight.main(["--torch_path", sat_path, "--config", TINY,
                         "--vit_mindspore_path", paths["visualglm_vit"],
                         "--qformer_mindspore_path", paths["visualglm_qformer"],
                         "--glm_mindspore_path", paths["glm_6b"]])
    assert (out / "glm_6b_for_lite.ckpt").is_file()
    config = write_config(str(tmp_path), vision=paths["visualglm_vit"],
                          qformer=paths["visualglm_qformer"], glm=paths["glm_6b"])
    gray = images_in_every_mode(str(tmp_path))[0]
    argv = ["--config", config, "--image_path", f"{EXAMPLE},{gray}", "--prompt", "描述这张图片。",
            "--max_new_tokens", "12", "--batch_size", "2"]
    with_cache = run_visualglm.main(argv + ["--use_past", "True"])
    without_cache = run_visualglm.main(argv + ["--use_past", "False"])
    assert with_cache == without_cache
    answers = [text.split("答：", 1)[1] for text in with_cache]
    assert answers[0] and answers[0] != answers[1], "two images, same prompt: answers must differ"
