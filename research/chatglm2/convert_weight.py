"""Weight conversion for ChatGLM2-6B: Hugging Face or MindFormers checkpoints -> one MindSpore checkpoint.

    python -m research.chatglm2.convert_weight --torch_path /path/to/chatglm2-6b \\
        --mindspore_path /path/to/glm2_6b.ckpt

`--torch_path` is a THUDM/chatglm2-6b directory, its index json (`pytorch_model-*.bin` or
`.safetensors` shards) or one shard, or a MindFormers glm2 `.ckpt` (r1.0's `embedding_table`
name). The output has MindFormers 1.9's parameter names. The table and the conversion are
convert_chatglm2.py's; reading and streaming are research.common.torch_checkpoint's: shapes
are checked first, then one shard at a time is converted and appended to the output, which
appears only when complete.
"""
import argparse

from research.chatglm2.configuration_chatglm2 import load_chatglm2_config
from research.chatglm2.convert_chatglm2 import convert_chatglm2
from research.common.runtime import cli_main
from research.common.torch_checkpoint import OUTPUT_DTYPES

DEFAULT_CONFIG = "run_glm2_6b.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a ChatGLM2-6B checkpoint (Hugging Face shards or a MindFormers glm2 "
                    ".ckpt) into one MindSpore checkpoint with MindFormers 1.9 parameter names.")
    parser.add_argument("--torch_path", required=True,
                        help="Hugging Face chatglm2-6b directory, index json, .bin or .safetensors; "
                             "or a MindFormers glm2 .ckpt (embedding_table or embedding_weight)")
    parser.add_argument("--mindspore_path", required=True, help="output .ckpt")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="model YAML (a name in configs/chatglm2/ or a path) whose shapes the "
                             "checkpoint must have")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="keep",
                        help="float dtype written; keep: float16 and float32 stay, bfloat16 becomes float32")
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    _, config = load_chatglm2_config(args.config)
    report = convert_chatglm2(args.torch_path, args.mindspore_path, config, dtype=args.dtype)
    print("\n".join(report.lines()))
    return report


if __name__ == "__main__":
    main()
