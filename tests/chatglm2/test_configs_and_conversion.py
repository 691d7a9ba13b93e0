"""ChatGLM2 configs (YAMLs against presets, parameter count, registry names) and the converter's
bad inputs: quantized, foreign and mis-shaped checkpoints are refused with exit code 2 and
nothing written; MindFormers r1.0 checkpoints (`embedding_table`) convert."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.chatglm2 import convert_weight
from research.chatglm2.configuration_chatglm2 import PRESETS, ChatGLM2Config, load_chatglm2_config
from research.chatglm2.convert_chatglm2 import chatglm2_rows
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration, parameter_shapes
from research.common.checkpoint import read_checkpoint
from research.common.config import CONFIG_ROOT
from research.common.convert import save_checkpoint_atomic
from research.common.errors import UserInputError
from tests.config_files import write_yaml

YAML_PRESETS = {"run_glm2_6b.yaml": "6b", "run_glm2_tiny.yaml": "tiny",
                **{f"run_glm2_{size}_{method}.yaml": size for size in ("6b", "tiny")
                   for method in ("ptuning2", "lora", "finetune")},
                **{f"run_glm2_tiny_demo_{stage}.yaml": "tiny_demo" for stage in ("base", "ptuning2", "lora")}}
# What a YAML may choose per run; every other field must equal its preset.
RUN_FIELDS = {"seq_length", "max_decode_length", "use_past", "do_sample", "top_k", "top_p", "temperature",
              "repetition_penalty", "checkpoint_name_or_path", "pre_seq_len", "hidden_dropout",
              "attention_dropout", "param_init_type", "compute_dtype", "prefix_projection", "prefix_dropout",
              "pet_config"}
TINY = os.path.join(CONFIG_ROOT, "chatglm2", "run_glm2_tiny.yaml")


def test_every_yaml_is_listed():
    assert sorted(os.listdir(os.path.join(CONFIG_ROOT, "chatglm2"))) == sorted(YAML_PRESETS)


@pytest.mark.parametrize("name", sorted(YAML_PRESETS))
def test_yaml_matches_its_preset(name):
    _, config = load_chatglm2_config(name)
    expected = PRESETS[YAML_PRESETS[name]]()
    differ = {f.name for f in dataclasses.fields(config)
              if getattr(config, f.name) != getattr(expected, f.name)}
    assert differ <= RUN_FIELDS, differ - RUN_FIELDS


def test_tiny_yaml_is_the_tiny_preset_exactly():
    assert load_chatglm2_config("run_glm2_tiny")[1] == ChatGLM2Config.from_name("tiny")


def test_6b_preset_counts_6243584000_parameters_from_shapes():
    config = ChatGLM2Config.from_name("6b")
    assert config.parameter_count() == 6_243_584_000
    # the 6B table and the model's parameter names agree (checked on the tiny model, allocated)
    tiny = ChatGLM2Config.from_name("tiny")
    model = ChatGLM2ForConditionalGeneration(tiny)
    assert {p.name: tuple(p.shape) for p in model.get_parameters()} == parameter_shapes(tiny)
    assert {row.target for row in chatglm2_rows(tiny)} == set(parameter_shapes(tiny))


def test_classes_are_registered_without_replacing_mindformers_own():
    config_cls = MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "ResearchChatGLM2Config")
    model_cls = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "ResearchChatGLM2ForConditionalGeneration")
    assert (config_cls, model_cls) == (ChatGLM2Config, ChatGLM2ForConditionalGeneration)
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "ChatGLM2Config").__module__.startswith("mindformers")
    assert MindFormerRegister.get_cls(
        MindFormerModuleType.MODELS, "ChatGLM2ForConditionalGeneration").__module__.startswith("mindformers")


@pytest.mark.parametrize("field, value, message", [
    ("quantization_bit", 4, "int4/int8"),
    ("pre_seq_len", -1, "must be >= 0"),
    ("pet_config", {"pet_type": "ptuning2", "pre_seq_len": 4, "prefix_projection": True, "projection_dim": 128},
     "projection_dim 128: upstream's prefix projection is hidden_size"),
    ("rmsnorm", False, "expected Literal"),
    ("num_layers", "28", "expected int"),
    ("batch_size", 0, "must be positive"),
    ("multi_query_group_num", 3, "not divisible"),
])
def test_bad_yaml_fields_are_refused_with_file_and_line(tmp_path, field, value, message):
    path = write_yaml(tmp_path / "bad.yaml", TINY, {f"model.model_config.{field}": value})
    with pytest.raises(UserInputError, match=message) as err:
        load_chatglm2_config(path)
    assert str(err.value).startswith(f"{path}:")


def test_mindformers_type_names_read_too(tmp_path):
    path = write_yaml(tmp_path / "mf.yaml", TINY, {"model.model_config.type": "ChatGLM2Config"})
    assert load_chatglm2_config(path)[1] == ChatGLM2Config.from_name("tiny")


def test_mindformers_ptuning2_pet_config_sets_the_prefix(tmp_path):
    """MindFormers r1.0 run_glm2_6b_ptuning2.yaml's pet_config (projection off: projection_dim unused)."""
    pet = {"pet_type": "ptuning2", "pre_seq_len": 128, "prefix_projection": False, "projection_dim": 128,
           "dropout_prob": 0.0}
    path = write_yaml(tmp_path / "mf.yaml", TINY, {"model.model_config.pet_config": pet,
                                                   "model.model_config.pre_seq_len": 0})
    config = load_chatglm2_config(path)[1]
    assert (config.pre_seq_len, config.prefix_projection, config.prefix_dropout, config.pet_config) == (
        128, False, 0.0, None)


def test_mindformers_batch_size_is_the_default_batch(tmp_path):
    """MindFormers' glm2 YAMLs set model_config.batch_size; it is the scripts' default --batch_size."""
    path = write_yaml(tmp_path / "mf.yaml", TINY, {"model.model_config.batch_size": 8})
    assert load_chatglm2_config(path)[1].batch_size == 8


# --- the converter -------------------------------------------------------------------------

def tiny_hf_state_dict(config, seed=0):
    rng = np.random.RandomState(seed)
    state = {row.source: torch.tensor(rng.normal(0, 0.1, row.shape).astype(np.float32))
             for row in chatglm2_rows(config)}
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(config.kv_channels // 4)
    return state


@pytest.fixture(scope="module")
def config():
    return ChatGLM2Config.from_name("tiny")


def run_cli(source, output, config_name="run_glm2_tiny.yaml"):
    return convert_weight.main(["--torch_path", str(source), "--mindspore_path", str(output),
                                "--config", config_name])


def refused(capsys, source, output):
    """The CLI's one-line error for `source`; exit code 2 and nothing written beside `output`."""
    before = sorted(os.listdir(os.path.dirname(output)))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(source, output)
    assert exit_info.value.code == 2
    assert sorted(os.listdir(os.path.dirname(output))) == before
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("reading shapes")]
    assert len(errors) == 1 and errors[0].startswith("error: ")  # one line, no traceback
    return errors[0]


def test_safetensors_shard_converts(tmp_path, config):
    from safetensors.torch import save_file

    state = tiny_hf_state_dict(config)
    save_file(state, str(tmp_path / "model.safetensors"))
    out = tmp_path / "out" / "glm2.ckpt"
    run_cli(tmp_path, out)
    params = read_checkpoint(str(out))
    np.testing.assert_array_equal(params["transformer.embedding.embedding_weight"],
                                  state["transformer.embedding.word_embeddings.weight"].numpy())
    assert "transformer.rotary_pos_emb.inv_freq" not in params


def test_mindformers_r10_checkpoint_with_embedding_table_converts(tmp_path, config):
    state = {k: v.numpy() for k, v in tiny_hf_state_dict(config, seed=1).items() if "inv_freq" not in k}
    state["transformer.embedding.embedding_table"] = state.pop("transformer.embedding.word_embeddings.weight")
    source = tmp_path / "glm2_r10.ckpt"
    save_checkpoint_atomic(state, str(source))
    out = tmp_path / "out" / "glm2.ckpt"
    run_cli(source, out)
    params = read_checkpoint(str(out))
    assert set(params) == set(parameter_shapes(config))
    np.testing.assert_array_equal(params["transformer.embedding.embedding_weight"],
                                  state["transformer.embedding.embedding_table"])


def test_int4_checkpoint_is_refused(tmp_path, capsys, config):
    state = tiny_hf_state_dict(config)
    for key in [k for k in state if "dense_h_to_4h" in k]:
        rows = state[key].shape[0]
        state[key] = torch.zeros(rows, config.hidden_size // 2, dtype=torch.int8)
        state[key.replace("weight", "weight_scale")] = torch.ones(rows, dtype=torch.float16)
    torch.save(state, tmp_path / "pytorch_model.bin")
    error = refused(capsys, tmp_path, tmp_path / "out.ckpt")
    assert "quantized (int4/int8)" in error and "weight_scale" in error


def test_int4_config_json_is_refused(tmp_path, capsys, config):
    torch.save(tiny_hf_state_dict(config), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "quantization_bit": 4}))
    error = refused(capsys, tmp_path, tmp_path / "out.ckpt")
    assert "quantization_bit 4" in error


def test_visualglm_glm_checkpoints_are_refused(tmp_path, capsys):
    """Both forms: HF ChatGLM-6B / visualglm-6b torch keys and our converted GLM .ckpt."""
    glm_keys = {"transformer.word_embeddings.weight": (320, 64),
                "transformer.layers.0.attention.query_key_value.weight": (192, 64),
                "lm_head.weight": (320, 64)}
    torch.save({k: torch.zeros(s) for k, s in glm_keys.items()}, tmp_path / "pytorch_model.bin")
    assert "ChatGLM-6B" in refused(capsys, tmp_path, tmp_path / "out.ckpt")
    ckpt = tmp_path / "glm.ckpt"
    save_checkpoint_atomic({"transformer.word_embeddings.embedding_table": np.zeros((320, 64), np.float32),
                            "transformer.layers.0.input_layernorm.gamma": np.ones(64, np.float32)}, str(ckpt))
    assert "ChatGLM-6B" in refused(capsys, ckpt, tmp_path / "out2.ckpt")


def test_unknown_missing_and_misshaped_keys_are_listed(tmp_path, capsys, config):
    state = tiny_hf_state_dict(config)
    state["transformer.encoder.layers.0.mlp.extra.weight"] = torch.zeros(2)
    del state["transformer.encoder.layers.1.self_attention.dense.weight"]
    state["transformer.output_layer.weight"] = torch.zeros(10, config.hidden_size)
    torch.save(state, tmp_path / "pytorch_model.bin")
    error = refused(capsys, tmp_path, tmp_path / "out.ckpt")
    for name in ("mlp.extra.weight", "layers.1.self_attention.dense.weight", "output_layer.weight"):
        assert name in error
