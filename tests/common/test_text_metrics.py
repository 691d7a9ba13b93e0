"""BLEU-4 / ROUGE by upstream's protocol: our scores equal a direct computation with jieba,
rouge_chinese and nltk written out here as ChatGLM2-6B's ptuning/main.py does it; an empty
prediction scores 0 and is counted; generated_predictions.txt round-trips."""
import json
import os

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from research.common.errors import UserInputError
from research.common.text_metrics import (METRICS, read_predictions, score_pair,
                                          score_predictions, write_predictions)

LABEL_ZH = "这件连衣裙采用宽松的版型，搭配简约的圆领设计，显瘦又时尚。"
PAIRS = [  # (prediction, label)
    (LABEL_ZH, LABEL_ZH),  # perfect match, Chinese
    ("这款连衣裙是宽松版型，圆领设计很简约，穿上显得时尚。", LABEL_ZH),  # partial, Chinese
    ("the cat sat on the mat", "the cat is on the mat"),  # partial, English
    ("A simple white shirt.", "A simple white shirt."),  # perfect match, English
    ("牛仔裤", "一件黑色的外套"),  # no word in common
    ("", "简约的圆领设计"),  # empty prediction
    (" \n", "the cat is on the mat"),  # whitespace only: empty for rouge_chinese too
]
EMPTY = {5, 6}


def upstream_scores(pred, label):
    """ChatGLM2-6B ptuning/main.py compute_metrics, the loop body for one sample."""
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))
    rouge = Rouge()
    scores = rouge.get_scores(' '.join(hypothesis), ' '.join(reference))
    result = scores[0]
    for k, v in result.items():
        score_dict[k].append(round(v["f"] * 100, 4))
    bleu_score = sentence_bleu([list(label)], list(pred),
                               smoothing_function=SmoothingFunction().method3)
    score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: v[0] for k, v in score_dict.items()}


@pytest.mark.parametrize("index", [i for i in range(len(PAIRS)) if i not in EMPTY])
def test_pair_scores_equal_upstream_computation(index):
    prediction, label = PAIRS[index]
    assert score_pair(prediction, label) == upstream_scores(prediction, label)


def test_hand_made_pairs_have_the_expected_shape():
    """The pairs test what they claim: perfect matches score 100, partial ones in between."""
    for prediction, label in (PAIRS[0], PAIRS[3]):
        assert score_pair(prediction, label) == {name: 100.0 for name in METRICS}
    for prediction, label in (PAIRS[1], PAIRS[2]):
        assert all(0 < value < 100 for value in score_pair(prediction, label).values())
    assert score_pair(*PAIRS[4])["rouge-1"] == 0.0


@pytest.mark.parametrize("index", sorted(EMPTY))
def test_empty_prediction_scores_zero_where_upstream_crashes(index):
    prediction, label = PAIRS[index]
    with pytest.raises(ValueError, match="Hypothesis is empty"):
        upstream_scores(prediction, label)
    assert score_pair(prediction, label) == {name: 0.0 for name in METRICS}


def test_report_means_count_the_empty_predictions():
    predictions, labels = zip(*PAIRS)
    report = score_predictions(predictions, labels)
    assert report.samples == len(PAIRS)
    assert report.empty_predictions == len(EMPTY)
    direct = [upstream_scores(p, l) if i not in EMPTY else dict.fromkeys(METRICS, 0.0)
              for i, (p, l) in enumerate(PAIRS)]
    for name in METRICS:
        assert report.means[name] == float(np.mean([scores[name] for scores in direct]))
        # skipping the empty ones (MindFormers' ADGENMetric) would report higher means
        skipped = float(np.mean([s[name] for i, s in enumerate(direct) if i not in EMPTY]))
        assert skipped > report.means[name]
    assert [dict(s) for s in report.per_sample] == direct


def test_report_line_as_upstream_prints_it():
    report = score_predictions(*zip(*PAIRS))
    line = report.line()
    assert "\n" not in line and line.startswith('{"bleu-4": ')
    fields = json.loads(line)
    assert list(fields) == ["bleu-4", "rouge-1", "rouge-2", "rouge-l", "samples",
                            "empty_predictions"]
    assert all(fields[name] == round(report.means[name], 4) for name in METRICS)
    assert (fields["samples"], fields["empty_predictions"]) == (len(PAIRS), len(EMPTY))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        score_predictions(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        score_predictions([], [])
    with pytest.raises(UserInputError, match=r"1 of 2 samples have an empty label \(sample 1,"):
        score_predictions(["a", "b"], ["a", " "])
    with pytest.raises(ValueError, match="label is empty"):
        score_pair("a", "")


def test_predictions_file_round_trip(tmp_path):
    predictions, labels = [p for p, _ in PAIRS], [l for _, l in PAIRS]
    path = tmp_path / "generated_predictions.txt"
    path.write_text("an older file\n", encoding="utf-8")
    write_predictions(path, predictions, labels)
    assert read_predictions(path) == (predictions, labels)
    lines = path.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(PAIRS) + 1
    assert lines[0] == json.dumps({"labels": LABEL_ZH, "predict": LABEL_ZH}, ensure_ascii=False)
    assert "连衣裙" in lines[0]  # not \\u-escaped, as upstream writes it
    assert os.listdir(tmp_path) == ["generated_predictions.txt"]  # no temp file left
    with pytest.raises(ValueError):
        write_predictions(path, predictions, labels[:-1])
    assert read_predictions(path) == (predictions, labels)  # the failed write left it intact


@pytest.mark.parametrize("content,message", [
    ('{"labels": "a", "predict": "b"}\nnot json\n', ":2: not a JSON line"),
    ('{"labels": "a"}\n', ':1: expected {"labels"'),
    ('["a", "b"]\n', ":1: expected"),
])
def test_bad_predictions_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "generated_predictions.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError, match=message.replace("{", r"\{")):
        read_predictions(path)
    with pytest.raises(UserInputError, match="cannot read"):
        read_predictions(tmp_path / "missing.txt")


def test_jieba_builds_its_dictionary_quietly(tmp_path, caplog):
    """Importing text_metrics silences jieba's "Building prefix dict ..." log; a fresh tokenizer
    with a cold cache builds from the dictionary inside the package (no download)."""
    tokenizer = jieba.Tokenizer()
    tokenizer.tmp_dir = str(tmp_path)
    assert list(tokenizer.cut("这件衣服很好看")) == ["这件", "衣服", "很", "好看"]
    assert os.listdir(tmp_path) == ["jieba.cache"]  # it did build, not reuse a cache
    assert not [r for r in caplog.records if r.name == "jieba"]  # its log is below the level
