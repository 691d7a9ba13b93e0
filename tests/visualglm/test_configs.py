"""The shipped YAMLs against the named presets, and no config field accepted and ignored.

Every YAML in configs/visualglm/ must agree with its preset (`PRESETS` in
configuration_glm.py / configuration_visualglm.py) on every architecture field: shapes, eps,
activation and layout switches, special ids. A run may choose only the fields in RUN_FIELDS:
where the weights are (checkpoint paths), the static graph length and the KV cache
(seq_length, max_decode_length, use_past), decoding defaults, LoRA (pet_config), training
switches (freeze_*, dropout rates) and precision (dtypes).

Every field of the model configs is either read by the code or refuses the values the code does
not implement, with the YAML's file:line in the error; so is every field of the sections outside
model_config (context, parallel, the trainer's sections, train_dataset, the top level).
"""
import dataclasses
import glob
import os
import re

import pytest

from research.common import runtime
from research.common.config import CONFIG_ROOT, REPO_ROOT, ModelConfig, load_config
from research.common.errors import UserInputError
from research.common.lora import LoRAConfig
from research.common.parallel import init_data_parallel
from research.common.qformer import QFormerConfig
from research.common.trainer import TrainingArguments
from research.common.vision import ViTConfig
from research.visualglm import configuration_glm, configuration_visualglm
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.configuration_visualglm import VisualGLMConfig, load_visualglm_config
from research.visualglm.dataset_visualglm import TrainDatasetConfig, build_train_dataset
from research.visualglm.finetune import FINETUNE_FIELDS, finetune

YAML_DIR = os.path.join(CONFIG_ROOT, "visualglm")
YAML_PRESETS = {
    "run_glm_6b_text_generation.yaml": "glm-6b",
    "run_glm_tiny_text_generation.yaml": "glm-tiny",
    "run_visualglm_6b_image_to_text_generation.yaml": "visualglm-6b",
    "run_visualglm_lora.yaml": "visualglm-6b",
    "run_visualglm_tiny_image_to_text_generation.yaml": "visualglm-tiny",
    "run_visualglm_tiny_demo.yaml": "visualglm-tiny-demo",
    "run_visualglm_tiny_finetune.yaml": "visualglm-tiny-demo",
    "run_visualglm_tiny_lora.yaml": "visualglm-tiny-demo",
}
RUN_FIELDS = {
    "checkpoint_name_or_path",
    "seq_length", "max_decode_length", "use_past",
    "do_sample", "top_k", "top_p", "temperature", "repetition_penalty",
    "pet_config",
    "freeze_vision", "freeze_text",
    "embedding_dropout_prob", "attention_dropout_rate", "hidden_dropout_rate",
    "param_init_type", "compute_dtype", "layernorm_compute_type", "softmax_compute_type", "dtype",
}


def architecture(config):
    """{dotted field: value} of every field of `config` and its sub-configs but RUN_FIELDS."""
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, ModelConfig):
            fields.update({f"{field.name}.{k}": v for k, v in architecture(value).items()})
        elif field.name not in RUN_FIELDS:
            fields[field.name] = value
    return fields


def load_model_config(path):
    if YAML_PRESETS[os.path.basename(path)].startswith("glm-"):
        yaml_config = load_config(path)
        return GLMConfig.from_dict(yaml_config.model.model_config, "model.model_config",
                                   yaml_config.source)
    return load_visualglm_config(path)[1]


def preset(name):
    family = configuration_glm if name.startswith("glm-") else configuration_visualglm
    return family.PRESETS[name]()


def test_every_shipped_yaml_has_a_preset():
    shipped = {os.path.basename(path) for path in glob.glob(os.path.join(YAML_DIR, "*.yaml"))}
    assert shipped == set(YAML_PRESETS)


@pytest.mark.parametrize("name", sorted(YAML_PRESETS))
def test_shipped_yaml_agrees_with_its_preset(name):
    ours = architecture(load_model_config(os.path.join(YAML_DIR, name)))
    expected = architecture(preset(YAML_PRESETS[name]))
    differences = {key: (ours[key], value) for key, value in expected.items() if ours[key] != value}
    assert not differences, f"{name} differs from preset {YAML_PRESETS[name]}: {differences}"


def test_architecture_comparison_sees_architecture_fields():
    """The comparison is not vacuous: the two tiny presets differ in their patch size only,
    and an eps (not a run field) counts."""
    tiny, demo = architecture(preset("visualglm-tiny")), architecture(preset("visualglm-tiny-demo"))
    assert {key for key in tiny if tiny[key] != demo[key]} == {"vision_config.patch_size"}
    assert (tiny["vision_config.ln_vision_eps"], tiny["vision_config.layer_norm_eps"]) == (1e-5, 1e-6)
    fields = set()
    for cls in (ViTConfig, QFormerConfig, GLMConfig, VisualGLMConfig):
        fields |= {field.name for field in dataclasses.fields(cls)}
    assert RUN_FIELDS <= fields  # no misspelt run field hides an architecture field


def test_presets_by_name():
    assert VisualGLMConfig.from_name("visualglm-6b") == VisualGLMConfig()
    assert GLMConfig.from_name("glm-6b") == GLMConfig()
    tiny = VisualGLMConfig.from_name("visualglm-tiny")
    assert tiny.text_config.num_layers == 2 and tiny.vision_config.patch_size == 14
    assert tiny is not VisualGLMConfig.from_name("visualglm-tiny")  # fresh, safe to change
    for name, factory in {**configuration_glm.PRESETS, **configuration_visualglm.PRESETS}.items():
        factory().validate()
    with pytest.raises(UserInputError, match="unknown preset 'glm-7b'; known presets: glm-6b, "):
        GLMConfig.from_name("glm-7b")
    with pytest.raises(UserInputError, match="visualglm-6b, visualglm-tiny"):
        VisualGLMConfig.from_name("visualglm")


# ---- every field used, or refused with file:line ------------------------------------------------

TINY_YAML = os.path.join(YAML_DIR, "run_visualglm_tiny_image_to_text_generation.yaml")
SECTIONS = {ViTConfig: "vision_config", QFormerConfig: "qformer_config",
            GLMConfig: "text_config", VisualGLMConfig: None}
# A value the code does not implement, for each field that no code reads.
REFUSED = {
    ViTConfig: {"qkv_bias": False, "hidden_act": "relu", "post_layernorm_residual": True,
                "use_mean_pooling": True, "attention_probs_dropout_prob": 0.1,
                "hidden_dropout_prob": 0.1, "drop_path_rate": 0.1,
                "layernorm_compute_type": "float16"},
    QFormerConfig: {"hidden_act": "relu", "layernorm_compute_type": "float16"},
    GLMConfig: {"layernorm_order": "pre", "use_final_layernorm": False, "activation_func": "relu",
                "position_encoding_2d": False, "layernorm_compute_type": "float16"},
    VisualGLMConfig: {},
    LoRAConfig: {"pet_type": "prefix", "pre_seq_len": 8},
}


def _code_reads(name):
    """True if some module under research/ reads an attribute called `name`."""
    pattern = re.compile(rf"\.{name}\b")
    for path in glob.glob(os.path.join(REPO_ROOT, "research", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as stream:
            if pattern.search(stream.read()):
                return True
    return False


def tiny_yaml_with(tmp_path, section, field, value):
    """The tiny YAML with `field: value` added to model_config (or one of its sections);
    returns (path, line of the field)."""
    with open(TINY_YAML, encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    anchor = f"    {section}:" if section else "  model_config:"
    at = lines.index(anchor) + 1
    indent = " " * (len(anchor) - len(anchor.lstrip()) + 2)
    assert not any(line.startswith(f"{indent}{field}:") for line in lines[at:]), "already set"
    lines.insert(at, f"{indent}{field}: {value}")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path), at + 1


@pytest.mark.parametrize("cls", list(REFUSED), ids=lambda cls: cls.__name__)
def test_every_field_is_read_or_refuses_what_is_not_implemented(cls):
    defaults = cls()
    unread = {field.name for field in dataclasses.fields(cls)
              if not isinstance(getattr(defaults, field.name), ModelConfig)
              and not _code_reads(field.name)}
    assert not unread - set(REFUSED[cls]), "fields nothing reads must refuse other values (REFUSED)"
    for name, value in REFUSED[cls].items():
        with pytest.raises(UserInputError, match=name):
            cls.from_dict({name: value})


@pytest.mark.parametrize("cls, field, value", [
    (cls, field, value) for cls, fields in REFUSED.items() if cls is not LoRAConfig
    for field, value in fields.items()])
def test_refusals_name_the_yaml_file_and_line(tmp_path, cls, field, value):
    path, line = tiny_yaml_with(tmp_path, SECTIONS[cls], field, value)
    with pytest.raises(UserInputError) as error:
        load_visualglm_config(path)
    where = "model.model_config." + (f"{SECTIONS[cls]}." if SECTIONS[cls] else "")
    assert f"{path}:{line}: {where}{field}:" in str(error.value)


@pytest.mark.parametrize("cls, field", [(cls, field) for cls in SECTIONS
                                        for field in cls.UNSUPPORTED_FIELDS])
def test_unsupported_mindformers_fields_are_refused_with_the_reason(tmp_path, cls, field):
    path, line = tiny_yaml_with(tmp_path, SECTIONS[cls], field, 1)
    with pytest.raises(UserInputError) as error:
        load_visualglm_config(path)
    where = "model.model_config." + (f"{SECTIONS[cls]}." if SECTIONS[cls] else "")
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: {where}{field}: not supported by {cls.__name__}: ")
    assert "remove the field" in message


@pytest.mark.parametrize("field", ["embedding_dropout_prob", "attention_dropout_rate",
                                   "hidden_dropout_rate"])
def test_glm_dropout_is_accepted_for_training_and_checked(tmp_path, field):
    path, _ = tiny_yaml_with(tmp_path, "text_config", field, 0.1)
    assert getattr(load_visualglm_config(path)[1].text_config, field) == 0.1
    path, line = tiny_yaml_with(tmp_path, "text_config", field, 1.5)
    with pytest.raises(UserInputError, match=re.escape(
            f"{path}:{line}: model.model_config.text_config.{field}: must be in [0, 1), got 1.5")):
        load_visualglm_config(path)


def test_ln_vision_eps_is_read_from_the_yaml(tmp_path):
    assert load_visualglm_config(TINY_YAML)[1].vision_config.ln_vision_eps == 1e-5
    with open(TINY_YAML, encoding="utf-8") as stream:
        text = stream.read()
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("ln_vision_eps: 1.0e-5", "ln_vision_eps: 1.0e-6"), "utf-8")
    vision = load_visualglm_config(str(path))[1].vision_config
    assert (vision.ln_vision_eps, vision.layer_norm_eps) == (1e-6, 1e-6)


# ---- the sections outside model_config --------------------------------------------------------

LORA_YAML = os.path.join(YAML_DIR, "run_visualglm_lora.yaml")
TINY_FINETUNE_YAML = os.path.join(YAML_DIR, "run_visualglm_tiny_finetune.yaml")
TRAINING_YAMLS = {"run_visualglm_lora.yaml", "run_visualglm_tiny_finetune.yaml",
                  "run_visualglm_tiny_lora.yaml"}
PREDICTION_FIELDS = {"seed", "context", "model", "processor"}


def yaml_with(tmp_path, base, field_path, value):
    """`base` with `field_path: value`, its line replaced or added first in its section;
    returns (path, line of the field)."""
    with open(base, encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    index = load_config(base).source.lines
    keys = tuple(field_path.split("."))
    if keys in index:
        at = index[keys] - 1
        lines[at] = lines[at][:len(lines[at]) - len(lines[at].lstrip())] + f"{keys[-1]}: {value}"
    else:
        at = index[keys[:-1]] if len(keys) > 1 else 0
        lines.insert(at, "  " * (len(keys) - 1) + f"{keys[-1]}: {value}")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path), at + 1


def yaml_replacing(tmp_path, base, old, new):
    """`base` with the text `old` replaced by `new` (once)."""
    with open(base, encoding="utf-8") as stream:
        text = stream.read()
    assert text.count(old) == 1, old
    path = tmp_path / "config.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return str(path)


@pytest.fixture
def ascend(monkeypatch):
    """init_context as on an Ascend machine, recording the devices it sets (and leaving
    MindSpore's mode and seed alone)."""
    devices = []
    monkeypatch.setattr(runtime, "device_target", lambda: "Ascend")
    monkeypatch.setattr(runtime.ms, "set_device", lambda *args: devices.append(args))
    monkeypatch.setattr(runtime.ms, "set_context", lambda **kwargs: None)
    monkeypatch.setattr(runtime.ms, "set_seed", lambda seed: None)
    monkeypatch.delenv("DEVICE_ID", raising=False)
    return devices


def refused(read, path, line, field, reason):
    with pytest.raises(UserInputError) as error:
        read(load_config(path))
    assert str(error.value).startswith(f"{path}:{line}: {field}: {reason}"), str(error.value)


@pytest.mark.parametrize("name", sorted(YAML_PRESETS))
def test_shipped_yamls_carry_only_fields_their_runs_read(name, ascend):
    config = load_config(os.path.join(YAML_DIR, name))
    runtime.init_context(config)
    if name in TRAINING_YAMLS:
        init_data_parallel(config)
        TrainingArguments.from_yaml(config)
        TrainDatasetConfig.from_dict(config.train_dataset, "train_dataset", config.source)
        assert set(config) - {"source"} <= set(FINETUNE_FIELDS)
    else:  # no run_mode, output_dir or runner_config: nothing reads them when answering
        assert set(config) - {"source"} <= PREDICTION_FIELDS


def test_context_device_id_is_the_default_device(tmp_path, ascend, monkeypatch):
    path, _ = yaml_with(tmp_path, TINY_YAML, "context.device_id", 3)
    runtime.init_context(load_config(path))
    runtime.init_context(load_config(path), 5)  # --device_id wins, as in MindFormers' scripts
    monkeypatch.setenv("DEVICE_ID", "6")
    runtime.init_context(load_config(path))  # the YAML wins over DEVICE_ID (build_context)
    runtime.init_context(load_config(TINY_FINETUNE_YAML))  # no context.device_id
    assert ascend == [("Ascend", 3), ("Ascend", 5), ("Ascend", 3), ("Ascend", 6)]


def test_mindformers_context_settings_reach_mindspore_after_the_device(tmp_path, monkeypatch, capsys):
    """MindFormers' YAML context fields are handed to MindSpore (as its build_context does), once the
    device is set, so that max_device_memory caps the NPU's memory; run_mode is said, not obeyed."""
    calls = []
    monkeypatch.setattr(runtime, "device_target", lambda: "Ascend")
    monkeypatch.setattr(runtime.ms, "set_device", lambda *args: calls.append(("set_device",) + args))
    monkeypatch.setattr(runtime.ms, "set_context", lambda **kwargs: calls.append(("set_context", kwargs)))
    monkeypatch.setattr(runtime.ms, "set_seed", lambda seed: None)
    path, _ = yaml_with(tmp_path, TINY_YAML, "context.max_device_memory", "'59GB'")
    path, _ = yaml_with(tmp_path, path, "context.max_call_depth", 10000)
    path, line = yaml_with(tmp_path, path, "run_mode", "'train'")
    runtime.init_context(load_config(path))
    assert calls == [("set_context", {"mode": runtime.ms.GRAPH_MODE}), ("set_device", "Ascend", 0),
                     ("set_context", {"max_device_memory": "59GB", "max_call_depth": 10000})]
    assert f"{path}:{line}: run_mode is 'train';" in capsys.readouterr().err
    runtime.init_context(load_config(path), tasks=("finetune", "train"))
    assert "run_mode" not in capsys.readouterr().err


@pytest.mark.parametrize("base, field, value, reason", [
    (TINY_YAML, "run_mode", "'serve'", "must be one of ['train', 'finetune', 'eval', 'predict', 'export']"),
    (TINY_YAML, "context.max_device_memory", "'58'", "must be a size such as '30GB', got '58'"),
    (TINY_YAML, "context.enable_graph_kernel_x", "False", "unknown field(s) ['enable_graph_kernel_x']"),
    (TINY_YAML, "context.mode", 2, "must be 0 (GRAPH) or 1 (PYNATIVE), got 2"),
])
def test_context_refusals(tmp_path, ascend, base, field, value, reason):
    path, line = yaml_with(tmp_path, base, field, value)
    refused(runtime.init_context, path, line, field, reason)
    assert not ascend


def test_context_device_id_is_refused_where_the_launcher_sets_the_device(tmp_path, ascend):
    parallel = yaml_replacing(tmp_path, TINY_FINETUNE_YAML, "use_parallel: False", "use_parallel: True")
    runtime.init_context(load_config(parallel))
    path, line = yaml_with(tmp_path, parallel, "context.device_id", 1)
    refused(runtime.init_context, path, line, "context.device_id",
            "with use_parallel: True each process takes its device from the launcher")


@pytest.mark.parametrize("field, value, reason", [
    ("parallel.parallel_mode", 1, "only 0 is implemented (data parallel"),
    ("parallel.gradients_mean", False, "only True is implemented (the gradients are averaged"),
    ("parallel.full_batch", True, "only False is implemented (each process reads only its share"),
    ("parallel.enable_parallel_optimizer", True, "unknown field(s)"),
    ("parallel_config.model_parallel", 2, "must be 1, got 2: only data parallelism is implemented"),
    ("parallel_config.pipeline_stage", 2, "must be 1, got 2: only data parallelism is implemented"),
    ("parallel_config.micro_batch_num", 4, "must be 1, got 4: only data parallelism is implemented"),
    ("parallel_config.vocab_emb_dp", True, "unknown field(s) ['vocab_emb_dp']"),
    ("parallel_config.data_parallel", 8, "8 but use_parallel is False (one process)"),
    ("use_parallel", "'yes'", "must be True or False"),
])
def test_parallel_refusals(tmp_path, field, value, reason):
    path, line = yaml_with(tmp_path, LORA_YAML, field, value)
    refused(init_data_parallel, path, line, field, reason)


@pytest.mark.parametrize("field, value, reason", [
    ("runner_config.sink_mode", True, "only False is implemented"),
    ("runner_config.sink_size", 2, "not implemented by the trainer (it reads runner_config: batch_size, "
                                   "epochs, sink_mode)"),
    ("runner_wrapper.type", "MFPipelineWithLossScaleCell", "only 'MFTrainOneStepCell' is implemented"),
    ("runner_wrapper.local_norm", True, "not implemented by the trainer"),
    ("runner_wrapper.scale_sense.type", "AdaptiveLossScaleUpdateCell",
     "'AdaptiveLossScaleUpdateCell' is not implemented; use DynamicLossScaleUpdateCell or "
     "FixedLossScaleUpdateCell"),
    ("optimizer.learning_rate", 0.001, "not implemented by the trainer (it reads optimizer: beta1, "
                                       "beta2, eps, weight_decay)"),
    ("train_dataset.drop_remainder", False, "only True is implemented (the compiled step has static"),
    ("train_dataset.batch_size", 3, "3 differs from runner_config.batch_size (4)"),
    ("load_checkpoint", "'/path/to/visualglm.ckpt'", "only '' is implemented (the weights come from"),
    ("resume_training", True, "only False is implemented (a run continues with --resume)"),
    ("lr_scale", True, "only False is implemented"),
    ("lr_scale_factor", 256, "not supported: it scales the learning rate only with lr_scale: True"),
    ("train_dataset_task", "{type: VisualGLMDataset}", "not supported: MindFormers builds its dataset"),
    ("lr_schedule.learning_rate", "2e-2", "expected a number, got '2e-2' (str); write floats with a dot"),
    ("lr_schedule.warmup_steps", "True", "expected a number, got True (bool)"),
])
def test_trainer_refusals(tmp_path, field, value, reason):
    path, line = yaml_with(tmp_path, LORA_YAML, field, value)
    refused(TrainingArguments.from_yaml, path, line, field, reason)


@pytest.mark.parametrize("old, new, field, reason", [
    ("callbacks:\n", "callbacks:\n  - type: MFLossMonitor\n", "callbacks.MFLossMonitor",
     "not supported: the loss is always reported"),
    ("save_network_params: False", "save_network_params: True",
     "callbacks.CheckpointMonitor.save_network_params", "only False is implemented"),
    ("save_trainable_params: True", "save_trainable_params: False",
     "callbacks.CheckpointMonitor.save_trainable_params", "only True is implemented"),
    ("save_trainable_params: True", "save_trainable_params: True\n    integrated_save: True",
     "callbacks.CheckpointMonitor.integrated_save", "not implemented by the trainer"),
    ("    scale_factor: 2\n", "    scale_factor: 2\n    scale_min: 1\n", "runner_wrapper.scale_sense.scale_min",
     "not a field of DynamicLossScaleUpdateCell"),
])
def test_callback_and_loss_scale_refusals(tmp_path, old, new, field, reason):
    """List entries have no line of their own in the index: the error points at `callbacks:`."""
    path = yaml_replacing(tmp_path, LORA_YAML, old, new)
    keys = tuple(field.split("."))[:1 if field.startswith("callbacks") else 3]
    line = load_config(path).source.lines[keys]
    refused(TrainingArguments.from_yaml, path, line, field, reason)


def test_fixed_loss_scale_is_honoured(tmp_path):
    dynamic = TrainingArguments.from_yaml(load_config(LORA_YAML))
    assert (dynamic.loss_scale_value, dynamic.scale_factor, dynamic.scale_window) == (65536.0, 2.0, 400)
    fixed = yaml_replacing(tmp_path, LORA_YAML, "type: DynamicLossScaleUpdateCell\n"
                           "    loss_scale_value: 65536\n    scale_factor: 2\n    scale_window: 400",
                           "type: FixedLossScaleUpdateCell\n    loss_scale_value: 1024")
    args = TrainingArguments.from_yaml(load_config(fixed))
    assert (args.loss_scale_value, args.scale_factor) == (1024.0, 1.0)
    fixed = yaml_replacing(tmp_path, LORA_YAML, "type: DynamicLossScaleUpdateCell",
                           "type: FixedLossScaleUpdateCell")
    line = load_config(fixed).source.lines[("runner_wrapper", "scale_sense", "scale_factor")]
    refused(TrainingArguments.from_yaml, fixed, line, "runner_wrapper.scale_sense.scale_factor",
            "not a field of FixedLossScaleUpdateCell (its fields: loss_scale_value)")


@pytest.mark.parametrize("field, value, reason", [
    ("train_dataset.tokenizer", "{type: ChatGLMTokenizer}",
     "not supported by TrainDatasetConfig: samples are built with processor.tokenizer"),
    ("train_dataset.input_columns", "[image, input_ids, labels, position_id, attention_mask]",
     "not supported by TrainDatasetConfig: the columns are the model's inputs"),
    ("train_dataset.num_parallel_workers", 8, "unknown field(s) ['num_parallel_workers']"),
])
def test_train_dataset_refusals(tmp_path, field, value, reason):
    path, line = yaml_with(tmp_path, LORA_YAML, field, value)
    refused(lambda config: build_train_dataset(config, None, None), path, line, field, reason)


def test_fine_tuning_refuses_top_level_fields_it_does_not_read(tmp_path, ascend):
    path, line = yaml_with(tmp_path, LORA_YAML, "eval_dataset", "{batch_size: 1}")
    refused(lambda config: finetune(config.source.path), path, line, "eval_dataset",
            "not read by fine-tuning; remove the field")
