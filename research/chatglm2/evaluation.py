"""ADGEN evaluation as upstream ptuning/'s `--do_predict --predict_with_generate` runs it: generate an
answer for every row of the evaluation set, write generated_predictions.txt, score BLEU-4 and
ROUGE-1/2/L (research.common.text_metrics, upstream's compute_metrics).

Upstream's protocol is the default: sampling with top_p 0.7 and temperature 0.95 (ptuning/main.py),
max_length = max_source_length + max_target_length + 1, seeded; do_sample False gives a
reproducible greedy run. Rows are answered `batch_size` at a time, left-padded.
"""
import dataclasses
import os
import sys

from research.chatglm2.inference import ChatGLM2Chat
from research.common.generation import GenerationConfig, generate
from research.common.progress import Progress
from research.common.text_metrics import Report, score_predictions, write_predictions

# Upstream ptuning/main.py's generation for evaluation.
EVAL_DEFAULTS = dict(do_sample=True, top_p=0.7, temperature=0.95)
PREDICTIONS_FILE = "generated_predictions.txt"


def eval_settings(glm: ChatGLM2Chat, data_config, **overrides) -> GenerationConfig:
    """Upstream's evaluation decoding, then the overrides that are not None."""
    limit = data_config.max_source_length + data_config.max_target_length + 1
    return glm.chat_config(**{"max_length": limit, **EVAL_DEFAULTS,
                              **{k: v for k, v in overrides.items() if v is not None}})


@dataclasses.dataclass
class Evaluation:
    report: Report
    predictions: list  # decoded answers, as scored
    path: str  # generated_predictions.txt


def evaluate(glm: ChatGLM2Chat, samples, settings: GenerationConfig, output_dir, batch_size=1,
             stream=None) -> Evaluation:
    """Answer every EvalSample (research.chatglm2.dataset_chatglm2), write the predictions file
    (stripped texts, as upstream writes it) and score the answers as upstream does (unstripped)."""
    predictions = []
    with Progress(len(samples), "evaluating", unit="rows", stream=stream or sys.stderr) as progress:
        for first in range(0, len(samples), batch_size):
            chunk = samples[first:first + batch_size]
            outputs = generate(glm.model, [s.prompt_ids for s in chunk],
                               dataclasses.replace(settings, seed=settings.seed + first))
            predictions += [glm.tokenizer.decode(ids) for ids in outputs]
            progress.update(len(chunk))
    labels = [s.label for s in samples]
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, PREDICTIONS_FILE)
    write_predictions(path, [p.strip() for p in predictions], [label.strip() for label in labels])
    return Evaluation(score_predictions(predictions, labels), predictions, path)
