"""Fine-tune VisualGLM (MindFormers' `run_visualglm_finetune.py`, seed 001 "MindSpore 微调").

    python -m research.visualglm.run_visualglm_finetune --config run_visualglm_lora.yaml \
        --graph_mode 0 --batch_size 4 --device_id 0

With `text_config.pet_config` (LoRA) only the LoRA matrices train; without it, full
fine-tuning of the Q-Former and glm_proj, plus the ViT / GLM when `freeze_vision` /
`freeze_text` are False. Checkpoints: `output/checkpoint_trainable/rank_N/` (trainable
parameters only) and `output/checkpoint/rank_N/` (full state, for `--resume`). With
`use_parallel: True` start it through `run_singlenode.sh` (one process per device;
msrun on CPU).
"""
import argparse

from research.common.runtime import cli_main
from research.visualglm.finetune import finetune


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config_path", dest="config", default="run_visualglm_lora.yaml",
                        help="YAML path or a name in configs/visualglm/")
    parser.add_argument("--graph_mode", type=int, choices=(0, 1), default=None,
                        help="0 GRAPH, 1 PYNATIVE (default: the YAML's context.mode)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="per-process batch size (default: runner_config.batch_size)")
    parser.add_argument("--device_id", type=int, default=None,
                        help="NPU id (default: context.device_id, else DEVICE_ID, which "
                             "run_singlenode.sh sets per rank, else 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default: runner_config.epochs")
    parser.add_argument("--output_dir", default=None, help="default: the YAML's output_dir")
    parser.add_argument("--resume", default=None,
                        help="'True' for the latest checkpoint in output_dir (nothing saved yet: "
                             "start at step 0), or a checkpoint path")
    args = parser.parse_args(argv)
    resume = {"true": True, "false": None}.get(str(args.resume).lower(), args.resume)
    return finetune(args.config, graph_mode=args.graph_mode, batch_size=args.batch_size,
                    device_id=args.device_id, epochs=args.epochs, output_dir=args.output_dir,
                    resume=resume)


if __name__ == "__main__":
    main()
