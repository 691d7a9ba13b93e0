"""ADGEN fine-tuning data for ChatGLM2-6B: `AdvertiseGen/train.json` / `dev.json` and chat data
in the same one-JSON-object-a-line form, preprocessed as upstream ptuning/main.py does.

Files: one JSON object a line, `{"content": "类型#上衣*...", "summary": "..."}` (ADGEN), or
`{"prompt", "response", "history": [[q, r], ...]}` (chat data, `history_column: history`).
Blank lines are passed over; a row whose prompt or answer is empty ("" or null) is skipped
and counted, as upstream skips it; anything else that is not such a row (bad JSON, a missing
column, a non-string value, a malformed history) is a UserInputError naming file:line.

Training sample (upstream preprocess_function_train):

    prompt    = source_prefix + build_prompt(query, history)   # "[Round 1]\\n\\n问：{q}\\n\\n答："
    a_ids     = [gMASK, sop] + encode(prompt)[:max_source_length - 2]
    b_ids     = encode(answer)[:max_target_length]
    input_ids = a_ids + b_ids + [eos]                  right-padded with pad (0)
    labels    = [pad] * len(a_ids) + b_ids + [eos]     right-padded with pad, then pad -> -100

Both cuts keep the start of the text (a long prompt loses its trailing "\\n\\n答："), and the
`[gMASK] sop` prefix counts within max_source_length, as HF's `encode(..., truncation=True,
max_length=...)` does. Labels are aligned with input_ids: the model shifts them (upstream). The
pad -> -100 replacement is upstream's, element by element, so an unknown piece (unk = pad = 0)
inside the answer is not trained on either.
Every row is padded to L = max_source_length + max_target_length + 1, the longest possible
row (MindFormers' seq_length rule). Upstream pads to max_source_length + max_target_length and
leaves the rare row that fills both limits one longer; the extra trailing pad changes nothing
(label -100, and causal attention keeps it out of every earlier position).

Evaluation sample (upstream preprocess_function_eval): `prompt_ids` as a_ids above (unpadded:
the generator pads on the left), `label_ids` = `[gMASK] sop` + encode(answer)[:max_target_length
- 2] (HF `tokenizer(text_target=...)`), and `label` = their decoded text, the reference that
upstream's compute_metrics scores against.

YAML: MindFormers' glm2 `train_dataset` / `eval_dataset` sections (notes/chatglm2.md §2.7):

    train_dataset:
      data_loader:
        type: ADGenDataLoader          # MindFormers' name; its fields are read here
        dataset_dir: "AdvertiseGen/train.json"
        shuffle: True
        phase: "train"                 # "eval": evaluation samples
        version: 2
        origin_columns: ["content", "summary"]   # [prompt_column, response_column]
        history_column: "history"      # optional (upstream's --history_column)
      input_columns: ["input_ids", "labels"]
      max_source_length: 64
      max_target_length: 128
      ignore_pad_token_for_loss: True
      seed: 0
      batch_size: 1
      drop_remainder: True

The training set is what research.common.trainer.Trainer consumes: `columns`, `__len__`,
`__getitem__(i) -> {"input_ids": int32 [L], "labels": int32 [L]}` and `order(epoch)` (a
permutation fixed by (seed, epoch) with shuffle, else 0..N-1).
"""
import dataclasses
import json
import os
import sys
from typing import Literal, Optional

import numpy as np

from research.common.config import FieldError, ModelConfig, check_int
from research.common.errors import UserInputError
from research.common.progress import Progress
from research.common.prompts import ChatGLM2Prompt
from research.common.runtime import resolve_path as _resolve_repo_path

IGNORE_INDEX = -100
COLUMNS = ("input_ids", "labels")
LOADER_TYPE = "ADGenDataLoader"
# Rows tokenized before a progress line is worth printing.
_PROGRESS_ROWS = 20000
_SHOWN_LINES = 10


# ---- the YAML ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ADGenLoaderConfig(ModelConfig):
    """`data_loader` of an ADGEN section: MindFormers' ADGenDataLoader fields, plus upstream's
    optional `history_column`. `type` must be ADGenDataLoader (checked by ADGenDataConfig)."""

    dataset_dir: str = ""
    phase: Literal["train", "eval"] = "train"
    shuffle: bool = False
    origin_columns: list[str] = dataclasses.field(default_factory=lambda: ["content", "summary"])
    history_column: Optional[str] = None
    version: Literal[2] = 2  # KeyWordGenDataset's ChatGLM2 preprocessing (1 is ChatGLM-6B's)

    @property
    def prompt_column(self):
        return self.origin_columns[0]

    @property
    def response_column(self):
        return self.origin_columns[1]

    def validate(self):
        if not self.dataset_dir:
            raise FieldError("dataset_dir", "must name the .json file (one JSON object a line)")
        if len(self.origin_columns) != 2 or self.origin_columns[0] == self.origin_columns[1]:
            raise FieldError("origin_columns", f"must be the two distinct field names [prompt, response], "
                                               f"e.g. [\"content\", \"summary\"]; got {self.origin_columns}")
        if self.history_column is not None and self.history_column in self.origin_columns:
            raise FieldError("history_column", f"{self.history_column!r} is also in origin_columns")


_PIPELINE_ONLY = ("a MindSpore dataset pipeline setting; the trainer stacks batches on the host, "
                  "so remove the field")


@dataclasses.dataclass
class ADGenDataConfig(ModelConfig):
    """An ADGEN `train_dataset` / `eval_dataset` section (MindFormers' glm2 field names, plus
    upstream's `source_prefix`). `batch_size` and `drop_remainder` are the trainer's
    (TrainingArguments.from_yaml checks them)."""

    data_loader: Optional[ADGenLoaderConfig] = None
    input_columns: list[str] = dataclasses.field(default_factory=lambda: list(COLUMNS))
    max_source_length: int = 64
    max_target_length: int = 128
    ignore_pad_token_for_loss: bool = True
    source_prefix: str = ""
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    drop_remainder: Optional[bool] = None

    UNSUPPORTED_FIELDS = {
        "tokenizer": "samples are built with processor.tokenizer, the one the model runs with; "
                     "remove the field",
        **{name: _PIPELINE_ONLY for name in ("num_parallel_workers", "python_multiprocessing", "repeat",
                                             "numa_enable", "prefetch_size")},
    }

    @property
    def seq_length(self):
        """Length of every training row: max_source_length + max_target_length + 1."""
        return self.max_source_length + self.max_target_length + 1

    def validate(self):
        if self.data_loader is None:
            raise FieldError("data_loader", "missing (type ADGenDataLoader, dataset_dir, phase, ...)")
        if list(self.input_columns) != list(COLUMNS):
            raise FieldError("input_columns", f"the samples' columns are {list(COLUMNS)}; got "
                                              f"{self.input_columns}")
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) < 3:  # room for [gMASK] sop and one token
                raise FieldError(name, f"must be at least 3, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, yaml_config, section="train_dataset"):
        """The section `section` of a loaded YAML (load_config). dataset_dir is resolved
        (relative: to the repository root) and must exist; seed falls back to the YAML's
        top-level seed, then 0."""
        source = getattr(yaml_config, "source", None)

        def where(path):
            return source.where(path) if source is not None else path

        node = yaml_config.get(section)
        if not hasattr(node, "get"):
            raise UserInputError(f"{where(section)}: missing (data_loader, max_source_length, "
                                 f"max_target_length, ...)")
        loader = node.get("data_loader")
        if loader is not None and not hasattr(loader, "get"):
            raise UserInputError(f"{where(section + '.data_loader')}: expected a mapping (type "
                                 f"ADGenDataLoader, dataset_dir, phase, ...), got {loader!r}")
        kind = (loader or {}).get("type", LOADER_TYPE)
        if kind != LOADER_TYPE:
            raise UserInputError(f"{where(section + '.data_loader.type')}: {kind!r} is not an ADGEN "
                                 f"loader; ChatGLM2 fine-tuning reads {LOADER_TYPE}'s fields")
        config = cls.from_dict(node, section, source)
        config.data_loader.dataset_dir = _resolve_repo_path(config.data_loader.dataset_dir,
                                                            where(section + ".data_loader.dataset_dir"))
        if config.seed is None:
            config.seed = yaml_config.get("seed") or 0
        return config


# ---- reading the file -----------------------------------------------------------------------------

@dataclasses.dataclass
class ADGenRow:
    """One usable row: its 1-based line number, the query, the answer and the past turns."""

    line: int
    prompt: str
    response: str
    history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ADGenFile:
    """The rows of one file and the line numbers of the rows skipped for an empty prompt or answer."""

    path: str
    rows: list
    skipped: list

    def summary(self):
        """One line: the row count and the skipped rows' line numbers (the first few)."""
        if not self.skipped:
            return f"{self.path}: {len(self.rows)} rows"
        shown = ", ".join(map(str, self.skipped[:_SHOWN_LINES]))
        if len(self.skipped) > _SHOWN_LINES:
            shown += ", ..."
        return (f"{self.path}: {len(self.rows)} rows; skipped {len(self.skipped)} with an empty prompt or "
                f"answer ({'lines' if len(self.skipped) > 1 else 'line'} {shown})")


def _string_field(path, number, row, column):
    if column not in row:
        raise UserInputError(f"{path}:{number}: the row has no {column!r} field (its fields: "
                             f"{', '.join(map(repr, row)) or 'none'}); set data_loader.origin_columns "
                             f"to the file's [prompt, response] field names")
    value = row[column]
    if value is not None and not isinstance(value, str):
        raise UserInputError(f"{path}:{number}: field {column!r} must be a string, got "
                             f"{type(value).__name__} {str(value)[:60]!r}")
    return value or ""


def _history(path, number, row, column):
    if column not in row:
        raise UserInputError(f"{path}:{number}: the row has no {column!r} field (its fields: "
                             f"{', '.join(map(repr, row)) or 'none'}); data_loader.history_column names it")
    try:
        return ChatGLM2Prompt.checked_turns("", row[column])
    except UserInputError as err:
        raise UserInputError(f"{path}:{number}: field {column!r}: {err}") from None


def _parse_line(path, number, raw):
    """The JSON object on line `number` (bytes), or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}:{number}: not UTF-8 text (byte {err.start + 1})") from None
    if number == 1:
        line = line.removeprefix("\ufeff")  # a byte order mark
    if not line.strip():
        return None
    try:
        row = json.loads(line, strict=False)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                             f"expected one JSON object a line") from None
    if not isinstance(row, dict):
        raise UserInputError(f"{path}:{number}: expected a JSON object, got a JSON {type(row).__name__}")
    return row


def read_adgen(path, prompt_column="content", response_column="summary", history_column=None):
    """The rows of an ADGEN-style file (one JSON object a line) as an ADGenFile.

    Rows with an empty (or null) prompt or answer are skipped and their line numbers kept
    (upstream skips them too); blank lines are passed over. Anything else wrong with a line
    raises a one-line UserInputError "file:line: ...".
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise UserInputError(f"ADGEN data file {path} does not exist (expected a .json file with one "
                             f"JSON object a line)")
    rows, skipped = [], []
    try:
        with open(path, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                row = _parse_line(path, number, raw)
                if row is None:
                    continue
                prompt = _string_field(path, number, row, prompt_column)
                response = _string_field(path, number, row, response_column)
                history = _history(path, number, row, history_column) if history_column else []
                if not prompt or not response:
                    skipped.append(number)
                    continue
                rows.append(ADGenRow(number, prompt, response, history))
    except OSError as err:
        raise UserInputError(f"cannot read {path}: {err.strerror or err}") from err
    if not rows:
        raise UserInputError(f"{path}: no usable rows ({len(skipped)} with an empty prompt or answer)")
    return ADGenFile(path, rows, skipped)


# ---- samples --------------------------------------------------------------------------------------

def prompt_ids(tokenizer, row, max_source_length, source_prefix=""):
    """`[gMASK] sop` + the row's prompt text, cut to max_source_length ids in all."""
    text = source_prefix + tokenizer.build_prompt(row.prompt, row.history)
    return tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=max_source_length)


def _rows_with_progress(rows, description):
    if len(rows) < _PROGRESS_ROWS:
        yield from rows
        return
    with Progress(len(rows), description, "rows") as progress:
        for row in rows:
            yield row
            progress.update()


def build_train_arrays(tokenizer, rows, max_source_length, max_target_length,
                       ignore_pad_token_for_loss=True, source_prefix=""):
    """(input_ids, labels), numpy int32 [N, max_source_length + max_target_length + 1], from
    ADGenRows as upstream's preprocess_function_train (module docstring)."""
    check_int("max_source_length", max_source_length, 3)
    check_int("max_target_length", max_target_length, 3)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    length = max_source_length + max_target_length + 1
    input_ids = np.full((len(rows), length), pad, np.int32)
    labels = np.full((len(rows), length), pad, np.int32)
    for i, row in enumerate(_rows_with_progress(rows, "tokenizing the training rows")):
        a_ids = prompt_ids(tokenizer, row, max_source_length, source_prefix)
        b_ids = tokenizer.encode(row.response, add_special_tokens=False, truncation=True,
                                 max_length=max_target_length)
        ids = a_ids + b_ids + [eos]
        input_ids[i, :len(ids)] = ids
        labels[i, len(a_ids):len(ids)] = b_ids + [eos]
    if ignore_pad_token_for_loss:
        labels[labels == pad] = IGNORE_INDEX
    return input_ids, labels


@dataclasses.dataclass
class EvalSample:
    """One evaluation row: the prompt ids to generate from, the label ids and their text."""

    line: int
    prompt_ids: list
    label_ids: list
    label: str


def build_eval_samples(tokenizer, rows, max_source_length, max_target_length, source_prefix=""):
    """EvalSamples from ADGenRows as upstream's preprocess_function_eval (module docstring)."""
    check_int("max_source_length", max_source_length, 3)
    check_int("max_target_length", max_target_length, 3)
    samples = []
    for row in _rows_with_progress(rows, "tokenizing the evaluation rows"):
        label_ids = tokenizer.encode(row.response, add_special_tokens=True, truncation=True,
                                     max_length=max_target_length)
        samples.append(EvalSample(row.line, prompt_ids(tokenizer, row, max_source_length, source_prefix),
                                  label_ids, tokenizer.decode(label_ids)))
    return samples


class ADGenTrainDataset:
    """Training rows for research.common.trainer.Trainer (module docstring)."""

    columns = COLUMNS

    def __init__(self, input_ids, labels, shuffle=False, seed=0, source=None):
        if input_ids.shape != labels.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids {input_ids.shape} and labels {labels.shape} must be equal [N, L]")
        self.input_ids, self.labels = input_ids, labels
        self.shuffle = shuffle
        self.seed = check_int("the dataset seed", seed, minimum=0)
        self.source = source  # the ADGenFile, when read from one

    @property
    def seq_length(self):
        return self.input_ids.shape[1]

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices are integers, got {type(index).__name__}")
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def order(self, epoch=0):
        """Indices of one epoch: 0..N-1, or with shuffle a permutation fixed by (seed, epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UserInputError(f"epoch must be a non-negative integer, got {epoch!r}")
        if not self.shuffle:
            return list(range(len(self)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self)).tolist()


def load_adgen(config: ADGenDataConfig, tokenizer, stream=None):
    """The data of an ADGEN section: an ADGenTrainDataset for phase "train", a list of
    EvalSamples for phase "eval". Prints the row count and the skipped rows to `stream`
    (default stderr)."""
    loader = config.data_loader
    data = read_adgen(loader.dataset_dir, loader.prompt_column, loader.response_column, loader.history_column)
    print(data.summary(), file=stream or sys.stderr)
    if loader.phase == "eval":
        return build_eval_samples(tokenizer, data.rows, config.max_source_length, config.max_target_length,
                                  config.source_prefix)
    input_ids, labels = build_train_arrays(tokenizer, data.rows, config.max_source_length,
                                           config.max_target_length, config.ignore_pad_token_for_loss,
                                           config.source_prefix)
    return ADGenTrainDataset(input_ids, labels, loader.shuffle, config.seed or 0, data)
