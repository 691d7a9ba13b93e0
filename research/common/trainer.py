"""A small, model-agnostic trainer: AdamWeightDecay, dynamic loss scaling, gradient clipping,
data parallelism, checkpoints that resume exactly, loss.csv and loss.png.

    args = TrainingArguments.from_yaml(load_config("run_visualglm_lora.yaml"))
    Trainer(network, lora_params, args, parallel_context=ctx).train(dataset, resume=True)

`network(*[batch[c] for c in dataset.columns])` returns the scalar loss. `dataset` has
`__len__`, `__getitem__(i) -> {column: numpy array}`, `columns` and, optionally,
`order(epoch) -> indices` (deterministic; else samples go in order). Batches are stacked on the
host and fed to one compiled step (static shapes: the last incomplete batch is dropped). With N
processes the global batch is batch_size * N samples and rank r takes rows r*batch_size.. of it.

One step (`TrainStep`, as MindFormers' MFTrainOneStepCell but with ordinary ops, so it runs on
CPU): gradients of loss * scale, divided by the scale, averaged over the processes, checked
for inf/nan (together with the loss), clipped to a global norm of `max_grad_norm`
(g * max_norm / max(norm, max_norm)), then applied - or skipped on overflow, in which case the
optimizer's step (and so the lr schedule) does not advance. The host keeps the loss scale as
MindSpore's DynamicLossScaleUpdateCell does: halve on overflow (not below 1), double after
`scale_window` consecutive good steps. A loss that stays non-finite, or overflows that go on
with the scale already at its minimum, for `nan_patience` consecutive steps stop training with
a TrainingDivergedError after loss.csv is written.

Files under `output_dir` (rank N, checkpoint names `<prefix>_rank_N-<step>.ckpt`):
`checkpoint_trainable/rank_N/` the trainable parameters only (MindSpore names), and
`checkpoint/rank_N/` the whole training state for `resume` (those parameters, the optimizer's
moments and global_step, the loss scale, the good-step and bad-step counters, the step and
the position in the data order); both keep the newest `keep_checkpoint_max`. Rank 0 also
writes loss.csv (COLUMNS) and loss.png at every checkpoint (before it, so the rows a resume
reads are never missing) and at the end.

Run safety: rank N holds `output_dir/.lock_rank_N` while it runs (`output_dir_lock`; deleted at
the end), so a second run on the same folder is refused, naming the holder, while the ranks of
one run coexist; a killed run's lock is taken over with a note. A start removes the temp files
of a save a kill interrupted. A write that fails (disk full, file size limit) stops the run with one
line naming the file and leaves nothing half written. `resume=True` with nothing saved starts
at step 0 with a note; a resume names the file and step it continues from.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import os
import re
import sys
import time
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindformers.tools.register import MindFormerModuleType

from research.common.atomic import LockHeld, atomic_write, exclusive_lock, remove_temp_files
from research.common.checkpoint import read_checkpoint
from research.common.config import check_value, repo_path, type_name
from research.common.convert import save_checkpoint_atomic
from research.common.errors import UserInputError
from research.common.loss_curve import write_loss_png
from research.common.layers import DROPOUT_STEP, set_dropout_keys
from research.common.lr_schedule import AnnealingLR, LayerScaledLR, layer_index, layer_lr_scale
from research.common.parallel import ParallelContext, gradient_reducer, init_data_parallel
from research.common.progress import Progress
from research.common.runtime import build_registered, init_context

COLUMNS = ("step", "epoch", "loss", "lr", "loss_scale", "skipped", "seconds")
_STATE_KEYS = ("step", "epoch", "position", "loss_scale", "good_steps", "bad_steps", "global_batch")


class TrainingDivergedError(UserInputError):
    """The loss went non-finite and loss scaling could not bring it back."""


@dataclasses.dataclass
class TrainingArguments:
    """What the trainer reads from a MindFormers YAML (see `from_yaml` for where each comes from)."""

    output_dir: str = "./output"
    epochs: int = 1
    batch_size: int = 1
    lr_schedule: dict = dataclasses.field(
        default_factory=lambda: {"type": "AnnealingLR", "learning_rate": 1e-5})
    layer_scale: bool = False
    layer_decay: float = 0.65
    num_layers: Optional[int] = None  # for layer_scale; default: 1 + the largest `layers.N.`
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    loss_scale_value: float = 65536.0
    scale_factor: float = 2.0  # 1.0: a fixed loss scale
    scale_window: int = 1000
    use_clip_grad: bool = False
    max_grad_norm: float = 1.0
    prefix: str = "model"
    save_checkpoint_steps: int = 0  # 0: only at the end
    keep_checkpoint_max: int = 5
    nan_patience: int = 3

    # (dotted YAML path, field)
    YAML_FIELDS = (
        ("output_dir", "output_dir"),
        ("runner_config.epochs", "epochs"),
        ("runner_config.batch_size", "batch_size"),
        ("layer_scale", "layer_scale"),
        ("layer_decay", "layer_decay"),
        ("optimizer.beta1", "beta1"),
        ("optimizer.beta2", "beta2"),
        ("optimizer.eps", "eps"),
        ("optimizer.weight_decay", "weight_decay"),
        ("runner_wrapper.scale_sense.loss_scale_value", "loss_scale_value"),
        ("runner_wrapper.scale_sense.scale_factor", "scale_factor"),
        ("runner_wrapper.scale_sense.scale_window", "scale_window"),
        ("runner_wrapper.use_clip_grad", "use_clip_grad"),
        ("runner_wrapper.max_grad_norm", "max_grad_norm"),
        ("callbacks.CheckpointMonitor.prefix", "prefix"),
        ("callbacks.CheckpointMonitor.save_checkpoint_steps", "save_checkpoint_steps"),
        ("callbacks.CheckpointMonitor.keep_checkpoint_max", "keep_checkpoint_max"),
    )
    # MindFormers fields the trainer implements at one value only: dotted path -> (value, why).
    FIXED_FIELDS = {
        "runner_config.sink_mode": (False, "each step's batch is fed from the host; no data sink"),
        "runner_wrapper.type": ("MFTrainOneStepCell",
                                "TrainStep is MFTrainOneStepCell's step with ordinary ops"),
        "train_dataset.drop_remainder": (True, "the compiled step has static shapes, so an epoch's "
                                               "last incomplete global batch is dropped"),
        "callbacks.CheckpointMonitor.save_trainable_params": (
            True, "the trainable parameters always go to checkpoint_trainable/"),
        "callbacks.CheckpointMonitor.save_network_params": (
            False, "the frozen weights are not saved again"),
        "load_checkpoint": ("", "the weights come from the model config's checkpoint paths; "
                                "a run continues with --resume"),
        "resume_training": (False, "a run continues with --resume"),
        "lr_scale": (False, "the learning rate is lr_schedule's, not scaled by the batch size"),
    }
    # MindFormers fields the trainer does not implement: dotted path -> why.
    UNSUPPORTED_FIELDS = {
        "lr_scale_factor": "it scales the learning rate only with lr_scale: True, which is not "
                           "implemented",
        "callbacks.MFLossMonitor": "the loss is always reported (progress line, loss.csv, loss.png)",
        "train_dataset_task": "MindFormers builds its dataset from it; here the data loader is "
                              "built from train_dataset",
    }
    # Sections read field by field: every field in them is in YAML_FIELDS or FIXED_FIELDS.
    SECTIONS = ("runner_config", "runner_wrapper", "optimizer", "callbacks",
                "callbacks.CheckpointMonitor")

    @classmethod
    def from_yaml(cls, config, **overrides):
        """Read the sections `runner_config`, `lr_schedule`, `layer_scale`/`layer_decay`,
        `optimizer` (AdamWeightDecay), `runner_wrapper` (scale_sense, use_clip_grad,
        max_grad_norm), the `CheckpointMonitor` entry of `callbacks` and
        `train_dataset.batch_size` (must equal runner_config.batch_size). Other fields of these
        sections and MindFormers' top-level training fields are accepted only at the value
        implemented (FIXED_FIELDS) or refused (UNSUPPORTED_FIELDS, unknown fields), with the
        YAML's file:line. `overrides` win."""
        source = getattr(config, "source", None)

        def where(path):
            return source.where(path) if source is not None else path

        optimizer = dict(config.get("optimizer") or {})
        if optimizer.pop("type", "AdamWeightDecay") != "AdamWeightDecay":
            raise UserInputError(f"{where('optimizer.type')}: only AdamWeightDecay is supported, "
                                 f"got {config['optimizer']['type']!r}")
        wrapper = dict(config.get("runner_wrapper") or {})
        wrapper["scale_sense"] = _loss_scale_fields(wrapper.get("scale_sense", {}), where)
        sections = {**config, "optimizer": optimizer, "runner_wrapper": wrapper,
                    "callbacks": _callbacks_by_type(config.get("callbacks"), where)}
        cls._refuse_unimplemented(sections, where)

        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for path, name in cls.YAML_FIELDS:
            node = _lookup(sections, path)
            if node is None:
                continue
            if not check_value(node, hints[name]):
                hint = "; write floats with a dot, like 1.0e-8" if isinstance(node, str) else ""
                raise UserInputError(f"{where(path)}: expected {type_name(hints[name])}, got "
                                     f"{node!r} ({type(node).__name__}){hint}")
            values[name] = float(node) if hints[name] is float else node
        batch_size = values.get("batch_size", cls.batch_size)
        dataset_batch_size = _lookup(sections, "train_dataset.batch_size")
        if dataset_batch_size is not None and dataset_batch_size != batch_size:
            raise UserInputError(f"{where('train_dataset.batch_size')}: {dataset_batch_size!r} differs "
                                 f"from runner_config.batch_size ({batch_size}), which the trainer "
                                 f"reads; make them equal or remove train_dataset.batch_size")
        lr_schedule = config.get("lr_schedule")
        if lr_schedule:
            for key, value in lr_schedule.items():  # every field but `type` is a number
                if key != "type" and (isinstance(value, (str, bool)) or not isinstance(value, (int, float))):
                    hint = "; write floats with a dot, like 2.0e-2" if isinstance(value, str) else ""
                    raise UserInputError(f"{where('lr_schedule.' + key)}: expected a number, got {value!r} "
                                         f"({type(value).__name__}){hint}")
            values["lr_schedule"] = dict(lr_schedule)
        values["output_dir"] = repo_path(values.get("output_dir", cls.output_dir))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def _refuse_unimplemented(cls, sections, where):
        """UNSUPPORTED_FIELDS, FIXED_FIELDS at another value, and unknown fields of SECTIONS."""
        for path, why in cls.UNSUPPORTED_FIELDS.items():
            if _lookup(sections, path) is not None:
                raise UserInputError(f"{where(path)}: not supported: {why}; remove the field")
        for path, (value, why) in cls.FIXED_FIELDS.items():
            found = _lookup(sections, path)
            if found is not None and (type(found) is not type(value) or found != value):
                raise UserInputError(f"{where(path)}: only {value!r} is implemented ({why}), "
                                     f"got {found!r}")
        paths = [path for path, _ in cls.YAML_FIELDS] + list(cls.FIXED_FIELDS)
        known = {".".join(path.split(".")[:n]) for path in paths for n in range(1, path.count(".") + 2)}
        for section in cls.SECTIONS:
            for key in _lookup(sections, section) or {}:
                if f"{section}.{key}" in known:
                    continue
                children = (path[len(section) + 1:] for path in known if path.startswith(section + "."))
                fields = sorted(child for child in children if "." not in child)
                raise UserInputError(f"{where(f'{section}.{key}')}: not implemented by the trainer "
                                     f"(it reads {section}: {', '.join(fields)}); remove the field")


# Loss-scale cells of MindSpore that the trainer implements, with their fields.
LOSS_SCALE_CELLS = {"DynamicLossScaleUpdateCell": ("loss_scale_value", "scale_factor", "scale_window"),
                    "FixedLossScaleUpdateCell": ("loss_scale_value",)}


def _loss_scale_fields(scale_sense, where):
    """`runner_wrapper.scale_sense` as the trainer's fields; a number or a
    FixedLossScaleUpdateCell is a fixed scale (scale_factor 1), a mapping without a type dynamic."""
    if isinstance(scale_sense, (int, float)) and not isinstance(scale_sense, bool):
        return {"loss_scale_value": scale_sense, "scale_factor": 1.0}
    if not isinstance(scale_sense, dict):
        raise UserInputError(f"{where('runner_wrapper.scale_sense')}: expected a number (a fixed loss "
                             f"scale) or one of {', '.join(LOSS_SCALE_CELLS)}, got {scale_sense!r}")
    fields = dict(scale_sense)
    kind = fields.pop("type", "DynamicLossScaleUpdateCell")
    if kind not in LOSS_SCALE_CELLS:
        raise UserInputError(f"{where('runner_wrapper.scale_sense.type')}: {kind!r} is not "
                             f"implemented; use {' or '.join(LOSS_SCALE_CELLS)}")
    unknown = sorted(set(fields) - set(LOSS_SCALE_CELLS[kind]))
    if unknown:
        raise UserInputError(f"{where(f'runner_wrapper.scale_sense.{unknown[0]}')}: not a field of "
                             f"{kind} (its fields: {', '.join(LOSS_SCALE_CELLS[kind])})")
    if kind == "FixedLossScaleUpdateCell":
        return {"loss_scale_value": fields.get("loss_scale_value", 1.0), "scale_factor": 1.0}
    return fields


def _callbacks_by_type(callbacks, where):
    """The YAML's `callbacks` list as {type: the entry's other fields}, one entry per type."""
    by_type = {}
    if callbacks is not None and not isinstance(callbacks, list):
        raise UserInputError(f"{where('callbacks')}: expected a list of entries with a type, "
                             f"got {callbacks!r}")
    for number, entry in enumerate(callbacks or []):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind in by_type:
            raise UserInputError(f"{where('callbacks')}: entry {number} ({entry!r}) must be a mapping "
                                 f"with a type not listed before")
        by_type[kind] = {key: value for key, value in entry.items() if key != "type"}
    return by_type


def _lookup(sections, path):
    """The value at a dotted path of nested mappings, or None."""
    node = sections
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


class _Float32Loss(nn.Cell):
    """The network with its loss cast to float32, so a scale of 65536 fits the backward seed."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, *inputs):
        return ops.cast(self.network(*inputs), ms.float32)


class TrainStep(nn.Cell):
    """loss, overflow, loss_finite, lr = step(loss_scale, *inputs); see the module docstring."""

    def __init__(self, network, optimizer, lr_schedule, max_grad_norm=None, reducer=None,
                 flags_all_reduce=None):
        super().__init__(auto_prefix=False)
        self.network = _Float32Loss(network)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.lr_schedule = lr_schedule
        self.clip = max_grad_norm is not None
        self.max_grad_norm = float(max_grad_norm or 1.0)
        self.reduce = reducer is not None
        self.reducer = reducer
        self.flags_all_reduce = flags_all_reduce

    def construct(self, loss_scale, *inputs):
        loss = self.network(*inputs)
        grads = self.grad(self.network, self.weights)(*inputs, ops.ones_like(loss) * loss_scale)
        grads = tuple(ops.cast(ops.cast(g, ms.float32) / loss_scale, g.dtype) for g in grads)
        if self.reduce:
            grads = self.reducer(grads)
        grads_finite = ops.stack([ops.isfinite(g).all() for g in grads]).all()
        flags = ops.stack([ops.logical_not(grads_finite), ops.logical_not(ops.isfinite(loss))])
        flags = ops.cast(flags, ms.float32)
        if self.reduce:  # every rank must take the same decision
            flags = self.flags_all_reduce(flags)
        overflow = flags.sum() > 0
        loss_finite = flags[1] == 0
        if self.clip:
            norm = ops.sqrt(ops.stack([ops.square(ops.cast(g, ms.float32)).sum() for g in grads]).sum())
            factor = self.max_grad_norm / ops.maximum(norm, self.max_grad_norm)
            grads = tuple(ops.cast(g * factor, g.dtype) for g in grads)
        lr = self.lr_schedule(self.optimizer.global_step)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, overflow, loss_finite, lr


def build_lr_schedule(section, total_steps):
    """The YAML `lr_schedule` as a LearningRateSchedule; `total_steps: -1` becomes `total_steps`."""
    kwargs = dict(section)
    kind = kwargs.pop("type", "AnnealingLR")
    if kwargs.get("total_steps", -1) in (-1, None):
        kwargs["total_steps"] = total_steps
    if kind == "AnnealingLR":
        try:
            return AnnealingLR(**kwargs)
        except TypeError as err:
            raise UserInputError(f"lr_schedule: {err}") from err
    return build_registered(MindFormerModuleType.LR, kind, **kwargs)


def parameter_groups(params, weight_decay, lr_schedule, layer_scale=False, layer_decay=1.0,
                     num_layers=None):
    """Optimizer groups: MindFormers' rule puts 1-D parameters and names ending in `.bias`
    (biases, LayerNorm) in a group without weight decay; with `layer_scale` each layer gets
    its own group with lr * layer_lr_scale (see research/common/lr_schedule.py)."""
    if layer_scale and num_layers is None:
        num_layers = 1 + max([layer_index(p.name) or 0 for p in params], default=0)
    groups = {}
    for param in params:
        decay = len(param.shape) > 1 and not param.name.endswith(".bias")
        scale = layer_lr_scale(param.name, layer_decay, num_layers) if layer_scale else 1.0
        if (decay, scale) not in groups:
            group = {"params": [], "weight_decay": weight_decay if decay else 0.0}
            if layer_scale:
                group["lr"] = LayerScaledLR(lr_schedule, scale)
            groups[(decay, scale)] = group
        groups[(decay, scale)]["params"].append(param)
    return list(groups.values())


def rank_batch_indices(order, position, batch_size, context):
    """Sample indices of this rank's share of global batch `position` of an epoch's order."""
    start = (position * context.world_size + context.rank) * batch_size
    return order[start:start + batch_size]


class TrainProgress(Progress):
    """`Progress` whose line shows the loss, lr, loss scale and samples per second."""

    def __init__(self, total, start, global_batch, stream=None):
        super().__init__(total, "train", "steps", stream)
        self.count = start
        self.start = start
        self.global_batch = global_batch
        self.metrics = ""

    def line(self):
        elapsed = time.monotonic() - self._start
        samples = (self.count - self.start) * self.global_batch / elapsed if elapsed > 0 else 0.0
        return (f"train: {self.count}/{self.total} steps{self.metrics}, "
                f"{samples:.1f} samples/s, {elapsed:.1f} s")


def _write_csv(path, rows):
    with atomic_write(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path, up_to_step):
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    types = {"step": int, "epoch": int, "skipped": int}
    rows = [{k: types.get(k, float)(row[k]) for k in COLUMNS} for row in rows]
    return [row for row in rows if row["step"] <= up_to_step]


@contextlib.contextmanager
def output_dir_lock(output_dir, context=None, stream=None):
    """Hold rank N's lock on `output_dir` (`.lock_rank_N`) for the block.

    Two runs writing one folder would mix their checkpoints and prune each other's files; the
    ranks of one run each lock their own file. A second run is refused (UserInputError naming
    the holder); the lock of a killed run is taken over with a note. A run script takes it
    before loading the model, so a refusal costs nothing; `Trainer.train` takes it again
    (nested) for callers that did not."""
    context = context or ParallelContext()
    path = os.path.join(output_dir, f".lock_rank_{context.rank}")
    stack = contextlib.ExitStack()
    try:
        os.makedirs(output_dir, exist_ok=True)
        previous = stack.enter_context(exclusive_lock(path))
    except LockHeld as held:
        raise UserInputError(f"{output_dir} is in use by another run "
                             f"({held.holder or 'a process that is just starting'}, lock "
                             f"{path}); wait for it to end or choose another output_dir") from None
    except OSError as err:
        raise UserInputError(f"cannot lock {path}: {err.strerror or err}") from err
    with stack:
        if previous and context.is_main:
            print(f"taking over {path} from a run that ended without releasing it ({previous})",
                  file=stream or sys.stderr)
        yield


class Trainer:
    """Train `trainable_params` of `network` (everything else stays bit-identical)."""

    def __init__(self, network, trainable_params, args, output_dir=None, parallel_context=None,
                 stream=None):
        self.args = args if isinstance(args, TrainingArguments) else TrainingArguments.from_yaml(args)
        self.network = network
        self.params = list(trainable_params)
        names = [p.name for p in self.params]
        if not self.params or len(set(names)) != len(names):
            raise UserInputError(f"trainable parameters must be a non-empty list of distinct "
                                 f"parameters, got {names}")
        frozen = [p.name for p in self.params if not p.requires_grad]
        if frozen:
            raise UserInputError(f"parameters marked requires_grad=False cannot be trained: {frozen}")
        self.output_dir = output_dir or self.args.output_dir
        self.context = parallel_context or ParallelContext()
        self.stream = stream
        self.optimizer = self.lr_schedule = self.step_cell = None
        self.history = []

    # ---------------------------------------------------------------- building
    def _build(self, total_steps):
        args = self.args
        self.lr_schedule = build_lr_schedule(args.lr_schedule, total_steps)
        groups = parameter_groups(self.params, args.weight_decay, self.lr_schedule,
                                  args.layer_scale, args.layer_decay, args.num_layers)
        self.optimizer = nn.AdamWeightDecay(groups, learning_rate=self.lr_schedule,
                                            beta1=args.beta1, beta2=args.beta2, eps=args.eps)
        reducer = gradient_reducer(self.optimizer.parameters, self.context)
        flags_all_reduce = ops.AllReduce() if reducer is not None else None
        set_dropout_keys(self.network, ms.get_seed() or 0)
        self.step_cell = TrainStep(self.network, self.optimizer, self.lr_schedule,
                                   args.max_grad_norm if args.use_clip_grad else None,
                                   reducer, flags_all_reduce)
        self.step_cell.set_train(True)

    # ---------------------------------------------------------------- paths
    def _checkpoint_dir(self, kind, rank=None):
        return os.path.join(self.output_dir, kind, f"rank_{self.context.rank if rank is None else rank}")

    def _checkpoints(self, directory, rank=None):
        """[(step, path)] of this rank's (or `rank`'s) checkpoints in `directory`, oldest first."""
        rank = self.context.rank if rank is None else rank
        pattern = re.compile(rf"{re.escape(self.args.prefix)}_rank_{rank}-(\d+)\.ckpt$")
        found = []
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            match = pattern.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(directory, name)))
        return sorted(found)

    def latest_state(self):
        """The newest training state any rank of this run saved (this rank's file if it has
        one), or None. The ranks hold identical states, and a kill during a save can leave one
        rank without the newest file that the others wrote: all must continue from one step."""
        newest = {}
        for rank in range(self.context.world_size):
            for step, path in self._checkpoints(self._checkpoint_dir("checkpoint", rank), rank):
                if step not in newest or rank == self.context.rank:
                    newest[step] = path
        return newest[max(newest)] if newest else None

    def _note(self, text):
        if self.context.is_main:
            print(text, file=self.stream or sys.stderr)

    # ---------------------------------------------------------------- state
    def _save(self, state):
        args, rank = self.args, self.context.rank
        name = f"{args.prefix}_rank_{rank}-{state['step']}.ckpt"
        trainable = {p.name: p.asnumpy() for p in self.params}
        full = dict(trainable)
        for param in (*self.optimizer.moments1, *self.optimizer.moments2, self.optimizer.global_step):
            full[param.name] = param.asnumpy()
        for key in _STATE_KEYS:
            full[f"trainer.{key}"] = np.array(state[key], np.float64 if key == "loss_scale" else np.int64)
        self._write_logs()  # first: a kill between the two cannot leave loss.csv behind a state
        for kind, params in (("checkpoint_trainable", trainable), ("checkpoint", full)):
            directory = self._checkpoint_dir(kind)
            self._write(os.path.join(directory, name), functools.partial(save_checkpoint_atomic, params))
            for _, old in self._checkpoints(directory)[:-max(args.keep_checkpoint_max, 1)]:
                os.remove(old)

    def _write_logs(self):
        if not self.context.is_main:
            return
        self._write(os.path.join(self.output_dir, "loss.csv"),
                    functools.partial(_write_csv, rows=self.history))
        applied = [row for row in self.history if not row["skipped"]]
        self._write(os.path.join(self.output_dir, "loss.png"),
                    functools.partial(write_loss_png, steps=[row["step"] for row in applied],
                                      losses=[row["loss"] for row in applied]))

    def _write(self, path, write):
        """`write(path)`; a failed write (disk full, file size limit) ends the run in one line.
        atomic_write has removed the partial file, and the older files are intact."""
        try:
            write(path)
        except OSError as err:
            latest = self.latest_state()
            then = (f"the newest complete state, {latest}, continues it with --resume" if latest
                    else "no training state was saved yet")
            raise UserInputError(f"could not write {path}: {err.strerror or err}; training "
                                 f"stopped; {then}") from err

    def _resume_path(self, resume):
        """The training-state file to continue from (`resume`: a file, a directory, or True for
        this run's newest state), or None when resume=True finds nothing saved yet."""
        if resume is True:
            path = self.latest_state()
            if path is None:
                self._note(f"nothing to resume: no {self.args.prefix}_rank_{self.context.rank}-"
                           f"<step>.ckpt in {self._checkpoint_dir('checkpoint')}; starting at step 0")
            return path
        path = str(resume)
        if os.path.isdir(path):
            found = self._checkpoints(path)
            if not found:
                raise UserInputError(f"nothing to resume from: no {self.args.prefix}_rank_"
                                     f"{self.context.rank}-<step>.ckpt in {path}")
            path = found[-1][1]
        return path

    def _restore(self, path, global_batch):
        """Load the training-state checkpoint `path`; returns the trainer's state."""
        saved = read_checkpoint(path, "training-state checkpoint")
        targets = (*self.params, *self.optimizer.moments1, *self.optimizer.moments2,
                   self.optimizer.global_step)
        needed = [p.name for p in targets] + [f"trainer.{key}" for key in _STATE_KEYS]
        missing = [name for name in needed if name not in saved]
        if missing:
            raise UserInputError(f"{path} is not a training state for these parameters "
                                 f"(a checkpoint_trainable file?); missing: {missing[:10]}")
        for param in targets:
            value = saved[param.name]
            if value.size != int(np.prod(param.shape)):
                raise UserInputError(f"{path}: {param.name} has shape {value.shape}, the model "
                                     f"{tuple(param.shape)}")
            param.set_data(ms.Tensor(value.reshape(param.shape), param.dtype))
        state = {key: saved[f"trainer.{key}"].item() for key in _STATE_KEYS}
        state["loss_scale"] = float(state["loss_scale"])
        if state["global_batch"] != global_batch:
            raise UserInputError(f"{path} was written with a global batch of "
                                 f"{state['global_batch']} samples, this run uses {global_batch}; "
                                 f"resume with the same batch_size and number of processes")
        return state

    # ---------------------------------------------------------------- training
    def train(self, dataset, resume=None):
        """Train under the output_dir lock; returns the loss history (one dict per step with
        the COLUMNS). `resume`: a training-state file or folder, or True for this run's newest
        state (none saved yet: start at step 0)."""
        with output_dir_lock(self.output_dir, self.context, self.stream):
            debris = [*remove_temp_files(self._checkpoint_dir("checkpoint"), r".+\.ckpt"),
                      *remove_temp_files(self._checkpoint_dir("checkpoint_trainable"), r".+\.ckpt")]
            if self.context.is_main:
                debris += remove_temp_files(self.output_dir, r"loss\.(?:csv|png)")
            if debris:
                self._note(f"removed {len(debris)} unfinished file(s) of an interrupted save: "
                           f"{', '.join(debris)}")
            return self._train(dataset, resume)

    def _train(self, dataset, resume):
        args, context = self.args, self.context
        columns = list(dataset.columns)
        global_batch = args.batch_size * context.world_size
        steps_per_epoch = len(dataset) // global_batch
        if steps_per_epoch == 0:
            raise UserInputError(f"the dataset has {len(dataset)} samples, fewer than one global "
                                 f"batch of {global_batch} (batch_size {args.batch_size} x "
                                 f"{context.world_size} processes)")
        total_steps = args.lr_schedule.get("total_steps", -1)
        if total_steps in (-1, None):
            total_steps = args.epochs * steps_per_epoch
        if self.step_cell is None:
            self._build(total_steps)

        state = dict(step=0, epoch=0, position=0, loss_scale=float(args.loss_scale_value),
                     good_steps=0, bad_steps=0, global_batch=global_batch)
        self.history, saved_step = [], None
        path = self._resume_path(resume) if resume else None
        if path is not None:
            state = self._restore(path, global_batch)
            self.history = _read_csv(os.path.join(self.output_dir, "loss.csv"), state["step"])
            saved_step = state["step"]
            self._note(f"resuming at step {saved_step} of {total_steps} from {path}")
        order_epoch, order = None, None
        progress = TrainProgress(total_steps, state["step"], global_batch, self.stream)
        with progress:
            while state["step"] < total_steps:
                if state["position"] >= steps_per_epoch:
                    state["epoch"], state["position"] = state["epoch"] + 1, 0
                if order_epoch != state["epoch"]:
                    order_epoch, order = state["epoch"], self._order(dataset, state["epoch"])
                indices = rank_batch_indices(order, state["position"], args.batch_size, context)
                samples = [dataset[int(i)] for i in indices]
                inputs = [ms.Tensor(np.stack([s[c] for s in samples])) for c in columns]
                start = time.perf_counter()
                DROPOUT_STEP.set_data(ms.Tensor(np.int32(state["step"])))  # this step's dropout masks
                loss, overflow, loss_finite, lr = self.step_cell(
                    ms.Tensor(state["loss_scale"], ms.float32), *inputs)
                loss, overflow, loss_finite = float(loss.asnumpy()), bool(overflow), bool(loss_finite)
                state["step"] += 1
                state["position"] += 1
                self.history.append(dict(
                    step=state["step"], epoch=state["epoch"], loss=loss,
                    lr=float(lr.asnumpy().reshape(-1)[0]), loss_scale=state["loss_scale"],
                    skipped=int(overflow), seconds=round(time.perf_counter() - start, 6)))
                self._update_loss_scale(state, overflow, loss_finite)
                progress.metrics = (f", loss {loss:.4g}, lr {self.history[-1]['lr']:.3g}, "
                                    f"scale {state['loss_scale']:g}")
                progress.update()
                if state["bad_steps"] >= args.nan_patience:
                    self._write_logs()
                    raise TrainingDivergedError(self._diverged_message(state, loss_finite))
                if args.save_checkpoint_steps and state["step"] % args.save_checkpoint_steps == 0:
                    self._save(state)
                    saved_step = state["step"]
        if saved_step != state["step"]:
            self._save(state)
        return self.history

    @staticmethod
    def _order(dataset, epoch):
        order = dataset.order(epoch) if hasattr(dataset, "order") else range(len(dataset))
        return np.asarray(list(order), dtype=np.int64)

    def _update_loss_scale(self, state, overflow, loss_finite):
        """DynamicLossScaleUpdateCell's rule, and the count of steps scaling cannot fix."""
        args = self.args
        if overflow:
            at_minimum = args.scale_factor <= 1 or state["loss_scale"] <= 1
            state["bad_steps"] = state["bad_steps"] + 1 if (not loss_finite or at_minimum) else 0
            state["loss_scale"] = max(state["loss_scale"] / args.scale_factor, 1.0)
            state["good_steps"] = 0
            return
        state["bad_steps"] = 0
        state["good_steps"] += 1
        if args.scale_window > 0 and state["good_steps"] >= args.scale_window:
            state["loss_scale"] *= args.scale_factor
            state["good_steps"] = 0

    def _diverged_message(self, state, loss_finite):
        reason = ("the loss was not finite" if not loss_finite else
                  "the gradients overflowed with the loss scale at its minimum")
        latest = self._checkpoints(self._checkpoint_dir("checkpoint"))
        hint = f"; the last good state is {latest[-1][1]}" if latest else ""
        return (f"training stopped at step {state['step']} (epoch {state['epoch']}): {reason} "
                f"on {state['bad_steps']} consecutive steps, which loss scaling cannot fix. "
                f"The losses so far are in {os.path.join(self.output_dir, 'loss.csv')}{hint}. "
                f"Lower the learning rate or check the data.")


def prepare_training(yaml_config, read_fields, *, graph_mode=None, batch_size=None, device_id=None, epochs=None,
                     output_dir=None):
    """What every fine-tuning run does first: the device and mode (--graph_mode), the data-parallel
    group, the TrainingArguments with the flags over the YAML, and a refusal of top-level YAML
    fields outside `read_fields`. Returns (parallel context, training arguments)."""
    if batch_size is not None and batch_size <= 0:
        raise UserInputError(f"--batch_size must be positive, got {batch_size}")
    if graph_mode is not None:
        yaml_config.context = {**(yaml_config.get("context") or {}), "mode": graph_mode}
    init_context(yaml_config, device_id, tasks=("finetune", "train"))
    parallel = init_data_parallel(yaml_config)
    overrides = dict(batch_size=batch_size, epochs=epochs,
                     output_dir=output_dir and os.path.abspath(output_dir))  # a flag: from here
    training = TrainingArguments.from_yaml(yaml_config, **{k: v for k, v in overrides.items() if v is not None})
    unread = sorted(set(yaml_config) - set(read_fields) - {"source"})  # source: the ConfigSource
    if unread:
        raise UserInputError(f"{yaml_config.source.where(unread[0])}: not read by fine-tuning; remove the field")
    return parallel, training


def train_and_report(network, trainable, training, parallel, dataset, resume, *, weights, method):
    """Train `network` (its `trainable` parameters) on `dataset` and say, on the main rank, what
    was loaded (`weights`), what trains (`method`) and where the result went; returns (trainer,
    loss history)."""
    if parallel.is_main:
        count = sum(int(p.size) for p in trainable)
        resumed = "; --resume replaces the trained ones with the saved state, if any" if resume else ""
        print(f"weights loaded: {weights}{resumed}")
        print(f"training {len(trainable)} tensors ({count:,} parameters) on {len(dataset)} samples; "
              f"{method}; rank {parallel.rank} of {parallel.world_size}")
    network.set_train(True)
    trainer = Trainer(network, trainable, training, parallel_context=parallel)
    history = trainer.train(dataset, resume=resume)
    if parallel.is_main and history:
        print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f}; trainable checkpoints "
              f"in {os.path.join(trainer.output_dir, 'checkpoint_trainable')}")
    return trainer, history


def finetune_parser(description, default_config, config_dir):
    """The flags of every run_*_finetune.py (MindFormers' names, plus --resume); the caller
    passes `resume_value(args.resume)` on."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config_path", dest="config", default=default_config,
                        help=f"YAML path or a name in {config_dir}")
    parser.add_argument("--graph_mode", type=int, choices=(0, 1), default=None,
                        help="0 GRAPH, 1 PYNATIVE (default: the YAML's context.mode)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="per-process batch size (default: runner_config.batch_size)")
    parser.add_argument("--device_id", type=int, default=None,
                        help="NPU id (default: context.device_id, else DEVICE_ID, which "
                             "run_singlenode.sh sets per rank, else 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default: runner_config.epochs")
    parser.add_argument("--output_dir", default=None, help="default: the YAML's output_dir")
    parser.add_argument("--resume", default=None,
                        help="'True' for the latest checkpoint in output_dir (nothing saved yet: "
                             "start at step 0), or a checkpoint path")
    return parser


def resume_value(flag):
    """--resume as Trainer.train takes it: True, None, or a path."""
    return {"true": True, "false": None}.get(str(flag).lower(), flag)
