"""VisualGLM fine-tuning as a library call (run_visualglm_finetune.py and the demo use it).

With `text_config.pet_config` (LoRA) only the LoRA matrices train; without it, full fine-tuning
of the Q-Former and glm_proj, plus the ViT / GLM when `freeze_vision` / `freeze_text` are False.
"""
from research.common.memory import check_memory
from research.common.trainer import output_dir_lock, prepare_training, train_and_report
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.dataset_visualglm import build_train_dataset
from research.visualglm.modeling_visualglm import (VisualGLMForTraining,
                                                   VisualGLMImageToTextGeneration, add_glm_lora,
                                                   select_trainable)
from research.visualglm.processing_visualglm import build_processor


# Top-level YAML fields that fine-tuning reads; each reader checks the fields of its section.
FINETUNE_FIELDS = ("seed", "context", "model", "processor", "use_parallel", "parallel",
                   "parallel_config", "train_dataset", "output_dir", "runner_config",
                   "runner_wrapper", "optimizer", "lr_schedule", "layer_scale", "layer_decay",
                   "callbacks", "load_checkpoint", "resume_training", "lr_scale")


def finetune(config, *, graph_mode=None, batch_size=None, device_id=None, epochs=None,
             output_dir=None, resume=None):
    """Train as the YAML says (the keywords override it); returns (trainer, loss history).

    The YAML and the data are checked, then output_dir is locked against a second run, before
    the model is loaded.
    `resume`: True for the latest full checkpoint in output_dir (none yet: start at step 0),
    or a checkpoint path."""
    yaml_config, model_config = load_visualglm_config(config)
    parallel, training = prepare_training(yaml_config, FINETUNE_FIELDS, graph_mode=graph_mode, batch_size=batch_size,
                                          device_id=device_id, epochs=epochs, output_dir=output_dir)
    processor = build_processor(yaml_config.get("processor") or {}, model_config.image_length)
    dataset = build_train_dataset(yaml_config, processor, model_config.text_config)
    check_memory(model_config.memory_estimate(training.batch_size, dataset.seq_length),
                 yaml_config.source.path)
    with output_dir_lock(training.output_dir, parallel):  # before the model: a refusal is quick
        model = VisualGLMImageToTextGeneration(model_config)
        loaded = model.load_checkpoints()
        lora = bool(model_config.text_config.pet_config)
        if lora:
            add_glm_lora(model, yaml_config.source)
        trainable = select_trainable(model)
        return train_and_report(VisualGLMForTraining(model), trainable, training, parallel, dataset, resume,
                                weights=', '.join(loaded) or 'none (random initialisation)',
                                method='LoRA' if lora else 'full fine-tuning')
