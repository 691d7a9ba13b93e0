"""ChatGLM2's MindIR graphs: what export_lite_model.py writes and run_chatglm2_infer_lite.py runs
(MindFormers' glm2 "ckpt转换为mindir" and "lite推理", as seed 001 does for VisualGLM).

Folders under the export's output directory (research.common.lite.decoder_graphs):
    mindir_full_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir   prefill ("full")
    mindir_inc_checkpoint_bs_{bs}_{seq}/rank_{rank}_graph.mindir    one-token step ("inc")
    mindir_full_checkpoint_bs_{bs}_{seq}/glm2_6b_for_lite.ckpt      the word embeddings
`seq` is the model's static length (`--seq_length`, as in run_chatglm2.py); positions are
[B, seq] (ChatGLM2's 1D positions).

At run time the graphs stand behind generate()'s CausalLM interface
(research.common.lite.runtime.GraphCausalLM: the prompt's embeddings gathered from the
checkpoint, the full graph once, then the incremental graph per token with the KV cache), and
the model is a research.chatglm2.inference.ChatGLM2Chat over them: prompts, history
truncation, decoding settings, stops and post-processing are run_chatglm2.py's own code.
"""
import dataclasses
import os

from research.chatglm2.configuration_chatglm2 import load_chatglm2_config
from research.chatglm2.inference import ChatGLM2Chat, build_tokenizer, check_tokenizer
from research.common.kv_cache import left_padded_positions_and_mask
from research.common.errors import UserInputError
from research.common.lite import decoder_graphs
from research.common.lite.decoder_graphs import (DECODER_INPUTS, DECODER_NAMES, DEFAULT_GE_CONFIG,
                                                 check_embedding_table,
                                                 check_exported_together, check_graph_files,
                                                 check_requested_shapes, export_decoder_graphs,
                                                 ge_config_path, lite_checkpoint_path, read_embedding_table,
                                                 save_embedding_table)
from research.common.lite.graphs import check_graph_kind, read_graph_inputs
from research.common.lite.runtime import Graph, GraphCausalLM, GraphCellRuntime, select_runtime
from research.common.runtime import device_target, init_context

LITE_CHECKPOINT = "glm2_6b_for_lite.ckpt"
LITE_PARAMETER = "transformer.embedding.embedding_weight"  # the model's own name (MindFormers 1.9)
WHAT_LITE = "the ChatGLM2 word embeddings for Lite"
WRITER = "research.chatglm2.export_lite_model"
GRAPH_NAMES = DECODER_NAMES


def graph_paths(output_dir, batch_size, seq_length, rank=0):
    """{"full": path, "inc": path} an export with these settings writes."""
    return decoder_graphs.graph_paths(output_dir, batch_size, seq_length, rank)


def graph_inputs(path, kind):
    """{name: GraphInput} of a ChatGLM2 graph file of this kind (checked: a GLM-6B / VisualGLM
    graph has the same input names but 2D positions [B,2,S])."""
    inputs = check_graph_kind(read_graph_inputs(path, GRAPH_NAMES[kind]), kind, path, DECODER_INPUTS,
                              GRAPH_NAMES, WRITER, "ChatGLM2")
    positions = inputs["position_ids"]
    if len(positions.shape) != 2:
        raise UserInputError(f"{path} is not a ChatGLM2 {GRAPH_NAMES[kind]} written by {WRITER}: its "
                             f"position_ids are {list(positions.shape)} where ChatGLM2's are [batch, length] "
                             f"(a GLM-6B / VisualGLM graph has [batch, 2, length])")
    return inputs


# ---- export --------------------------------------------------------------------------------------

def export_chatglm2_graphs(chat, output_dir, batch_size, use_past, rank=0):
    """Write the graphs of a loaded ChatGLM2 (research.chatglm2.inference.load_chatglm2) for
    `batch_size` rows of its seq_length; returns {kind: path}. The word embeddings the graphs
    were exported with go beside the full graph as glm2_6b_for_lite.ckpt (returned as "lite"),
    where the runner looks for them."""
    config, model = chat.config, chat.model
    paths = graph_paths(output_dir, batch_size, config.seq_length, rank)
    written = export_decoder_graphs(model, paths, batch_size, config.hidden_size,
                                    lambda batch, length: (batch, length), use_past)
    table = model.transformer.embedding.embedding_weight.asnumpy()
    written["lite"] = save_embedding_table(table, written["full"], LITE_CHECKPOINT, LITE_PARAMETER)
    return written


# ---- running -------------------------------------------------------------------------------------

def open_graphs(full_path, inc_path):
    """{kind: Graph} for the given files, checked against each other (not yet loaded)."""
    check_graph_files(full_path, inc_path, GRAPH_NAMES)
    paths = {"full": full_path, "inc": inc_path}
    graphs = {kind: Graph(kind, path, graph_inputs(path, kind)) for kind, path in paths.items() if path}
    check_exported_together(graphs, GRAPH_NAMES, length_name="seq_length")
    return graphs


def check_config_fits_graphs(config, graphs, where):
    """The YAML gives the tokenizer and decoding: its model must be the one the graphs hold."""
    full = graphs["full"]
    found = {"hidden_size": (full["input_embeds"].shape[-1], config.hidden_size, full.path)}
    if "inc" in graphs:
        inc = graphs["inc"]
        layers, _, kv_heads, _, head_dim = inc["key_cache"].shape
        found.update(num_layers=(layers, config.num_layers, inc.path),
                     kv_heads=(kv_heads, config.kv_heads, inc.path),
                     kv_channels=(head_dim, config.kv_channels, inc.path))
    wrong = [f"{name} {graph} in {path}, {yaml} in the YAML" for name, (graph, yaml, path) in found.items()
             if graph != yaml]
    if wrong:
        raise UserInputError(f"{where}: the graphs were exported from another model ({'; '.join(wrong)}): "
                             f"pass the --config they were exported with")


def _device_id(yaml_config, device_id):
    """--device_id, else the YAML's context.device_id, else $DEVICE_ID, else 0 (as init_context)."""
    if device_id is not None:
        return device_id
    context = yaml_config.get("context") or {}
    if context.get("device_id") is not None:
        return int(context["device_id"])
    value = os.environ.get("DEVICE_ID", "0")
    return int(value) if value.isdigit() else 0


@dataclasses.dataclass
class LiteChatGLM2(ChatGLM2Chat):
    """A ChatGLM2Chat whose model is the exported graphs (research.common.lite.runtime.GraphCausalLM)."""

    graphs: dict = dataclasses.field(default_factory=dict)  # {kind: Graph}
    runtime: object = None  # research.common.lite.runtime's LiteRuntime or GraphCellRuntime
    runtime_line: str = ""  # which runtime runs the graphs, and why
    lite_checkpoint: str = ""  # the word embeddings' checkpoint
    device_id: int = 0

    @property
    def batch_size(self):
        """Rows per forward pass: the graphs' (fewer are filled by repeating the last)."""
        return self.model.batch_size

    @property
    def use_past(self):
        """Whether the incremental graph runs the new tokens (else the full graph re-runs)."""
        return "inc" in self.graphs

    def describe_weights(self):
        return f"weights: those exported into {self.graphs['full'].path}; word embeddings: {self.lite_checkpoint}"

    def load_graphs(self):
        """Build the graphs with the runtime (MindSpore Lite compiles them here); returns self."""
        if isinstance(self.runtime, GraphCellRuntime):
            init_context(self.yaml, self.device_id)
        for graph in self.graphs.values():
            if graph.runtime is None:
                graph.load(self.runtime)
        return self


def load_lite_chatglm2(config, full_model_path, *, inc_model_path=None, lite_checkpoint=None, ge_config=None,
                       runtime="auto", device_id=None, seq_length=None, batch_size=None,
                       use_past=None, load=True) -> LiteChatGLM2:
    """ChatGLM2Chat over exported graphs; the YAML gives the tokenizer, special ids and decoding
    defaults. The KV cache (use_past) is used exactly when the incremental graph is given
    (use_past False leaves it out); seq_length and batch_size are the graphs', checked against
    the ones asked. Every file is checked before anything is loaded; with load=False nothing
    is (call load_graphs() after checking the prompts, say)."""
    yaml_config, model_config = load_chatglm2_config(config)
    where = yaml_config.source.path
    ge_config = ge_config_path(ge_config, DEFAULT_GE_CONFIG)
    graphs = open_graphs(full_model_path, inc_model_path if use_past is not False else None)
    full = graphs["full"]
    model_config.seq_length = check_requested_shapes(full, batch_size, seq_length)
    model_config.batch_size = full["input_embeds"].shape[0]
    model_config.use_past = "inc" in graphs
    model_config.validate()
    check_config_fits_graphs(model_config, graphs, where)
    tokenizer = build_tokenizer(yaml_config, model_config.seq_length)
    check_tokenizer(model_config, tokenizer, where)
    table_path = lite_checkpoint_path(lite_checkpoint, full.path, LITE_CHECKPOINT, WHAT_LITE)
    table = check_embedding_table(read_embedding_table(table_path, LITE_CHECKPOINT, LITE_PARAMETER,
                                                       "the ChatGLM2 word embeddings"),
                                  full, tokenizer.vocab_size, LITE_CHECKPOINT)
    if table.shape[0] != model_config.padded_vocab_size:
        raise UserInputError(f"{where}: the word embeddings in {table_path} have {table.shape[0]} rows but "
                             f"model_config.padded_vocab_size is {model_config.padded_vocab_size}: the graphs "
                             f"were exported from another model; pass the --config they were exported with")
    device_id = _device_id(yaml_config, device_id)
    chosen, runtime_line = select_runtime(runtime, ge_config, device_id)
    model = GraphCausalLM(full, graphs.get("inc"), table, left_padded_positions_and_mask)
    glm = LiteChatGLM2(model_config, yaml_config, model, tokenizer, True, device_target(), graphs=graphs,
                       runtime=chosen, runtime_line=runtime_line, lite_checkpoint=table_path, device_id=device_id)
    return glm.load_graphs() if load else glm
