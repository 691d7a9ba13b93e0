"""VisualGLM fine-tuning data: one training sample per (image, prompt, label), and the loaders
that read upstream's fewshot `dataset.json` and COCO 2017 captions.

Sample layout (upstream finetune_visualglm.py `FewShotDataset`, which MindFormers'
visualglm_dataset.py repeats):

    a_ids = encode("<img>") + [pad] * image_length + encode("</img>问：{prompt}\\n答：")
    b_ids = encode(label)
    a_ids, b_ids = a_ids[:max_source_length - 1], b_ids[:max_target_length - 2]
    input_ids = a_ids + [gMASK, <sop>] + b_ids + [<eop>]      (build_inputs_with_special_tokens)
    labels    = [-100] * context_length + input_ids[context_length:]   (context_length = index of <sop>)

then both right-padded to seq_length = max_source_length + max_target_length (the longest
sample, (ms - 1) + 2 + (mt - 2) + 1, fills it exactly), input_ids with pad and labels with -100.
The prompt is wrapped in "问：...\\n答：" exactly as upstream's fine-tuning does (and as chat()
does at inference, so the fine-tuned model sees the same layout); English data uses "Q:...\\nA:".
The label at <sop> is <sop> itself: with the usual shift (logits[:-1] against labels[1:]) the
model learns to emit <sop> after [gMASK], as upstream trains it.

Departures from upstream, all on the side of failing early:
- upstream truncates a_ids blindly and can cut into the image placeholders; here a
  max_source_length that cannot hold "<img>" + the placeholders + 1 is a UserInputError;
- the loaders check every row (fields, types, image file present) when they are built, but
  decode images only in `__getitem__` (upstream decodes the whole dataset into RAM first);
- the shuffle order is a deterministic function of (seed, epoch), so a trainer can resume
  exactly (`order(epoch)`).
"""
import dataclasses
import json
import os
import random
import sys
from typing import Optional

import numpy as np
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import ModelConfig, check_int
from research.common.errors import UserInputError
from research.common.image_processing import check_image, load_image
from research.common.progress import Progress
from research.common.prompts import VisualGLMPrompt
from research.common.runtime import build_registered, resolve_path as _resolve_repo_path
from research.visualglm.modeling_glm import glm_positions_and_mask
from research.visualglm.processing_visualglm import IMAGE_END, IMAGE_START

DATASET_LOADER = MindFormerModuleType.DATASET_LOADER
IGNORE_INDEX = -100
COLUMNS = ("image", "input_ids", "labels", "position_ids", "attention_mask", "image_mask")
FEWSHOT_FIELDS = ("img", "prompt", "label")
# Seed 000 asks the fine-tuned model "What's in the image?" (cli_demo --prompt_en).
COCO_DEFAULT_PROMPT = "What's in the image?"
# Text that the tokenizer turns into a special id; in a prompt or label it would move the
# [gMASK] / <sop> positions the labels and 2D positions are keyed on.
SPECIAL_TEXTS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
_MAX_REPORTED_ERRORS = 5


# ---- one sample --------------------------------------------------------------------------------

def training_seq_length(max_source_length, max_target_length):
    """Padded length of every sample: max_source_length + max_target_length (as upstream)."""
    return max_source_length + max_target_length


def _encode(tokenizer, text):
    # Truncation is ours (per part, below); lift the tokenizer's own length limit.
    return tokenizer.encode(text, add_special_tokens=False, max_length=sys.maxsize)


def _image_prefix_length(processor):
    """Number of ids before the text: len(encode("<img>")) + image_length."""
    return len(_encode(processor.tokenizer, IMAGE_START)) + processor.image_length


def check_lengths(processor, max_source_length, max_target_length, text_config=None):
    """Validate the two length limits; returns the padded seq_length.

    max_source_length must hold "<img>" + the image placeholders + 1 (a_ids are cut to
    max_source_length - 1, and the cut must never reach the placeholders); max_target_length
    must be >= 2 (b_ids are cut to max_target_length - 2). With `text_config`, the padded
    length must not exceed its seq_length (the model's static length and rotary table).
    """
    check_int("max_source_length", max_source_length)
    check_int("max_target_length", max_target_length)
    prefix = _image_prefix_length(processor)
    if max_source_length - 1 < prefix:
        raise UserInputError(
            f"max_source_length {max_source_length} is too small: the prompt starts with \"<img>\" "
            f"({prefix - processor.image_length} tokens) and {processor.image_length} image placeholders, "
            f"and the source is cut to max_source_length - 1, so max_source_length must be at least "
            f"{prefix + 1} (upstream uses 64)")
    if max_target_length < 2:
        raise UserInputError(f"max_target_length must be at least 2 (the label is cut to "
                             f"max_target_length - 2 tokens), got {max_target_length}")
    seq_length = training_seq_length(max_source_length, max_target_length)
    if text_config is not None and seq_length > text_config.seq_length:
        raise UserInputError(
            f"max_source_length + max_target_length = {max_source_length} + {max_target_length} = "
            f"{seq_length} exceeds the model's text_config.seq_length {text_config.seq_length}; lower "
            f"them or raise seq_length")
    return seq_length


def check_special_ids(tokenizer, text_config):
    """The tokenizer and the GLM config must agree on the special ids and the vocabulary, or the
    labels and 2D positions are computed from the wrong tokens."""
    pairs = (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
             ("gmask_token_id", tokenizer.gmask_token_id), ("mask_token_id", tokenizer.mask_token_id))
    wrong = [f"{name}: text_config {getattr(text_config, name)} vs tokenizer {value}"
             for name, value in pairs if getattr(text_config, name) != value]
    if wrong:
        raise UserInputError(f"the tokenizer ({getattr(tokenizer, 'vocab_file', '?')}) does not match "
                             f"text_config: {'; '.join(wrong)}; use the vocab file the model was built for")
    if tokenizer.vocab_size > text_config.vocab_size:
        raise UserInputError(f"the tokenizer has {tokenizer.vocab_size} ids but text_config.vocab_size "
                             f"is {text_config.vocab_size}; its ids would fall outside the embedding table")


def build_training_sample(processor, image, prompt, label, max_source_length, max_target_length,
                          text_config, english=False):
    """One fine-tuning sample as upstream FewShotDataset builds it (see the module docstring).

    image: anything BlipImageProcessor takes (path, PIL image, HxWxC uint8 array).
    prompt / label: strings; the prompt is wrapped as "问：{prompt}\\n答：" ("Q:{prompt}\\nA:"
    with `english`). Returns numpy arrays, L = max_source_length + max_target_length:
      image          float32 [3, S, S]
      input_ids      int32 [L]   a + [gMASK, <sop>] + b + [<eop>], right-padded with pad
      labels         int32 [L]   -100 before <sop> and over padding, else input_ids
      position_ids   int32 [2, L]  GLM 2D positions (glm_positions_and_mask, no left padding)
      attention_mask float32 [1, L, L]  1 = attend: bidirectional prompt, causal answer
      image_mask     int32 [L]   1 on the image_length placeholder positions
    """
    seq_length = check_lengths(processor, max_source_length, max_target_length, text_config)
    for name, value in (("prompt", prompt), ("label", label)):
        if not isinstance(value, str):
            raise UserInputError(f"the {name} must be a string, got {type(value).__name__}")
    tokenizer = processor.tokenizer
    before = _encode(tokenizer, IMAGE_START)
    placeholders = [tokenizer.pad_token_id] * processor.image_length
    after = _encode(tokenizer, IMAGE_END + VisualGLMPrompt(english).build_prompt(prompt))
    a_ids = (before + placeholders + after)[:max_source_length - 1]
    b_ids = _encode(tokenizer, label)[:max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(a_ids, b_ids)
    context_length = len(a_ids) + 1  # index of <sop>
    labels = [IGNORE_INDEX] * context_length + input_ids[context_length:]
    padding = seq_length - len(input_ids)
    input_ids = np.array(input_ids + [tokenizer.pad_token_id] * padding, np.int32)
    labels = np.array(labels + [IGNORE_INDEX] * padding, np.int32)
    position_ids, attention_mask = glm_positions_and_mask(input_ids[None], [0], text_config)
    image_mask = np.zeros(seq_length, np.int32)
    image_mask[len(before):len(before) + processor.image_length] = 1
    pixels = processor.image_processor(image)[0].astype(np.float32)
    return {"image": pixels, "input_ids": input_ids, "labels": labels,
            "position_ids": position_ids[0], "attention_mask": attention_mask[0],
            "image_mask": image_mask}


# ---- loaders -----------------------------------------------------------------------------------

def _reject_unknown_fields(loader, fields, ignored, known):
    """data_loader YAML fields a loader does not take: `ignored` ones are dropped, others refused."""
    unknown = sorted(set(fields) - set(ignored))
    if unknown:
        raise UserInputError(f"{loader} got unknown data_loader fields {unknown}; known: {known}")


def _bool(name, value):
    if not isinstance(value, bool):
        raise UserInputError(f"data_loader.{name} must be True or False, got {value!r}")
    return value


def _raise_collected(where, errors, total_rows):
    """One UserInputError listing the first few row problems."""
    shown = errors[:_MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    raise UserInputError(f"{where}: {len(errors)} problem(s) in {total_rows} rows:\n  "
                         + "\n  ".join(shown) + more)


def _special_text(text):
    return next((special for special in SPECIAL_TEXTS if special in text), None)


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}:{err.lineno}:{err.colno}: {what} is not valid JSON: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: {what} is not UTF-8 text: {err}") from err
    except OSError as err:
        raise UserInputError(f"cannot read {what} {path}: {err.strerror or err}") from err


class _SampleLoader:
    """Rows of (image path, prompt, label) -> samples; index mapping, shuffle and lazy decode.

    Subclasses fill `self.rows` (validated, image paths resolved) and `self.source`.
    """

    columns = COLUMNS

    def __init__(self, processor, max_source_length, max_target_length, text_config, shuffle=False,
                 seed=0, random_mapping=False, scale=1, english=False):
        if processor is None or text_config is None:
            raise UserInputError("a data loader needs the VisualGLMProcessor and the GLM text_config "
                                 "to build samples")
        self.processor = processor
        self.text_config = text_config
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.seq_length = check_lengths(processor, max_source_length, max_target_length, text_config)
        check_special_ids(processor.tokenizer, text_config)
        self.shuffle = _bool("shuffle", shuffle)
        self.random_mapping = _bool("random_mapping", random_mapping)
        self.scale = check_int("data_loader.scale", scale)
        if self.scale != 1 and not self.random_mapping:
            raise UserInputError(f"data_loader.scale is {scale} but random_mapping is False; scale only "
                                 f"enlarges the dataset with random_mapping: True (as in MindFormers)")
        self.seed = check_int("the dataset seed", seed, minimum=0)
        self.english = english
        self.rows = []
        self.source = ""

    def _finish_rows(self):
        """Every image is decoded once now, so a broken file stops the run before training,
        with its row, instead of at the step that first draws it."""
        if not self.rows:
            raise UserInputError(f"{self.source}: the dataset contains no samples")
        first_row = {}
        for number, (path, _, _) in enumerate(self.rows):
            first_row.setdefault(path, number)
        errors = []
        progress = (Progress(len(first_row), f"checking the images of {self.source}", "images")
                    if len(first_row) >= 1000 else None)  # a progress line only where it takes a while
        for path, number in first_row.items():
            try:
                check_image(path)
            except UserInputError as err:
                errors.append(f"row {number}: {err}")
            if progress:
                progress.update()
        if progress:
            progress.close()
        if errors:
            _raise_collected(self.source, errors, len(self.rows))

    def __len__(self):
        return len(self.rows) * self.scale

    def row_index(self, index):
        """Row behind dataset index `index`.

        Without random_mapping the identity. With it (MindFormers' SFTRandomMappingDataSet),
        len = rows * scale and index i draws its row from a generator seeded by i:
        RandomState(seed=[Random(i).randint(0, 2**32 - 1) x 16]).randint(rows). So the mapping is
        fixed, not a cycle: a row may appear more or fewer than `scale` times.
        """
        if not self.random_mapping:
            return index
        draw = random.Random(index)
        state = np.random.RandomState(seed=[draw.randint(0, 2 ** 32 - 1) for _ in range(16)])
        return int(state.randint(len(self.rows)))

    def order(self, epoch=0):
        """Indices of one epoch: 0..len-1, or with `shuffle` a permutation fixed by (seed, epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UserInputError(f"epoch must be a non-negative integer, got {epoch!r}")
        if not self.shuffle:
            return list(range(len(self)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self)).tolist()

    def row(self, index):
        """(row number, image path, prompt, label) behind dataset index `index`."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices are integers, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        number = self.row_index(int(index) % len(self))
        return (number,) + self.rows[number]

    def __getitem__(self, index):
        number, path, prompt, label = self.row(index)
        try:
            image = load_image(path)  # decoded here, not at construction
        except UserInputError as err:
            raise UserInputError(f"{self.source} row {number}: {err}") from err
        return build_training_sample(self.processor, image, prompt, label, self.max_source_length,
                                     self.max_target_length, self.text_config, self.english)


def _fewshot_image_path(json_dir, image):
    """Candidates for an "img" value: absolute as is; relative to the json's folder, then to its
    parent (upstream's dataset.json says "fewshot-data/2p.png", relative to the repo root)."""
    if os.path.isabs(image):
        return [image]
    return [os.path.join(json_dir, image), os.path.join(os.path.dirname(json_dir), image)]


@MindFormerRegister.register(DATASET_LOADER)
class VisualGLMDataLoader(_SampleLoader):
    """Upstream's fewshot `dataset.json`: a JSON list of {"img", "prompt", "label"}.

    YAML `train_dataset.data_loader` fields: dataset_dir (the dataset.json file, or a folder
    holding one), shuffle, column_names (the json keys for image, prompt, label; default
    ["img", "prompt", "label"]), file_format ("json"), random_mapping, scale; `type` is ignored.
    Plus what samples need: processor (VisualGLMProcessor), max_source_length,
    max_target_length, text_config (GLMConfig), seed, english.
    Every row is checked here (object, string fields, no special-token text, image file exists);
    images are decoded in `__getitem__`.
    """

    def __init__(self, dataset_dir, processor=None, max_source_length=64, max_target_length=256,
                 text_config=None, shuffle=False, column_names=FEWSHOT_FIELDS, file_format="json",
                 random_mapping=False, scale=1, seed=0, english=False, **kwargs):
        _reject_unknown_fields("VisualGLMDataLoader", kwargs, ignored=("type",),
                               known="type, dataset_dir, shuffle, column_names, file_format, "
                                     "random_mapping, scale")
        super().__init__(processor, max_source_length, max_target_length, text_config, shuffle, seed,
                         random_mapping, scale, english)
        if file_format not in (None, "json"):
            raise UserInputError(f"VisualGLMDataLoader reads file_format 'json' (a dataset.json list), "
                                 f"got {file_format!r}")
        if (isinstance(column_names, str) or not isinstance(column_names, (list, tuple))
                or len(column_names) != 3 or not all(isinstance(c, str) for c in column_names)):
            raise UserInputError(f"data_loader.column_names must be the three json keys for image, prompt "
                                 f"and label, e.g. {list(FEWSHOT_FIELDS)}; got {column_names!r}")
        self.column_names = tuple(column_names)
        self.source = self._find_json(dataset_dir)
        self._read_rows(self.source)

    @staticmethod
    def _find_json(dataset_dir):
        if not isinstance(dataset_dir, (str, os.PathLike)) or not os.fspath(dataset_dir):
            raise UserInputError(f"data_loader.dataset_dir must be the path of dataset.json, got {dataset_dir!r}")
        path = os.fspath(dataset_dir)
        if os.path.isdir(path):
            path = os.path.join(path, "dataset.json")
        if not os.path.isfile(path):
            raise UserInputError(f"data_loader.dataset_dir: {path} does not exist (expected the fewshot "
                                 f"dataset.json, a JSON list of {{\"img\", \"prompt\", \"label\"}})")
        return os.path.abspath(path)

    def _read_rows(self, path):
        data = _read_json(path, "the dataset")
        if not isinstance(data, list):
            raise UserInputError(f"{path}: expected a JSON list of {{\"img\", \"prompt\", \"label\"}} "
                                 f"objects, got a JSON {type(data).__name__}")
        json_dir = os.path.dirname(path)
        image_key, prompt_key, label_key = self.column_names
        errors = []
        for number, item in enumerate(data):
            if not isinstance(item, dict):
                errors.append(f"row {number}: expected an object with fields {list(self.column_names)}, "
                              f"got {type(item).__name__} {str(item)[:60]!r}")
                continue
            problems = []
            for key in self.column_names:
                if key not in item:
                    problems.append(f"row {number}: field {key!r} is missing")
                elif not isinstance(item[key], str):
                    problems.append(f"row {number}: field {key!r} must be a string, got "
                                    f"{type(item[key]).__name__} {item[key]!r:.60}")
                elif key != image_key and _special_text(item[key]):
                    problems.append(f"row {number}: field {key!r} contains the special token text "
                                    f"{_special_text(item[key])!r}, which would break the GLM layout")
            if not problems and not item[image_key]:
                problems.append(f"row {number}: field {image_key!r} is empty")
            if problems:
                errors.extend(problems)
                continue
            candidates = _fewshot_image_path(json_dir, item[image_key])
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is None:
                errors.append(f"row {number}: image {item[image_key]!r} not found (looked for "
                              f"{', '.join(repr(c) for c in candidates)})")
                continue
            self.rows.append((found, item[prompt_key], item[label_key]))
        if errors:
            _raise_collected(path, errors, len(data))
        self._finish_rows()


@MindFormerRegister.register(DATASET_LOADER)
class CocoCaptionsDataLoader(_SampleLoader):
    """COCO 2017 captions (seed 000): `<dataset_dir>/annotations/captions_<split>.json` and the
    images in `<dataset_dir>/<split>/<file_name>`; one sample per caption (annotation order),
    all with the same question `prompt` (default "What's in the image?", seed 000's English
    prompt) in the English "Q:...\\nA:" layout unless `english` is False.
    The annotation file and every referenced image file are checked here; images are decoded
    in `__getitem__`. `max_samples` keeps only the first that many captions.
    """

    def __init__(self, dataset_dir, processor=None, max_source_length=64, max_target_length=256,
                 text_config=None, shuffle=False, split="train2017", prompt=COCO_DEFAULT_PROMPT,
                 english=True, random_mapping=False, scale=1, seed=0, max_samples=None, **kwargs):
        _reject_unknown_fields("CocoCaptionsDataLoader", kwargs,
                               ignored=("type", "column_names", "file_format"),
                               known="type, dataset_dir, split, prompt, english, shuffle, "
                                     "random_mapping, scale, max_samples")
        super().__init__(processor, max_source_length, max_target_length, text_config, shuffle, seed,
                         random_mapping, scale, english)
        if not isinstance(prompt, str) or not prompt or _special_text(prompt):
            raise UserInputError(f"CocoCaptionsDataLoader prompt must be a non-empty string without special "
                                 f"token text, got {prompt!r}")
        if max_samples is not None:
            check_int("max_samples", max_samples)
        if not isinstance(dataset_dir, (str, os.PathLike)) or not os.path.isdir(dataset_dir):
            raise UserInputError(f"data_loader.dataset_dir must be the COCO root folder (holding annotations/ "
                                 f"and {split}/), got {dataset_dir!r}")
        root = os.path.abspath(dataset_dir)
        self.source = os.path.join(root, "annotations", f"captions_{split}.json")
        if not os.path.isfile(self.source):
            raise UserInputError(f"COCO captions file {self.source} does not exist")
        self._read_rows(root, split, prompt, max_samples)

    def _read_rows(self, root, split, prompt, max_samples):
        data = _read_json(self.source, "the COCO captions file")
        if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
                or not isinstance(data.get("annotations"), list)):
            raise UserInputError(f"{self.source}: expected a COCO captions object with 'images' and "
                                 f"'annotations' lists")
        errors, files = [], {}
        for number, image in enumerate(data["images"]):
            if (not isinstance(image, dict) or not isinstance(image.get("id"), int)
                    or not isinstance(image.get("file_name"), str) or not image["file_name"]):
                errors.append(f"images[{number}]: expected an object with an integer 'id' and a "
                              f"'file_name' string, got {str(image)[:80]!r}")
                continue
            files[image["id"]] = os.path.join(root, split, image["file_name"])
        annotations = data["annotations"][:max_samples] if max_samples else data["annotations"]
        present = {}
        for number, note in enumerate(annotations):
            if not isinstance(note, dict):
                errors.append(f"annotations[{number}]: expected an object, got {type(note).__name__}")
                continue
            caption, image_id = note.get("caption"), note.get("image_id")
            if not isinstance(caption, str):
                errors.append(f"annotations[{number}]: field 'caption' is missing or not a string")
                continue
            if _special_text(caption):
                errors.append(f"annotations[{number}]: caption contains the special token text "
                              f"{_special_text(caption)!r}")
                continue
            if image_id not in files:
                errors.append(f"annotations[{number}]: image_id {image_id!r} is not in 'images'")
                continue
            path = files[image_id]
            if path not in present:
                present[path] = os.path.isfile(path)
            if not present[path]:
                errors.append(f"annotations[{number}]: image {path!r} not found")
                continue
            self.rows.append((path, prompt, caption.strip()))
        if errors:
            _raise_collected(self.source, errors, len(annotations))
        self._finish_rows()


# ---- from the YAML -----------------------------------------------------------------------------

@dataclasses.dataclass
class TrainDatasetConfig(ModelConfig):
    """The YAML's `train_dataset`. `batch_size` and `drop_remainder` are the trainer's, which
    batches the samples (TrainingArguments.from_yaml checks them)."""

    data_loader: Optional[dict] = None
    max_source_length: Optional[int] = None
    max_target_length: Optional[int] = None
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    drop_remainder: Optional[bool] = None

    UNSUPPORTED_FIELDS = {
        "tokenizer": "samples are built with processor.tokenizer, the one the model runs with; "
                     "remove the field",
        "input_columns": f"the columns are the model's inputs, {', '.join(COLUMNS)}; remove the field",
    }


def build_train_dataset(yaml_config, processor, text_config, resolve_path=None):
    """The data loader described by the YAML `train_dataset` section.

    `yaml_config`: the whole config (its `train_dataset` is used) or the section itself.
    Reads data_loader (type -> class via MindFormers' DATASET_LOADER registry; dataset_dir
    relative to the repository root when relative), max_source_length, max_target_length
    and seed (train_dataset.seed, else the top-level seed, else 0); TrainDatasetConfig checks
    the section's other fields.
    The padded length max_source_length + max_target_length must fit text_config.seq_length.
    """
    resolve_path = resolve_path or _resolve_repo_path
    if not hasattr(yaml_config, "get"):
        raise UserInputError(f"expected the YAML config (a mapping), got {type(yaml_config).__name__}")
    source = getattr(yaml_config, "source", None)

    def where(path):
        return source.where(path) if source is not None else path

    section = yaml_config if "data_loader" in yaml_config else yaml_config.get("train_dataset")
    if not hasattr(section, "get"):
        raise UserInputError("the config has no train_dataset section (with data_loader, "
                             "max_source_length, max_target_length)")
    train = TrainDatasetConfig.from_dict(section, "train_dataset", source)
    loader_node = train.data_loader
    if not hasattr(loader_node, "get"):
        raise UserInputError("train_dataset.data_loader is missing (type, dataset_dir, ...)")
    missing = [f"train_dataset.{name}" for name in ("max_source_length", "max_target_length")
               if getattr(train, name) is None]
    missing += [f"train_dataset.data_loader.{name}" for name in ("type", "dataset_dir")
                if not loader_node.get(name)]
    if missing:
        raise UserInputError(f"missing config field(s): {', '.join(missing)}")
    fields = dict(loader_node)
    kind = fields.pop("type")
    fields["dataset_dir"] = resolve_path(fields["dataset_dir"], "train_dataset.data_loader.dataset_dir")
    seed = train.seed
    if seed is None:
        seed = yaml_config.get("seed", 0) if section is not yaml_config else 0
    try:
        return build_registered(DATASET_LOADER, kind, processor=processor,
                                max_source_length=train.max_source_length,
                                max_target_length=train.max_target_length,
                                text_config=text_config, seed=seed or 0, **fields)
    except TypeError as err:
        raise UserInputError(f"{where('train_dataset.data_loader')} ({kind}): {err}") from err


# ---- MindSpore dataset ---------------------------------------------------------------------------

class _ColumnSource:
    """Random-access source for GeneratorDataset: one epoch's order, samples as column tuples."""

    def __init__(self, loader, epoch, column_names):
        self.loader = loader
        self.indices = loader.order(epoch)
        self.column_names = column_names

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        sample = self.loader[self.indices[position]]
        return tuple(sample[name] for name in self.column_names)


def to_generator_dataset(loader, batch_size, drop_remainder=True, epoch=0, column_names=COLUMNS,
                         output_names=None, num_parallel_workers=1):
    """A batched `mindspore.dataset.GeneratorDataset` over one epoch of `loader`, in
    `loader.order(epoch)` (so MindSpore's own shuffle is off). `column_names` picks the sample
    columns; `output_names` renames them (MindFormers' YAML calls position_ids "position_id")."""
    from mindspore.dataset import GeneratorDataset  # only MindFormers-style pipelines need it

    check_int("batch_size", batch_size)
    unknown = [name for name in column_names if name not in loader.columns]
    if unknown:
        raise UserInputError(f"unknown sample columns {unknown}; the samples have {list(loader.columns)}")
    output_names = list(output_names or column_names)
    if len(output_names) != len(column_names):
        raise UserInputError(f"output_names {output_names} must name the {len(column_names)} columns "
                             f"{list(column_names)}")
    dataset = GeneratorDataset(_ColumnSource(loader, epoch, tuple(column_names)), column_names=output_names,
                               shuffle=False, num_parallel_workers=num_parallel_workers)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)
