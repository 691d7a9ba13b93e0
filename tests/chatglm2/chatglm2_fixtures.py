"""A tiny ChatGLM2 with random weights behind the tiny YAML, for the chat, script and Lite tests.

The tiny YAML names no checkpoint (zero embeddings: every answer would be the same token), so
these write one with every weight random and a YAML that loads it.
"""
import os

import numpy as np

from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.modeling_chatglm2 import parameter_shapes
from research.common.config import CONFIG_ROOT
from research.common.convert import save_checkpoint_atomic
from tests.config_files import write_yaml

TINY_YAML = os.path.join(CONFIG_ROOT, "chatglm2", "run_glm2_tiny.yaml")


def random_weights(config: ChatGLM2Config, seed=0):
    """{name: array} for every parameter: norms around 1, the rest N(0, 0.3)."""
    rng = np.random.RandomState(seed)
    return {name: (1.0 + 0.2 * rng.standard_normal(shape) if name.endswith("layernorm.weight")
                   else 0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in parameter_shapes(config).items()}


def tiny_yaml_with_weights(directory, mode=0, **changes):
    """A copy of the tiny YAML (context.mode `mode`, plus {dotted path: value} changes) whose
    checkpoint holds random weights; returns the YAML's path."""
    checkpoint = os.path.join(directory, "glm2_tiny_random.ckpt")
    save_checkpoint_atomic(random_weights(ChatGLM2Config.from_name("tiny")), checkpoint)
    return write_yaml(os.path.join(directory, "glm2_tiny_random.yaml"), TINY_YAML,
                      {"context.mode": mode, "model.model_config.checkpoint_name_or_path": checkpoint,
                       **changes})
