"""Loading parameters into a network with errors that say which names and shapes are wrong."""
import dataclasses
import glob
import os
import re

import numpy as np
import mindspore as ms

from research.common.convert import MODEL_PARAMETERS, check_names_and_shapes
from research.common.errors import UserInputError


def read_checkpoint(path, what="checkpoint"):
    """{name: numpy array} from a MindSpore .ckpt file, or a clear error."""
    if not os.path.isfile(path):
        raise UserInputError(f"{what} not found: {path}")
    try:
        params = ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for corrupt files
        raise UserInputError(f"{what} {path} is not a readable MindSpore checkpoint: {err}") from err
    return {name: value.asnumpy() for name, value in params.items()}


def load_params_into_net(net, params, what="checkpoint", allow_missing=(), prefix=""):
    """Copy {name: array} into `net`; unknown, missing or mis-shaped names are an error.

    `allow_missing` lists name prefixes that may stay at their initial values (for example
    LoRA weights when loading a base checkpoint). `prefix` is where the checkpoint's names
    are rooted in `net`: a sub-cell's parameters carry their parent's path
    (`llm_model.transformer...`) while a GLM checkpoint says `transformer...`.
    """
    own = {p.name[len(prefix):]: p for p in net.get_parameters() if p.name.startswith(prefix)}
    copy_params(own, params, what, allow_missing)


def copy_params(own, params, what, allow_missing=(), hint="wrong model or config?"):
    """Copy {name: array} into the parameters {name: Parameter} after checking that the names
    and shapes match exactly (names starting with `allow_missing` may be absent)."""
    check_names_and_shapes({name: param.shape for name, param in own.items()},
                           {name: np.shape(value) for name, value in params.items()},
                           f"{what} does not fit this model ({hint})",
                           dataclasses.replace(MODEL_PARAMETERS, found_side=what),
                           optional=allow_missing)
    for name, value in params.items():
        param = own[name]
        param.set_data(ms.Tensor(np.asarray(value), dtype=param.dtype))


def latest_checkpoint(path):
    """`path` itself, or the checkpoint with the highest step (`...-STEP.ckpt`) in a folder."""
    if not os.path.isdir(path):
        return path
    files = glob.glob(os.path.join(path, "*.ckpt"))
    if not files:
        raise UserInputError(f"no .ckpt file in {path}")

    def step(name):
        numbers = re.findall(r"-(\d+)\.ckpt$", name)
        return (int(numbers[0]) if numbers else -1, os.path.getmtime(name))

    return max(files, key=step)
