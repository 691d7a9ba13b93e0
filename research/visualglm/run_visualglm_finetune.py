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
from research.common.runtime import cli_main
from research.common.trainer import finetune_parser, resume_value
from research.visualglm.finetune import finetune


@cli_main
def main(argv=None):
    args = finetune_parser(__doc__, "run_visualglm_lora.yaml", "configs/visualglm/").parse_args(argv)
    return finetune(args.config, graph_mode=args.graph_mode, batch_size=args.batch_size,
                    device_id=args.device_id, epochs=args.epochs, output_dir=args.output_dir,
                    resume=resume_value(args.resume))


if __name__ == "__main__":
    main()
