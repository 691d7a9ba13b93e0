"""Export VisualGLM to MindIR for MindSpore Lite (seed 001, "ckpt转换为mindir").

    python -m research.visualglm.export_lite_model --mode export --config CONFIG \\
        --use_past True --device_id 0 --seq_length 512 --batch_size 1

writes, under --output_dir (default: the YAML's `output_dir`, else `output/`; a YAML's relative
paths are relative to the repository root):
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
- `glm_6b_for_lite.ckpt` beside the full graph: the GLM word embeddings these graphs were
  exported with, which the runner gathers the prompt's embeddings from.
Weights are the YAML's three checkpoints (model.load_checkpoints()); a part without one keeps
its random initialisation and the export says so.
Over 1 GB of weights (the 6B model) MindSpore keeps them in `rank_0_graph_variables/` beside
the graph file. run_visualglm_infer_lite.py runs the files.
"""
import argparse
import os
import shlex

from research.common.config import repo_path
from research.common.errors import UserInputError
from research.common.lite.export import describe_size
from research.common.lite.graphs import describe
from research.common.runtime import cli_main, str2bool
from research.visualglm.inference import DEFAULT_CONFIG, load_visualglm
from research.visualglm.lite_visualglm import GRAPH_NAMES, export_visualglm_graphs, graph_inputs, graph_paths


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
    parser.add_argument("--output_dir", default=None,
                        help="where the mindir_* folders go (default: the YAML's output_dir, else "
                             "output/ at the repository root)")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise UserInputError(f"--batch_size must be positive, got {args.batch_size}")
    chat = load_visualglm(args.config, device_id=args.device_id, seq_length=args.seq_length,
                          use_past=args.use_past)
    config, text = chat.config, chat.config.text_config
    seq_length = text.seq_length - config.image_length
    print(f"device: {chat.device}; {chat.describe_weights()}")
    print(f"exporting batch_size={args.batch_size}, seq_length={seq_length} (GLM length "
          f"{text.seq_length} = {seq_length} text + {config.image_length} image tokens), "
          f"use_past={text.use_past}, compute dtype {text.compute_dtype}")
    rank = int(os.getenv("RANK_ID", "0"))
    output_dir = args.output_dir or repo_path(chat.yaml.get("output_dir") or "output")
    written = export_visualglm_graphs(chat, output_dir, args.batch_size, text.use_past, rank)
    lite_checkpoint = written.pop("lite")
    for kind, path in written.items():
        print(f"wrote {GRAPH_NAMES[kind]}: {path} ({describe_size(path)})\n"
              f"    inputs: {describe(graph_inputs(path, kind).values())}")
    print(f"wrote {lite_checkpoint}: the GLM word embeddings that go with these graphs")
    stale = graph_paths(output_dir, args.batch_size, seq_length, rank)["inc"]
    if not text.use_past and os.path.exists(stale):
        print(f"note: use_past is False, so no incremental graph was written; {stale} is from an "
              f"earlier export and may not match these weights")
    here = {kind: shlex.quote(os.path.relpath(path)) for kind, path in written.items()}
    command = (f"python -m research.visualglm.run_visualglm_infer_lite --config {shlex.quote(args.config)} "
               f"--full_model_path {here['full']}"
               + (f" --inc_model_path {here['inc']}" if "inc" in here else "")
               + f" --seq_length {seq_length} --batch_size {args.batch_size} --device_id {args.device_id}"
               + " --image_path IMAGE --prompt PROMPT")
    print(f"run them with:\n    {command}")
    return written


if __name__ == "__main__":
    main()
