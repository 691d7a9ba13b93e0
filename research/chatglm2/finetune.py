"""ChatGLM2 fine-tuning as a library call (run_chatglm2_finetune.py and the demo use it).

The method follows the model config, as upstream's flags and MindFormers' YAMLs choose it:
`pre_seq_len` > 0 is P-Tuning v2 (only the prefix encoder trains, the base is frozen),
`pet_config` is LoRA (only the LoRA matrices train), neither is full fine-tuning. The data is
the YAML's ADGEN `train_dataset` (research.chatglm2.dataset_chatglm2); the trainer, LR
schedules, loss scaling, data-parallel launch and exact resume are research.common.trainer's.
"""
from research.chatglm2.configuration_chatglm2 import load_chatglm2_config
from research.chatglm2.dataset_chatglm2 import ADGenDataConfig, load_adgen
from research.chatglm2.inference import build_tokenizer, check_tokenizer
from research.chatglm2.modeling_chatglm2 import (ChatGLM2ForConditionalGeneration, ChatGLM2ForTraining, add_lora,
                                                 fine_tuning_method, select_trainable)
from research.common.errors import UserInputError
from research.common.memory import check_memory
from research.common.runtime import load_weights, resolve_path
from research.common.trainer import output_dir_lock, prepare_training, train_and_report

# Top-level YAML fields that fine-tuning reads (eval_dataset: run_chatglm2_eval.py's, in the same
# YAML as MindFormers keeps it); each reader checks the fields of its section.
FINETUNE_FIELDS = ("seed", "context", "model", "processor", "use_parallel", "parallel", "parallel_config",
                   "train_dataset", "eval_dataset", "output_dir", "runner_config", "runner_wrapper", "optimizer",
                   "lr_schedule", "layer_scale", "layer_decay", "callbacks", "load_checkpoint",
                   "resume_training", "lr_scale")
METHOD_NAMES = {"ptuning2": "P-Tuning v2", "lora": "LoRA", "full": "full fine-tuning"}


def finetune(config, *, graph_mode=None, batch_size=None, device_id=None, epochs=None, output_dir=None,
             resume=None):
    """Train as the YAML says (the keywords override it); returns (trainer, loss history).

    The YAML, the tokenizer, the checkpoint path and the data are checked, then output_dir is
    locked against a second run, before the model is built. `resume`: True for the latest full
    checkpoint in output_dir (none yet: start at step 0), or a checkpoint path."""
    yaml_config, model_config = load_chatglm2_config(config)
    parallel, training = prepare_training(yaml_config, FINETUNE_FIELDS, graph_mode=graph_mode, batch_size=batch_size,
                                          device_id=device_id, epochs=epochs, output_dir=output_dir)
    data_config = ADGenDataConfig.from_yaml(yaml_config)
    if data_config.seq_length > model_config.seq_length:
        raise UserInputError(f"{yaml_config.source.path}: train_dataset rows are max_source_length + "
                             f"max_target_length + 1 = {data_config.seq_length} tokens but model_config.seq_length "
                             f"is {model_config.seq_length}")
    tokenizer = build_tokenizer(yaml_config, model_config.seq_length)
    check_tokenizer(model_config, tokenizer, yaml_config.source.path)
    dataset = load_adgen(data_config, tokenizer)
    check_memory(model_config.memory_estimate(training.batch_size), yaml_config.source.path)
    if model_config.checkpoint_name_or_path:
        resolve_path(model_config.checkpoint_name_or_path, "ChatGLM2 checkpoint")
    method = fine_tuning_method(model_config)
    with output_dir_lock(training.output_dir, parallel):  # before the model: a refusal is quick
        model = ChatGLM2ForConditionalGeneration(model_config)
        # the base checkpoint has no prefix (P-Tuning) and no LoRA matrices: those start fresh
        loaded = load_weights(model, model_config.checkpoint_name_or_path, "ChatGLM2 checkpoint",
                              allow_missing=("transformer.prefix_encoder.",))
        if method == "lora":
            add_lora(model, yaml_config.source)
        trainable = select_trainable(model)
        weights = model_config.checkpoint_name_or_path if loaded else "none (random initialisation)"
        return train_and_report(ChatGLM2ForTraining(model), trainable, training, parallel, dataset, resume,
                                weights=weights, method=METHOD_NAMES[method])
