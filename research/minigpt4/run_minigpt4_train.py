"""Train MiniGPT-4's llama_proj: stage 1 (image-caption shards) or stage 2 (cc_sbu_align), as
upstream's `torchrun --nproc-per-node NUM_GPU train.py --cfg-path train_configs/minigpt4_stage1_pretrain.yaml`.

    python -m research.minigpt4.run_minigpt4_train --config minigpt4_stage1_pretrain.yaml
    python -m research.minigpt4.run_minigpt4_train --config minigpt4_stage2_finetune.yaml   # model ckpt: stage 1's

Checkpoints: `output_dir/checkpoint_trainable/rank_N/` (llama_proj: point the eval YAML's
`model_config.checkpoint_name_or_path` at it, or export it with `convert_weight.py
--export_llama_proj`) and `output_dir/checkpoint/rank_N/` (the whole state, for `--resume`, which
continues mid-epoch with the same losses). With `use_parallel: True` start it through
`run_singlenode.sh` (one process per device; msrun on CPU); each rank reads its own shards.
"""
from research.common.runtime import cli_main
from research.common.trainer import finetune_parser, resume_value
from research.minigpt4.finetune import train


@cli_main
def main(argv=None):
    args = finetune_parser(__doc__, "minigpt4_stage1_pretrain.yaml", "configs/minigpt4/").parse_args(argv)
    return train(args.config, graph_mode=args.graph_mode, batch_size=args.batch_size, device_id=args.device_id,
                 epochs=args.epochs, output_dir=args.output_dir, resume=resume_value(args.resume))


if __name__ == "__main__":
    main()
