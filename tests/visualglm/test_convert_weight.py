"""convert_weight.py: SAT and Hugging Face VisualGLM checkpoints -> our MindSpore checkpoints.

The source checkpoints are tiny (the tiny YAML's shapes) with SAT's real key names; the
outputs are checked against the parameters of the cells they are loaded into.
"""
import contextlib
import io
import os
import re
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from research.common import torch_checkpoint
from research.common.checkpoint import read_checkpoint
from research.common.config import REPO_ROOT
from research.common.convert import CheckpointWriter, per_head_qkv_to_contiguous, save_checkpoint_atomic
from research.common.progress import Progress
from research.common.qformer import QFormer
from research.common.vision import EvaViT
from research.visualglm import convert_weight
from research.visualglm.modeling_glm import GLMForConditionalGeneration
from tests.visualglm.visualglm_fixtures import (SAT_IMAGE_PREFIX, TINY_CONFIG, hf_from_sat,
                                      sat_visualglm_state_dict, tiny_visualglm_config,
                                      write_hf_checkpoint, write_sat_checkpoint)

OUTPUTS = ("vit", "qformer", "glm", "glm_6b_for_lite")
QKV = "transformer.layers.1.attention.query_key_value.weight"
EMBEDDINGS = "transformer.word_embeddings.embedding_table"


@pytest.fixture(scope="module")
def config():
    return tiny_visualglm_config()


@pytest.fixture(scope="module")
def state_dict(config):
    """The fixture's weights with random biases, so the qkv bias permutation is exercised."""
    rng = np.random.RandomState(1)
    return {key: rng.normal(0, 0.02, value.shape).astype(np.float32) if key.endswith(".bias")
            else value for key, value in sat_visualglm_state_dict(config).items()}


@pytest.fixture(scope="module")
def sat_dir(state_dict, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("sat"))
    write_sat_checkpoint(state_dict, directory)
    return directory


def convert(torch_path, out_dir, *flags, config=TINY_CONFIG):
    """Run the command line; returns {output file stem: {name: array}}."""
    out_dir = str(out_dir)
    convert_weight.main([
        "--torch_path", str(torch_path), "--config", config,
        "--vit_mindspore_path", os.path.join(out_dir, "vit.ckpt"),
        "--qformer_mindspore_path", os.path.join(out_dir, "qformer.ckpt"),
        "--glm_mindspore_path", os.path.join(out_dir, "glm.ckpt"), *flags])
    return {stem: read_checkpoint(os.path.join(out_dir, stem + ".ckpt")) for stem in OUTPUTS}


@pytest.fixture(scope="module")
def sat_converted(sat_dir, tmp_path_factory):
    return convert(sat_dir, tmp_path_factory.mktemp("sat_out"))


def test_sat_outputs_match_our_cells_names_shapes_and_values(config, state_dict, sat_converted):
    text_hidden, query_hidden = config.text_config.hidden_size, config.qformer_config.hidden_size

    def shapes(net, prefix=""):
        return {prefix + p.name: tuple(p.shape) for p in net.get_parameters()}

    expected = {
        "vit": shapes(EvaViT(config.vision_config), "visual_encoder."),
        "qformer": {**shapes(QFormer(config.qformer_config), "qformer."),
                    "glm_proj.weight": (text_hidden, query_hidden), "glm_proj.bias": (text_hidden,)},
        "glm": shapes(GLMForConditionalGeneration(config.text_config)),
        "glm_6b_for_lite": {EMBEDDINGS: (config.text_config.vocab_size, text_hidden)},
    }
    for stem, want in expected.items():
        assert {name: value.shape for name, value in sat_converted[stem].items()} == want, stem
        assert {value.dtype for value in sat_converted[stem].values()} == {np.dtype(np.float32)}

    vit, qformer, glm = sat_converted["vit"], sat_converted["qformer"], sat_converted["glm"]
    image = SAT_IMAGE_PREFIX
    for ours, source in (
            (vit["visual_encoder.ln_vision.gamma"], image + "vit.mixins.cls.ln_vision.weight"),
            (vit["visual_encoder.cls_token"], image + "vit.transformer.word_embeddings.weight"),
            (vit["visual_encoder.layers.1.attention.query_key_value.bias"],
             image + "vit.transformer.layers.1.attention.query_key_value.bias"),
            (qformer["qformer.query_tokens"], image + "qformer.transformer.word_embeddings.weight"),
            (qformer["qformer.layers.0.post_cross_attention_layernorm.beta"],
             image + "qformer.transformer.layers.0.post_cross_attention_layernorm.bias"),
            (qformer["glm_proj.weight"], image + "glm_proj.weight"),
            (glm[QKV], QKV),
            (glm["lm_head.weight"], "mixins.chatglm-final.lm_head.weight"),
            (sat_converted["glm_6b_for_lite"][EMBEDDINGS], "transformer.word_embeddings.weight")):
        np.testing.assert_array_equal(ours, state_dict[source])


@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_hf_sharded_checkpoints_give_the_same_arrays_as_sat(config, state_dict, sat_converted,
                                                            safetensors, tmp_path):
    hf = hf_from_sat(state_dict, config)
    assert not np.array_equal(hf[QKV], state_dict[QKV])  # per-head order really differs
    index = write_hf_checkpoint(hf, str(tmp_path / "hf"), shards=2, safetensors=safetensors)
    converted = convert(index if safetensors else tmp_path / "hf", tmp_path / "out")
    for stem in OUTPUTS:
        assert converted[stem].keys() == sat_converted[stem].keys()
        for name, value in converted[stem].items():
            np.testing.assert_array_equal(value, sat_converted[stem][name], err_msg=name)


@pytest.mark.parametrize("source_dtype, flag, expected", [
    (None, "float16", np.float16), ("float16", "keep", np.float16),
    ("bfloat16", "keep", np.float32), ("float16", "float32", np.float32)])
def test_output_dtype(state_dict, source_dtype, flag, expected, tmp_path):
    write_sat_checkpoint(state_dict, str(tmp_path / "sat"), dtype=source_dtype)
    converted = convert(tmp_path / "sat", tmp_path / "out", "--dtype", flag)
    for stem in OUTPUTS:
        assert {value.dtype for value in converted[stem].values()} == {np.dtype(expected)}
    assert list(converted["glm_6b_for_lite"]) == [EMBEDDINGS]
    np.testing.assert_allclose(converted["glm"]["lm_head.weight"].astype(np.float32),
                               state_dict["mixins.chatglm-final.lm_head.weight"], atol=1e-3)


def test_qkv_layout_flag_overrides_the_detected_order(config, state_dict, sat_dir, tmp_path):
    converted = convert(sat_dir, tmp_path, "--qkv_layout", "per_head")
    permuted = per_head_qkv_to_contiguous(state_dict[QKV], config.text_config.num_heads)
    np.testing.assert_array_equal(converted["glm"][QKV], permuted)


def _torch_file(tmp_path, obj):
    import torch

    path = tmp_path / "checkpoint.pt"
    torch.save(obj, path)
    return path


def _text_file(tmp_path, *_):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    return tmp_path / "notes.txt"


def _truncated_file(tmp_path, _, sat_dir):
    with open(os.path.join(sat_dir, "1", "mp_rank_00_model_states.pt"), "rb") as stream:
        data = stream.read()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    return tmp_path / "truncated.pt"


def _no_module_key(tmp_path, *_):
    return _torch_file(tmp_path, {"model": {}, "iteration": 1})


def _not_visualglm(tmp_path, *_):
    import torch

    return _torch_file(tmp_path, {"encoder.weight": torch.zeros(2)})


def _unknown_key(tmp_path, state_dict, _):
    extra = {"transformer.layers.9.mlp.extra.weight": np.zeros(2, np.float32)}
    write_sat_checkpoint({**state_dict, **extra}, str(tmp_path / "sat"))
    return tmp_path / "sat"


def _missing_key(tmp_path, state_dict, _):
    dropped = SAT_IMAGE_PREFIX + "qformer.transformer.layers.1.mlp.dense_4h_to_h.bias"
    write_sat_checkpoint({k: v for k, v in state_dict.items() if k != dropped}, str(tmp_path / "sat"))
    return tmp_path / "sat"


BAD_INPUTS = {
    "missing path": (lambda tmp_path, *_: tmp_path / "absent", "--torch_path not found"),
    "text file": (_text_file, "cannot read .*notes.txt as a PyTorch checkpoint"),
    "truncated file": (_truncated_file, "cannot read .*truncated.pt as a PyTorch checkpoint"),
    "no module key": (_no_module_key, "holds no weights.*'module'.*model, iteration"),
    "not visualglm": (_not_visualglm, "not a VisualGLM checkpoint.*encoder.weight"),
    "unknown key": (_unknown_key, "1 unknown key.*transformer.layers.9.mlp.extra.weight"),
    "missing key": (_missing_key,
                    "1 expected key.* missing: .*qformer.transformer.layers.1.mlp.dense_4h_to_h.bias"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(case, state_dict, sat_dir, tmp_path, capsys):
    make_input, message = BAD_INPUTS[case]
    torch_path = make_input(tmp_path, state_dict, sat_dir)
    with pytest.raises(SystemExit) as exit_info:
        convert(torch_path, tmp_path / "out")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # progress lines, then the error
    error = err.splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()  # rejected before any output was opened


def test_checkpoint_of_another_model_size_is_named_as_such(sat_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert(sat_dir, tmp_path / "out", config="run_visualglm_6b_image_to_text_generation.yaml")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "wrong shape (is this checkpoint for another model size?)" in err
    assert "expected (257, 1408), found (17, 48)" in err
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_output_files(sat_dir, tmp_path, monkeypatch):
    """A read error halfway through (after some tensors were written) removes every output."""
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint_atomic({"old": np.ones(2, np.float32)}, str(out / "glm.ckpt"))
    original, calls = torch_checkpoint.to_numpy, []

    def failing(value):
        calls.append(1)
        if len(calls) == 50:
            raise OSError("read error")
        return original(value)

    monkeypatch.setattr(torch_checkpoint, "to_numpy", failing)
    with pytest.raises(OSError, match="read error"):
        convert(sat_dir, out)
    assert os.listdir(out) == ["glm.ckpt"]
    assert list(read_checkpoint(str(out / "glm.ckpt"))) == ["old"]


def test_converter_opens_one_shard_at_a_time_and_writes_as_it_goes(config, state_dict, tmp_path,
                                                                    monkeypatch):
    import torch

    write_hf_checkpoint(hf_from_sat(state_dict, config), str(tmp_path / "hf"), shards=2)
    events, mmap_flags = [], []
    open_shard, write, torch_load = torch_checkpoint.Shard.tensors, CheckpointWriter.write, torch.load

    @contextlib.contextmanager
    def tracked_open(shard):
        events.append(("open", os.path.basename(shard.path)))
        with open_shard(shard) as tensors:
            yield tensors
        events.append(("close", os.path.basename(shard.path)))

    def tracked_write(writer, name, value):
        events.append(("write", name))
        write(writer, name, value)

    def tracked_load(*args, **kwargs):
        mmap_flags.append(kwargs.get("mmap"))
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch_checkpoint.Shard, "tensors", tracked_open)
    monkeypatch.setattr(CheckpointWriter, "write", tracked_write)
    monkeypatch.setattr(torch, "load", tracked_load)
    convert(tmp_path / "hf", tmp_path / "out")

    assert mmap_flags and all(mmap_flags)
    open_now, written_per_shard = None, {}
    for kind, name in events:
        if kind == "open":
            assert open_now is None, f"{name} opened while {open_now} is open"
            open_now = name
        elif kind == "close":
            open_now = None
        else:
            assert open_now is not None, f"{name} written with no shard open"
            written_per_shard[open_now] = written_per_shard.get(open_now, 0) + 1
    assert len(written_per_shard) == 2 and min(written_per_shard.values()) > 0
    assert sum(written_per_shard.values()) == 96


def test_checkpoint_writer_round_trips_through_mindspore(tmp_path):
    rng = np.random.RandomState(0)
    values = {"layer.weight": rng.normal(size=(3, 5)).astype(np.float32),
              "layer.bias": rng.normal(size=(7,)).astype(np.float16),
              "sliced": rng.normal(size=(40, 10)).astype(np.float32),  # 25 slices of 64 bytes
              "steps": np.arange(4, dtype=np.int32).reshape(2, 2)}
    path = str(tmp_path / "out.ckpt")
    with CheckpointWriter(path, slice_bytes=64) as writer:
        for name, value in values.items():
            writer.write(name, value)
    assert (writer.num_tensors, writer.num_elements) == (4, 15 + 7 + 400 + 4)
    loaded = ms.load_checkpoint(path)
    assert list(loaded) == list(values)
    for name, value in values.items():
        assert loaded[name].asnumpy().dtype == value.dtype
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)
    assert os.listdir(tmp_path) == ["out.ckpt"]


def test_checkpoint_writer_leaves_no_half_file_and_keeps_the_old_one(tmp_path):
    path = str(tmp_path / "model.ckpt")
    save_checkpoint_atomic({"old": np.ones(2, np.float32)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        with CheckpointWriter(path) as writer:
            writer.write("new", np.zeros(4, np.float32))
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        with CheckpointWriter(str(tmp_path / "fresh.ckpt")) as writer:
            raise RuntimeError("before any tensor")
    assert os.listdir(tmp_path) == ["model.ckpt"]
    assert list(read_checkpoint(path)) == ["old"]


def test_progress_prints_tenths_off_a_terminal_and_one_line_on_it():
    log = io.StringIO()
    with Progress(40, "converting", unit="tensors", stream=log) as progress:
        for _ in range(40):
            progress.update()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("converting: 4/40 tensors (")
    assert lines[-1].startswith("converting: 40/40 tensors (") and lines[-1].endswith(" s)")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with Progress(3, "reading", stream=terminal) as progress:
        for _ in range(3):
            progress.update()
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")
    assert terminal.getvalue().count("\n") == 1


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "research.visualglm.convert_weight", "--help"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for flag in ("--torch_path", "--vit_mindspore_path", "--qformer_mindspore_path",
                 "--glm_mindspore_path", "--config", "--qkv_layout", "--dtype"):
        assert flag in result.stdout
