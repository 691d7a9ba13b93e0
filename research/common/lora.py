"""LoRA through mindpet's `LoRADense`, configured by the YAML `pet_config` (seed 001).

`apply_lora` swaps the selected `nn.Dense` cells of a model for `LoRADense` cells holding the
same weight and bias (same parameter names, so base checkpoints still load) plus the
low-rank pair `mindpet_delta_lora_a` [rank, in] and `mindpet_delta_lora_b` [out, rank]:
y = x W^T + b + (alpha / rank) * x A^T B^T. B starts at zero, so a fresh LoRA model computes
exactly what the base model does. `merge_lora` folds the pair into W for deployment.
"""
import dataclasses
import re
from typing import Literal, Optional, Union

import numpy as np
import mindspore as ms
from mindspore import nn
from mindpet.delta.lora import LoRADense

from research.common.checkpoint import copy_params
from research.common.config import FieldError, ModelConfig
from research.common.errors import UserInputError
from research.common.layers import SkinnyDense, StepDropout

LORA_NAMES = ("mindpet_delta_lora_a", "mindpet_delta_lora_b")


@dataclasses.dataclass
class LoRAConfig(ModelConfig):
    """`pet_config` fields of MindFormers' LoRA YAML."""

    pet_type: Literal["lora"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # Regex matched against a Dense cell's name; '' means the model's default targets.
    target_modules: str = ""
    # Cells whose name contains one of these are never adapted.
    exclude_layers: list = dataclasses.field(default_factory=list)
    # Layer indices that get LoRA: a list of indices, one index, or None for all layers.
    layer_range: Optional[Union[int, list]] = None
    # P-Tuning v2's prefix length, which MindFormers' pet_config carries; LoRA has no prefix.
    pre_seq_len: int = 0
    # Where the checkpoint_trainable files are written and read (issue 4).
    checkpoint_name_or_path: str = ""

    def validate(self):
        if self.lora_rank <= 0:
            raise FieldError("lora_rank", f"must be positive, got {self.lora_rank}")
        if self.lora_alpha == 0:
            raise FieldError("lora_alpha", "must not be 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FieldError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.pre_seq_len != 0:
            raise FieldError("pre_seq_len", f"is P-Tuning v2's prefix length, which LoRA does not "
                                            f"have; set it to 0, got {self.pre_seq_len}")
        try:
            re.compile(self.target_modules)
        except re.error as err:
            raise FieldError("target_modules", f"is not a valid regex: {err}") from err

    @property
    def layers(self):
        if self.layer_range is None:
            return None
        return {self.layer_range} if isinstance(self.layer_range, int) else set(self.layer_range)


def _selected(name, config: LoRAConfig, default_targets, layer_pattern):
    if any(excluded in name for excluded in config.exclude_layers):
        return False
    if not re.search(config.target_modules or default_targets, name):
        return False
    if config.layers is None:
        return True
    match = re.search(layer_pattern, name)
    return match is not None and int(match.group(1)) in config.layers


def apply_lora(model: nn.Cell, config: LoRAConfig, default_targets, compute_dtype=None,
               layer_pattern=r"layers\.(\d+)\."):
    """Replace the selected Dense cells of `model` by LoRADense; returns the adapted names.

    `compute_dtype` (a MindSpore dtype) defaults to each weight's own dtype.
    """
    adapted = []
    for name, cell in list(model.cells_and_names()):
        adaptable = isinstance(cell, nn.Dense) and not isinstance(cell, LoRADense)
        if not name or not adaptable or not _selected(name, config, default_targets, layer_pattern):
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model if not parent_name else dict(model.cells_and_names())[parent_name]
        lora = LoRADense(cell.in_channels, cell.out_channels, lora_rank=config.lora_rank,
                         lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                         has_bias=cell.has_bias, param_init_type=cell.weight.dtype,
                         compute_dtype=compute_dtype or cell.weight.dtype)
        prefix = cell.weight.name[:-len("weight")]
        lora.lora_dropout = StepDropout(config.lora_dropout)  # masks that a resumed run draws again
        lora.weight.set_data(cell.weight.data)
        if cell.has_bias:
            lora.bias.set_data(cell.bias.data)
        setattr(parent, attribute, lora)
        for local_name, param in lora.parameters_and_names():
            param.name = prefix + local_name.rpartition(".")[2]
        adapted.append(name)
    if not adapted:
        raise UserInputError(
            f"pet_config selects no layer (target_modules {config.target_modules or default_targets!r}, "
            f"layer_range {config.layer_range}, exclude_layers {config.exclude_layers})")
    return adapted


def is_lora_parameter(name):
    return name.endswith(LORA_NAMES)


def freeze_all_but_lora(model: nn.Cell):
    """requires_grad only on LoRA parameters; returns them."""
    trainable = []
    for param in model.get_parameters():
        param.requires_grad = is_lora_parameter(param.name)
        if param.requires_grad:
            trainable.append(param)
    return trainable


def load_lora_checkpoint(model: nn.Cell, params, what="LoRA checkpoint"):
    """Copy {name: array} of a trainable-only LoRA checkpoint into `model`.

    Every LoRA parameter of the model must be present with its shape: a checkpoint of another
    rank, other layers or another model is refused with the names that differ.
    """
    own = {p.name: p for p in model.get_parameters() if is_lora_parameter(p.name)}
    copy_params(own, params, what, hint="another lora_rank, layer_range or model than pet_config?")


def merge_lora(model: nn.Cell):
    """Fold every LoRADense into a SkinnyDense (W += alpha/rank * B A); returns the count."""
    merged = 0
    for name, cell in list(model.cells_and_names()):
        if not isinstance(cell, LoRADense):
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model if not parent_name else dict(model.cells_and_names())[parent_name]
        weight = cell.weight.asnumpy().astype(np.float32)
        delta = cell.mindpet_delta_lora_b.asnumpy().astype(np.float32) @ \
            cell.mindpet_delta_lora_a.asnumpy().astype(np.float32)
        dense = SkinnyDense(cell.in_channels, cell.out_channels, has_bias=cell.has_bias,
                            dtype=cell.weight.dtype)
        dense.weight.set_data(ms.Tensor(weight + cell.scaling * delta, dtype=cell.weight.dtype))
        if cell.has_bias:
            dense.bias.set_data(cell.bias.data)
        names = {"weight": cell.weight.name, "bias": cell.bias.name if cell.has_bias else None}
        setattr(parent, attribute, dense)
        for local_name, param in dense.parameters_and_names():
            param.name = names[local_name.rpartition(".")[2]]
        merged += 1
    return merged
