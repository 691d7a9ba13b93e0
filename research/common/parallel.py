"""Data parallelism with MindSpore's collective communication (HCCL on Ascend, MindSpore's
own TCP collectives on CPU under `msrun`).

A process started by `research/run_singlenode.sh` (or msrun) joins the group with
`init_data_parallel`; the trainer averages gradients with `gradient_reducer`. With
`use_parallel: False` both are no-ops, so one code path serves one and N processes.
"""
import dataclasses
import os

from research.common.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


def init_data_parallel(yaml_config):
    """Join the process group when the YAML says `use_parallel: True`; returns the context.

    `parallel_config.data_parallel` must equal the number of processes launched. On Ascend
    with a rank table (run_singlenode.sh) this process's device is $DEVICE_ID: call this
    before anything sets another device. With `use_parallel: False` in a process that a
    launcher started as one of several, it raises instead of training N separate copies.
    """
    if not yaml_config.get("use_parallel", False):
        _check_not_launched_for_many()
        return ParallelContext()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    mode = (yaml_config.get("parallel") or {}).get("parallel_mode", 0)
    if mode != 0:
        raise UserInputError(f"parallel.parallel_mode {mode!r}: only 0 (data parallel) is supported")
    _use_rank_table_device()
    try:
        init()
    except RuntimeError as err:
        raise UserInputError(
            "use_parallel is True but this process was not started by a launcher "
            "(run_singlenode.sh or msrun) that sets up the process group: " + str(err)) from err
    world_size, rank = get_group_size(), get_rank()
    wanted = (yaml_config.get("parallel_config") or {}).get("data_parallel", world_size)
    if wanted != world_size:
        raise UserInputError(f"parallel_config.data_parallel is {wanted} but {world_size} "
                             f"processes were launched")
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    return ParallelContext(rank=rank, world_size=world_size)


def _launched_by():
    """'msrun' or 'rank_table' when a multi-process launcher started this process, else None."""
    if os.environ.get("MS_ROLE"):  # msrun (and MindSpore's dynamic cluster) set it
        return "msrun"
    if os.environ.get("RANK_TABLE_FILE") and os.environ.get("DEVICE_ID") is not None:
        return "rank_table"  # research/run_singlenode.sh on Ascend
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
