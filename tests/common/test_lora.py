"""LoRA on the GLM of VisualGLM: selection, only LoRA trains and is saved, merge = unmerged."""
import glob
import os

import numpy as np
import mindspore as ms
import pytest
import yaml
from mindspore import Tensor

from research.common.checkpoint import read_checkpoint
from research.common.errors import UserInputError
from research.common.lora import (LoRAConfig, apply_lora, freeze_all_but_lora, is_lora_parameter,
                                  load_lora_checkpoint, merge_lora)
from research.common.config import REPO_ROOT
from research.visualglm import run_visualglm_finetune, run_visualglm_with_lora, synthetic_data
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.modeling_glm import GLMForConditionalGeneration, glm_positions_and_mask
from research.visualglm.modeling_visualglm import GLM_LORA_TARGETS, VisualGLMImageToTextGeneration

LORA_YAML = os.path.join(REPO_ROOT, "configs", "visualglm", "run_visualglm_tiny_lora.yaml")


def tiny_glm():
    config = load_visualglm_config("run_visualglm_tiny_image_to_text_generation.yaml")[1].text_config
    return config, GLMForConditionalGeneration(config)


def logits(model, config):
    ids = np.array([[20, 21, 22, 23, 24, config.gmask_token_id, config.bos_token_id, 30]], np.int32)
    positions, mask = glm_positions_and_mask(ids, [0], config)
    return model(Tensor(ids), Tensor(positions), Tensor(mask))[0].asnumpy()


def test_layer_range_targets_and_exclusions():
    _, model = tiny_glm()
    adapted = apply_lora(model, LoRAConfig(lora_rank=4, lora_alpha=8, layer_range=[1]), GLM_LORA_TARGETS)
    assert adapted == ["transformer.layers.1.attention.query_key_value",
                       "transformer.layers.1.attention.dense"]
    _, model = tiny_glm()
    everything = LoRAConfig(lora_rank=4, lora_alpha=8, target_modules=r"dense", exclude_layers=["mlp"])
    assert all("mlp" not in name for name in apply_lora(model, everything, GLM_LORA_TARGETS))
    with pytest.raises(UserInputError, match="selects no layer"):
        apply_lora(tiny_glm()[1], LoRAConfig(layer_range=[7]), GLM_LORA_TARGETS)


def test_fresh_lora_is_the_base_model_and_merge_keeps_the_logits():
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the same cells run before and after merging
    try:
        config, model = tiny_glm()
        base = logits(model, config)
        apply_lora(model, LoRAConfig(lora_rank=4, lora_alpha=8, layer_range=[0, 1]), GLM_LORA_TARGETS)
        # B starts at zero; only the summation order differs (SkinnyDense vs LoRADense)
        np.testing.assert_allclose(logits(model, config), base, atol=1e-6, rtol=0)
        rng = np.random.RandomState(0)
        for param in freeze_all_but_lora(model):
            param.set_data(Tensor(rng.normal(0, 0.2, param.shape).astype(np.float32)))
        adapted = logits(model, config)
        assert np.abs(adapted - base).max() > 1e-2
        assert merge_lora(model) == 4
        assert not any(is_lora_parameter(p.name) for p in model.get_parameters())
        np.testing.assert_allclose(logits(model, config), adapted, atol=1e-5, rtol=0)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_lora_checkpoint_of_another_rank_is_refused():
    _, model = tiny_glm()
    apply_lora(model, LoRAConfig(lora_rank=4, lora_alpha=8, layer_range=[0]), GLM_LORA_TARGETS)
    _, other = tiny_glm()
    apply_lora(other, LoRAConfig(lora_rank=2, lora_alpha=8, layer_range=[0]), GLM_LORA_TARGETS)
    params = {p.name: p.asnumpy() for p in other.get_parameters() if is_lora_parameter(p.name)}
    with pytest.raises(UserInputError, match=r"another lora_rank.*shape mismatch"):
        load_lora_checkpoint(model, params)
    with pytest.raises(UserInputError, match="missing"):
        load_lora_checkpoint(model, {})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A short LoRA fine-tune of the tiny VisualGLM (random base weights) on 16 synthetic images."""
    directory = tmp_path_factory.mktemp("lora")
    synthetic_data.make_synthetic_dataset(str(directory / "data"), 16, seed=1, test_count=2)
    with open(LORA_YAML, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    config["output_dir"] = str(directory / "output")
    config["train_dataset"]["data_loader"]["dataset_dir"] = str(directory / "data" / "dataset.json")
    config["train_dataset"]["data_loader"]["scale"] = 1
    config["runner_config"]["batch_size"] = 4
    model = config["model"]["model_config"]
    model["checkpoint_name_or_path"] = ""
    model["vision_config"]["checkpoint_name_or_path"] = ""
    model["text_config"]["checkpoint_name_or_path"] = ""
    config["processor"]["tokenizer"]["vocab_file"] = "examples/tiny/ice_text.model"
    path = directory / "lora.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    trainer, history = run_visualglm_finetune.main(["--config", str(path)])
    return directory, path, trainer, history


def test_only_lora_parameters_train_and_are_saved(lora_run):
    directory, _, trainer, history = lora_run
    model = trainer.network.model
    files = glob.glob(str(directory / "output" / "checkpoint_trainable" / "rank_0" / "*.ckpt"))
    assert len(files) == 1
    saved = read_checkpoint(files[0])
    lora_names = {p.name for p in model.get_parameters() if is_lora_parameter(p.name)}
    assert set(saved) == lora_names and len(lora_names) == 16  # A, B of 4 cells in 2 layers
    assert any(np.abs(value).max() > 0 for name, value in saved.items() if name.endswith("_b"))
    # the frozen base keeps its initial values (initialisation is seeded by the YAML's seed)
    ms.set_seed(0)
    fresh = {p.name: p.asnumpy() for p in VisualGLMImageToTextGeneration(model.config).get_parameters()}
    for param in model.get_parameters():
        if not is_lora_parameter(param.name):
            np.testing.assert_array_equal(param.asnumpy(), fresh[param.name], err_msg=param.name)
    assert len(history) == 4


def test_with_lora_script_and_merge_give_the_same_answers(lora_run, tmp_path):
    directory, path, _, _ = lora_run
    image = str(directory / "data" / "images" / "test_00000.png")
    lora_dir = str(directory / "output" / "checkpoint_trainable" / "rank_0")
    argv = ["--lora_checkpoint", lora_dir, "--config", str(path), "--image_path", image,
            "--max_new_tokens", "8", "--use_past", "True"]
    answers = run_visualglm_with_lora.main(argv)
    merged_path = str(tmp_path / "glm_merged.ckpt")
    assert run_visualglm_with_lora.main(argv + ["--merge", merged_path]) == answers
    merged = read_checkpoint(merged_path)
    assert not any(is_lora_parameter(name) for name in merged)
    assert "transformer.layers.0.attention.query_key_value.weight" in merged
