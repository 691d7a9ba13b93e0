"""Learning-rate schedules for fine-tuning: SAT's `AnnealingLR`, MiniGPT-4's (LAVIS')
`linear_warmup_cosine_lr` and layer-wise lr decay.

`AnnealingLR` is the schedule of SwissArmyTransformer (sat/training/learning_rates.py) as
MindFormers' VisualGLM port runs it (research/visualglm/visualglm_lr_schedule.py), for the
optimizer's 0-based `global_step` s (the number of updates applied so far):

    auto warmup  s <= last_iter + auto_warmup_steps:  min(lr * auto_warmup_rate, lr * s / warmup_steps)
    warmup       0 < s <= warmup_steps:                lr * s / warmup_steps
    cosine       r = min(1, (s - warmup_steps) / num_iters)
                 min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2
    linear       max(min_lr, lr * (1 - (s - warmup_steps) / num_iters))
    constant     lr

Upstream writes the cosine branch as `lr / d * ((cos(pi r) + 1) * (d - 1) / 2 + 1)` with
d = 1 / decay_ratio; that is the line above with min_lr = lr * decay_ratio (decay_ratio 0.1
gives the "decay to lr/10" of VisualGLM). Note that the decay runs over `num_iters` steps
*after* the warmup, so the floor is reached at step warmup_steps + num_iters. The defaults
auto_warmup_steps=100, auto_warmup_rate=0.05, last_iter=-1 are upstream's: the first 100
updates run at no more than 5% of the lr (set auto_warmup_steps: 0 for a plain linear warmup).
Departures: upstream's linear branch goes below zero after num_iters; here it stops at
min_lr. `min_lr`, when given, replaces lr * decay_ratio.

`LinearWarmupCosineLR` is MiniGPT-4's `linear_warmup_cosine_lr` (minigpt4/common/optims.py at
the seed commit 22d8888) for update s (0-based), with T = max_epoch * iters_per_epoch:

    s < warmup_steps:  min(init_lr, warmup_lr + (init_lr - warmup_lr) * (s mod iters_per_epoch) / warmup_steps)
    otherwise:         min_lr + (init_lr - min_lr) * (1 + cos(pi * s / T)) / 2

Upstream passes the step within the epoch to the warmup (the same as s whenever the warmup ends
in the first epoch, as in both MiniGPT-4 stages) and the cosine runs over all T steps, warmup
included, so it continues just below init_lr where the warmup stops.

Layer-wise decay (`layer_scale: True`, MindFormers' `get_optimizer_grouped_parameters` with
its ViT rule): a parameter in block N (a name containing `layers.N.`) gets
lr * layer_decay ** (num_layers - N); embeddings (names containing `embed`) get
layer_decay ** (num_layers + 1), everything else (heads, final norms) the full lr.
"""
import math
import re

import mindspore as ms
from mindspore import ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError

DECAY_STYLES = ("cosine", "linear", "constant")


@MindFormerRegister.register(MindFormerModuleType.LR)
class AnnealingLR(LearningRateSchedule):
    """Warmup then cosine (or linear, or no) decay; see the module docstring for the formula."""

    def __init__(self, learning_rate, warmup_steps=0, num_iters=-1, total_steps=-1,
                 decay_style="cosine", min_lr=None, decay_ratio=0.1, auto_warmup_steps=100,
                 auto_warmup_rate=0.05, last_iter=-1):
        super().__init__()
        decay_style = str(decay_style).lower()
        decay_style = "constant" if decay_style == "none" else decay_style
        if decay_style not in DECAY_STYLES:
            raise UserInputError(f"lr_schedule.decay_style must be one of {DECAY_STYLES}, "
                                 f"got {decay_style!r}")
        if num_iters is None or num_iters <= 0:  # decay until the last step of training
            if total_steps is None or total_steps <= 0:
                raise UserInputError("lr_schedule: set num_iters (or total_steps) to a positive "
                                     "number of steps")
            num_iters = max(total_steps - warmup_steps, 1)
        min_lr = learning_rate * decay_ratio if min_lr is None else min_lr
        if not 0 < learning_rate or not 0 <= min_lr <= learning_rate or warmup_steps < 0:
            raise UserInputError(f"lr_schedule: need learning_rate > 0, 0 <= min_lr <= "
                                 f"learning_rate and warmup_steps >= 0; got learning_rate="
                                 f"{learning_rate}, min_lr={min_lr}, warmup_steps={warmup_steps}")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.num_iters = int(num_iters)
        self.total_steps = total_steps
        self.decay_style = decay_style
        self.min_lr = float(min_lr)
        self.auto_warmup_end = int(last_iter) + int(auto_warmup_steps)
        self.auto_warmup_lr = self.learning_rate * float(auto_warmup_rate)
        self.use_auto_warmup = auto_warmup_steps > 0

    def value(self, step):
        """The learning rate at `step` as a Python float (for tests and logs)."""
        lr = self.learning_rate
        warm = lr * step / self.warmup_steps if self.warmup_steps > 0 else lr
        if self.use_auto_warmup and step <= self.auto_warmup_end:
            return min(self.auto_warmup_lr, warm)
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return warm
        progress = (step - self.warmup_steps) / self.num_iters
        if self.decay_style == "cosine":
            return self.min_lr + (lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress))) / 2
        if self.decay_style == "linear":
            return max(self.min_lr, lr * (1 - progress))
        return lr

    def construct(self, global_step):
        step = ops.cast(global_step, ms.float32)
        lr = self.learning_rate
        progress = (step - self.warmup_steps) / self.num_iters
        if self.decay_style == "cosine":
            cosine = (1 + ops.cos(math.pi * ops.minimum(progress, 1.0))) / 2
            rate = self.min_lr + (lr - self.min_lr) * cosine
        elif self.decay_style == "linear":
            rate = ops.maximum(lr * (1 - progress), self.min_lr)
        else:
            rate = step * 0 + lr
        warm = lr * step / self.warmup_steps if self.warmup_steps > 0 else step * 0 + lr
        if self.warmup_steps > 0:
            rate = ops.select(step <= self.warmup_steps, warm, rate)
        if self.use_auto_warmup:
            rate = ops.select(step <= self.auto_warmup_end, ops.minimum(warm, self.auto_warmup_lr), rate)
        return rate


class LinearWarmupCosineLR(LearningRateSchedule):
    """MiniGPT-4's linear_warmup_cosine_lr; see the module docstring for the formula. Without
    `iters_per_epoch` an epoch is total_steps / max_epoch updates (upstream: the loader's length)."""

    def __init__(self, init_lr, min_lr, max_epoch, iters_per_epoch=None, warmup_steps=0, warmup_lr=-1,
                 total_steps=-1):
        super().__init__()
        if iters_per_epoch is None:
            if total_steps is None or total_steps <= 0:
                raise UserInputError("lr_schedule: set iters_per_epoch to a positive number of steps")
            iters_per_epoch = max(total_steps // max_epoch, 1)
        if not 0 <= min_lr <= init_lr or init_lr <= 0 or max_epoch <= 0 or iters_per_epoch <= 0 or warmup_steps < 0:
            raise UserInputError(f"lr_schedule: need 0 <= min_lr <= init_lr, init_lr > 0, max_epoch > 0, "
                                 f"iters_per_epoch > 0 and warmup_steps >= 0; got init_lr={init_lr}, "
                                 f"min_lr={min_lr}, max_epoch={max_epoch}, iters_per_epoch={iters_per_epoch}, "
                                 f"warmup_steps={warmup_steps}")
        self.init_lr = float(init_lr)
        self.min_lr = float(min_lr)
        self.iters_per_epoch = int(iters_per_epoch)
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = float(warmup_lr) if warmup_lr >= 0 else self.init_lr  # upstream: -1 means init_lr
        self.total = int(max_epoch) * self.iters_per_epoch

    def value(self, step):
        """The learning rate at `step` as a Python float (for tests and logs)."""
        if step < self.warmup_steps:
            rise = (self.init_lr - self.warmup_lr) * (step % self.iters_per_epoch) / max(self.warmup_steps, 1)
            return min(self.init_lr, self.warmup_lr + rise)
        return (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / self.total)) + self.min_lr

    def construct(self, global_step):
        step = ops.cast(global_step, ms.float32)
        cosine = (self.init_lr - self.min_lr) * 0.5 * (1.0 + ops.cos(math.pi * step / self.total)) + self.min_lr
        if self.warmup_steps == 0:
            return cosine
        in_epoch = step - ops.floor(step / self.iters_per_epoch) * self.iters_per_epoch
        warm = ops.minimum(self.warmup_lr + (self.init_lr - self.warmup_lr) * in_epoch / self.warmup_steps,
                           self.init_lr)
        return ops.select(step < self.warmup_steps, warm, cosine)


MindFormerRegister.register_cls(LinearWarmupCosineLR, MindFormerModuleType.LR, alias="linear_warmup_cosine_lr")


class LayerScaledLR(LearningRateSchedule):
    """`base(step) * scale`: one optimizer group's share of a layer-wise decayed lr."""

    def __init__(self, base, scale):
        super().__init__()
        self.base = base
        self.scale = float(scale)

    def construct(self, global_step):
        return self.base(global_step) * self.scale


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name):
    """N for a parameter name containing `layers.N.`, else None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_lr_scale(name, layer_decay, num_layers):
    """The lr multiplier of parameter `name` under layer-wise decay (MindFormers' ViT rule)."""
    index = layer_index(name)
    if index is not None:
        return layer_decay ** (num_layers - index)
    if "embed" in name:
        return layer_decay ** (num_layers + 1)
    return 1.0
