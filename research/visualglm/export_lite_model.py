"""Export VisualGLM to MindIR for MindSpore Lite (seed 001, "ckpt转换为mindir").

    python -m research.visualglm.export_lite_model --mode export --config CONFIG \\
        --use_past True --device_id 0 --seq_length 512 --batch_size 1

writes, under --output_dir (default output/):
- `mindir_full_checkpoint_bs_{bs}_{seq}/rank_0_graph.mindir`: the GLM prefill graph,
  input_embeds [B,S,H], position_ids [B,2,S], attention_mask [B,1,S,S], logits_index [B]
  -> logits [B,V] at logits_index, key_cache, value_cache [layers,B,heads,S,head_dim];
- with use_past, `mindir_inc_checkpoint_bs_{bs}_{seq}/rank_0_graph.mindir`: one token per row,
  input_ids [B,1], position_ids [B,2,1], attention_mask [B,1,1,S], key_cache, value_cache,
  cache_index [] (the slot to write) -> logits [B,V], key_cache, value_cache;
- `mindir_image_encoder_bs_{bs}/rank_0_graph.mindir`: ViT + Q-Former + glm_proj,
  pixel_values [B,3,I,I] -> image embeddings [B,32,H].

`--seq_length` is the text length, as in run_visualglm.py and seed 001 (its folder example
`bs_1_512` is for `--seq_length 512`): the graphs' static GLM length S is seq_length + the 32
image tokens. Without the flag it is the YAML's `text_config.seq_length` - 32, the length
run_visualglm.py uses. --use_past defaults to the YAML's `use_past`.
Weights are the YAML's three checkpoints (model.load_checkpoints()); a part without one keeps
its random initialisation and the export says so (with no GLM checkpoint it also writes the
random word embeddings as `glm_6b_for_lite.ckpt` in the output directory, for the runner).
Over 1 GB of weights (the 6B model) MindSpore keeps them in `rank_0_graph_variables/` beside
the graph file. run_visualglm_infer_lite.py runs the files.
"""
import argparse
import os
import shutil

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from research.common.convert import save_checkpoint_atomic
from research.common.errors import UserInputError
from research.common.layers import ms_dtype
from research.common.runtime import cli_main, str2bool
from research.visualglm.convert_weight import LITE_CHECKPOINT, LITE_PARAMETER
from research.visualglm.lite_graphs import GRAPH_NAMES, describe, graph_paths, read_graph_inputs
from research.visualglm.run_visualglm import DEFAULT_CONFIG, build_visualglm, describe_weights


class GLMPrefillGraph(nn.Cell):
    """The GLM over the whole padded sequence from input embeddings (image already spliced in)."""

    def __init__(self, llm_model):
        super().__init__(auto_prefix=False)
        self.llm_model = llm_model

    def construct(self, input_embeds, position_ids, attention_mask, logits_index):
        return self.llm_model(None, position_ids, attention_mask, input_embeds, None, None, None,
                              logits_index)


class GLMDecodeGraph(nn.Cell):
    """One new token per row against the KV cache; writes it at slot `cache_index`."""

    def __init__(self, llm_model):
        super().__init__(auto_prefix=False)
        self.llm_model = llm_model

    def construct(self, input_ids, position_ids, attention_mask, key_cache, value_cache, cache_index):
        logits, key_cache, value_cache = self.llm_model(
            input_ids, position_ids, attention_mask, None, key_cache, value_cache, cache_index, None)
        return logits.reshape(logits.shape[0], -1), key_cache, value_cache


def example_inputs(config, batch_size):
    """{graph kind: zero tensors with the static shapes and dtypes of its inputs}."""
    text = config.text_config
    length, hidden = text.seq_length, text.hidden_size
    compute = ms_dtype(text.compute_dtype)
    cache_shape = (text.num_layers, batch_size, text.num_heads, length, text.head_dim)
    image = config.vision_config.image_size

    def zeros(shape, dtype):
        return Tensor(np.zeros(shape, np.float32), dtype)

    return {
        "full": (zeros((batch_size, length, hidden), compute), zeros((batch_size, 2, length), ms.int32),
                 zeros((batch_size, 1, length, length), ms.float32), zeros((batch_size,), ms.int32)),
        "inc": (zeros((batch_size, 1), ms.int32), zeros((batch_size, 2, 1), ms.int32),
                zeros((batch_size, 1, 1, length), ms.float32), zeros(cache_shape, compute),
                zeros(cache_shape, compute), Tensor(0, ms.int32)),
        "image_encoder": (zeros((batch_size, 3, image, image), ms.float32),),
    }


def export_graphs(model, config, output_dir, batch_size, seq_length, use_past, rank=0):
    """Write the graphs; returns {kind: path}. `seq_length` is the text length (folder names)."""
    paths = graph_paths(output_dir, batch_size, seq_length, rank)
    cells = {"full": GLMPrefillGraph(model.llm_model)}
    if use_past:
        cells["inc"] = GLMDecodeGraph(model.llm_model)
    cells["image_encoder"] = model.image_encoder
    inputs = example_inputs(config, batch_size)
    written = {}
    for kind, cell in cells.items():
        cell.set_train(False)
        prefix = paths[kind][:-len(".mindir")]
        os.makedirs(os.path.dirname(paths[kind]), exist_ok=True)
        remove_previous_export(prefix)
        ms.export(cell, *inputs[kind], file_name=prefix, file_format="MINDIR")
        if not os.path.exists(paths[kind]) and os.path.exists(prefix + "_graph.mindir"):
            # Over 1 GB of weights MindSpore writes <prefix>_graph.mindir and the weights in
            # <prefix>_variables/ (found by a path relative to the graph's folder): give the graph
            # the name seed 001 uses.
            os.replace(prefix + "_graph.mindir", paths[kind])
        written[kind] = paths[kind]
    return written


def remove_previous_export(prefix):
    """The files an earlier export wrote under this name, so that none of them goes stale."""
    for path in (prefix + ".mindir", prefix + "_graph.mindir"):
        if os.path.exists(path):
            os.remove(path)
    if os.path.isdir(prefix + "_variables"):
        shutil.rmtree(prefix + "_variables")


def describe_size(path):
    """'12.3 MiB', plus the external weights folder when MindSpore split them out."""
    size = f"{os.path.getsize(path) / 2**20:.1f} MiB"
    variables = path[:-len(".mindir")] + "_variables"
    if os.path.isdir(variables):
        total = sum(os.path.getsize(os.path.join(variables, name)) for name in os.listdir(variables))
        size += f", weights in {variables}/ {total / 2**30:.2f} GiB"
    return size


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="export", choices=["export"], help="only 'export'")
    parser.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                        help="YAML path or a name in configs/visualglm/")
    parser.add_argument("--use_past", type=str2bool, default=None,
                        help="also export the incremental graph (default: the YAML's use_past)")
    parser.add_argument("--device_id", type=int, default=0)
    parser.add_argument("--seq_length", type=int, default=None,
                        help="text tokens; the GLM graphs' length is this + the 32 image tokens "
                             "(default: the YAML's text_config.seq_length - 32)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--output_dir", default="output", help="where the mindir_* folders go")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise UserInputError(f"--batch_size must be positive, got {args.batch_size}")
    build_args = argparse.Namespace(config=args.config, device_id=args.device_id,
                                    seq_length=args.seq_length, use_past=args.use_past,
                                    do_sample=None, top_k=None, top_p=None)
    config, model, _, loaded, device = build_visualglm(build_args)
    text = config.text_config
    seq_length = text.seq_length - config.image_length
    print(f"device: {device}; {describe_weights(loaded)}")
    print(f"exporting batch_size={args.batch_size}, seq_length={seq_length} (GLM length "
          f"{text.seq_length} = {seq_length} text + {config.image_length} image tokens), "
          f"use_past={text.use_past}, compute dtype {text.compute_dtype}")
    rank = int(os.getenv("RANK_ID", "0"))
    written = export_graphs(model, config, args.output_dir, args.batch_size, seq_length,
                            text.use_past, rank)
    for kind, path in written.items():
        print(f"wrote {GRAPH_NAMES[kind]}: {path} ({describe_size(path)})\n"
              f"    inputs: {describe(read_graph_inputs(path, GRAPH_NAMES[kind]))}")
    lite_checkpoint = None
    if not text.checkpoint_name_or_path:
        # No GLM checkpoint, so no glm_6b_for_lite.ckpt from convert_weight.py: write the random
        # word embeddings the graphs were exported with, for the Lite runner to embed prompts.
        lite_checkpoint = os.path.join(args.output_dir, LITE_CHECKPOINT)
        table = model.llm_model.transformer.word_embeddings.embedding_table.asnumpy()
        save_checkpoint_atomic({LITE_PARAMETER: table}, lite_checkpoint)
        print(f"wrote {lite_checkpoint}: the random GLM word embeddings {list(table.shape)} that "
              f"go with these graphs (no GLM checkpoint in the YAML)")
    stale = graph_paths(args.output_dir, args.batch_size, seq_length, rank)["inc"]
    if not text.use_past and os.path.exists(stale):
        print(f"note: use_past is False, so no incremental graph was written; {stale} is from an "
              f"earlier export and may not match these weights")
    command = (f"python -m research.visualglm.run_visualglm_infer_lite --config {args.config} "
               f"--full_model_path {written['full']}"
               + (f" --inc_model_path {written['inc']}" if "inc" in written else "")
               + f" --seq_length {seq_length} --batch_size {args.batch_size} --device_id {args.device_id}"
               + (f" --lite_checkpoint {lite_checkpoint}" if lite_checkpoint else "")
               + " --image_path IMAGE --prompt PROMPT")
    print(f"run them with:\n    {command}")
    return written


if __name__ == "__main__":
    main()
