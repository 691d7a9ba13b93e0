"""MiniGPT-4 training as a library call (run_minigpt4_train.py and the demo use it): stage 1 on
image-caption shards, stage 2 on cc_sbu_align, as upstream's `train.py --cfg-path
train_configs/minigpt4_stage{1_pretrain,2_finetune}.yaml`.

Only `llama_proj` trains; the ViT, ln_vision, the Q-Former and the LLaMA are frozen (and have no
dropout, so they run as in eval mode), unless the model config's freeze_vit / freeze_qformer /
freeze_llama say otherwise (the demo's stand-in pretraining). Stage 2 starts from a stage-1 checkpoint: the model's
`checkpoint_name_or_path` (upstream's `ckpt:`) names it, a training checkpoint loads as it is.
The data is research.minigpt4.dataset_minigpt4's; the trainer (AdamW, loss scaling, exact
resume, data parallel) and the schedules (`linear_warmup_cosine_lr`) are research.common's.
"""
from research.common.errors import UserInputError
from research.common.memory import check_memory
from research.common.trainer import output_dir_lock, prepare_training, train_and_report
from research.minigpt4.configuration_minigpt4 import load_minigpt4_config
from research.minigpt4.dataset_minigpt4 import build_train_dataset
from research.minigpt4.inference import check_special_ids
from research.minigpt4.modeling_minigpt4 import MiniGPT4, MiniGPT4ForTraining, checkpoint_paths, select_trainable
from research.common.runtime import resolve_path

# Top-level YAML fields that training reads; each reader checks the fields of its section.
TRAIN_FIELDS = ("seed", "context", "model", "use_parallel", "parallel", "parallel_config", "train_dataset",
                "output_dir", "runner_config", "runner_wrapper", "optimizer", "lr_schedule", "callbacks")


def check_dataset_fits(dataset, model_config, where):
    """The data's image placeholders, image size and tokenizer must be the model's."""
    if dataset.image_tokens != model_config.image_tokens:
        raise UserInputError(f"{where}: train_dataset.image_tokens is {dataset.image_tokens} but the model makes "
                             f"{model_config.image_tokens} image embeddings per image")
    image_size = dataset.image_processor.eval_processor.image_size
    if image_size != model_config.vision_config.image_size:
        raise UserInputError(f"{where}: train_dataset.image_size is {image_size} but "
                             f"vision_config.image_size is {model_config.vision_config.image_size}")
    if dataset.seq_length > model_config.text_config.seq_length:
        raise UserInputError(f"{where}: training rows are {dataset.seq_length} positions but "
                             f"text_config.seq_length is {model_config.text_config.seq_length}")
    check_special_ids(model_config.text_config, dataset.tokenizer)


def train(config, *, graph_mode=None, batch_size=None, device_id=None, epochs=None, output_dir=None, resume=None):
    """Train llama_proj as the YAML says (the keywords override it); returns (trainer, loss history).

    The YAML, the data and the checkpoint paths are checked, then output_dir is locked against a
    second run, before the model is built. `resume`: True for the latest full checkpoint in
    output_dir (none yet: start at step 0), or a checkpoint path."""
    yaml_config, model_config = load_minigpt4_config(config)
    parallel, training = prepare_training(yaml_config, TRAIN_FIELDS, graph_mode=graph_mode, batch_size=batch_size,
                                          device_id=device_id, epochs=epochs, output_dir=output_dir)
    dataset = build_train_dataset(yaml_config, training.batch_size, parallel)
    check_dataset_fits(dataset, model_config, yaml_config.source.path)
    check_memory(model_config.memory_estimate(training.batch_size), yaml_config.source.path)
    for what, path in checkpoint_paths(model_config):
        if path:
            resolve_path(path, what)
    with output_dir_lock(training.output_dir, parallel):  # before the model: a refusal is quick
        model = MiniGPT4(model_config)
        loaded = model.load_checkpoints()
        trainable = select_trainable(model)
        return train_and_report(MiniGPT4ForTraining(model), trainable, training, parallel, dataset, resume,
                                weights=", ".join(loaded) or "none (random initialisation)",
                                method=training_method(model_config))


def training_method(config):
    """What trains and what stays frozen, in words."""
    parts = [("ViT", config.freeze_vit), ("LLaMA", config.freeze_llama)]
    if config.has_qformer:
        parts.insert(1, ("Q-Former", config.freeze_qformer))
    trained = ["llama_proj"] + [name for name, frozen in parts if not frozen]
    frozen = [name for name, frozen in parts if frozen]
    return f"training {', '.join(trained)}" + (f"; {', '.join(frozen)} frozen" if frozen else "")
