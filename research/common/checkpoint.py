"""Loading parameters into a network with errors that say which names and shapes are wrong."""
import os

import numpy as np
import mindspore as ms

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
    unknown = sorted(set(params) - set(own))
    missing = sorted(name for name in set(own) - set(params)
                     if not name.startswith(tuple(allow_missing)))
    wrong = [f"{name}: model {tuple(own[name].shape)}, {what} {tuple(np.shape(params[name]))}"
             for name in sorted(set(params) & set(own))
             if tuple(own[name].shape) != tuple(np.shape(params[name]))]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} name(s) the model does not have: {', '.join(unknown[:10])}")
    if missing:
        problems.append(f"{len(missing)} model parameter(s) missing: {', '.join(missing[:10])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:10])}")
    if problems:
        raise UserInputError(f"{what} does not fit this model ({hint}): " + " | ".join(problems))
    for name, value in params.items():
        param = own[name]
        param.set_data(ms.Tensor(np.asarray(value), dtype=param.dtype))
