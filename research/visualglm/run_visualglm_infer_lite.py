"""Answer questions about images with the MindIR graphs of export_lite_model.py (seed 001,
"lite推理").

    python -m research.visualglm.run_visualglm_infer_lite --config CONFIG \\
        --full_model_path output/mindir_full_checkpoint_bs_1_512/rank_0_graph.mindir \\
        --inc_model_path output/mindir_inc_checkpoint_bs_1_512/rank_0_graph.mindir \\
        --seq_length 512 --ge_config research/visualglm/context.cfg --device_id 0 \\
        --image_path IMAGE --prompt "描述这张图片。"

How it runs: the image encoder graph turns the images into 32 embeddings each; the prompt's
token embeddings are a numpy gather from `glm_6b_for_lite.ckpt`; the image embeddings replace
the 32 placeholders after `<img>`; the full graph runs once over the padded sequence and the
incremental graph once per new token with the KV cache, driven by the generation loop
run_visualglm.py uses (research.common.generation.generate: same limits, stops and sampling).
Without --inc_model_path (or with --use_past False) every new token re-runs the full graph:
slower, same tokens.

Runtime: MindSpore Lite when `mindspore_lite` imports (Ascend hosts), each file built with the
GE options of --ge_config (seed 001's context.cfg); otherwise `mindspore.load` + `nn.GraphCell`
run the same files. The output says which one ran.

Output: the list of "<img></img>问：...\n答：answer" strings run_visualglm.py prints, then the
generate time (prefill + decode; image encoder apart) and tokens/s; --generate_repeat_time N
answers N times (upstream's flag), the first run including the graphs' compilation.

Batch size and sequence length are those the graphs were exported with, read from the files;
--batch_size / --seq_length (text length; the GLM length is this + 32) are checked against
them. --config supplies the tokenizer, image processor, special ids and sampling defaults,
and the location of glm_6b_for_lite.ckpt: `text_config.checkpoint_name_or_path` itself when
it names that file (seed 001), else beside it (where convert_weight.py writes it);
--lite_checkpoint overrides both.
"""
import argparse
import dataclasses
import os
import time

import numpy as np
from mindspore import Tensor

from research.common.config import REPO_ROOT
from research.common.errors import UserInputError
from research.common.generation import generate
from research.common.runtime import cli_main, device_target, init_context, str2bool
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.convert_weight import LITE_CHECKPOINT, LITE_PARAMETER
from research.visualglm.lite_graphs import (GRAPH_NAMES, check_graph_kind,
                                            default_image_encoder_path, describe, read_graph_inputs)
from research.visualglm.modeling_glm import glm_positions_and_mask
from research.visualglm.modeling_visualglm import splice_prompt_embeddings
from research.visualglm.processing_visualglm import build_processor, postprocess_response
from research.visualglm.run_glm import check_special_ids
from research.visualglm.run_visualglm import (DEFAULT_CONFIG, DEFAULT_IMAGE, DEFAULT_PROMPT,
                                              generation_settings, image_prompt_pairs)

DEFAULT_GE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context.cfg")
RUNTIMES = ("auto", "lite", "mindspore")


# ---- runtimes: run one MindIR file ---------------------------------------------------------------

class GraphCellRuntime:
    """`mindspore.load` + `nn.GraphCell`: the exported graph as MindSpore compiled it."""

    name = "MindSpore (mindspore.load + nn.GraphCell)"

    def load(self, path):
        import mindspore as ms
        from mindspore import nn

        try:
            cell = nn.GraphCell(ms.load(path))
        except (RuntimeError, ValueError) as err:
            raise UserInputError(f"MindSpore cannot load {path}: {err}") from err

        def run(*values):
            from mindspore import Tensor

            outputs = cell(*[Tensor(v) if isinstance(v, np.ndarray) else v for v in values])
            return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

        return run

    @staticmethod
    def to_numpy(value):
        return value.asnumpy()


class LiteRuntime:
    """MindSpore Lite: each file is built with the GE options of the --ge_config file."""

    name = "MindSpore Lite"

    def __init__(self, mslite, ge_config, device_id):
        self.mslite = mslite
        self.ge_config = ge_config
        self.context = mslite.Context()
        if device_target() == "Ascend":
            self.context.target = ["ascend"]
            self.context.ascend.device_id = device_id
        else:
            self.context.target = ["cpu"]

    def load(self, path):
        model = self.mslite.Model()
        try:
            model.build_from_file(path, self.mslite.ModelType.MINDIR, self.context, self.ge_config)
        except (RuntimeError, ValueError) as err:
            raise UserInputError(f"MindSpore Lite cannot build {path} with {self.ge_config}: {err}") from err
        slots = model.get_inputs()

        def run(*values):
            tensors = []
            for slot, value in zip(slots, values):
                if isinstance(value, np.ndarray):  # else: an output tensor of an earlier call
                    slot.set_data_from_numpy(np.ascontiguousarray(value))
                    value = slot
                tensors.append(value)
            return tuple(model.predict(tensors))

        return run

    @staticmethod
    def to_numpy(value):
        return value.get_data_to_numpy()


def select_runtime(choice, ge_config, device_id):
    """(runtime, a line saying which one runs and why)."""
    if choice in ("auto", "lite"):
        try:
            import mindspore_lite as mslite
        except ImportError:
            if choice == "lite":
                raise UserInputError("--runtime lite: mindspore_lite is not installed (it ships for "
                                     "Ascend hosts); use --runtime auto or mindspore") from None
        else:
            return LiteRuntime(mslite, ge_config, device_id), \
                f"runtime: MindSpore Lite {getattr(mslite, '__version__', '')} with GE config {ge_config}"
    reason = "requested" if choice == "mindspore" else "mindspore_lite is not installed"
    return GraphCellRuntime(), (f"runtime: {GraphCellRuntime.name} ({reason}; the GE options of "
                                f"{ge_config} apply to MindSpore Lite only)")


class Graph:
    """One exported file: its inputs as the file declares them, and a way to run it.

    Numpy inputs are cast to the declared dtypes; outputs stay runtime tensors (the KV cache goes
    back in without a copy), `numpy()` converts one.
    """

    def __init__(self, kind, path, inputs):
        self.kind, self.path = kind, path
        self.inputs = check_graph_kind(inputs, kind, path)
        self.runtime = None
        self._run = None

    def __getitem__(self, name):
        return self.inputs[name]

    def load(self, runtime):
        self.runtime = runtime
        self._run = runtime.load(self.path)

    def __call__(self, *values):
        cast = []
        for spec, value in zip(self.inputs.values(), values):
            if isinstance(value, np.ndarray) or np.isscalar(value):
                value = np.asarray(value, dtype=spec.dtype)
                if value.shape != spec.shape:
                    raise ValueError(f"{GRAPH_NAMES[self.kind]} input {spec.name}: got shape "
                                     f"{value.shape}, the file has {spec.shape}")
            cast.append(value)
        return self._run(*cast)

    def numpy(self, value):
        return self.runtime.to_numpy(value)


# ---- opening and checking the files ------------------------------------------------------------

def open_graphs(full_path, inc_path, encoder_path):
    """{kind: Graph} for the given files, checked against each other (not yet loaded)."""
    if not full_path:
        raise UserInputError("--full_model_path is required (the full graph written by "
                             "export_lite_model.py, e.g. output/mindir_full_checkpoint_bs_1_512/"
                             "rank_0_graph.mindir)")
    if not os.path.exists(full_path):
        raise UserInputError(f"{GRAPH_NAMES['full']} not found: {full_path}")
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
    graphs = {kind: Graph(kind, path, read_graph_inputs(path, GRAPH_NAMES[kind]))
              for kind, path in paths.items() if path}
    full = graphs["full"]
    batch, length, hidden = full["input_embeds"].shape
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


def check_requested_shapes(graphs, args, image_length):
    """--batch_size / --seq_length against the exported shapes; returns (batch, text length)."""
    full = graphs["full"]
    batch, length, _ = full["input_embeds"].shape
    text_length = length - image_length
    exported = (f"{full.path} was exported with batch_size {batch} and seq_length {text_length} "
                f"(GLM length {length} = {text_length} text + {image_length} image tokens)")
    if args.batch_size is not None and args.batch_size != batch:
        raise UserInputError(f"--batch_size {args.batch_size} was asked but {exported}; pass "
                             f"--batch_size {batch}, or re-export with --batch_size {args.batch_size}")
    if args.seq_length is not None and args.seq_length != text_length:
        raise UserInputError(f"--seq_length {args.seq_length} was asked but {exported}; pass "
                             f"--seq_length {text_length}, or re-export with --seq_length {args.seq_length}")
    return batch, text_length


def ge_config_path(path):
    """--ge_config as given, else beside this script (seed 001 passes a bare `context.cfg`)."""
    if path is None:
        return DEFAULT_GE_CONFIG
    for candidate in (path, os.path.join(os.path.dirname(DEFAULT_GE_CONFIG), path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserInputError(f"--ge_config not found: {path}")


def lite_checkpoint_path(args, text_config):
    """glm_6b_for_lite.ckpt: --lite_checkpoint, the YAML's GLM checkpoint if it is that file, or
    the file beside the YAML's GLM checkpoint."""
    if args.lite_checkpoint:
        path, origin = args.lite_checkpoint, "--lite_checkpoint"
    else:
        glm = text_config.checkpoint_name_or_path
        if not glm:
            raise UserInputError(f"no {LITE_CHECKPOINT}: the YAML's text_config.checkpoint_name_or_path "
                                 f"is empty; pass --lite_checkpoint (convert_weight.py writes the file "
                                 f"beside the GLM checkpoint; export_lite_model.py writes one for "
                                 f"random weights)")
        if os.path.basename(glm) == LITE_CHECKPOINT:
            path, origin = glm, "the YAML's text_config.checkpoint_name_or_path"
        else:
            path = os.path.join(os.path.dirname(glm), LITE_CHECKPOINT)
            origin = f"beside the YAML's GLM checkpoint {glm}"
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserInputError(f"{LITE_CHECKPOINT} (the GLM word embeddings for Lite) not found: {path} "
                         f"({origin}); convert_weight.py writes it beside the GLM checkpoint, or "
                         f"pass --lite_checkpoint")


def read_embedding_table(path):
    """The GLM word embeddings [vocab, hidden] (numpy) from a checkpoint that holds them."""
    import mindspore as ms

    try:
        params = ms.load_checkpoint(path, choice_func=lambda name: name == LITE_PARAMETER)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for unreadable files
        raise UserInputError(f"{path} is not a readable MindSpore checkpoint: {err}") from err
    if LITE_PARAMETER not in params:
        raise UserInputError(f"{path} has no {LITE_PARAMETER} (the GLM word embeddings)")
    return params[LITE_PARAMETER].asnumpy()


# ---- generation --------------------------------------------------------------------------------

class GraphLanguageModel:
    """The exported GLM graphs behind the model interface of research.common.generation:
    the prefill (full) graph when no KV cache is given, else the one-token (inc) graph."""

    def __init__(self, graphs, embedding_table, text_config, seq_length):
        self.graphs = graphs
        self.embedding_table = embedding_table
        self.config = dataclasses.replace(text_config, seq_length=seq_length)
        self.prefill_seconds = None

    def generation_inputs(self, input_ids, pad_lengths):
        return glm_positions_and_mask(input_ids, pad_lengths, self.config)

    def embed_tokens(self, input_ids):
        return Tensor(self.embedding_table[input_ids.asnumpy()])

    def __call__(self, input_ids, position_ids, attention_mask, inputs_embeds=None, key_cache=None,
                 value_cache=None, cache_index=None, logits_index=None):
        """The full (prefill) graph over the whole sequence: (logits, key_cache, value_cache)."""
        start = time.perf_counter()
        graph = self.graphs["full"]
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        logits, key_cache, value_cache = graph(embeds.asnumpy(), position_ids.asnumpy(),
                                               attention_mask.asnumpy(), logits_index.asnumpy())
        if self.prefill_seconds is None:
            self.prefill_seconds = time.perf_counter() - start
        return Tensor(graph.numpy(logits)), key_cache, value_cache

    def cached_forward(self, batch_size, min_length):
        return GraphKVCacheForward(self)


class GraphKVCacheForward:
    """The cached-forward interface over the graphs: the prompt goes through the full graph,
    padded on the right to its static length (the padded slots are overwritten by the decode
    steps before they are attended), each new token through the inc graph, which takes the
    KV cache in and gives the updated one back."""

    def __init__(self, language_model):
        self.language_model = language_model
        self.length = language_model.config.seq_length
        self.key_cache = self.value_cache = None

    def __call__(self, input_ids, position_ids, attention_mask, inputs_embeds, cache_index, logits_index):
        if logits_index is not None:
            pad = self.length - input_ids.shape[1]
            embeds = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            embeds = np.pad(embeds.asnumpy(), ((0, 0), (0, pad), (0, 0)))
            position_ids = np.pad(position_ids.asnumpy(), ((0, 0), (0, 0), (0, pad)))
            attention_mask = np.pad(attention_mask.asnumpy(), ((0, 0), (0, 0), (0, pad), (0, 0)))
            logits, self.key_cache, self.value_cache = self.language_model(
                None, Tensor(position_ids), Tensor(attention_mask), Tensor(embeds),
                logits_index=logits_index)
            return logits
        graph = self.language_model.graphs["inc"]
        logits, self.key_cache, self.value_cache = graph(
            input_ids.asnumpy(), position_ids.asnumpy(), attention_mask.asnumpy(),
            self.key_cache, self.value_cache, cache_index.asnumpy())
        return Tensor(graph.numpy(logits).reshape(input_ids.shape[0], -1))


class LiteVisualGLM:
    """VisualGLM answered by the exported graphs; the same steps as
    VisualGLMImageToTextGeneration.generate + research.common.generation.generate."""

    def __init__(self, config, processor, graphs, embedding_table):
        self.config = config
        self.text_config = config.text_config
        self.processor = processor
        self.graphs = graphs
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

    def prepare(self, pairs, english=False):
        """Processor outputs for up to batch_size pairs, the last pair repeated to fill the batch
        (the graphs' batch size is fixed); the prompts must fit the exported length."""
        if not 0 < len(pairs) <= self.batch_size:
            raise ValueError(f"1..{self.batch_size} pairs per batch, got {len(pairs)}")
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
        """New token ids per row through the shared generation loop (same limits, stops and
        sampling as run_visualglm.py); `timings` (a dict) receives image_s, prefill_s, decode_s."""
        timings = {} if timings is None else timings
        start = time.perf_counter()
        encoder = self.graphs["image_encoder"]
        image_embeds = encoder.numpy(encoder(pixel_values)[0])
        if image_embeds.shape[:2] != (len(prompts), self.config.image_length):
            raise UserInputError(f"the image encoder graph gives {image_embeds.shape[1]} embeddings per "
                                 f"image but the config's Q-Former has {self.config.image_length} queries")
        embeds = splice_prompt_embeddings(prompts, pre_image_lengths, image_embeds,
                                          lambda ids: self.embedding_table[ids],
                                          self.text_config.pad_token_id)
        timings["image_s"] = time.perf_counter() - start
        language_model = GraphLanguageModel(self.graphs, self.embedding_table, self.text_config,
                                            self.seq_length)
        settings = dataclasses.replace(settings, use_past=self.use_past and settings.use_past)
        start = time.perf_counter()
        outputs = generate(language_model, prompts, settings, prompt_embeds=embeds)
        timings["prefill_s"] = language_model.prefill_seconds
        timings["decode_s"] = time.perf_counter() - start - language_model.prefill_seconds
        return outputs

    def answer(self, pairs, settings, english=False, timings=None):
        """(prompt texts, answers, new ids per row) for up to batch_size (image, query) pairs."""
        inputs = self.prepare(pairs, english)
        outputs = self.generate(inputs["input_ids"], inputs["pre_image_lengths"],
                                inputs["pixel_values"], settings, timings)[:len(pairs)]
        answers = [postprocess_response(self.processor.tokenizer.decode(ids)) for ids in outputs]
        return inputs["prompts"][:len(pairs)], answers, outputs


def build_lite_visualglm(args):
    """(LiteVisualGLM, settings, runtime line) from the flags; every file checked first."""
    yaml_config, config = load_visualglm_config(args.config)
    text = config.text_config
    for field in ("do_sample", "top_k", "top_p"):
        if getattr(args, field) is not None:
            setattr(text, field, getattr(args, field))
    ge_config = ge_config_path(args.ge_config)
    if args.inc_model_path and not os.path.exists(args.inc_model_path):
        raise UserInputError(f"{GRAPH_NAMES['inc']} not found: {args.inc_model_path} (export it with "
                             f"export_lite_model.py --use_past True, or leave out --inc_model_path "
                             f"to re-run the full graph for every token)")
    inc_path = args.inc_model_path if args.use_past is not False else None
    graphs = open_graphs(args.full_model_path, inc_path, args.image_encoder_path)
    _, text_length = check_requested_shapes(graphs, args, config.image_length)
    text.seq_length = text_length + config.image_length
    text.validate()
    config.validate()
    processor = build_processor(yaml_config.get("processor") or {}, config.image_length)
    check_special_ids(text, processor.tokenizer)
    table = read_embedding_table(lite_checkpoint_path(args, text))
    model = LiteVisualGLM(config, processor, graphs, table)
    runtime, runtime_line = select_runtime(args.runtime, ge_config, args.device_id)
    if isinstance(runtime, GraphCellRuntime):
        init_context(yaml_config, args.device_id)
    for graph in graphs.values():
        graph.load(runtime)
    settings = generation_settings(config, processor.tokenizer, args.max_new_tokens)
    settings.use_past = model.use_past
    return model, settings, runtime_line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full_model_path", default=None, help="full (prefill) graph .mindir")
    parser.add_argument("--inc_model_path", default=None,
                        help="incremental graph .mindir (without it the full graph re-runs per token)")
    parser.add_argument("--image_encoder_path", default=None,
                        help="image encoder .mindir (default: mindir_image_encoder_bs_B/ beside the "
                             "full graph's folder)")
    parser.add_argument("--lite_checkpoint", default=None,
                        help=f"{LITE_CHECKPOINT} (default: beside the YAML's GLM checkpoint)")
    parser.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                        help="YAML path or a name in configs/visualglm/ (tokenizer, processor, ids, "
                             "sampling)")
    parser.add_argument("--ge_config", default=None,
                        help=f"MindSpore Lite GE options (default {DEFAULT_GE_CONFIG})")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="auto: MindSpore Lite if it imports, else mindspore.load + GraphCell")
    parser.add_argument("--device_id", type=int, default=0)
    parser.add_argument("--seq_length", type=int, default=None,
                        help="text tokens the graphs were exported with (checked; default: theirs)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="batch size the graphs were exported with (checked; default: theirs)")
    parser.add_argument("--use_past", type=str2bool, default=None,
                        help="False: ignore --inc_model_path and re-run the full graph per token")
    parser.add_argument("--image_path", action="append", default=None,
                        help=f"image file (default {DEFAULT_IMAGE}); repeat or comma-separate for several")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"question (default {DEFAULT_PROMPT}); one per image")
    parser.add_argument("--do_sample", type=str2bool, default=None, help="sample (overrides YAML)")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--english", type=str2bool, default=False, help="Q:/A: prompt format")
    parser.add_argument("--generate_repeat_time", type=int, default=1,
                        help="answer everything this many times (the first run compiles the graphs)")
    return parser.parse_args(argv)


def answer_all(model, settings, pairs, english=False):
    """Answer every (image, prompt) pair, batch_size at a time; returns (results, stats)."""
    results, new_tokens = [], 0
    stats = {"image_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
    start = time.perf_counter()
    for first in range(0, len(pairs), model.batch_size):
        timings = {}
        prompts, answers, outputs = model.answer(pairs[first:first + model.batch_size], settings,
                                                 english, timings)
        results += [prompt + reply for prompt, reply in zip(prompts, answers)]
        new_tokens += sum(len(ids) for ids in outputs)
        for key, value in timings.items():
            stats[key] += value
    stats.update(seconds=time.perf_counter() - start, new_tokens=new_tokens)
    return results, stats


def describe_speed(stats):
    generate, seconds, tokens = stats["prefill_s"] + stats["decode_s"], stats["seconds"], stats["new_tokens"]
    return (f"generate time {generate:.3f} s (prefill {stats['prefill_s']:.3f} s + decode "
            f"{stats['decode_s']:.3f} s; image encoder {stats['image_s']:.3f} s), {tokens} new tokens, "
            f"{tokens / max(generate, 1e-9):.1f} tokens/s; end to end {seconds:.2f} s "
            f"({tokens / max(seconds, 1e-9):.1f} tokens/s)")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.generate_repeat_time <= 0:
        raise UserInputError(f"--generate_repeat_time must be positive, got {args.generate_repeat_time}")
    model, settings, runtime_line = build_lite_visualglm(args)
    args.batch_size = model.batch_size
    pairs = image_prompt_pairs(args)
    print(runtime_line)
    print(f"graphs: batch_size {model.batch_size}, seq_length {model.seq_length - model.config.image_length} "
          f"(GLM length {model.seq_length})")
    for graph in model.graphs.values():
        print(f"    {GRAPH_NAMES[graph.kind]}: {graph.path}\n        inputs: "
              f"{describe(graph.inputs.values())}")
    if not model.use_past:
        why = "--use_past False" if args.inc_model_path else "no --inc_model_path"
        print(f"{why}: the full graph re-runs for every new token (slower; the same tokens)")
    for repeat in range(args.generate_repeat_time):
        results, stats = answer_all(model, settings, pairs, args.english)
        first = " (includes compiling the graphs)" if repeat == 0 else ""
        if repeat == args.generate_repeat_time - 1:
            print(results)
        print(f"run {repeat + 1}/{args.generate_repeat_time}{first}: {describe_speed(stats)}; "
              f"batch_size={model.batch_size}, use_past={model.use_past}")
    return results


if __name__ == "__main__":
    main()
