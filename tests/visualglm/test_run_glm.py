"""run_glm.py end to end on the tiny preset, and its answers to bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest

from research.common.config import CONFIG_ROOT, REPO_ROOT, load_config
from research.common.convert import save_checkpoint_atomic
from research.common.generation import GenerationConfig, generate
from research.common.prompts import VisualGLMPrompt
from research.common.runtime import load_weights
from research.common.testing import train_tiny_ice_text_model
from research.visualglm import run_glm
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.modeling_glm import GLMForConditionalGeneration
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer

TINY = os.path.join(CONFIG_ROOT, "visualglm", "run_glm_tiny_text_generation.yaml")


def run(capsys, *args):
    answers = run_glm.main(["--config", TINY, *args])
    return answers, capsys.readouterr().out


def bad_run(capsys, *args, config=TINY):
    with pytest.raises(SystemExit) as exit_info:
        run_glm.main(["--config", config, *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_shipped_tiny_tokenizer_is_the_deterministic_build(tmp_path):
    rebuilt = train_tiny_ice_text_model(str(tmp_path / "ice_text.model"))
    with open(rebuilt, "rb") as fresh, open(os.path.join(REPO_ROOT, "examples/tiny/ice_text.model"), "rb") as shipped:
        assert fresh.read() == shipped.read()


def test_same_answers_with_and_without_kv_cache(capsys):
    with_cache, out = run(capsys, "--prompt", "描述这张图片。", "--prompt", "你好", "--use_past", "True")
    without, _ = run(capsys, "--prompt", "描述这张图片。", "--prompt", "你好", "--use_past", "False")
    assert with_cache == without
    assert "UNTRAINED" in out and "问：描述这张图片。\\n答：" in out


def test_loads_a_converted_checkpoint(tmp_path, capsys):
    """Weights saved to a .ckpt and given with --checkpoint drive the answers."""
    config = GLMConfig.from_dict(dict(
        load_config(TINY).model.model_config))
    rng = np.random.RandomState(5)
    model = GLMForConditionalGeneration(config)
    params = {p.name: rng.normal(0, 0.3, p.shape).astype(np.float32) for p in model.get_parameters()}
    path = str(tmp_path / "glm_tiny.ckpt")
    save_checkpoint_atomic(params, path)
    answers, out = run(capsys, "--checkpoint", path, "--prompt", "你好", "--max_new_tokens", "8")
    assert path in out
    load_weights(model, path, "GLM checkpoint")
    tokenizer = ChatGLMTokenizer(os.path.join(REPO_ROOT, "examples/tiny/ice_text.model"))
    ids = generate(model, [tokenizer.encode(VisualGLMPrompt().build_prompt("你好"))], GenerationConfig(
        max_new_tokens=8, repetition_penalty=config.repetition_penalty, sampling_rule="sat",
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        valid_vocab_size=tokenizer.vocab_size))[0]
    assert answers == [VisualGLMPrompt().postprocess(tokenizer.decode(ids))]


def write_config(tmp_path, old, new):
    with open(TINY, encoding="utf-8") as f:
        text = f.read()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    lines = text.replace(old, new).splitlines()
    first = new.splitlines()[0]
    return str(path), next(i for i, line in enumerate(lines, 1) if first in line)


def test_wrong_field_type_names_file_line_and_field(tmp_path, capsys):
    path, line = write_config(tmp_path, "num_layers: 2", "num_layers: two")
    err = bad_run(capsys, config=path)
    assert f"{path}:{line}: model.model_config.num_layers: expected int, got 'two'" in err


def test_unknown_field_is_named(tmp_path, capsys):
    path, _ = write_config(tmp_path, "num_layers: 2", "num_layers: 2\n    num_layer: 3")
    assert "unknown field(s) ['num_layer']" in bad_run(capsys, config=path)


def test_missing_tokenizer_file(tmp_path, capsys):
    path, _ = write_config(tmp_path, "examples/tiny/ice_text.model", "nowhere/ice_text.model")
    assert "tokenizer vocab_file not found: nowhere/ice_text.model" in bad_run(capsys, config=path)


def test_prompt_longer_than_seq_length(capsys):
    tokenizer = ChatGLMTokenizer(os.path.join(REPO_ROOT, "examples/tiny/ice_text.model"))
    question = "红色的圆形。" * 6
    length = len(tokenizer.encode(VisualGLMPrompt().build_prompt(question)))
    assert 32 < length < 64  # fits the tokenizer's max_length, not the model's seq_length
    err = bad_run(capsys, "--prompt", question, "--seq_length", "32")
    assert f"the prompt has {length} tokens but seq_length is 32" in err
    err = bad_run(capsys, "--prompt", question * 4)
    assert "more than max_length 64" in err


def test_missing_and_foreign_checkpoints(tmp_path, capsys):
    assert "GLM checkpoint not found: /no/such.ckpt" in bad_run(capsys, "--checkpoint", "/no/such.ckpt")
    other = str(tmp_path / "other.ckpt")
    save_checkpoint_atomic({"vision.blocks.0.weight": np.zeros((2, 2), np.float32)}, other)
    err = bad_run(capsys, "--checkpoint", other)
    assert "does not fit this model" in err and "vision.blocks.0.weight" in err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a readable MindSpore checkpoint" in bad_run(capsys, "--checkpoint", str(garbage))


def test_special_ids_must_match_the_tokenizer(tmp_path, capsys):
    path, _ = write_config(tmp_path, "gmask_token_id: 5", "gmask_token_id: 6")
    assert "gmask_token_id: config 6, tokenizer 5" in bad_run(capsys, config=path)


def test_command_line_exit_code_from_the_seed_directory():
    """The seed's way: cd research/visualglm && python run_glm.py ...; bad input exits 2."""
    result = subprocess.run(
        [sys.executable, "run_glm.py", "--config", "no_such_config.yaml"],
        cwd=os.path.join(REPO_ROOT, "research", "visualglm"), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2
    assert "config not found: 'no_such_config.yaml'" in result.stderr
    assert "Traceback" not in result.stderr
