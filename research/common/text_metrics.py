"""BLEU-4 and ROUGE-1/2/L of generated text against labels, by upstream's protocol.

ChatGLM2-6B's ptuning/main.py `compute_metrics` is the reference the published ADGEN numbers come
from, so each step is its own, with the same libraries (jieba, rouge_chinese, nltk; pinned in
pyproject.toml) and nothing re-implemented:

- ROUGE: both texts cut into words by `jieba.cut`, joined with spaces, `Rouge().get_scores`;
  the F value of rouge-1, rouge-2 and rouge-l.
- BLEU-4: `sentence_bleu([list(label)], list(prediction), smoothing_function=
  SmoothingFunction().method3)`, on characters, one reference, default weights (0.25 x 4).
- Each sample's score x100 rounded to 4 decimals, then `float(np.mean(...))` of each metric.

One deliberate difference: an empty (or whitespace-only) prediction, which makes rouge_chinese
raise "Hypothesis is empty." and so upstream crash (MindFormers' ADGENMetric skips it, which
inflates the means), scores 0 on all four metrics and is counted in the means and in
`Report.empty_predictions`. An empty label is a data error (upstream crashes on it too).

`write_predictions` / `read_predictions` handle upstream's `generated_predictions.txt`: one JSON
line `{"labels": ..., "predict": ...}` per sample, UTF-8, non-ASCII kept as is.
"""
import dataclasses
import json
import logging

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from research.common.atomic import atomic_write
from research.common.errors import UserInputError

# jieba logs "Building prefix dict from the default dictionary ..." at DEBUG on its first cut.
# Its dictionary ships inside the package (no download); it caches the parsed one in the temp dir.
jieba.setLogLevel(logging.WARNING)

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")  # upstream's score_dict order
PREDICTIONS_FILE = "generated_predictions.txt"


def score_pair(prediction, label):
    """The four scores of one sample, {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}, each x100 and
    rounded to 4 decimals as upstream; all 0.0 for an empty or whitespace-only prediction."""
    if not label.strip():
        raise ValueError("the label is empty: there is nothing to score the prediction against")
    hypothesis = list(jieba.cut(prediction))
    reference = list(jieba.cut(label))
    hypothesis_text = " ".join(hypothesis)
    if not hypothesis_text.strip():  # exactly what rouge_chinese rejects as "Hypothesis is empty."
        return {name: 0.0 for name in METRICS}
    result = Rouge().get_scores(hypothesis_text, " ".join(reference))[0]
    scores = {name: round(result[name]["f"] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(prediction),
                         smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def is_empty_prediction(prediction):
    """Whether `score_pair` scores this prediction 0 without asking rouge_chinese."""
    return not " ".join(jieba.cut(prediction)).strip()


@dataclasses.dataclass(frozen=True)
class Report:
    """Means over all samples (empty predictions included, as 0), how many samples there were,
    how many predictions were empty, and each sample's scores."""
    means: dict
    samples: int
    empty_predictions: int
    per_sample: tuple

    def line(self):
        """One JSON line with the four means rounded to 4 decimals, keys sorted as upstream's
        `trainer.log_metrics` / `save_metrics` show them, then the counts:
        {"bleu-4": .., "rouge-1": .., "rouge-2": .., "rouge-l": .., "samples": N,
        "empty_predictions": K}."""
        fields = {name: round(self.means[name], 4) for name in sorted(METRICS)}
        fields["samples"] = self.samples
        fields["empty_predictions"] = self.empty_predictions
        return json.dumps(fields, ensure_ascii=False)


def score_predictions(predictions, labels):
    """Score each (prediction, label) pair with `score_pair` and average as upstream.

    Raises ValueError when the two lists differ in length or are empty (upstream's `zip` would
    silently drop the extra ones), and UserInputError naming the samples whose label is empty
    (checked before any scoring, so a bad data set fails at once).
    """
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("no samples to score")
    empty_labels = [i for i, label in enumerate(labels) if not label.strip()]
    if empty_labels:
        shown = ", ".join(str(i) for i in empty_labels[:10])
        more = f" and {len(empty_labels) - 10} more" if len(empty_labels) > 10 else ""
        raise UserInputError(f"{len(empty_labels)} of {len(labels)} samples have an empty label "
                             f"(sample {shown}{more}, counted from 0): BLEU/ROUGE need a "
                             "reference text")
    per_sample = tuple(score_pair(p, l) for p, l in zip(predictions, labels))
    means = {name: float(np.mean([s[name] for s in per_sample])) for name in METRICS}
    empty = sum(1 for p in predictions if is_empty_prediction(p))
    return Report(means=means, samples=len(per_sample), empty_predictions=empty,
                  per_sample=per_sample)


def write_predictions(path, predictions, labels):
    """Write upstream's generated_predictions.txt: per sample one line
    `{"labels": label, "predict": prediction}` (ensure_ascii=False, UTF-8, "\\n" line ends),
    through a temp file renamed into place, so a failed run never leaves a partial file.

    The texts are written as given: upstream strips both before writing, so strip them before
    scoring and writing if the file and the scores are to agree."""
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as stream:
        for prediction, label in zip(predictions, labels):
            stream.write(json.dumps({"labels": label, "predict": prediction},
                                    ensure_ascii=False) + "\n")


def read_predictions(path):
    """(predictions, labels) from a generated_predictions.txt; blank lines are skipped. Raises
    UserInputError for a file that cannot be read or is not UTF-8, and naming the line for a
    line that is not a JSON object with string "labels" and "predict"."""
    predictions, labels = [], []
    try:
        stream = open(path, encoding="utf-8")
    except OSError as error:
        raise UserInputError(f"cannot read the predictions file {path}: {error}") from None
    with stream:
        try:
            lines = list(stream)
        except UnicodeDecodeError as error:
            raise UserInputError(f"{path} is not UTF-8 text: {error}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path}:{number}: not a JSON line ({error})") from None
            if (not isinstance(record, dict) or not isinstance(record.get("labels"), str)
                    or not isinstance(record.get("predict"), str)):
                raise UserInputError(f'{path}:{number}: expected {{"labels": "...", '
                                     f'"predict": "..."}}, found {line.strip()[:200]}')
            predictions.append(record["predict"])
            labels.append(record["labels"])
    return predictions, labels
