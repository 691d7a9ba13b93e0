"""run_chatglm2_finetune.py on the synthetic ADGEN set from a random tiny base: each method trains
what it should and nothing else (P-Tuning v2 the prefix, LoRA its matrices, full everything),
the loss falls, and a run stopped and resumed gives the same loss sequence."""
import glob
import os

import numpy as np
import pytest

from research.chatglm2 import run_chatglm2_finetune
from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.synthetic_adgen import write_adgen
from research.common.checkpoint import read_checkpoint
from research.common.config import CONFIG_ROOT
from research.common.convert import save_checkpoint_atomic
from tests.chatglm2.chatglm2_fixtures import random_weights
from tests.config_files import write_yaml

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm2ft")
    write_adgen(str(root / "data"), train=8 * STEPS, dev=4)
    base = random_weights(ChatGLM2Config.from_name("tiny"))
    save_checkpoint_atomic(base, str(root / "base.ckpt"))
    return root, base


def config(setup, method, name, **changes):
    root, _ = setup
    return write_yaml(root / f"{name}.yaml", os.path.join(CONFIG_ROOT, "chatglm2", f"run_glm2_tiny_{method}.yaml"),
                      {"train_dataset.data_loader.dataset_dir": str(root / "data" / "train.json"),
                       "model.model_config.checkpoint_name_or_path": str(root / "base.ckpt"),
                       "output_dir": str(root / name), **changes})


def trained(output_dir):
    (path,) = glob.glob(os.path.join(output_dir, "checkpoint_trainable", "rank_0", "*.ckpt"))
    return read_checkpoint(path)


@pytest.mark.parametrize("method, trains", [
    ("ptuning2", lambda name: name.startswith("transformer.prefix_encoder.")),
    ("lora", lambda name: "mindpet_delta_lora" in name),
    ("finetune", lambda name: True),
])
def test_each_method_trains_only_its_parameters(setup, method, trains):
    root, base = setup
    trainer, history = run_chatglm2_finetune.main(["--config", config(setup, method, method)])
    assert len(history) == STEPS and history[-1]["loss"] < history[0]["loss"]
    model = {p.name: p.asnumpy() for p in trainer.network.get_parameters()}
    saved = trained(root / method)
    assert set(saved) == {name for name in model if trains(name)} and saved
    for name, value in model.items():  # the rest is the base, bit for bit
        if not trains(name):
            assert np.array_equal(value, base[name]), name
        elif name in base:
            assert not np.array_equal(value, base[name]), name  # full fine-tuning moved it


def test_stopped_and_resumed_run_gives_the_same_losses(setup):
    """Without dropout: MindSpore's in-graph dropout RNG starts afresh in the resumed process,
    so with prefix_dropout > 0 the masks after the resume point differ (a known limit)."""
    constant = {"model.model_config.prefix_dropout": 0.0,"lr_schedule": {"type": "AnnealingLR", "learning_rate": 2.e-2, "warmup_steps": 0,
                                "num_iters": 2 * STEPS, "total_steps": -1, "auto_warmup_steps": 0},
                "callbacks": [{"type": "CheckpointMonitor", "prefix": "pt", "save_checkpoint_steps": STEPS,
                               "keep_checkpoint_max": 2}]}
    _, full = run_chatglm2_finetune.main(["--config", config(setup, "ptuning2", "full", **constant),
                                          "--epochs", "2"])
    run_chatglm2_finetune.main(["--config", config(setup, "ptuning2", "part", **constant), "--epochs", "1"])
    _, resumed = run_chatglm2_finetune.main(["--config", config(setup, "ptuning2", "part", **constant),
                                             "--epochs", "2", "--resume", "True"])
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert len(full) == 2 * STEPS
