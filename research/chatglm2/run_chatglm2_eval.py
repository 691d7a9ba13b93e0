"""Evaluate ChatGLM2 on ADGEN's dev.json as upstream ptuning/evaluate.sh does: generate, write
generated_predictions.txt, print BLEU-4 / ROUGE-1 / ROUGE-2 / ROUGE-L.

    python -m research.chatglm2.run_chatglm2_eval --config run_glm2_6b_ptuning2.yaml \\
        --ptuning_checkpoint output/glm2_6b_ptuning2/checkpoint_trainable/rank_0/glm2-6b-pt-128-2e-2_rank_0-3000.ckpt
    python -m research.chatglm2.run_chatglm2_eval --config run_glm2_6b_lora.yaml --lora_checkpoint LORA.ckpt
    python -m research.chatglm2.run_chatglm2_eval --config run_glm2_6b_finetune.yaml --checkpoint FULL.ckpt
    python -m research.chatglm2.run_chatglm2_eval --config run_glm2_6b.yaml --eval_dataset_dir ...   # the base model

The rows are the YAML's `eval_dataset` (ADGenDataLoader fields, phase "eval"; --eval_dataset_dir
replaces its file). Decoding is upstream's evaluation protocol (sampling, top_p 0.7,
temperature 0.95, max_length = max_source_length + max_target_length + 1, --seed);
`--do_sample False` for a reproducible greedy run. An empty answer scores 0 and is counted.
Writes --output_dir (default: the YAML's output_dir)/generated_predictions.txt.
"""
import os

from research.chatglm2.dataset_chatglm2 import ADGenDataConfig, load_adgen
from research.chatglm2.evaluation import evaluate, eval_settings
from research.chatglm2.inference import chatglm2_parser, decoding_overrides, load_from_arguments
from research.common.config import repo_path
from research.common.errors import UserInputError
from research.common.runtime import cli_main


@cli_main
def main(argv=None):
    parser = chatglm2_parser(__doc__)
    parser.add_argument("--eval_dataset_dir", default=None, help="the evaluation file (replaces eval_dataset's)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows per forward pass (default: the YAML's model_config.batch_size)")
    parser.add_argument("--output_dir", default=None, help="default: the YAML's output_dir")
    args = parser.parse_args(argv)
    glm = load_from_arguments(args, batch_size=args.batch_size or 1)
    data_config = ADGenDataConfig.from_yaml(glm.yaml, "eval_dataset")
    if args.eval_dataset_dir:
        data_config.data_loader.dataset_dir = os.path.abspath(args.eval_dataset_dir)
    if data_config.data_loader.phase != "eval":
        raise UserInputError(f"{glm.yaml.source.where('eval_dataset.data_loader.phase')}: must be \"eval\" "
                             f"(prompts to answer and their references), got {data_config.data_loader.phase!r}")
    samples = load_adgen(data_config, glm.tokenizer)
    if not samples:
        raise UserInputError(f"{data_config.data_loader.dataset_dir}: no rows to evaluate")
    settings = eval_settings(glm, data_config, **decoding_overrides(args))
    output_dir = os.path.abspath(args.output_dir) if args.output_dir else repo_path(glm.yaml.get("output_dir") or "output")
    print(f"device: {glm.device}; {glm.describe_weights()}")
    print(f"{len(samples)} rows; do_sample={settings.do_sample}, top_p {settings.top_p}, temperature "
          f"{settings.temperature}, max_length {settings.max_length}, seed {settings.seed}")
    result = evaluate(glm, samples, settings, output_dir, batch_size=args.batch_size or glm.config.batch_size)
    print(f"wrote {result.path}")
    if result.report.empty_predictions:
        print(f"note: {result.report.empty_predictions} of {result.report.samples} answers were empty; "
              f"they score 0 and count in the means")
    print(result.report.line())
    return result


if __name__ == "__main__":
    main()
