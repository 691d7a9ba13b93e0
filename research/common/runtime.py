"""What every run script does: pick the device, build registered classes from the YAML,
load checkpoints, and turn bad input into a one-line error with exit code 2."""
import functools
import os
import sys

import mindspore as ms
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.checkpoint import load_params_into_net, read_checkpoint
from research.common.config import REPO_ROOT
from research.common.errors import UserInputError

EXIT_BAD_INPUT = 2


def cli_main(main):
    """Run `main()`; a UserInputError prints 'error: ...' and exits with code 2."""

    @functools.wraps(main)
    def wrapper(argv=None, **kwargs):
        try:
            return main(argv, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

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


def device_target():
    """Ascend where an NPU is visible, else CPU (GPU builds of MindSpore are not used here)."""
    return "Ascend" if os.path.exists("/dev/davinci0") else "CPU"


def init_context(config, device_id=0):
    """Set MindSpore's mode and device from the YAML's `context` section and the CLI."""
    context = config.get("context") or {}
    mode = context.get("mode", 0)
    if mode not in (0, 1):
        raise UserInputError(f"context.mode must be 0 (GRAPH) or 1 (PYNATIVE), got {mode!r}")
    ms.set_context(mode=ms.GRAPH_MODE if mode == 0 else ms.PYNATIVE_MODE)
    target = device_target()
    if target == "Ascend":
        ms.set_device(target, device_id)
    elif ms.get_context("device_target") != target:  # CPU is the default; set once per process
        ms.set_device(target)
    ms.set_seed(int(config.get("seed", 0) or 0))
    return target


def resolve_path(path, what):
    """A file path from the command line or YAML: as given, else relative to the repo root."""
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.exists(candidate):
            return candidate
    raise UserInputError(f"{what} not found: {path}")


def build_registered(module_type, name, *args, **kwargs):
    """Instantiate a class registered in MindFormers' registry, with a clear unknown-name error."""
    if not MindFormerRegister.is_exist(module_type, name):
        raise UserInputError(f"unknown {module_type} type {name!r}; is the model package imported?")
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
