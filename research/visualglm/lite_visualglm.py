"""VisualGLM's MindIR graphs: what export_lite_model.py writes and run_visualglm_infer_lite.py
runs (seed 001, "ckpt转换为mindir" and "lite推理").

Folders under the export's output directory (seed 001):
    mindir_full_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir   GLM prefill ("full")
    mindir_inc_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir    GLM one-token step ("inc")
    mindir_image_encoder_bs_{bs}/rank_{rank}_graph.mindir           ViT + Q-Former + glm_proj
`seq` is the text length (`--seq_length`, as in run_visualglm.py and seed 001's example
`bs_1_512` for `--seq_length 512`); the graphs' static GLM length is seq + the 32 image tokens.

The decoder graphs, their folders and the checks before loading them are
research.common.lite's (export, decoder_graphs); at run time the image encoder graph
gives 32 embeddings per image, the prompt's token embeddings are a numpy gather from
`glm_6b_for_lite.ckpt`, the image embeddings replace the placeholders after `<img>`, and
research.common.lite.runtime.GraphCausalLM runs the GLM graphs through the same generation
loop as the in-graph model.
"""
import dataclasses
import os
import time

import numpy as np
import mindspore as ms

from research.common.config import repo_path
from research.common.errors import UserInputError
from research.common.generation import generate
from research.common.image_splice import splice_prompt_embeddings
from research.common.lite import decoder_graphs
from research.common.lite.decoder_graphs import (DECODER_FOLDERS, DECODER_INPUTS, DECODER_NAMES,
                                                 check_embedding_table, check_exported_together,
                                                 check_graph_files, export_decoder_graphs,
                                                 full_graph_folder, save_embedding_table)
from research.common.lite.export import export_cell
from research.common.lite.graphs import check_graph_kind, read_graph_inputs
from research.common.lite.runtime import Graph, GraphCausalLM, GraphCellRuntime, select_runtime
from research.common.prompts import VisualGLMPrompt
from research.common.runtime import init_context
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.convert_visualglm import LITE_CHECKPOINT, LITE_PARAMETER
from research.visualglm.inference import Reply, check_special_ids, generation_config
from research.visualglm.modeling_glm import glm_positions_and_mask
from research.visualglm.processing_visualglm import build_processor

FOLDERS = {**DECODER_FOLDERS, "image_encoder": "mindir_image_encoder_bs_{batch_size}"}
GRAPH_INPUTS = {**DECODER_INPUTS, "image_encoder": ("pixel_values",)}
GRAPH_NAMES = {**DECODER_NAMES, "image_encoder": "image encoder graph"}
DEFAULT_GE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context.cfg")
WHAT_LITE = "the GLM word embeddings for Lite"


def graph_paths(output_dir, batch_size, seq_length, rank=0):
    """{graph kind: path} of the files an export with these settings writes."""
    return decoder_graphs.graph_paths(output_dir, batch_size, seq_length, rank, FOLDERS)


def default_image_encoder_path(full_model_path):
    """The encoder file exported beside a full graph: `.../mindir_full_checkpoint_bs_B_S/F`
    -> `.../mindir_image_encoder_bs_B/F`; None when the path does not follow that naming."""
    found = full_graph_folder(full_model_path)
    if found is None:
        return None
    parent, batch_size, _ = found
    return os.path.join(parent, FOLDERS["image_encoder"].format(batch_size=batch_size),
                        os.path.basename(full_model_path))


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
    written = export_decoder_graphs(model.llm_model, paths, batch_size, text.hidden_size,
                                    lambda batch, length: (batch, 2, length), use_past)
    size = config.vision_config.image_size
    written["image_encoder"] = export_cell(
        model.image_encoder, (ms.Tensor(np.zeros((batch_size, 3, size, size), np.float32)),),
        paths["image_encoder"])
    table = model.llm_model.transformer.word_embeddings.embedding_table.asnumpy()
    written["lite"] = save_embedding_table(table, written["full"], LITE_CHECKPOINT, LITE_PARAMETER)
    return written


# ---- running -------------------------------------------------------------------------------------

def open_graphs(full_path, inc_path, encoder_path):
    """{kind: Graph} for the given files, checked against each other (not yet loaded)."""
    check_graph_files(full_path, inc_path, GRAPH_NAMES)
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
    check_exported_together(graphs, GRAPH_NAMES, length_name="GLM length",
                            others={"image_encoder": (graphs["image_encoder"]["pixel_values"].shape[0], None)})
    return graphs


def check_requested_shapes(full, batch_size, seq_length, image_length):
    """--batch_size / --seq_length against the exported shapes; returns the text length."""
    length = full["input_embeds"].shape[1]
    text_length = length - image_length
    return decoder_graphs.check_requested_shapes(
        full, batch_size, seq_length, image_length,
        f" (GLM length {length} = {text_length} text + {image_length} image tokens)")


def ge_config_path(path):
    """--ge_config as given, else beside this module (seed 001 passes a bare `context.cfg`)."""
    return decoder_graphs.ge_config_path(path, DEFAULT_GE_CONFIG)


def lite_checkpoint_path(lite_checkpoint, text_config, full_model_path):
    """glm_6b_for_lite.ckpt: the one given (--lite_checkpoint), else the one the export wrote
    beside the full graph (the embeddings those graphs were exported with), else the YAML's GLM
    checkpoint if it is that file (seed 001) or the file beside it (where convert_weight.py
    writes it)."""
    candidates = []
    glm = text_config.checkpoint_name_or_path
    if glm:
        path = repo_path(glm if os.path.basename(glm) == LITE_CHECKPOINT
                         else os.path.join(os.path.dirname(glm), LITE_CHECKPOINT))
        candidates.append((path, "from the YAML's text_config.checkpoint_name_or_path"))
    return decoder_graphs.lite_checkpoint_path(
        lite_checkpoint, full_model_path, LITE_CHECKPOINT, WHAT_LITE, candidates,
        "export_lite_model.py writes it beside the full graph, convert_weight.py beside the GLM checkpoint")


def read_embedding_table(path):
    """The GLM word embeddings [vocab, hidden] (numpy) from a checkpoint that holds them."""
    return decoder_graphs.read_embedding_table(path, LITE_CHECKPOINT, LITE_PARAMETER, "the GLM word embeddings")


class LiteVisualGLM:
    """VisualGLM answered by the exported graphs: the same steps as
    VisualGLMImageToTextGeneration.generate + research.common.generation.generate."""

    def __init__(self, config, processor, graphs, embedding_table, runtime_line=""):
        self.config, self.text_config = config, config.text_config
        self.processor, self.graphs, self.runtime_line = processor, graphs, runtime_line
        full = graphs["full"]
        self.batch_size, self.seq_length, _ = full["input_embeds"].shape
        self.embedding_table = check_embedding_table(embedding_table, full, processor.tokenizer.vocab_size,
                                                     LITE_CHECKPOINT)
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
