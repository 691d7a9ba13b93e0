"""Fine-tune ChatGLM2-6B on ADGEN-format data: P-Tuning v2, LoRA or full fine-tuning
(upstream ptuning/train.sh and ds_train_finetune.sh; MindFormers' glm2 fine-tuning YAMLs).

    python -m research.chatglm2.run_chatglm2_finetune --config run_glm2_6b_ptuning2.yaml \\
        --graph_mode 0 --batch_size 1 --device_id 0

The YAML chooses the method: `model_config.pre_seq_len` > 0 is P-Tuning v2 (only the prefix
trains), `model_config.pet_config` LoRA (only its matrices), neither full fine-tuning.
Checkpoints: `output/checkpoint_trainable/rank_N/` (trainable parameters only: the prefix, the
LoRA matrices or the whole model) and `output/checkpoint/rank_N/` (full state, for `--resume`).
With `use_parallel: True` start it through `run_singlenode.sh` (one process per device; msrun
on CPU) with the same YAML.
"""
from research.chatglm2.finetune import finetune
from research.common.runtime import cli_main
from research.common.trainer import finetune_parser, resume_value


@cli_main
def main(argv=None):
    args = finetune_parser(__doc__, "run_glm2_6b_ptuning2.yaml", "configs/chatglm2/").parse_args(argv)
    return finetune(args.config, graph_mode=args.graph_mode, batch_size=args.batch_size,
                    device_id=args.device_id, epochs=args.epochs, output_dir=args.output_dir,
                    resume=resume_value(args.resume))


if __name__ == "__main__":
    main()
