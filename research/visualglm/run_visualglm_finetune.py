"""Fine-tune VisualGLM (MindFormers' `run_visualglm_finetune.py`, seed 001 "MindSpore 微调").

    python -m research.visualglm.run_visualglm_finetune --config run_visualglm_lora.yaml \
        --graph_mode 0 --batch_size 4 --device_id 0

With `text_config.pet_config` (LoRA) only the LoRA matrices train; without it, full
fine-tuning of the Q-Former and glm_proj, plus the ViT / GLM when `freeze_vision` /
`freeze_text` are False. Checkpoints: `output/checkpoint_trainable/rank_N/` (trainable
parameters only) and `output/checkpoint/rank_N/` (full state, for `--resume`). With
`use_parallel: True` start it through `research/run_singlenode.sh` (one process per device;
msrun on CPU).
"""
import argparse
import os

from research.common.errors import UserInputError
from research.common.parallel import init_data_parallel
from research.common.runtime import cli_main, init_context
from research.common.trainer import Trainer, TrainingArguments
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.dataset_visualglm import build_train_dataset
from research.visualglm.modeling_visualglm import (VisualGLMForTraining,
                                                   VisualGLMImageToTextGeneration, add_glm_lora,
                                                   select_trainable)
from research.visualglm.processing_visualglm import build_processor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config_path", dest="config", default="run_visualglm_lora.yaml",
                        help="YAML path or a name in configs/visualglm/")
    parser.add_argument("--graph_mode", type=int, choices=(0, 1), default=None,
                        help="0 GRAPH, 1 PYNATIVE (default: the YAML's context.mode)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="per-process batch size (default: runner_config.batch_size)")
    parser.add_argument("--device_id", type=int, default=int(os.environ.get("DEVICE_ID", 0)),
                        help="NPU id (default: DEVICE_ID, which run_singlenode.sh sets per rank)")
    parser.add_argument("--epochs", type=int, default=None, help="default: runner_config.epochs")
    parser.add_argument("--output_dir", default=None, help="default: the YAML's output_dir")
    parser.add_argument("--resume", default=None,
                        help="'True' for the latest checkpoint in output_dir, or a checkpoint path")
    return parser.parse_args(argv)


def build_training(args):
    """(yaml, config, model, trainable params, dataset, parallel context) from YAML + flags."""
    yaml_config, config = load_visualglm_config(args.config)
    if args.graph_mode is not None:
        yaml_config.context = {**(yaml_config.get("context") or {}), "mode": args.graph_mode}
    init_context(yaml_config, args.device_id)
    parallel = init_data_parallel(yaml_config)
    model = VisualGLMImageToTextGeneration(config)
    loaded = model.load_checkpoints()
    if config.text_config.pet_config:
        add_glm_lora(model, yaml_config.source)
    trainable = select_trainable(model)
    processor = build_processor(yaml_config.get("processor") or {}, config.image_length)
    dataset = build_train_dataset(yaml_config, processor, config.text_config)
    return yaml_config, config, model, trainable, dataset, parallel, loaded


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserInputError(f"--batch_size must be positive, got {args.batch_size}")
    yaml_config, config, model, trainable, dataset, parallel, loaded = build_training(args)
    overrides = {name: getattr(args, name) for name in ("batch_size", "epochs", "output_dir")
                 if getattr(args, name) is not None}
    training = TrainingArguments.from_yaml(yaml_config, **overrides)
    count = sum(int(p.size) for p in trainable)
    if parallel.is_main:
        print(f"weights loaded: {', '.join(loaded) or 'none (training from random initialisation)'}")
        print(f"training {len(trainable)} tensors ({count:,} parameters) on {len(dataset)} samples; "
              f"{'LoRA' if config.text_config.pet_config else 'full fine-tuning'}; "
              f"rank {parallel.rank} of {parallel.world_size}")
    network = VisualGLMForTraining(model)
    network.set_train(True)
    resume = {"true": True, "false": None}.get(str(args.resume).lower(), args.resume)
    trainer = Trainer(network, trainable, training, parallel_context=parallel)
    history = trainer.train(dataset, resume=resume)
    if parallel.is_main and history:
        print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f}; trainable checkpoints "
              f"in {os.path.join(trainer.output_dir, 'checkpoint_trainable')}")
    return trainer, history


if __name__ == "__main__":
    main()
