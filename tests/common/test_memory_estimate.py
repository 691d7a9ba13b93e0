"""The memory check (research/common/memory.py): estimates against independent numbers, and
the oversized configs of issue #12 item 4 refused in one line before anything is allocated."""
import os
import resource
import subprocess
import sys

import pytest

from research.common import memory
from research.common.config import REPO_ROOT
from research.common.errors import UserInputError
from research.visualglm import finetune, inference, run_glm, run_visualglm_finetune, synthetic_data
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.configuration_visualglm import VisualGLMConfig, load_visualglm_config
from research.visualglm.modeling_glm import GLMForConditionalGeneration
from research.visualglm.modeling_visualglm import VisualGLMImageToTextGeneration
from tests.config_files import write_yaml

MiB, GiB = 1024 ** 2, 1024 ** 3
CONFIGS = os.path.join(REPO_ROOT, "configs", "visualglm")
TINY_VISUALGLM = os.path.join(CONFIGS, "run_visualglm_tiny_image_to_text_generation.yaml")
TINY_GLM = os.path.join(CONFIGS, "run_glm_tiny_text_generation.yaml")
TINY_FINETUNE = os.path.join(CONFIGS, "run_visualglm_tiny_finetune.yaml")
# ChatGLM-6B's published parameter count counts the tied word embedding once; this port keeps
# lm_head as its own [vocab, hidden] matrix.
CHATGLM_6B_PARAMETERS = 6_173_286_400
GLM_6B_LM_HEAD = 130_528 * 4_096
# The children run under this address-space limit: the refusal must not depend on how much
# memory the test machine has, and a broken check fails fast instead of exhausting it.
CHILD_ADDRESS_SPACE = 16 * GiB
# A bare import of the scripts peaks near 0.76 GiB of RSS here; building the glm_proj of the
# hidden_size case alone would add 1.2 GiB.
CHILD_MAX_RSS = 1.5 * GiB


def parameter_bytes(cell):
    return sum(param.data.nbytes for param in cell.get_parameters())


def test_parameter_bytes_match_the_built_models():
    """Counted from shapes, extrapolated over the layers, equal to what MindSpore allocates:
    3 GLM layers, and a Q-Former of 5 layers with cross-attention in every second one."""
    glm = GLMConfig.from_name("glm-tiny")
    glm.num_layers = 3
    assert glm.parameter_bytes() == parameter_bytes(GLMForConditionalGeneration(glm))
    config = VisualGLMConfig.from_name("visualglm-tiny")
    config.qformer_config.num_hidden_layers = 5
    config.vision_config.num_hidden_layers = 3
    built = VisualGLMImageToTextGeneration(config)
    assert config.memory_estimate().parameters == parameter_bytes(built)


def test_glm_6b_in_float16():
    glm = GLMConfig.from_name("glm-6b")
    glm.param_init_type = glm.compute_dtype = "float16"
    glm.use_past = True
    assert glm.parameter_bytes() == 2 * (CHATGLM_6B_PARAMETERS + GLM_6B_LM_HEAD)
    # 512 slots (seq_length) of keys and values: 2 x 28 layers x 4096 float16 per token
    assert glm.memory_estimate().kv_cache == 512 * 2 * 28 * 4096 * 2


def test_tiny_presets_need_little_and_the_6b_fits_a_big_machine(monkeypatch):
    for tiny in (GLMConfig.from_name("glm-tiny"), VisualGLMConfig.from_name("visualglm-tiny")):
        assert tiny.memory_estimate(batch_size=8).total < 16 * MiB
    demo = VisualGLMConfig.from_name("visualglm-tiny-demo")
    demo.freeze_vision = demo.freeze_text = False
    assert demo.memory_estimate(batch_size=16, training_length=80).total < 32 * MiB
    # VisualGLM-6B as configs/visualglm runs it: float16 GLM, float32 ViT and Q-Former
    _, config = load_visualglm_config("run_visualglm_6b_image_to_text_generation.yaml")
    needed = config.memory_estimate().total
    assert 15 * GiB < needed < 20 * GiB
    monkeypatch.setattr(memory, "available_memory", lambda: 24 * GiB)
    memory.check_memory(config.memory_estimate(), "6b.yaml")


def test_training_adds_gradients_and_two_moments_of_the_trainable_parameters():
    config = VisualGLMConfig.from_name("visualglm-tiny")
    frozen = config.memory_estimate(batch_size=2, training_length=64)
    config.freeze_text = False
    unfrozen = config.memory_estimate(batch_size=2, training_length=64)
    assert unfrozen.optimizer - frozen.optimizer == 3 * config.text_config.parameter_bytes()
    config.text_config.pet_config = {"pet_type": "lora"}
    assert config.memory_estimate(batch_size=2, training_length=64).optimizer == 0


def test_huge_seq_length_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 21 * GiB)
    config = VisualGLMConfig.from_name("visualglm-tiny")
    config.text_config.seq_length = 10 ** 9
    config.text_config.use_past = True  # as the YAML: the cache takes max_decode_length slots
    with pytest.raises(UserInputError) as refused:
        memory.check_memory(config.memory_estimate(), "run_x.yaml")
    message = str(refused.value)
    # cos and sin: 10^9 positions x 8 float32 columns each
    assert message.startswith("run_x.yaml: model_config needs about 59.6 GiB (")
    assert "position tables 59.6 GiB" in message
    assert "but only 21.0 GiB is available; lower seq_length" in message
    assert "\n" not in message


def never_built(*args, **kwargs):
    raise AssertionError("the model was built before the memory check")


def test_glm_loader_checks_before_building(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    monkeypatch.setattr(inference, "build_registered", never_built)
    with pytest.raises(SystemExit) as stopped:
        run_glm.main(["--config", TINY_GLM, "--seq_length", "32"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {TINY_GLM}: model_config needs about ")


def test_finetune_checks_before_building(tmp_path, monkeypatch, capsys):
    synthetic_data.make_synthetic_dataset(str(tmp_path / "data"), 4, test_count=1)
    config = write_yaml(tmp_path / "finetune.yaml", TINY_FINETUNE, {
        "output_dir": str(tmp_path / "output"),
        "train_dataset.data_loader.dataset_dir": str(tmp_path / "data" / "dataset.json"),
        "processor.tokenizer.vocab_file": os.path.join(REPO_ROOT, "examples/tiny/ice_text.model")})
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    monkeypatch.setattr(finetune, "VisualGLMImageToTextGeneration", never_built)
    with pytest.raises(SystemExit) as stopped:
        run_visualglm_finetune.main(["--config", config, "--batch_size", "2"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {config}: model_config needs about ")
    assert "optimizer" in error  # full fine-tuning: the training estimate


# Runs run_visualglm's main as `python -m research.visualglm.run_visualglm` does, timing what
# follows the imports (MindSpore + MindFormers alone take 8-30 s on a loaded 2-core machine).
CHILD = """
import sys, time
from research.visualglm import run_visualglm
start = time.perf_counter()
try:
    run_visualglm.main(sys.argv[1:])
finally:
    print(f"seconds after import: {time.perf_counter() - start:.2f}")
"""


TEXT = "model.model_config.text_config."


@pytest.mark.parametrize("changes, flags, needed", [
    ({TEXT + "seq_length": 10 ** 9}, [], "position tables 59.6 GiB"),
    ({}, ["--seq_length", str(10 ** 9)], "position tables 59.6 GiB"),
    ({TEXT + "num_layers": 100_000}, [], "parameters 18.6 GiB"),
    ({TEXT + "hidden_size": 10 ** 7}, [], "parameters 2.8 PiB"),
], ids=["seq_length-yaml", "seq_length-flag", "num_layers", "hidden_size"])
def test_oversized_configs_end_in_one_line_without_allocating(tmp_path, changes, flags, needed):
    config = write_yaml(tmp_path / "oversized.yaml", TINY_VISUALGLM, changes)

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))

    with open(tmp_path / "stdout", "wb") as stdout, open(tmp_path / "stderr", "wb") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, "--config", config, *flags],
                                 cwd=REPO_ROOT, stdout=stdout, stderr=stderr,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 preexec_fn=limit_address_space)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    out = (tmp_path / "stdout").read_text(encoding="utf-8")
    err = (tmp_path / "stderr").read_text(encoding="utf-8")
    assert child.returncode == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {config}: model_config needs about ")
    assert needed in lines[0]
    assert "lower seq_length / num_layers / hidden_size / batch_size" in lines[0]
    seconds = float(out.rsplit("seconds after import: ", 1)[1])
    assert seconds < 10, out
    assert usage.ru_maxrss * 1024 < CHILD_MAX_RSS  # Linux reports KiB


LAYER_OBJECTS_PROBE = """
import os
from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration

def resident():
    with open("/proc/self/statm", encoding="ascii") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

config = ChatGLM2Config.from_name("tiny")
config.num_layers = 400
before = resident()
model = ChatGLM2ForConditionalGeneration(config)
print(resident() - before, config.parameter_count() * 4)
"""


def test_layer_objects_are_counted_below_what_building_them_takes():
    """Deep and narrow configs are refused too: 100000 tiny ChatGLM2 layers hold 4.3 GiB of
    parameters but about 9 GiB of cell and parameter objects, which LAYER_OBJECT_BYTES bounds
    from below (measured on 400 layers in a fresh process, whose heap has nothing to reuse)."""
    done = subprocess.run([sys.executable, "-c", LAYER_OBJECTS_PROBE], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
    grown, parameter_bytes = map(int, done.stdout.split()[-2:])
    assert grown - parameter_bytes >= 400 * memory.LAYER_OBJECT_BYTES, (grown, parameter_bytes)
    from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
    config = ChatGLM2Config.from_name("tiny")
    config.num_layers = 400
    assert config.memory_estimate().layer_objects == 400 * memory.LAYER_OBJECT_BYTES
