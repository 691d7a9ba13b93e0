"""Weight conversion for MiniGPT-4: the upstream files -> the MindSpore checkpoints MiniGPT4 loads.

    python -m research.minigpt4.convert_weight --config run_minigpt4_13b.yaml \\
        --eva_vit_path eva_vit_g.pth --vit_mindspore_path eva_vit_g.ckpt \\
        --q_former_model blip2_pretrained_flant5xxl.pth --qformer_mindspore_path blip2_qformer.ckpt \\
        --llama_model /path/to/vicuna-13b-v0 --llama_mindspore_path vicuna_13b.ckpt \\
        --ckpt pretrained_minigpt4.pth --proj_mindspore_path minigpt4_llama_proj.ckpt

Each upstream file comes with its output; any subset may be converted (the Llama-2 variant has no
--q_former_model). Back to PyTorch: `--export_llama_proj TRAINED.ckpt --export_path OUT.pth` writes a
trained llama_proj in pretrained_minigpt4.pth's layout ({"model": {llama_proj.weight, llama_proj.bias}}). `--config` names the model the files must fit: a llama_proj of another variant
is reported with the config it belongs to. Vicuna is a Hugging Face directory, index json,
`.bin` or `.safetensors`; it streams shard by shard. The tables are convert_minigpt4.py's.
"""
import argparse

from research.common.errors import UserInputError
from research.common.runtime import cli_main
from research.common.torch_checkpoint import OUTPUT_DTYPES
from research.minigpt4.configuration_minigpt4 import load_minigpt4_config
from research.minigpt4.convert_minigpt4 import MiniGPT4Paths, convert_minigpt4, export_llama_proj

DEFAULT_CONFIG = "run_minigpt4_13b.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert MiniGPT-4's upstream files (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, the "
                    "Vicuna weights, pretrained_minigpt4.pth) into MindSpore checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="model YAML (a name in configs/minigpt4/ or a path) the files must fit")
    parser.add_argument("--eva_vit_path", help="LAVIS eva_vit_g.pth")
    parser.add_argument("--vit_mindspore_path", help="output: EVA-ViT-g .ckpt")
    parser.add_argument("--q_former_model", help="LAVIS blip2_pretrained_flant5xxl.pth (upstream's q_former_model)")
    parser.add_argument("--qformer_mindspore_path", help="output: ln_vision + Q-Former .ckpt")
    parser.add_argument("--llama_model", help="Vicuna / Llama-2-chat Hugging Face weights (upstream's llama_model)")
    parser.add_argument("--llama_mindspore_path", help="output: LLaMA .ckpt")
    parser.add_argument("--ckpt", help="pretrained_minigpt4.pth (upstream's ckpt: llama_proj)")
    parser.add_argument("--proj_mindspore_path", help="output: llama_proj .ckpt")
    parser.add_argument("--export_llama_proj", help="a MindSpore checkpoint with llama_proj (training output) to "
                                                    "write as upstream's .pth (with --export_path)")
    parser.add_argument("--export_path", help="output .pth of --export_llama_proj")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="keep",
                        help="float dtype written; keep: float16 and float32 stay, bfloat16 becomes float32")
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.export_llama_proj or args.export_path:
        if not (args.export_llama_proj and args.export_path):
            raise UserInputError("--export_llama_proj and --export_path go together")
        shapes = export_llama_proj(args.export_llama_proj, args.export_path)
        print(f"wrote {', '.join(f'{k} {list(v)}' for k, v in shapes.items())} -> {args.export_path}")
        return shapes
    _, config = load_minigpt4_config(args.config)
    paths = MiniGPT4Paths(eva_vit=args.eva_vit_path, blip2=args.q_former_model, vicuna=args.llama_model,
                          minigpt4=args.ckpt, vit_out=args.vit_mindspore_path, qformer_out=args.qformer_mindspore_path,
                          llama_out=args.llama_mindspore_path, proj_out=args.proj_mindspore_path)
    report = convert_minigpt4(paths, config, dtype=args.dtype)
    print("\n".join(report.lines()))
    return report


if __name__ == "__main__":
    main()
