"""VisualGLM's MindIR graphs: what export_lite_model.py writes and run_visualglm_infer_lite.py
runs (seed 001, "ckpt转换为mindir" and "lite推理").

Folders under the export's output directory (seed 001):
    mindir_full_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir   GLM prefill ("full")
    mindir_inc_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir    GLM one-token step ("inc")
    mindir_image_encoder_bs_{bs}/rank_{rank}_graph.mindir           ViT + Q-Former + glm_proj
`seq` is the text length (`--seq_length`, as in run_visualglm.py and seed 001's example
`bs_1_512` for `--seq_length 512`); the graphs' static GLM length is seq + the 32 image tokens.

The decoder graphs are research.common.lite.export's; at run time the image encoder graph
gives 32 embeddings per image, the prompt's token embeddings are a numpy gather from
`glm_6b_for_lite.ckpt`, the image embeddings replace the placeholders after `<img>`, and
research.common.lite.runtime.GraphCausalLM runs the GLM graphs through the same generation
loop as the in-graph model.
"""
import dataclasses
import os
import re
import time

import numpy as np
import mindspore as ms

from research.common.checkpoint import read_checkpoint
from research.common.config import repo_path
from research.common.convert import save_checkpoint_atomic
from research.common.errors import UserInputError
from research.common.generation import generate
from research.common.lite.export import (DECODE_INPUTS, PREFILL_INPUTS, DecodeGraph, PrefillGraph,
                                         decoder_example_inputs, export_cell)
from research.common.lite.graphs import check_graph_kind, read_graph_inputs
from research.common.lite.runtime import Graph, GraphCausalLM, GraphCellRuntime, select_runtime
from research.common.prompts import VisualGLMPrompt
from research.common.runtime import init_context
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.convert_visualglm import LITE_CHECKPOINT, LITE_PARAMETER
from research.visualglm.inference import Reply, check_special_ids, generation_config
from research.visualglm.modeling_glm import glm_positions_and_mask
from research.visualglm.modeling_visualglm import splice_prompt_embeddings
from research.visualglm.processing_visualglm import build_processor

GRAPH_FILE = "rank_{rank}_graph.mindir"
FOLDERS = {"full": "mindir_full_checkpoint_bs_{batch_size}_{seq_length}",
           "inc": "mindir_inc_checkpoint_bs_{batch_size}_{seq_length}",
           "image_encoder": "mindir_image_encoder_bs_{batch_size}"}
GRAPH_INPUTS = {"full": PREFILL_INPUTS, "inc": DECODE_INPUTS, "image_encoder": ("pixel_values",)}
GRAPH_NAMES = {"full": "full (prefill) graph", "inc": "incremental (one-token) graph",
               "image_encoder": "image encoder graph"}
DEFAULT_GE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context.cfg")


def graph_paths(output_dir, batch_size, seq_length, rank=0):
    """{graph kind: path} of the files an export with these settings writes."""
    name = GRAPH_FILE.format(rank=rank)
    return {kind: os.path.join(output_dir, folder.format(batch_size=batch_size, seq_length=seq_length), name)
            for kind, folder in FOLDERS.items()}


def default_image_encoder_path(full_model_path):
    """The encoder file exported beside a full graph: `.../mindir_full_checkpoint_bs_B_S/F`
    -> `.../mindir_image_encoder_bs_B/F`; None when the path does not follow that naming."""
    folder, name = os.path.split(os.path.abspath(full_model_path))
    parent, leaf = os.path.split(folder)
    match = re.fullmatch(r"mindir_full_checkpoint_bs_(\d+)_\d+", leaf)
    if not match:
        return None
    return os.path.join(parent, FOLDERS["image_encoder"].format(batch_size=match.group(1)), name)


def graph_inputs(path, kind):
    """{name: GraphInput} of a VisualGLM graph file of this kind (checked)."""
    return check_graph_kind(read_graph_inputs(path, GRAPH_NAMES[kind]), kind, path, GRAPH_INPUTS,
                            GRAPH_NAMES, "export_lite_model.py", "VisualGLM")


# ---- export --------------------------------------------------------------------------------------

def export_visualglm_graphs(chat, output_dir, batch_size, use_past, rank=0):
    """Write the graphs of a loaded VisualGLM (research.visualglm.inference.load_visualglm);
    returns {kind: path}. The word embeddings the graphs were exported with go beside the full
    graph as glm_6b_for_lite.ckpt (returned as "lite"), where the runner looks first."""
    config, model = chat.config, chat.model
    text = config.text_config
    paths = graph_paths(output_dir, batch_size, text.seq_length - config.image_length, rank)
    inputs = decoder_example_inputs(model.llm_model, batch_size, text.hidden_size,
                                    lambda batch, length: (batch, 2, length))
    size = config.vision_config.image_size
    cells = {"full": (PrefillGraph(model.llm_model), inputs["full"])}
    if use_past:
        cells["inc"] = (DecodeGraph(model.llm_model), inputs["inc"])
    cells["image_encoder"] = (model.image_encoder, (ms.Tensor(np.zeros((batch_size, 3, size, size), np.float32)),))
    written = {kind: export_cell(cell, example, paths[kind]) for kind, (cell, example) in cells.items()}
    written["lite"] = os.path.join(os.path.dirname(written["full"]), LITE_CHECKPOINT)
    table = model.llm_model.transformer.word_embeddings.embedding_table.asnumpy()
    save_checkpoint_atomic({LITE_PARAMETER: table}, written["lite"])
    return written


# ---- running -------------------------------------------------------------------------------------

def open_graphs(full_path, inc_path, encoder_path):
    """{kind: Graph} for the given files, checked against each other (not yet loaded)."""
    if not full_path:
        raise UserInputError("--full_model_path is required (the full graph written by "
                             "export_lite_model.py, e.g. output/mindir_full_checkpoint_bs_1_512/"
                             "rank_0_graph.mindir)")
    if not os.path.exists(full_path):
        raise UserInputError(f"{GRAPH_NAMES['full']} not found: {full_path}")
    if inc_path and not os.path.exists(inc_path):
        raise UserInputError(f"{GRAPH_NAMES['inc']} not found: {inc_path} (export it with "
                             f"export_lite_model.py --use_past True, or leave out --inc_model_path "
                             f"to re-run the full graph for every token)")
    if not encoder_path:
        encoder_path = default_image_encoder_path(full_path)
        if encoder_path is None:
            raise UserInputError(f"cannot derive the image encoder graph's path from {full_path} (it is "
                                 f"not in a mindir_full_checkpoint_bs_B_S folder): give "
                                 f"--image_encoder_path")
        if not os.path.exists(encoder_path):
            raise UserInputError(f"{GRAPH_NAMES['image_encoder']} not found: {encoder_path} (derived "
                                 f"from --full_model_path; give --image_encoder_path)")
    paths = {"full": full_path, "inc": inc_path, "image_encoder": encoder_path}
    graphs = {kind: Graph(kind, path, graph_inputs(path, kind)) for kind, path in paths.items() if path}
    full = graphs["full"]
    batch, length, _ = full["input_embeds"].shape
    found = {"full": (batch, length)}
    if "inc" in graphs:
        inc = graphs["inc"]
        found["inc"] = (inc["input_ids"].shape[0], inc["attention_mask"].shape[-1])
        if inc["key_cache"].dtype != full["input_embeds"].dtype:
            raise UserInputError(f"{inc.path} keeps its KV cache in {inc['key_cache'].dtype} but {full.path} "
                                 f"computes in {full['input_embeds'].dtype}: export both together")
    found["image_encoder"] = (graphs["image_encoder"]["pixel_values"].shape[0], None)
    if any(b != batch or (s is not None and s != length) for b, s in found.values()):
        listing = "; ".join(f"{GRAPH_NAMES[k]} {graphs[k].path}: batch size {b}"
                            + (f", GLM length {s}" if s is not None else "") for k, (b, s) in found.items())
        raise UserInputError(f"the graphs were not exported together ({listing}); export them with "
                             f"one export_lite_model.py command")
    return graphs


def check_requested_shapes(full, batch_size, seq_length, image_length):
    """--batch_size / --seq_length against the exported shapes; returns the text length."""
    batch, length, _ = full["input_embeds"].shape
    text_length = length - image_length
    exported = (f"{full.path} was exported with batch_size {batch} and seq_length {text_length} "
                f"(GLM length {length} = {text_length} text + {image_length} image tokens)")
    if batch_size is not None and batch_size != batch:
        raise UserInputError(f"--batch_size {batch_size} was asked but {exported}; pass "
                             f"--batch_size {batch}, or re-export with --batch_size {batch_size}")
    if seq_length is not None and seq_length != text_length:
        raise UserInputError(f"--seq_length {seq_length} was asked but {exported}; pass "
                             f"--seq_length {text_length}, or re-export with --seq_length {seq_length}")
    return text_length


def ge_config_path(path):
    """--ge_config as given, else beside this module (seed 001 passes a bare `context.cfg`)."""
    if path is None:
        return DEFAULT_GE_CONFIG
    for candidate in (path, os.path.join(os.path.dirname(DEFAULT_GE_CONFIG), path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserInputError(f"--ge_config not found: {path}")


def lite_checkpoint_path(lite_checkpoint, text_config, full_model_path):
    """glm_6b_for_lite.ckpt: the one given (--lite_checkpoint), else the one the export wrote
    beside the full graph (the embeddings those graphs were exported with), else the YAML's GLM
    checkpoint if it is that file (seed 001) or the file beside it (where convert_weight.py
    writes it)."""
    if lite_checkpoint:
        if not os.path.isfile(lite_checkpoint):
            raise UserInputError(f"{LITE_CHECKPOINT} (the GLM word embeddings for Lite) not found: "
                                 f"{lite_checkpoint} (--lite_checkpoint)")
        return lite_checkpoint
    candidates = [(os.path.join(os.path.dirname(full_model_path), LITE_CHECKPOINT), "beside the full graph")]
    glm = text_config.checkpoint_name_or_path
    if glm:
        path = repo_path(glm if os.path.basename(glm) == LITE_CHECKPOINT
                         else os.path.join(os.path.dirname(glm), LITE_CHECKPOINT))
        candidates.append((path, "from the YAML's text_config.checkpoint_name_or_path"))
    for path, _ in candidates:
        if os.path.isfile(path):
            return path
    looked = "; ".join(f"{path} ({origin})" for path, origin in candidates)
    raise UserInputError(f"{LITE_CHECKPOINT} (the GLM word embeddings for Lite) not found: looked for "
                         f"{looked}; export_lite_model.py writes it beside the full graph, "
                         f"convert_weight.py beside the GLM checkpoint; or pass --lite_checkpoint")


def read_embedding_table(path):
    """The GLM word embeddings [vocab, hidden] (numpy) from a checkpoint that holds them."""
    params = read_checkpoint(path, LITE_CHECKPOINT)
    if LITE_PARAMETER not in params:
        raise UserInputError(f"{path} has no {LITE_PARAMETER} (the GLM word embeddings)")
    return params[LITE_PARAMETER]


class LiteVisualGLM:
    """VisualGLM answered by the exported graphs: the same steps as
    VisualGLMImageToTextGeneration.generate + research.common.generation.generate."""

    def __init__(self, config, processor, graphs, embedding_table, runtime_line=""):
        self.config, self.text_config = config, config.text_config
        self.processor, self.graphs, self.runtime_line = processor, graphs, runtime_line
        full = graphs["full"]
        self.batch_size, self.seq_length, hidden = full["input_embeds"].shape
        if embedding_table.ndim != 2 or embedding_table.shape[1] != hidden:
            raise UserInputError(f"the word embeddings have shape {list(embedding_table.shape)} but the "
                                 f"full graph takes hidden size {hidden}: wrong {LITE_CHECKPOINT}?")
        if embedding_table.shape[0] < processor.tokenizer.vocab_size:
            raise UserInputError(f"the word embeddings have {embedding_table.shape[0]} rows but the "
                                 f"tokenizer has {processor.tokenizer.vocab_size} tokens")
        self.embedding_table = embedding_table.astype(full["input_embeds"].dtype)
        size = graphs["image_encoder"]["pixel_values"].shape[-1]
        if processor.image_processor.image_size != size:
            raise UserInputError(f"the image encoder graph takes {size}x{size} images but the "
                                 f"processor resizes to {processor.image_processor.image_size}")

    @property
    def use_past(self):
        return "inc" in self.graphs

    def generation_config(self, max_new_tokens=None):
        """The YAML's decoding settings; the KV cache is used exactly when the decode graph was given."""
        settings = generation_config(self.text_config, self.processor.tokenizer, max_new_tokens)
        return dataclasses.replace(settings, use_past=self.use_past)

    def _prepare(self, pairs, english):
        """Processor outputs for up to batch_size pairs, the last pair repeated to fill the batch
        (the graphs' batch size is fixed); the prompts must fit the exported length."""
        filled = list(pairs) + [pairs[-1]] * (self.batch_size - len(pairs))
        inputs = self.processor([p[0] for p in filled], [p[1] for p in filled], english=english)
        text_length = self.seq_length - self.config.image_length
        for index, ids in enumerate(inputs["input_ids"][:len(pairs)]):
            if len(ids) >= self.seq_length:
                raise UserInputError(
                    f"prompt {index} has {len(ids)} tokens ({self.config.image_length} image placeholders "
                    f"and [gMASK] <sop> included) but the exported graphs hold {self.seq_length} "
                    f"(seq_length {text_length} + {self.config.image_length} image tokens) and need room "
                    f"for the answer: shorten the prompt, or re-export with a larger --seq_length")
        return inputs

    def generate(self, prompts, pre_image_lengths, pixel_values, settings, timings=None):
        """New token ids per row (batch_size rows), as VisualGLMImageToTextGeneration.generate;
        `timings` (a dict) gets image_s, prefill_s and decode_s added."""
        timings = {"image_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0} if timings is None else timings
        start = time.perf_counter()
        encoder = self.graphs["image_encoder"]
        image_embeds = encoder.numpy(encoder(pixel_values)[0])
        if image_embeds.shape[1] != self.config.image_length:
            raise UserInputError(f"the image encoder graph gives {image_embeds.shape[1]} embeddings per "
                                 f"image but the config's Q-Former has {self.config.image_length} queries")
        embeds = splice_prompt_embeddings(prompts, pre_image_lengths, image_embeds,
                                          lambda ids: self.embedding_table[ids], self.text_config.pad_token_id)
        timings["image_s"] += time.perf_counter() - start
        language_model = GraphCausalLM(
            self.graphs["full"], self.graphs.get("inc"), self.embedding_table,
            lambda ids, pads: glm_positions_and_mask(ids, pads, self.text_config))
        settings = dataclasses.replace(settings, use_past=self.use_past and settings.use_past)
        start = time.perf_counter()
        outputs = generate(language_model, prompts, settings, prompt_embeds=embeds)
        timings["prefill_s"] += language_model.prefill_seconds
        timings["decode_s"] += time.perf_counter() - start - language_model.prefill_seconds
        return outputs

    def answer(self, pairs, *, english=False, settings=None, max_new_tokens=None, timings=None):
        """Replies to (image, question) pairs, batch_size at a time; `timings` (a dict) gets
        image_s, prefill_s and decode_s added."""
        settings = settings or self.generation_config(max_new_tokens)
        timings = {"image_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0} if timings is None else timings
        style = VisualGLMPrompt(english=english)
        replies = []
        for first in range(0, len(pairs), self.batch_size):
            chunk = pairs[first:first + self.batch_size]
            inputs = self._prepare(chunk, english)
            outputs = self.generate(inputs["input_ids"], inputs["pre_image_lengths"], inputs["pixel_values"],
                                    settings, timings)[:len(chunk)]
            replies += [Reply(prompt, style.postprocess(self.processor.tokenizer.decode(ids)), ids)
                        for prompt, ids in zip(inputs["prompts"], outputs)]
        return replies


def load_lite_visualglm(config, full_model_path, *, inc_model_path=None, image_encoder_path=None,
                        lite_checkpoint=None, ge_config=None, runtime="auto", device_id=0,
                        seq_length=None, batch_size=None, use_past=None, do_sample=None, top_k=None,
                        top_p=None) -> LiteVisualGLM:
    """LiteVisualGLM over exported graphs; the YAML gives the tokenizer, image processor, special
    ids and sampling defaults. Every file is checked before anything is loaded."""
    yaml_config, model_config = load_visualglm_config(config)
    text = model_config.text_config
    for field, value in dict(do_sample=do_sample, top_k=top_k, top_p=top_p).items():
        if value is not None:
            setattr(text, field, value)
    ge_config = ge_config_path(ge_config)
    graphs = open_graphs(full_model_path, inc_model_path if use_past is not False else None,
                         image_encoder_path)
    text_length = check_requested_shapes(graphs["full"], batch_size, seq_length, model_config.image_length)
    text.seq_length = text_length + model_config.image_length
    text.validate()
    model_config.validate()
    processor = build_processor(yaml_config.get("processor") or {}, model_config.image_length)
    check_special_ids(text, processor.tokenizer)
    table = read_embedding_table(lite_checkpoint_path(lite_checkpoint, text, graphs["full"].path))
    chosen, runtime_line = select_runtime(runtime, ge_config, device_id)
    model = LiteVisualGLM(model_config, processor, graphs, table, runtime_line)
    if isinstance(chosen, GraphCellRuntime):
        init_context(yaml_config, device_id)
    for graph in graphs.values():
        graph.load(chosen)
    return model
