"""What an exported MindIR file declares: its inputs (names, static shapes, dtypes), read from
the file itself, so a runner learns what was exported (batch size, length, hidden size) and
which graph a file is before loading it.

Every graph input keeps the name of its `construct` argument in the file (`<graph>:<argument>`).
Weights over 1 GB are stored beside the file (`*_variables/`), so the file parsed here stays small.
"""
import dataclasses
import os

import numpy as np

from research.common.errors import UserInputError

# mind_ir.proto TensorProto.DataType names -> numpy dtypes.
_NUMPY_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64,
                 "FLOAT64": np.float64, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
                 "UINT8": np.uint8, "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class GraphInput:
    name: str
    shape: tuple
    dtype: np.dtype

    def __str__(self):
        return f"{self.name} [{', '.join(map(str, self.shape))}] {np.dtype(self.dtype).name}"


def read_graph_inputs(path, what):
    """[GraphInput] of a MindIR file, read from its protobuf (mindspore.train.mind_ir_pb2)."""
    from mindspore.train import mind_ir_pb2

    if not os.path.exists(path):
        raise UserInputError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise UserInputError(f"{what} {path} is a directory; give the .mindir file in it")
    model = mind_ir_pb2.ModelProto()
    try:
        with open(path, "rb") as stream:
            model.ParseFromString(stream.read())
    except OSError as err:
        raise UserInputError(f"cannot read {what} {path}: {err.strerror or err}") from err
    except Exception as err:  # protobuf's DecodeError and friends: not a MindIR file
        raise UserInputError(f"{what} {path} is not a MindIR file ({type(err).__name__})") from err
    if not model.HasField("graph") or not model.graph.input:
        raise UserInputError(f"{what} {path} is not a MindIR graph with inputs")
    inputs = []
    for item in model.graph.input:
        if len(item.tensor) != 1:
            raise UserInputError(f"{what} {path}: input {item.name} is not a single tensor")
        tensor = item.tensor[0]
        type_name = mind_ir_pb2.TensorProto.DataType.Name(tensor.data_type)
        if type_name not in _NUMPY_DTYPES:
            raise UserInputError(f"{what} {path}: input {item.name} has unsupported type {type_name}")
        inputs.append(GraphInput(item.name.rsplit(":", 1)[-1], tuple(int(d) for d in tensor.dims),
                                 np.dtype(_NUMPY_DTYPES[type_name])))
    return inputs


def check_graph_kind(inputs, kind, path, expected_inputs, names, writer, model_name):
    """{name: GraphInput}; the inputs must be those of a `kind` graph (`expected_inputs` maps
    each kind to its input names, `names` each kind to words for messages, `writer` names the
    export script)."""
    found_names = tuple(item.name for item in inputs)
    if found_names != expected_inputs[kind]:
        found = [other for other, expected in expected_inputs.items() if expected == found_names]
        actual = f"it is the {names[found[0]]}" if found else \
            f"its inputs are {describe(inputs)}"
        raise UserInputError(f"{path} is not a {model_name} {names[kind]} written by {writer}: {actual} "
                             f"(expected inputs {', '.join(expected_inputs[kind])})")
    for item in inputs:
        if any(d <= 0 for d in item.shape):
            raise UserInputError(f"{path}: input {item} has a dynamic dimension; {writer} exports "
                                 f"static shapes")
    return {item.name: item for item in inputs}


def describe(inputs):
    return ", ".join(map(str, inputs))
