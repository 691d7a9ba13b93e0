"""What every run script does: pick the device, build registered classes from the YAML,
load checkpoints, and turn bad input into a one-line error with exit code 2."""
import dataclasses
import functools
import os
import sys
from typing import Literal, Optional

import mindspore as ms
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.checkpoint import load_params_into_net, read_checkpoint
from research.common.config import FieldError, ModelConfig, check_int, repo_path
from research.common.errors import UserInputError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def cli_main(main):
    """Run `main()`; a UserInputError prints 'error: ...' and exits with code 2, Ctrl-C prints
    'interrupted' and exits with 130 (the shell's code for SIGINT), neither with a traceback."""

    @functools.wraps(main)
    def wrapper(argv=None, **kwargs):
        try:
            return main(argv, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def str2bool(value):
    """argparse type for 'True'/'False' flags as MindFormers' scripts take them."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise UserInputError(f"expected True or False, got {value!r}")


def add_generation_arguments(parser, default_config, config_dir):
    """The flags every inference script takes (MindFormers' names); None means the YAML's value."""
    parser.add_argument("--config", "--config_path", dest="config", default=default_config,
                        help=f"YAML path or a name in {config_dir}")
    parser.add_argument("--device_id", type=int, default=None, help="default: context.device_id, else 0")
    parser.add_argument("--use_past", type=str2bool, default=None, help="KV cache (overrides YAML)")
    parser.add_argument("--do_sample", type=str2bool, default=None, help="sample (overrides YAML)")
    parser.add_argument("--max_new_tokens", type=int, default=None)


def device_target():
    """Ascend where an NPU is visible, else CPU (GPU builds of MindSpore are not used here)."""
    return "Ascend" if os.path.exists("/dev/davinci0") else "CPU"


@dataclasses.dataclass
class ContextConfig(ModelConfig):
    """The YAML's `context`: MindSpore's execution mode and the Ascend device."""

    mode: int = 0  # 0 GRAPH, 1 PYNATIVE
    device_id: Optional[int] = None  # the NPU on Ascend (a CPU run has one device)
    # MindFormers' field; by default the device is found (Ascend where an NPU is visible, else CPU).
    device_target: Optional[Literal["Ascend", "CPU"]] = None

    def validate(self):
        if self.mode not in (0, 1):
            raise FieldError("mode", f"must be 0 (GRAPH) or 1 (PYNATIVE), got {self.mode!r}")
        if self.device_id is not None and self.device_id < 0:
            raise FieldError("device_id", f"must be >= 0, got {self.device_id}")


def init_context(config, device_id=None):
    """Set MindSpore's mode, device and seed from the YAML's `context` and `seed`.

    The device is `device_id` (the --device_id flag) when given, else `context.device_id`, else
    $DEVICE_ID, else 0, as in MindFormers (run_mindformer.py, build_context). `run_mode` is
    refused: each script does one task.
    """
    source = getattr(config, "source", None)

    def where(path):
        return source.where(path) if source is not None else path

    if "run_mode" in config:
        raise UserInputError(f"{where('run_mode')}: not read: each script does one task "
                             f"(run_visualglm*.py and run_glm.py answer, run_visualglm_finetune.py "
                             f"fine-tunes); remove the field")
    context = ContextConfig.from_dict(config.get("context"), "context", source)
    if context.device_id is not None and config.get("use_parallel"):
        raise UserInputError(f"{where('context.device_id')}: with use_parallel: True each process "
                             f"takes its device from the launcher (DEVICE_ID from run_singlenode.sh, "
                             f"or msrun); remove the field")
    ms.set_context(mode=ms.GRAPH_MODE if context.mode == 0 else ms.PYNATIVE_MODE)
    target = device_target()
    if context.device_target == "Ascend" and target != "Ascend":
        raise UserInputError(f"{where('context.device_target')}: Ascend, but no Ascend device is visible "
                             f"(/dev/davinci0); set CPU or remove the field to use what there is")
    target = context.device_target or target
    if target == "Ascend":
        if device_id is None:
            device_id = context.device_id
        if device_id is None:
            device_id = os.environ.get("DEVICE_ID", "0")
            if not device_id.isdigit():
                raise UserInputError(f"DEVICE_ID must be a device number, got {device_id!r}")
        ms.set_device(target, int(device_id))
    elif ms.get_context("device_target") != target:  # CPU is the default; set once per process
        ms.set_device(target)
    ms.set_seed(check_int(where("seed"), config.get("seed") or 0, minimum=0))
    return target


def resolve_path(path, what):
    """An existing file or folder named in a YAML (relative: to the repository root)."""
    found = repo_path(path)
    if os.path.exists(found):
        return found
    where = "" if found == path else f" (a relative path in a YAML is relative to the repository root: {found})"
    raise UserInputError(f"{what} not found: {path}{where}")


def build_registered(module_type, name, *args, **kwargs):
    """Instantiate a class registered in MindFormers' registry, with a clear unknown-name error."""
    if not MindFormerRegister.is_exist(module_type, name):
        raise UserInputError(f"unknown {module_type} type {name!r}: no such class is registered in MindFormers")
    return MindFormerRegister.get_cls(module_type, name)(*args, **kwargs)


def load_weights(net, checkpoint, what, allow_missing=(), prefix=""):
    """Load a converted checkpoint into `net` (nothing to do for an empty path)."""
    if not checkpoint:
        return False
    params = read_checkpoint(resolve_path(checkpoint, what), what)
    load_params_into_net(net, params, what=f"{what} {checkpoint}", allow_missing=allow_missing,
                         prefix=prefix)
    return True


MODELS = MindFormerModuleType.MODELS
CONFIG = MindFormerModuleType.CONFIG
TOKENIZER = MindFormerModuleType.TOKENIZER
