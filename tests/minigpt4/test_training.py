"""run_minigpt4_train.py on the tiny model: stage 1 on webdataset shards, stage 2 on cc_sbu_align
from stage 1's llama_proj, exact resume mid-epoch, two processes, the .pth export, bad input.

The frozen parts come from upstream-format files (tests/minigpt4/upstream_files.py: a random
transformers Blip2 + LLaMA, every weight non-trivial) converted with convert_weight.py, so the
frozen LLaMA is not a near-constant function as a freshly initialised one would be.
"""
import glob
import os
import sys

import numpy as np
import pytest
from PIL import Image

from research.common.checkpoint import read_checkpoint
from research.common.config import CONFIG_ROOT
from research.minigpt4 import convert_weight, run_minigpt4_train
from research.minigpt4.configuration_minigpt4 import MiniGPT4Config
from research.minigpt4.synthetic_data import caption_sample, write_align, write_shard
from tests.config_files import write_yaml
from tests.launch import run_two_processes
from tests.minigpt4 import upstream_files

STAGE1 = os.path.join(CONFIG_ROOT, "minigpt4", "minigpt4_tiny_stage1_pretrain.yaml")
STAGE2 = os.path.join(CONFIG_ROOT, "minigpt4", "minigpt4_tiny_stage2_finetune.yaml")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30)}
ITERS = 3  # global batches per epoch


def picture(colour, number):
    """A plain image of `colour` with a darker square whose corner depends on `number`."""
    image = Image.new("RGB", (64, 64), COLOURS[colour])
    corner = 8 + 4 * (number % 5)
    image.paste(tuple(c // 2 for c in COLOURS[colour]), (corner, corner, corner + 24, corner + 24))
    return image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The converted frozen parts and the data: 2 shards of 8 captioned images, an aligned set of 8."""
    root = tmp_path_factory.mktemp("minigpt4_train")
    config = MiniGPT4Config.from_name("minigpt4-tiny")
    files = upstream_files.write_upstream_files(str(root / "upstream"), config.vision_config, config.qformer_config,
                                                config.text_config, seed=3)
    parts = {name: str(root / f"{name}.ckpt") for name in ("vit", "qformer", "llama")}
    convert_weight.main(["--config", STAGE1, "--eva_vit_path", files.eva_vit, "--vit_mindspore_path", parts["vit"],
                         "--q_former_model", files.blip2, "--qformer_mindspore_path", parts["qformer"],
                         "--llama_model", files.vicuna, "--llama_mindspore_path", parts["llama"]])
    colours = list(COLOURS)
    for shard in range(2):
        samples = [caption_sample(f"{shard}{n:04d}", picture(colours[n % 4], n), f"A {colours[n % 4]} square.")
                   for n in range(8)]
        write_shard(str(root / "laion" / f"{shard:05d}.tar"), samples)
    rows = [(str(2 * n), picture(colours[n % 4], n), f"The picture is {colours[n % 4]}, with a dark square.")
            for n in range(8)]
    data_dir, prompts = write_align(str(root / "cc_sbu_align"), rows)
    return root, parts, data_dir, prompts


def yaml_for(setup, stage, name, **changes):
    root, parts, data_dir, prompts = setup
    frozen = {"model.model_config.vision_config.checkpoint_name_or_path": parts["vit"],
              "model.model_config.qformer_config.checkpoint_name_or_path": parts["qformer"],
              "model.model_config.text_config.checkpoint_name_or_path": parts["llama"],
              "output_dir": str(root / name), "runner_config.batch_size": 4, "runner_config.epochs": 2,
              "train_dataset.iters_per_epoch": ITERS, "lr_schedule.iters_per_epoch": ITERS,
              "lr_schedule.max_epoch": 2, "lr_schedule.warmup_steps": 2,
              "callbacks": [{"type": "CheckpointMonitor", "prefix": "minigpt4", "save_checkpoint_steps": 2,
                             "keep_checkpoint_max": 3}]}
    if stage == 1:
        data = {"train_dataset.datasets": [{"name": "laion", "shards": str(root / "laion"), "sample_ratio": 1.0}]}
    else:
        data = {"train_dataset.data_dir": data_dir, "train_dataset.prompt_path": prompts}
    return write_yaml(root / f"{name}.yaml", STAGE1 if stage == 1 else STAGE2, {**frozen, **data, **changes})


def trainable_checkpoint(output_dir, rank=0):
    return max(glob.glob(os.path.join(output_dir, "checkpoint_trainable", f"rank_{rank}", "*.ckpt")),
               key=lambda path: int(path.rsplit("-", 1)[1].split(".")[0]))


@pytest.fixture(scope="module")
def stage1(setup):
    return run_minigpt4_train.main(["--config", yaml_for(setup, 1, "stage1")])


def test_stage1_trains_only_llama_proj_and_the_loss_falls(setup, stage1):
    root, parts, _, _ = setup
    trainer, history = stage1
    assert len(history) == 2 * ITERS and history[-1]["loss"] < history[0]["loss"]
    saved = read_checkpoint(trainable_checkpoint(root / "stage1"))
    assert set(saved) == {"image_encoder.llama_proj.weight", "image_encoder.llama_proj.bias"}
    model = {p.name: p.asnumpy() for p in trainer.network.get_parameters()}
    frozen = {**read_checkpoint(parts["vit"]), **read_checkpoint(parts["qformer"]),
              **{"llama_model." + name: value for name, value in read_checkpoint(parts["llama"]).items()}}
    assert set(frozen) | set(saved) == set(model)
    for name, value in frozen.items():  # everything else is the converted weights, bit for bit
        assert np.array_equal(model[name], value), name
    for name, value in saved.items():
        np.testing.assert_array_equal(model[name], value)


def test_stage2_starts_from_stage1_and_exports_to_upstreams_pth(setup, stage1, tmp_path, capsys):
    root, parts, _, _ = setup
    stage1_proj = trainable_checkpoint(root / "stage1")
    capsys.readouterr()
    trainer, history = run_minigpt4_train.main(["--config", yaml_for(
        setup, 2, "stage2", **{"model.model_config.checkpoint_name_or_path": stage1_proj})])
    assert "llama_proj checkpoint" in capsys.readouterr().out  # stage 1's llama_proj was loaded
    assert len(history) == 2 * ITERS
    trained = read_checkpoint(trainable_checkpoint(root / "stage2"))
    assert not np.array_equal(trained["image_encoder.llama_proj.weight"],
                              read_checkpoint(stage1_proj)["image_encoder.llama_proj.weight"])
    # back to PyTorch and in again: the same llama_proj
    pth = str(tmp_path / "pretrained_minigpt4.pth")
    convert_weight.main(["--export_llama_proj", trainable_checkpoint(root / "stage2"), "--export_path", pth])
    import torch
    exported = torch.load(pth, weights_only=True)
    assert set(exported) == {"model"} and set(exported["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    back = str(tmp_path / "proj.ckpt")
    convert_weight.main(["--config", STAGE2, "--ckpt", pth, "--proj_mindspore_path", back])
    again = read_checkpoint(back)
    for name, value in trained.items():
        np.testing.assert_array_equal(again[name], value)


def test_resumed_mid_epoch_gives_the_same_losses(setup, stage1, tmp_path):
    """The full run saved at steps 2, 4 and 6 (an epoch is 3 steps): a new run resumed from step 4,
    the middle of epoch 2, gives the full run's losses of steps 5 and 6 and its llama_proj."""
    root, _, _, _ = setup
    _, full = stage1
    (state,) = [path for path in glob.glob(str(root / "stage1" / "checkpoint" / "rank_0" / "*.ckpt"))
                if path.endswith("-4.ckpt")]
    _, resumed = run_minigpt4_train.main(["--config", yaml_for(setup, 1, "resumed"), "--resume", state])
    steps = {row["step"]: row["loss"] for row in resumed}
    assert {step: loss for step, loss in steps.items() if step > 4} == \
        {row["step"]: row["loss"] for row in full if row["step"] > 4}
    assert max(steps) == 2 * ITERS
    ours, theirs = read_checkpoint(trainable_checkpoint(root / "resumed")), read_checkpoint(
        trainable_checkpoint(root / "stage1"))
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value)


def test_two_processes_read_their_own_shards_and_agree(setup, tmp_path):
    """run_singlenode.sh (msrun on CPU) with the same YAML and use_parallel: True: rank r reads shard r,
    the gradients are averaged, both ranks end with the same llama_proj."""
    parallel = yaml_for(setup, 1, "parallel", **{"runner_config.batch_size": 2, "use_parallel": True,
                                                  "parallel_config.data_parallel": 2,
                                                  "output_dir": str(tmp_path / "parallel")})
    command = f"{sys.executable} -m research.minigpt4.run_minigpt4_train --config {parallel}"
    run_two_processes(command, tmp_path)
    rank0 = read_checkpoint(trainable_checkpoint(tmp_path / "parallel", 0))
    rank1 = read_checkpoint(trainable_checkpoint(tmp_path / "parallel", 1))
    assert set(rank0) == {"image_encoder.llama_proj.weight", "image_encoder.llama_proj.bias"}
    for name, value in rank0.items():
        np.testing.assert_array_equal(value, rank1[name], err_msg=name)
    logs = " ".join(open(path, encoding="utf-8", errors="replace").read()
                    for path in glob.glob(str(tmp_path / "logs" / "**" / "*"), recursive=True) if os.path.isfile(path))
    for rank in (0, 1):  # 2 shards: one each
        assert f"rank {rank} of 2: laion: 8 samples from 1 shard" in logs, logs[-2000:]


@pytest.mark.parametrize("changes,message", [
    ({"train_dataset.prompt_path": "/nowhere/alignment.txt"}, "alignment.txt"),
    ({"train_dataset.image_tokens": 64}, "image_tokens"),
    ({"model.model_config.text_config.checkpoint_name_or_path": "/nowhere/llama.ckpt"}, "llama.ckpt"),
    ({"lr_schedule.min_lr": 1.0}, "min_lr"),
])
def test_bad_input_is_one_line(setup, changes, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_minigpt4_train.main(["--config", yaml_for(setup, 2, "bad", **changes)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("name", ["minigpt4_stage1_pretrain.yaml", "minigpt4_7b_stage1_pretrain.yaml"])
def test_stage1_yamls_carry_upstreams_hyper_parameters(name):
    """Upstream train_configs/minigpt4_stage1_pretrain.yaml (notes/minigpt4.md §2.10)."""
    from research.common.config import load_config

    config = load_config(os.path.join(CONFIG_ROOT, "minigpt4", name))
    assert dict(config.lr_schedule) == {"type": "linear_warmup_cosine_lr", "init_lr": 1e-4, "min_lr": 8e-5,
                                        "warmup_lr": 1e-6, "warmup_steps": 5000, "iters_per_epoch": 5000,
                                        "max_epoch": 4}
    assert (config.runner_config.batch_size, config.runner_config.epochs, config.optimizer.weight_decay) == (64, 4, 0.05)
    assert (config.optimizer.beta1, config.optimizer.beta2) == (0.9, 0.999)
    data = config.train_dataset
    assert [(d["name"], d["sample_ratio"]) for d in data.datasets] == [("laion", 115), ("cc_sbu", 14)]
    assert (data.max_txt_len, data.iters_per_epoch, data.image_size, data.end_sym) == (32, 5000, 224, "\n")


@pytest.mark.parametrize("name", ["minigpt4_stage2_finetune.yaml", "minigpt4_7b_stage2_finetune.yaml"])
def test_stage2_yamls_carry_upstreams_hyper_parameters(name):
    """Upstream train_configs/minigpt4_stage2_finetune.yaml."""
    from research.common.config import load_config

    config = load_config(os.path.join(CONFIG_ROOT, "minigpt4", name))
    assert dict(config.lr_schedule) == {"type": "linear_warmup_cosine_lr", "init_lr": 3e-5, "min_lr": 1e-5,
                                        "warmup_lr": 1e-6, "warmup_steps": 200, "iters_per_epoch": 200,
                                        "max_epoch": 5}
    assert (config.runner_config.batch_size, config.runner_config.epochs) == (12, 5)
    data = config.train_dataset
    assert (data.max_txt_len, data.end_sym, data.prompt_template, data.iters_per_epoch) == (
        160, "###", "###Human: {} ###Assistant: ", 200)
    assert "stage1" in config.model.model_config.checkpoint_name_or_path  # upstream's ckpt: stage 1's


def test_freeze_flags_choose_what_trains_and_split_checkpoint_round_trips(tmp_path):
    """Upstream's freeze_vit / freeze_qformer (and freeze_llama) add their parts to llama_proj; a
    whole-model checkpoint split into the four files loads back into the same weights."""
    from research.common.convert import save_checkpoint_atomic
    from research.minigpt4.modeling_minigpt4 import MiniGPT4, select_trainable, split_checkpoint

    config = MiniGPT4Config.from_name("minigpt4-tiny")
    model = MiniGPT4(config)
    assert {p.name for p in select_trainable(model)} == {"image_encoder.llama_proj.weight",
                                                        "image_encoder.llama_proj.bias"}
    config.freeze_vit, config.freeze_llama = False, False
    names = {p.name for p in select_trainable(model)}
    assert any(n.startswith("image_encoder.visual_encoder.") for n in names)
    assert any(n.startswith("llama_model.") for n in names)
    assert not any(n.startswith("image_encoder.qformer.") for n in names)
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    for part, values in split_checkpoint(params, config).items():
        save_checkpoint_atomic(values, str(tmp_path / f"{part}.ckpt"))
    config.vision_config.checkpoint_name_or_path = str(tmp_path / "vit.ckpt")
    config.qformer_config.checkpoint_name_or_path = str(tmp_path / "qformer.ckpt")
    config.text_config.checkpoint_name_or_path = str(tmp_path / "llama.ckpt")
    config.checkpoint_name_or_path = str(tmp_path / "proj.ckpt")
    again = MiniGPT4(config)
    assert len(again.load_checkpoints()) == 4
    for p in again.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), params[p.name], err_msg=p.name)
