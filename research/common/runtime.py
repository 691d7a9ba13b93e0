"""What every run script does: pick the device, build registered classes from the YAML,
load checkpoints, and turn bad input into a one-line error with exit code 2."""
import dataclasses
import functools
import os
import re
import sys
from typing import Literal, Optional, Union

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


class StreamPrinter:
    """Prints a single row's answer as it grows, for generate()'s `on_tokens` (the terminal chats).

    It decodes the whole answer each step, since a sentencepiece piece may only become printable
    together with the next one. `visible(text)` is the part of the decoded text to show (e.g. the
    text before a stop string); only what extends what is shown already is written."""

    def __init__(self, tokenizer, out, visible=lambda text: text):
        self.tokenizer, self.out, self.visible = tokenizer, out, visible
        self.ids, self.shown = [], ""

    def __call__(self, new_tokens):
        if new_tokens[0] is None:
            return
        self.ids.append(new_tokens[0])
        text = self.visible(self.tokenizer.decode(self.ids))
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def read_line(prompt, stdin):
    """One line typed at the terminal chats, stripped; None at the end of input."""
    print(prompt, end="", flush=True)
    line = stdin.readline()
    return None if line == "" else line.strip()


def ask_image(image_processor, stdin):
    """Ask for an image path until `image_processor` reads it (a bad file is reported and asked
    for again, not fatal); None at 'stop' or the end of input."""
    while True:
        image = read_line("image path: ", stdin)
        if image is None or image == "stop":
            return None
        try:
            image_processor(image)
            return image
        except UserInputError as err:
            print(f"error: {err}")


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
    """The YAML's `context`: MindSpore's execution mode and the Ascend device, plus the MindSpore
    context settings MindFormers' YAMLs carry, handed to MindSpore as MindFormers' build_context
    hands them (MindSpore itself says where one does not apply, e.g. max_device_memory on CPU)."""

    mode: int = 0  # 0 GRAPH, 1 PYNATIVE
    device_id: Optional[int] = None  # the NPU on Ascend (a CPU run has one device)
    # MindFormers' field; by default the device is found (Ascend where an NPU is visible, else CPU).
    device_target: Optional[Literal["Ascend", "CPU"]] = None
    max_device_memory: Optional[str] = None  # e.g. "30GB" ("59GB" for Atlas 800T A2)
    max_call_depth: Optional[int] = None
    save_graphs: Union[bool, int, None] = None
    save_graphs_path: Optional[str] = None
    enable_graph_kernel: Optional[bool] = None
    graph_kernel_flags: Optional[str] = None

    def validate(self):
        if self.mode not in (0, 1):
            raise FieldError("mode", f"must be 0 (GRAPH) or 1 (PYNATIVE), got {self.mode!r}")
        if self.device_id is not None and self.device_id < 0:
            raise FieldError("device_id", f"must be >= 0, got {self.device_id}")
        if self.max_device_memory is not None and not re.fullmatch(r"\d+(\.\d+)?GB", self.max_device_memory):
            raise FieldError("max_device_memory", f"must be a size such as '30GB', got {self.max_device_memory!r}")
        if self.max_call_depth is not None and self.max_call_depth < 1:
            raise FieldError("max_call_depth", f"must be >= 1, got {self.max_call_depth}")

    def mindspore_settings(self):
        """The fields MindSpore's set_context takes as they are (those given in the YAML)."""
        names = ("max_device_memory", "max_call_depth", "save_graphs", "save_graphs_path",
                 "enable_graph_kernel", "graph_kernel_flags")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


# MindFormers' run_mindformer.py tasks; its --run_mode flag overrides the YAML's, as the script does here.
RUN_MODES = ("train", "finetune", "eval", "predict", "export")


def init_context(config, device_id=None, tasks=("predict", "eval")):
    """Set MindSpore's mode, device and seed from the YAML's `context` and `seed`.

    The device is `device_id` (the --device_id flag) when given, else `context.device_id`, else
    $DEVICE_ID, else 0, as in MindFormers (run_mindformer.py, build_context). The script chooses
    the task, as MindFormers' --run_mode does; a YAML `run_mode` naming another one (the same
    MindFormers YAML serves all tasks) is said in one line, not obeyed.
    """
    source = getattr(config, "source", None)

    def where(path):
        return source.where(path) if source is not None else path

    run_mode = config.get("run_mode")
    if run_mode is not None and run_mode not in RUN_MODES:
        raise UserInputError(f"{where('run_mode')}: must be one of {list(RUN_MODES)}, got {run_mode!r}")
    if run_mode is not None and run_mode not in tasks:
        print(f"note: {where('run_mode')} is {run_mode!r}; {os.path.basename(sys.argv[0])} does "
              f"{tasks[0]!r}: the script chooses the task (MindFormers' --run_mode)", file=sys.stderr)
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
    if context.mindspore_settings():  # after the device: max_device_memory applies to it
        ms.set_context(**context.mindspore_settings())
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
