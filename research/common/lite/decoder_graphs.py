"""The exported decoder graphs as files: where an export writes them, the checks a runner makes
before loading them, and the word-embedding table that goes with them. Shared by every model's
export_lite_model.py and Lite runner (VisualGLM's GLM, ChatGLM2).

Folders under the export's output directory (seed 001's naming):
    mindir_full_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir   prefill ("full")
    mindir_inc_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir    one-token step ("inc")
and beside the full graph a checkpoint holding the word embeddings the graphs were exported
with: the full graph takes input embeddings, so the runner gathers the prompt's from it.
"""
import os
import re

from research.common.checkpoint import read_checkpoint
from research.common.convert import save_checkpoint_atomic
from research.common.errors import UserInputError
from research.common.lite.export import (DECODE_INPUTS, PREFILL_INPUTS, DecodeGraph, PrefillGraph,
                                         decoder_example_inputs, export_cell)

GRAPH_FILE = "rank_{rank}_graph.mindir"
DECODER_FOLDERS = {"full": "mindir_full_checkpoint_bs_{batch_size}_{seq_length}",
                   "inc": "mindir_inc_checkpoint_bs_{batch_size}_{seq_length}"}
DECODER_INPUTS = {"full": PREFILL_INPUTS, "inc": DECODE_INPUTS}
DECODER_NAMES = {"full": "full (prefill) graph", "inc": "incremental (one-token) graph"}
# MindSpore Lite's GE options (seed 001's context.cfg) for models without their own.
DEFAULT_GE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context.cfg")
_FULL_FOLDER = re.compile(r"mindir_full_checkpoint_bs_(\d+)_(\d+)")


def graph_paths(output_dir, batch_size, seq_length, rank=0, folders=None):
    """{graph kind: path} of the files an export with these settings writes (`folders`: {kind:
    folder pattern}, default the decoder's two)."""
    name = GRAPH_FILE.format(rank=rank)
    return {kind: os.path.join(output_dir, folder.format(batch_size=batch_size, seq_length=seq_length), name)
            for kind, folder in (folders or DECODER_FOLDERS).items()}


def full_graph_folder(full_model_path):
    """(parent folder, batch size, seq_length) of a full graph in its export's
    `mindir_full_checkpoint_bs_B_S` folder; None when the path does not follow that naming."""
    folder = os.path.dirname(os.path.abspath(full_model_path))
    parent, leaf = os.path.split(folder)
    match = _FULL_FOLDER.fullmatch(leaf)
    return None if match is None else (parent, int(match.group(1)), int(match.group(2)))


# ---- export --------------------------------------------------------------------------------------

def export_decoder_graphs(decoder, paths, batch_size, hidden_size, position_shape, use_past):
    """Write the full graph of `decoder` (research.common.kv_cache's construct signature) and,
    with use_past, its incremental graph, at paths["full"] / paths["inc"]; returns {kind: path}.
    `position_shape(batch, length)` is the decoder's position-id shape."""
    inputs = decoder_example_inputs(decoder, batch_size, hidden_size, position_shape)
    cells = {"full": (PrefillGraph(decoder), inputs["full"])}
    if use_past:
        cells["inc"] = (DecodeGraph(decoder), inputs["inc"])
    return {kind: export_cell(cell, example, paths[kind]) for kind, (cell, example) in cells.items()}


def save_embedding_table(table, full_path, checkpoint_name, parameter):
    """Write the word embeddings [vocab, hidden] as `checkpoint_name` beside the full graph, the
    runner's first place to look; returns the path."""
    path = os.path.join(os.path.dirname(full_path), checkpoint_name)
    save_checkpoint_atomic({parameter: table}, path)
    return path


# ---- before loading ------------------------------------------------------------------------------

def check_graph_files(full_path, inc_path, names=DECODER_NAMES):
    """--full_model_path must be given and exist; --inc_model_path, when given, must exist."""
    if not full_path:
        raise UserInputError("--full_model_path is required (the full graph written by "
                             "export_lite_model.py, e.g. output/mindir_full_checkpoint_bs_1_512/"
                             "rank_0_graph.mindir)")
    if not os.path.exists(full_path):
        raise UserInputError(f"{names['full']} not found: {full_path}")
    if inc_path and not os.path.exists(inc_path):
        raise UserInputError(f"{names['inc']} not found: {inc_path} (export it with "
                             f"export_lite_model.py --use_past True, or leave out --inc_model_path "
                             f"to re-run the full graph for every token)")


def check_exported_together(graphs, names, others=None, length_name="length"):
    """The full and (when given) incremental graph of {kind: Graph} must have one batch size,
    length and compute dtype; `others` adds {kind: (batch size, length or None)} of a model's
    other graphs (VisualGLM's image encoder) to the batch-size check."""
    full = graphs["full"]
    batch, length, _ = full["input_embeds"].shape
    found = {"full": (batch, length)}
    if "inc" in graphs:
        inc = graphs["inc"]
        found["inc"] = (inc["input_ids"].shape[0], inc["attention_mask"].shape[-1])
        if inc["key_cache"].dtype != full["input_embeds"].dtype:
            raise UserInputError(f"{inc.path} keeps its KV cache in {inc['key_cache'].dtype} but {full.path} "
                                 f"computes in {full['input_embeds'].dtype}: export both together")
    found.update(others or {})
    if any(b != batch or (s is not None and s != length) for b, s in found.values()):
        listing = "; ".join(f"{names[k]} {graphs[k].path}: batch size {b}"
                            + (f", {length_name} {s}" if s is not None else "") for k, (b, s) in found.items())
        raise UserInputError(f"the graphs were not exported together ({listing}); export them with "
                             f"one export_lite_model.py command")


def check_requested_shapes(full, batch_size, seq_length, extra_length=0, detail=""):
    """--batch_size / --seq_length against the full graph's shapes (its length is seq_length +
    `extra_length`, `detail` says so); returns the exported seq_length."""
    batch, length, _ = full["input_embeds"].shape
    exported_length = length - extra_length
    exported = f"{full.path} was exported with batch_size {batch} and seq_length {exported_length}{detail}"
    if batch_size is not None and batch_size != batch:
        raise UserInputError(f"--batch_size {batch_size} was asked but {exported}; pass "
                             f"--batch_size {batch}, or re-export with --batch_size {batch_size}")
    if seq_length is not None and seq_length != exported_length:
        raise UserInputError(f"--seq_length {seq_length} was asked but {exported}; pass "
                             f"--seq_length {exported_length}, or re-export with --seq_length {seq_length}")
    return exported_length


def ge_config_path(path, default=DEFAULT_GE_CONFIG):
    """--ge_config as given, else `default`; a bare name is also looked up beside `default`
    (seed 001 passes `context.cfg`)."""
    if path is None:
        return default
    for candidate in (path, os.path.join(os.path.dirname(default), path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserInputError(f"--ge_config not found: {path}")


# ---- the word embeddings -------------------------------------------------------------------------

def lite_checkpoint_path(lite_checkpoint, full_model_path, checkpoint_name, what, more_candidates=(),
                         writers="export_lite_model.py writes it beside the full graph"):
    """The embeddings checkpoint: the one given (--lite_checkpoint), else `checkpoint_name`
    beside the full graph (what the export wrote with these graphs), else the first of
    `more_candidates` [(path, where it comes from)] that exists. `what` names the contents
    in messages; `writers` says which scripts write the file."""
    if lite_checkpoint:
        if not os.path.isfile(lite_checkpoint):
            raise UserInputError(f"{checkpoint_name} ({what}) not found: {lite_checkpoint} (--lite_checkpoint)")
        return lite_checkpoint
    candidates = [(os.path.join(os.path.dirname(full_model_path), checkpoint_name), "beside the full graph")]
    candidates += list(more_candidates)
    for path, _ in candidates:
        if os.path.isfile(path):
            return path
    looked = "; ".join(f"{path} ({origin})" for path, origin in candidates)
    raise UserInputError(f"{checkpoint_name} ({what}) not found: looked for {looked}; {writers}; "
                         f"or pass --lite_checkpoint")


def read_embedding_table(path, checkpoint_name, parameter, what):
    """The word embeddings [vocab, hidden] (numpy): `parameter` of the checkpoint at `path`."""
    params = read_checkpoint(path, checkpoint_name)
    if parameter not in params:
        raise UserInputError(f"{path} has no {parameter} ({what})")
    return params[parameter]


def check_embedding_table(table, full, vocab_size, checkpoint_name):
    """The table must give the full graph's input embeddings for every token of the tokenizer
    (`vocab_size` ids); returns it in the graph's dtype."""
    hidden = full["input_embeds"].shape[-1]
    if table.ndim != 2 or table.shape[1] != hidden:
        raise UserInputError(f"the word embeddings have shape {list(table.shape)} but the "
                             f"full graph takes hidden size {hidden}: wrong {checkpoint_name}?")
    if table.shape[0] < vocab_size:
        raise UserInputError(f"the word embeddings have {table.shape[0]} rows but the "
                             f"tokenizer has {vocab_size} tokens")
    return table.astype(full["input_embeds"].dtype)
