"""Weight conversion for VisualGLM: SAT or Hugging Face checkpoints -> MindSpore checkpoints.

    python -m research.visualglm.convert_weight --torch_path TORCH_CKPT \\
        --vit_mindspore_path VIT.ckpt --qformer_mindspore_path QFORMER.ckpt \\
        --glm_mindspore_path GLM.ckpt

`--torch_path` is a SAT checkpoint (`mp_rank_00_model_states.pt`, or its directory with a
`latest` file) or a Hugging Face visualglm-6b directory / index json (`.bin` or
`.safetensors` shards). The tables and the conversion are `convert_visualglm.py`'s.

The conversion streams: a first pass reads only shapes (index and safetensors headers, or an
mmap of each torch file) and checks every key and shape before anything is written; the
second pass opens one shard at a time and appends each converted tensor straight to its
output file, so memory stays near the largest shard, not the whole 7.8B-parameter model.
"""
import argparse

from research.common.runtime import cli_main
from research.common.torch_checkpoint import OUTPUT_DTYPES
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.convert_visualglm import LITE_CHECKPOINT, QKV_LAYOUTS, convert_visualglm

DEFAULT_CONFIG = "run_visualglm_6b_image_to_text_generation.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a VisualGLM-6B checkpoint (SAT or Hugging Face) into the MindSpore "
                    "checkpoints of the ViT, the Q-Former (+ glm_proj) and the GLM.")
    parser.add_argument("--torch_path", required=True,
                        help="SAT mp_rank_00_model_states.pt or its directory (with 'latest'), or a "
                             "Hugging Face visualglm-6b directory, index json, .bin or .safetensors")
    parser.add_argument("--vit_mindspore_path", required=True, help="output: EVA-ViT + ln_vision .ckpt")
    parser.add_argument("--qformer_mindspore_path", required=True,
                        help="output: Q-Former + glm_proj .ckpt")
    parser.add_argument("--glm_mindspore_path", required=True,
                        help=f"output: GLM .ckpt; {LITE_CHECKPOINT} is written beside it")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="model YAML (a name in configs/visualglm/ or a path) whose shapes the "
                             "checkpoint must have")
    parser.add_argument("--qkv_layout", choices=QKV_LAYOUTS, default="auto",
                        help="order of the GLM's fused qkv rows in the source; auto: contiguous "
                             "for SAT, per_head for Hugging Face")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="keep",
                        help="float dtype written; keep: float16 and float32 stay, bfloat16 "
                             "becomes float32")
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    _, config = load_visualglm_config(args.config)
    report = convert_visualglm(args.torch_path, args.vit_mindspore_path,
                               args.qformer_mindspore_path, args.glm_mindspore_path, config,
                               qkv_layout=args.qkv_layout, dtype=args.dtype)
    print("\n".join(report.lines()))
    return report


if __name__ == "__main__":
    main()
