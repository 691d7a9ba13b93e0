"""Export ChatGLM2 to MindIR for MindSpore Lite (MindFormers' glm2 "ckpt转换为mindir").

    python -m research.chatglm2.export_lite_model --mode export --config CONFIG \\
        --use_past True --device_id 0 --seq_length 512 --batch_size 1

writes, under --output_dir (default: the YAML's `output_dir`, else `output/`; a YAML's relative
paths are relative to the repository root):
- `mindir_full_checkpoint_bs_{bs}_{seq}/rank_0_graph.mindir`: the prefill graph,
  input_embeds [B,S,H], position_ids [B,S], attention_mask [B,1,S,S], logits_index [B]
  -> logits [B,V] at logits_index, key_cache, value_cache [layers,B,kv_groups,S,head_dim];
- with use_past, `mindir_inc_checkpoint_bs_{bs}_{seq}/rank_0_graph.mindir`: one token per row,
  input_ids [B,1], position_ids [B,1], attention_mask [B,1,1,S], key_cache, value_cache,
  cache_index [] (the slot to write) -> logits [B,V], key_cache, value_cache;
- `glm2_6b_for_lite.ckpt` beside the full graph: the word embeddings these graphs were
  exported with, which the runner gathers the prompt's embeddings from.

`--seq_length` is the static length S (default: the YAML's model_config.seq_length), as in
run_chatglm2.py; --use_past defaults to the YAML's `use_past`, --batch_size to its
model_config.batch_size. Weights are the YAML's checkpoint (or --checkpoint); without one the
model keeps its random initialisation and the export says so. Over 1 GB of weights (the 6B
model) MindSpore keeps them in `rank_0_graph_variables/` beside the graph file.
run_chatglm2_infer_lite.py runs the files; the command is printed at the end.
"""
import argparse
import os
import shlex

from research.chatglm2.inference import DEFAULT_CONFIG, load_chatglm2
from research.chatglm2.lite_chatglm2 import GRAPH_NAMES, export_chatglm2_graphs, graph_inputs, graph_paths
from research.common.config import repo_path
from research.common.errors import UserInputError
from research.common.lite.export import describe_size
from research.common.lite.graphs import describe
from research.common.runtime import cli_main, str2bool


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="export", choices=["export"], help="only 'export'")
    parser.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                        help="YAML path or a name in configs/chatglm2/")
    parser.add_argument("--use_past", type=str2bool, default=None,
                        help="also export the incremental graph (default: the YAML's use_past)")
    parser.add_argument("--device_id", type=int, default=None, help="default: context.device_id, else 0")
    parser.add_argument("--seq_length", type=int, default=None,
                        help="the graphs' static length (default: the YAML's model_config.seq_length)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows per forward pass (default: the YAML's model_config.batch_size)")
    parser.add_argument("--checkpoint", "--load_checkpoint", dest="checkpoint", default=None,
                        help="converted checkpoint (overrides model_config.checkpoint_name_or_path)")
    parser.add_argument("--output_dir", default=None,
                        help="where the mindir_* folders go (default: the YAML's output_dir, else "
                             "output/ at the repository root)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserInputError(f"--batch_size must be positive, got {args.batch_size}")
    glm = load_chatglm2(args.config, device_id=args.device_id, seq_length=args.seq_length,
                        use_past=args.use_past, checkpoint=args.checkpoint, batch_size=args.batch_size or 1)
    config = glm.config
    batch_size = args.batch_size or config.batch_size
    print(f"device: {glm.device}; {glm.describe_weights()}")
    print(f"exporting batch_size={batch_size}, seq_length={config.seq_length}, use_past={config.use_past}, "
          f"compute dtype {config.compute_dtype}")
    rank = int(os.getenv("RANK_ID", "0"))
    output_dir = args.output_dir or repo_path(glm.yaml.get("output_dir") or "output")
    written = export_chatglm2_graphs(glm, output_dir, batch_size, config.use_past, rank)
    lite_checkpoint = written.pop("lite")
    for kind, path in written.items():
        print(f"wrote {GRAPH_NAMES[kind]}: {path} ({describe_size(path)})\n"
              f"    inputs: {describe(graph_inputs(path, kind).values())}")
    print(f"wrote {lite_checkpoint}: the word embeddings that go with these graphs")
    stale = graph_paths(output_dir, batch_size, config.seq_length, rank)["inc"]
    if not config.use_past and os.path.exists(stale):
        print(f"note: use_past is False, so no incremental graph was written; {stale} is from an "
              f"earlier export and may not match these weights")
    here = {kind: shlex.quote(os.path.relpath(path)) for kind, path in written.items()}
    command = (f"python -m research.chatglm2.run_chatglm2_infer_lite --config {shlex.quote(args.config)} "
               f"--full_model_path {here['full']}"
               + (f" --inc_model_path {here['inc']}" if "inc" in here else "")
               + f" --seq_length {config.seq_length} --batch_size {batch_size}"
               + (f" --device_id {args.device_id}" if args.device_id is not None else "")
               + " --prompt PROMPT")
    print(f"run them with:\n    {command}")
    return written


if __name__ == "__main__":
    main()
