"""Data parallelism with MindSpore's collective communication (HCCL on Ascend, MindSpore's
own TCP collectives on CPU under `msrun`).

A process started by `run_singlenode.sh` (or msrun) joins the group with
`init_data_parallel`; the trainer averages gradients with `gradient_reducer`. With
`use_parallel: False` both are no-ops, so one code path serves one and N processes.
"""
import dataclasses
import os
from typing import Optional

from research.common.config import FieldError, ModelConfig
from research.common.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


@dataclasses.dataclass
class AutoParallelConfig(ModelConfig):
    """The YAML's `parallel` (MindSpore's auto-parallel context), at the values that data
    parallelism as implemented here means."""

    parallel_mode: int = 0
    gradients_mean: bool = True
    full_batch: bool = False

    IMPLEMENTED = {
        "parallel_mode": (0, "data parallel: each process trains a whole copy of the model"),
        "gradients_mean": (True, "the gradients are averaged over the processes"),
        "full_batch": (False, "each process reads only its share of the global batch"),
    }

    def validate(self):
        for name, (value, meaning) in self.IMPLEMENTED.items():
            if getattr(self, name) != value:
                raise FieldError(name, f"only {value!r} is implemented ({meaning}), "
                                       f"got {getattr(self, name)!r}")


@dataclasses.dataclass
class ParallelConfig(ModelConfig):
    """The YAML's `parallel_config`: only data parallelism is implemented."""

    data_parallel: Optional[int] = None  # default: the number of processes launched
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1

    def validate(self):
        if self.data_parallel is not None and self.data_parallel < 1:
            raise FieldError("data_parallel", f"must be a positive integer, got {self.data_parallel}")
        for name in ("model_parallel", "pipeline_stage", "micro_batch_num"):
            if getattr(self, name) != 1:
                raise FieldError(name, f"must be 1, got {getattr(self, name)}: only data parallelism "
                                       f"is implemented (data_parallel processes, each with the "
                                       f"whole model)")


def init_data_parallel(yaml_config):
    """Join the process group when the YAML says `use_parallel: True`; returns the context.

    `parallel` and `parallel_config` are checked either way (AutoParallelConfig,
    ParallelConfig). `parallel_config.data_parallel` must equal the number of processes
    launched (1 with `use_parallel: False`). On Ascend with a rank table (run_singlenode.sh)
    this process's device is $DEVICE_ID: call this before anything sets another device. With
    `use_parallel: False` in a process that a launcher started as one of several, it raises
    instead of training N separate copies.
    """
    source = getattr(yaml_config, "source", None)

    def where(path):
        return source.where(path) if source is not None else path

    AutoParallelConfig.from_dict(yaml_config.get("parallel"), "parallel", source)
    wanted = ParallelConfig.from_dict(yaml_config.get("parallel_config"), "parallel_config",
                                      source).data_parallel
    use_parallel = yaml_config.get("use_parallel", False)
    if not isinstance(use_parallel, bool):
        raise UserInputError(f"{where('use_parallel')}: must be True or False, got {use_parallel!r}")
    if not use_parallel:
        _check_not_launched_for_many()
        if wanted not in (None, 1):
            raise UserInputError(f"{where('parallel_config.data_parallel')}: {wanted} but use_parallel "
                                 f"is False (one process); set use_parallel: True and launch {wanted} "
                                 f"processes, or set data_parallel: 1")
        return ParallelContext()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    _use_rank_table_device()
    try:
        init()
    except RuntimeError as err:
        raise UserInputError(
            "use_parallel is True but this process was not started by a launcher "
            "(run_singlenode.sh or msrun) that sets up the process group: " + str(err)) from err
    world_size, rank = get_group_size(), get_rank()
    if wanted not in (None, world_size):
        raise UserInputError(f"{where('parallel_config.data_parallel')}: {wanted} but {world_size} "
                             f"processes were launched")
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    return ParallelContext(rank=rank, world_size=world_size)


def _launched_by():
    """'msrun' or 'rank_table' when a multi-process launcher started this process, else None."""
    if os.environ.get("MS_ROLE"):  # msrun (and MindSpore's dynamic cluster) set it
        return "msrun"
    if os.environ.get("RANK_TABLE_FILE") and os.environ.get("DEVICE_ID") is not None:
        return "rank_table"  # run_singlenode.sh on Ascend
    return None


def _check_not_launched_for_many():
    """use_parallel False in one of N launched processes would train N separate copies
    (and, under msrun, the scheduler process too), all writing the same output files."""
    rank_size = os.environ.get("RANK_SIZE", "")
    if _launched_by() and rank_size.isdigit() and int(rank_size) > 1:
        raise UserInputError(f"this process is one of {rank_size} started by a launcher "
                             f"(run_singlenode.sh / msrun) but the YAML has use_parallel: False; set "
                             f"use_parallel: True and parallel_config.data_parallel: {rank_size}")


def _use_rank_table_device():
    """A rank-table launch gives each process its device in DEVICE_ID; MindSpore must use it
    before init() (msrun assigns devices itself, so it is left alone)."""
    if _launched_by() != "rank_table" or not os.path.exists("/dev/davinci0"):
        return
    import mindspore as ms

    device_id = os.environ["DEVICE_ID"]
    if not device_id.isdigit():
        raise UserInputError(f"DEVICE_ID must be a device number, got {device_id!r}")
    try:
        ms.set_device("Ascend", int(device_id))  # a no-op where it is already set to this device
    except RuntimeError as err:
        current = ms.get_current_device()
        raise UserInputError(
            f"this rank was launched on Ascend device {device_id} (DEVICE_ID) but MindSpore is already "
            f"set to {current.device_target} device {current.device_id}; pass the device id from "
            f"DEVICE_ID when setting up the context, or call init_data_parallel first") from err


def gradient_reducer(parameters, context: ParallelContext):
    """A cell averaging gradients over the processes, or None with one process."""
    if context.world_size == 1:
        return None
    from mindspore import nn

    return nn.DistributedGradReducer(parameters, mean=True, degree=context.world_size)
