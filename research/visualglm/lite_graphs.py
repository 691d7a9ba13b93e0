"""What export_lite_model.py writes and run_visualglm_infer_lite.py reads: the three MindIR
graphs of VisualGLM, where they live and what their inputs are.

Folders (seed 001), under the export's output directory:
    mindir_full_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir   GLM prefill ("full")
    mindir_inc_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir    GLM one-token step ("inc")
    mindir_image_encoder_bs_{bs}/rank_{rank}_graph.mindir           ViT + Q-Former + glm_proj
`seq` is the text length (`--seq_length`, as in run_visualglm.py and seed 001's example
`bs_1_512` for `--seq_length 512`); the graphs' static GLM length is seq + the 32 image tokens.

Every graph input keeps the name of its `construct` argument in the MindIR file, with its
static shape and dtype, so `read_graph_inputs` learns from the file itself what was exported
(batch size, GLM length, hidden size, image size) and which graph it is.
"""
import dataclasses
import os
import re

import numpy as np

from research.common.errors import UserInputError

GRAPH_FILE = "rank_{rank}_graph.mindir"
FULL_DIR = "mindir_full_checkpoint_bs_{batch_size}_{seq_length}"
INC_DIR = "mindir_inc_checkpoint_bs_{batch_size}_{seq_length}"
IMAGE_ENCODER_DIR = "mindir_image_encoder_bs_{batch_size}"

# Input names, in order, of each graph (the `construct` arguments of the export wrappers).
GRAPH_INPUTS = {
    "full": ("input_embeds", "position_ids", "attention_mask", "logits_index"),
    "inc": ("input_ids", "position_ids", "attention_mask", "key_cache", "value_cache", "cache_index"),
    "image_encoder": ("pixel_values",),
}
GRAPH_NAMES = {"full": "full (prefill) graph", "inc": "incremental (one-token) graph",
               "image_encoder": "image encoder graph"}

# mind_ir.proto TensorProto.DataType names -> numpy dtypes.
_NUMPY_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64,
                 "FLOAT64": np.float64, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
                 "UINT8": np.uint8, "BOOL": np.bool_}


def graph_paths(output_dir, batch_size, seq_length, rank=0):
    """{graph kind: path} of the files an export with these settings writes."""
    name = GRAPH_FILE.format(rank=rank)
    folders = {"full": FULL_DIR, "inc": INC_DIR, "image_encoder": IMAGE_ENCODER_DIR}
    return {kind: os.path.join(output_dir, folder.format(batch_size=batch_size, seq_length=seq_length),
                               name)
            for kind, folder in folders.items()}


def default_image_encoder_path(full_model_path):
    """The encoder file exported beside a full graph: `.../mindir_full_checkpoint_bs_B_S/F`
    -> `.../mindir_image_encoder_bs_B/F`; None when the path does not follow that naming."""
    folder, name = os.path.split(os.path.abspath(full_model_path))
    parent, leaf = os.path.split(folder)
    match = re.fullmatch(r"mindir_full_checkpoint_bs_(\d+)_\d+", leaf)
    if not match:
        return None
    return os.path.join(parent, IMAGE_ENCODER_DIR.format(batch_size=match.group(1)), name)


@dataclasses.dataclass(frozen=True)
class GraphInput:
    name: str
    shape: tuple
    dtype: np.dtype

    def __str__(self):
        return f"{self.name} [{', '.join(map(str, self.shape))}] {np.dtype(self.dtype).name}"


def read_graph_inputs(path, what):
    """[GraphInput] of a MindIR file, read from its protobuf (mindspore.train.mind_ir_pb2).

    Graph input names are stored as `<graph>:<argument>`; the argument part is kept. Weights
    larger than 1 GB are stored beside the file (`*_variables/`), so the file parsed here holds
    the graph and stays small.
    """
    from mindspore.train import mind_ir_pb2

    if not os.path.exists(path):
        raise UserInputError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise UserInputError(f"{what} {path} is a directory; give the .mindir file in it "
                             f"({GRAPH_FILE.format(rank=0)})")
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


def check_graph_kind(inputs, kind, path):
    """The inputs must be those of a `kind` graph written by export_lite_model.py."""
    names = tuple(item.name for item in inputs)
    if names != GRAPH_INPUTS[kind]:
        found = [other for other, expected in GRAPH_INPUTS.items() if expected == names]
        actual = f"it is the {GRAPH_NAMES[found[0]]}" if found else \
            f"its inputs are {', '.join(map(str, inputs))}"
        raise UserInputError(f"{path} is not a VisualGLM {GRAPH_NAMES[kind]} written by "
                             f"export_lite_model.py: {actual} (expected inputs "
                             f"{', '.join(GRAPH_INPUTS[kind])})")
    for item in inputs:
        if any(d <= 0 for d in item.shape):
            raise UserInputError(f"{path}: input {item} has a dynamic dimension; export_lite_model.py "
                                 f"exports static shapes")
    return {item.name: item for item in inputs}


def describe(inputs):
    return ", ".join(map(str, inputs))
