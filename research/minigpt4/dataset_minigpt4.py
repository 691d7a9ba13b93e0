"""MiniGPT-4 training data (issue #16): stage 1 reads image-caption pairs from webdataset tar
shards (LAION, CC/SBU), stage 2 reads `cc_sbu_align` with its prompt file. Both are map-style
datasets for research.common.trainer, columns COLUMNS, with one padded length L per dataset so
that every batch has the same shapes.

Sample layouts (upstream MG4@v1 `mini_gpt4.py` forward; notes/minigpt4.md §2.6). T image
placeholders (`image_tokens`: 32, 64 for the Llama-2 variant) hold the pad id: the model
replaces their embeddings where image_mask is 1. Text is encoded without special tokens.
    stage 1: input  = [bos] + T placeholders + ids(clean(caption) + end_sym)[:max_txt_len]
             labels = -100 over bos and the image, the text ids, -100 over the padding
             L = 1 + T + max_txt_len
    stage 2: prompt = template.format(line), split at "<ImageHere>" into p_before / p_after
             input  = [bos] + ids(p_before) + T placeholders + ids(p_after)
                      + ids(caption + end_sym)[:max_txt_len]   (a cut answer loses its end_sym)
             labels = -100 everywhere but the answer ids
             L = 1 + longest p_before + T + longest p_after + max_txt_len
clean() is upstream's BlipCaptionProcessor.pre_caption (stage 1 only; cc_sbu_align captions
are used raw). Labels are set by position, not by comparing with the pad id, so an end_sym of
"</s>" (the Llama-2 variant's, = pad) is still learned.

Order and resume: `order(epoch)` is a function of (seed, epoch) and decides that epoch's
per-batch draws (the dataset of each global batch in stage 1, the prompt in stage 2); the
crop of a sample is seeded by (seed, epoch, index). So a fresh object that calls order(epoch)
gives the same samples, and a resumed run sees exactly what the interrupted one would have.

Departures from upstream, all on the side of saying what happened:
- upstream streams resampled shards (`wds.ResampledShards`, a 1000-sample shuffle buffer);
  here each rank indexes its own shards once, at construction (every sample is read and its
  image decoded at reduced scale), and an epoch is `iters_per_epoch` global batches as
  upstream's, drawing each dataset's samples without replacement, pass after pass;
- samples without json or with an undecodable image are skipped as upstream's
  `warn_and_continue` does, but counted in one line per dataset, and none left is an error;
- prompt lines without "<ImageHere>" are an error (upstream drops them silently).
"""
import dataclasses
import glob
import io
import json
import os
import re
import struct
import sys
import tarfile
import zlib
from typing import Literal, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from research.common.config import ModelConfig, check_int, repo_path
from research.common.errors import UserInputError
from research.common.image_processing import BlipImageTrainProcessor, check_image, to_rgb
from research.common.parallel import ParallelContext
from research.common.progress import Progress
from research.common.runtime import resolve_path as _resolve_repo_path
from research.minigpt4.conversation_minigpt4 import IMAGE_PLACEHOLDER, IMAGE_TOKENS
from research.minigpt4.tokenization_minigpt4 import LlamaTokenizer

COLUMNS = ("image", "input_ids", "labels", "image_mask")
IGNORE_INDEX = -100
# Upstream minigpt4_stage2_finetune.yaml (Vicuna v0); the Llama-2 variant uses '[INST] {} [/INST] '.
STAGE2_TEMPLATE = "###Human: {} ###Assistant: "
CAPTION_MAX_WORDS = 50  # BlipCaptionProcessor's max_words
# What Pillow may raise for damaged image data (as research.common.image_processing).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_SHOWN_EXAMPLES = 3
_SHARDS_FOR_PROGRESS = 10  # a progress line only where reading takes a while


def clean_caption(caption, max_words=CAPTION_MAX_WORDS):
    """Upstream BlipCaptionProcessor.pre_caption: lower-case, `.!"()*#:;~` to spaces, runs of
    whitespace to one space, trailing newline and outer spaces stripped, first max_words words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _check_epoch(epoch):
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise UserInputError(f"epoch must be a non-negative integer, got {epoch!r}")
    return int(epoch)


def _decode_image(data, where, draft=None):
    """Encoded image bytes -> RGB PIL image (JPEGs at about `draft` pixels when given: every
    byte is still decoded, so damage shows); damage is a UserInputError naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if draft:
                image.draft("RGB", draft)
            image.load()
            return to_rgb(image, where)
    except UnidentifiedImageError as err:
        raise UserInputError(f"{where}: not an image Pillow can read") from err
    except _DECODE_ERRORS as err:
        raise UserInputError(f"{where}: the image is truncated or corrupt: {err}") from err


class _MiniGPT4Dataset:
    """What both stages share: the tokenizer, the train transform, the padded layout."""

    columns = COLUMNS

    def __init__(self, tokenizer, batch_size, parallel_context, max_txt_len, image_tokens, image_size,
                 transform, end_sym, seed):
        self.tokenizer = tokenizer
        self.batch_size = check_int("batch_size", batch_size)
        context = parallel_context or ParallelContext()
        self.rank, self.world_size = context.rank, context.world_size
        self.global_batch = self.batch_size * self.world_size
        self.max_txt_len = check_int("max_txt_len", max_txt_len)
        self.image_tokens = check_int("image_tokens", image_tokens)
        self.image_processor = BlipImageTrainProcessor(image_size, transform=transform)
        if not isinstance(end_sym, str):
            raise UserInputError(f"end_sym must be a string, got {end_sym!r}")
        self.end_sym = end_sym
        self.seed = check_int("the dataset seed", seed, minimum=0)
        if self.seed >= 2 ** 32:  # it seeds numpy's RandomState for the crops
            raise UserInputError(f"the dataset seed must be below 2**32, got {seed}")
        self.seq_length = None  # set by the subclass once the prompts are known
        self._epoch = 0

    def _encode(self, text):
        # The length cut is the layout's (max_txt_len), not the tokenizer's max_length.
        return self.tokenizer.encode(text, add_special_tokens=False, max_length=sys.maxsize)

    def _answer_ids(self, text):
        return self._encode(text + self.end_sym)[:self.max_txt_len]

    def _crop_seed(self, index):
        return (self.seed, self._epoch, int(index))

    def _layout(self, pixels, before, after, answer):
        """The padded sample of [bos] + before + T placeholders + after + answer."""
        pad = self.tokenizer.pad_token_id
        prompt = [self.tokenizer.bos_token_id] + before + [pad] * self.image_tokens + after
        padding = self.seq_length - len(prompt) - len(answer)
        image_mask = np.zeros(self.seq_length, np.int32)
        image_mask[1 + len(before):1 + len(before) + self.image_tokens] = 1
        return {"image": pixels.astype(np.float32),
                "input_ids": np.array(prompt + answer + [pad] * padding, np.int32),
                "labels": np.array([IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * padding, np.int32),
                "image_mask": image_mask}


# ---- stage 1: webdataset shards ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WebDatasetSource:
    """One stage-1 dataset: `shards` is a brace pattern (`/data/laion/{00000..10488}.tar`, as
    webdataset expands it) or a folder of .tar files; `sample_ratio` weighs how often a global
    batch comes from it (upstream: laion 115, cc_sbu 14)."""

    name: str
    shards: str
    sample_ratio: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise UserInputError(f"a stage-1 dataset needs a name, got {self.name!r}")
        if not isinstance(self.shards, (str, os.PathLike)) or not os.fspath(self.shards):
            raise UserInputError(f"{self.name}: shards must be a brace pattern or a folder of .tar "
                                 f"files, got {self.shards!r}")
        if (isinstance(self.sample_ratio, bool) or not isinstance(self.sample_ratio, (int, float))
                or not 0 < self.sample_ratio < float("inf")):
            raise UserInputError(f"{self.name}: sample_ratio must be a positive number, got {self.sample_ratio!r}")


def expand_shards(source):
    """The shard files of a WebDatasetSource, in order; none, or any missing, is an error."""
    pattern = os.fspath(source.shards)
    if os.path.isdir(pattern):
        paths = sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
        if not paths:
            raise UserInputError(f"{source.name}: the folder {pattern} holds no .tar shards")
        return paths
    paths = expand_urls(pattern)
    if not paths:
        raise UserInputError(f"{source.name}: the shard pattern {pattern!r} names no shards")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:_SHOWN_EXAMPLES]) + (" ..." if len(missing) > _SHOWN_EXAMPLES else "")
        raise UserInputError(f"{source.name}: {len(missing)} of the {len(paths)} shards of {pattern!r} "
                             f"do not exist: {shown}")
    return paths


def _member_locations(path):
    """{(key, suffix): (offset, size)} of the files in a tar, keyed as webdataset keys them:
    where `__getitem__` reads a sample's bytes."""
    locations = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, suffix = base_plus_ext(info.name)
            if info.isreg() and key is not None:
                locations[(key, suffix.lower())] = (info.offset_data, info.size)
    return locations


def _read_at(stream, offset, size):
    stream.seek(int(offset))
    return stream.read(int(size))


def _json_caption(data):
    """json["caption"] if the bytes are a JSON object with a caption string, else None."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, str) else None


class _ShardIndex:
    """The usable samples of one source's shards on this rank, and what was skipped."""

    SKIPS = ("without jpg", "without json", "json without a caption", "undecodable image")

    def __init__(self, source, paths):
        self.source, self.paths = source, paths
        self.skipped = {reason: 0 for reason in self.SKIPS}
        self.undecodable = []  # (shard name, key) of the first few
        shard, keys, images, jsons = [], [], [], []
        progress = (Progress(len(paths), f"reading the {source.name} shards", "shards")
                    if len(paths) >= _SHARDS_FOR_PROGRESS else None)
        for number, path in enumerate(paths):
            for key, image_at, json_at in self._read_shard(path):
                shard.append(number)
                keys.append(key)
                images.append(image_at)
                jsons.append(json_at)
            if progress:
                progress.update()
        if progress:
            progress.close()
        self.shard = np.array(shard, np.int32)
        self.keys = np.array(keys, dtype=str)
        self.image_at = np.array(images, np.int64).reshape(-1, 2)
        self.json_at = np.array(jsons, np.int64).reshape(-1, 2)

    def __len__(self):
        return len(self.keys)

    def _read_shard(self, path):
        """(key, image (offset, size), json (offset, size)) of each usable sample: webdataset
        groups the files into samples; tarfile's member table says where each file lies."""
        name = os.path.basename(path)
        try:
            locations = _member_locations(path)
            with open(path, "rb") as stream:
                for sample in group_by_keys(tar_file_expander([{"url": path, "stream": stream}])):
                    key = sample["__key__"]
                    reason = self._check(sample, f"shard {path} key {key}")
                    if reason:
                        self.skipped[reason] += 1
                        if reason == "undecodable image" and len(self.undecodable) < _SHOWN_EXAMPLES:
                            self.undecodable.append(f"shard {name} key {key}")
                        continue
                    yield key, locations[(key, "jpg")], locations[(key, "json")]
        except (tarfile.TarError, OSError, ValueError) as err:
            raise UserInputError(f"{self.source.name}: cannot read the shard {path}: {err}") from err

    @staticmethod
    def _check(sample, where):
        """Why a sample is skipped, or None: upstream reads only `jpg` and `json["caption"]`."""
        if "jpg" not in sample:
            return "without jpg"
        if "json" not in sample:
            return "without json"
        if _json_caption(sample["json"]) is None:
            return "json without a caption"
        try:
            _decode_image(sample["jpg"], where, draft=(32, 32))
        except UserInputError:
            return "undecodable image"
        return None

    def summary(self):
        """One line: how many samples from how many shards, and what was skipped."""
        shards = f"{len(self.paths)} shard{'s' if len(self.paths) != 1 else ''}"
        line = f"{self.source.name}: {len(self)} samples from {shards}"
        skipped = sum(self.skipped.values())
        if skipped:
            parts = []
            for reason, count in self.skipped.items():
                if count:
                    part = f"{count} {reason}"
                    if reason == "undecodable image":
                        more = " ..." if count > len(self.undecodable) else ""
                        part += ": " + ", ".join(self.undecodable) + more
                    parts.append(part)
            line += f"; skipped {skipped} ({', '.join(parts)})"
        return line


class MiniGPT4Stage1Dataset(_MiniGPT4Dataset):
    """Stage-1 pretraining data: image-caption pairs from webdataset shards, several datasets
    mixed one per global batch by sample_ratio (upstream MultiIterLoader).

    datasets: WebDatasetSource list. Shard i of a dataset goes to rank i % world_size (fewer
    shards than ranks is an error); each rank reads, indexes and serves only its own, and
    prints one line per dataset (samples, shards, skipped). An epoch is `iters_per_epoch`
    global batches (upstream stage 1: 5000). Indices name this rank's samples (the datasets'
    samples one after another); in `order(epoch)` the rows of other ranks are -1, as this
    rank cannot know their samples (the trainer reads only its own rows).
    """

    def __init__(self, datasets, tokenizer, batch_size, iters_per_epoch, parallel_context=None,
                 max_txt_len=32, image_tokens=IMAGE_TOKENS, image_size=224, transform="random_resized_crop",
                 end_sym="\n", seed=0):
        super().__init__(tokenizer, batch_size, parallel_context, max_txt_len, image_tokens, image_size,
                         transform, end_sym, seed)
        self.iters_per_epoch = check_int("iters_per_epoch", iters_per_epoch)
        if isinstance(datasets, WebDatasetSource) or not isinstance(datasets, (list, tuple)) or not datasets:
            raise UserInputError(f"stage 1 needs a non-empty list of datasets (name, shards, sample_ratio), "
                                 f"got {datasets!r}")
        names = [source.name for source in datasets]
        if len(set(names)) != len(names):
            raise UserInputError(f"stage-1 dataset names must differ, got {names}")
        self.seq_length = 1 + self.image_tokens + self.max_txt_len
        self.sources = [self._index(source) for source in datasets]
        self.summaries = [index.summary() for index in self.sources]
        where = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        for line in self.summaries:
            print(where + line, file=sys.stderr)
        self._starts = np.cumsum([0] + [len(index) for index in self.sources])

    def _index(self, source):
        paths = expand_shards(source)
        if len(paths) < self.world_size:
            raise UserInputError(f"{source.name}: {len(paths)} shards in {os.fspath(source.shards)!r} for "
                                 f"{self.world_size} ranks; each rank reads shards of its own (shard i goes "
                                 f"to rank i % {self.world_size}), so give at least one shard per rank")
        index = _ShardIndex(source, paths[self.rank::self.world_size])
        if not len(index):
            mine = f" (rank {self.rank}'s {len(index.paths)} of {len(paths)} shards)" if self.world_size > 1 else ""
            raise UserInputError(f"no usable samples in {os.fspath(source.shards)!r}{mine}: {index.summary()}")
        return index

    def __len__(self):
        return self.iters_per_epoch * self.global_batch

    def dataset_draws(self, epoch):
        """The dataset (number in `datasets`) of each global batch of `epoch`, drawn with
        probabilities proportional to the sample ratios."""
        ratios = np.array([index.source.sample_ratio for index in self.sources], np.float64)
        rng = np.random.default_rng([self.seed, _check_epoch(epoch)])
        return rng.choice(len(ratios), size=self.iters_per_epoch, p=ratios / ratios.sum())

    def _sample_stream(self, number, epoch, count):
        """The first `count` of this rank's samples of dataset `number` in `epoch`: permutations
        of them one after another, a fresh one for each pass."""
        size = len(self.sources[number])
        passes = -(-count // size)
        return np.concatenate([np.random.default_rng([self.seed, epoch, number, self.rank, p]).permutation(size)
                               for p in range(passes)])[:count]

    def order(self, epoch=0):
        """This epoch's indices in global-batch order (iters_per_epoch x ranks x batch_size; the
        rows of other ranks -1); also fixes the epoch of the crops."""
        draws = self.dataset_draws(epoch)
        rows = np.full((self.iters_per_epoch, self.world_size, self.batch_size), -1, np.int64)
        for number in range(len(self.sources)):
            batches = np.flatnonzero(draws == number)
            if batches.size:
                stream = self._sample_stream(number, epoch, batches.size * self.batch_size)
                rows[batches, self.rank] = self._starts[number] + stream.reshape(batches.size, self.batch_size)
        self._epoch = int(epoch)
        return rows.reshape(-1)

    def _locate(self, index):
        """(this rank's shard index of the dataset, sample number in it) of sample `index`."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices are integers, got {type(index).__name__}")
        if not 0 <= index < self._starts[-1]:
            raise IndexError(f"index {index} is not one of this rank's {self._starts[-1]} samples")
        number = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[number], int(index) - int(self._starts[number])

    def sample_source(self, index):
        """(dataset name, shard path, key) of sample `index` of this rank."""
        shard_index, local = self._locate(index)
        return (shard_index.source.name, shard_index.paths[shard_index.shard[local]],
                str(shard_index.keys[local]))

    def __getitem__(self, index):
        shard_index, local = self._locate(index)
        path = shard_index.paths[shard_index.shard[local]]
        where = f"{shard_index.source.name}: shard {path} key {shard_index.keys[local]}"
        with open(path, "rb") as stream:
            image_bytes, json_bytes = (_read_at(stream, *shard_index.image_at[local]),
                                       _read_at(stream, *shard_index.json_at[local]))
        caption = _json_caption(json_bytes)
        if caption is None:
            raise UserInputError(f"{where}: the sample's json no longer holds a caption; the shard "
                                 f"changed after this dataset indexed it")
        pixels = self.image_processor(_decode_image(image_bytes, where), self._crop_seed(index))
        return self._layout(pixels, [], [], self._answer_ids(clean_caption(caption)))


# ---- stage 2: cc_sbu_align ---------------------------------------------------------------------

def _read_prompts(path, template):
    """The prompts of `path` (one a line; blank lines skipped) in `template`, each split at
    <ImageHere>: [(prompt, before, after)]. A line without exactly one placeholder is an error."""
    try:
        marked = template.format("\0")  # upstream fills the template with str.format
    except (AttributeError, IndexError, KeyError, ValueError) as err:
        raise UserInputError(f"prompt_template {template!r} is not a format string with one '{{}}': {err}") from err
    if marked.count("\0") != 1:
        raise UserInputError(f"prompt_template must hold one '{{}}' where the prompt goes, got {template!r}")
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: the prompt file is not UTF-8 text: {err}") from err
    except OSError as err:
        raise UserInputError(f"cannot read the prompt file {path}: {err.strerror or err}") from err
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.count(IMAGE_PLACEHOLDER) != 1:
            found = "no" if IMAGE_PLACEHOLDER not in line else line.count(IMAGE_PLACEHOLDER)
            raise UserInputError(f"{path}:{number}: {found} {IMAGE_PLACEHOLDER} in {line!r}; every prompt line "
                                 f"needs exactly one, where the image goes (e.g. '<Img>{IMAGE_PLACEHOLDER}</Img> "
                                 f"Describe this image in detail.'). Upstream drops such lines silently.")
        prompt = template.format(line)
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise UserInputError(f"prompt_template {template!r} must not contain {IMAGE_PLACEHOLDER} itself")
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        prompts.append((prompt, before, after))
    if not prompts:
        raise UserInputError(f"{path}: the prompt file holds no prompts (one a line, each with {IMAGE_PLACEHOLDER})")
    return prompts


def _read_annotations(path, image_dir):
    """[(image path, caption)] of filter_cap.json; a problem is an error naming the file and entry."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not UTF-8 text: {err}") from err
    except OSError as err:
        raise UserInputError(f"cannot read {path}: {err.strerror or err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserInputError(f"{path}: expected {{\"annotations\": [{{\"image_id\": ..., \"caption\": ...}}, ...]}}, "
                             f"found no 'annotations' list")
    rows = []
    for number, note in enumerate(data["annotations"]):
        where = f"{path}: annotations[{number}]"
        if not isinstance(note, dict):
            raise UserInputError(f"{where}: expected an object with image_id and caption, got {note!r:.80}")
        image_id, caption = note.get("image_id"), note.get("caption")
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or image_id == "":
            raise UserInputError(f"{where}: image_id must be a string or an integer, got {image_id!r}")
        if not isinstance(caption, str):
            raise UserInputError(f"{where}: caption must be a string, got {caption!r:.80}")
        image = os.path.join(image_dir, f"{image_id}.jpg")
        if not os.path.isfile(image):
            raise UserInputError(f"{where}: image_id {image_id!r} has no image: {image} does not exist")
        rows.append((image, caption))
    if not rows:
        raise UserInputError(f"{path}: the 'annotations' list is empty")
    return rows


class MiniGPT4Stage2Dataset(_MiniGPT4Dataset):
    """Stage-2 fine-tuning data: `data_dir/filter_cap.json` ({"annotations": [{"image_id",
    "caption"}]}) with `data_dir/image/{image_id}.jpg`, one prompt of `prompt_path` per global
    batch in `prompt_template`. Every entry and image is checked here (images decoded at
    reduced scale); captions are used as written. An epoch is every annotation once, shuffled
    (the trainer drops the last incomplete global batch), or, with `iters_per_epoch` (upstream's
    stage 2: 200), that many global batches drawn from shuffled passes over the annotations, as
    upstream's loader cycles through them."""

    def __init__(self, data_dir, prompt_path, tokenizer, batch_size, parallel_context=None,
                 prompt_template=STAGE2_TEMPLATE, max_txt_len=160, image_tokens=IMAGE_TOKENS, image_size=224,
                 transform="random_resized_crop", end_sym="###", seed=0, iters_per_epoch=None):
        super().__init__(tokenizer, batch_size, parallel_context, max_txt_len, image_tokens, image_size,
                         transform, end_sym, seed)
        if not isinstance(data_dir, (str, os.PathLike)) or not os.path.isdir(data_dir):
            raise UserInputError(f"data_dir must be the cc_sbu_align folder (filter_cap.json, image/), "
                                 f"got {data_dir!r}")
        self.source = os.path.join(os.fspath(data_dir), "filter_cap.json")
        self.rows = _read_annotations(self.source, os.path.join(os.fspath(data_dir), "image"))
        for number, (image, _) in enumerate(self.rows):
            try:
                check_image(image)
            except UserInputError as err:
                raise UserInputError(f"{self.source}: annotations[{number}]: {err}") from err
        self.prompts = [(prompt, self._encode(before), self._encode(after))
                        for prompt, before, after in _read_prompts(prompt_path, prompt_template)]
        self.seq_length = (1 + max(len(before) for _, before, _ in self.prompts) + self.image_tokens
                           + max(len(after) for _, _, after in self.prompts) + self.max_txt_len)
        self.iters_per_epoch = None if iters_per_epoch is None else check_int("iters_per_epoch", iters_per_epoch)
        self._row_of = self._prompt_of = None
        self.order(0)  # samples read before any order() call are epoch 0's

    def __len__(self):
        """Positions of an epoch: the annotations, or iters_per_epoch global batches."""
        return len(self.rows) if self.iters_per_epoch is None else self.iters_per_epoch * self.global_batch

    def order(self, epoch=0):
        """This epoch's positions: each names an annotation (a permutation fixed by (seed, epoch),
        or consecutive such passes for iters_per_epoch) and one prompt drawn per global batch."""
        rng = np.random.default_rng([self.seed, _check_epoch(epoch)])
        length = len(self)
        passes = -(-length // len(self.rows))
        self._row_of = np.concatenate([rng.permutation(len(self.rows)) for _ in range(passes)])[:length]
        draws = rng.integers(len(self.prompts), size=-(-length // self.global_batch))
        self._prompt_of = draws[np.arange(length) // self.global_batch]
        self._epoch = int(epoch)
        return np.arange(length)

    def prompt_of(self, index):
        """The prompt (template applied) that position `index` gets in the current epoch."""
        return self.prompts[self._prompt_of[index]][0]

    def annotation_of(self, index):
        """(image path, caption) at position `index` in the current epoch."""
        return self.rows[self._row_of[index]]

    def __getitem__(self, index):
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices are integers, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} positions")
        image, caption = self.annotation_of(index)
        _, before, after = self.prompts[self._prompt_of[index]]
        pixels = self.image_processor(image, self._crop_seed(index))
        return self._layout(pixels, before, after, self._answer_ids(caption))


# ---- from the YAML -----------------------------------------------------------------------------

@dataclasses.dataclass
class _DatasetConfig(ModelConfig):
    """Fields both stages read. `batch_size` and `drop_remainder` are the trainer's
    (TrainingArguments.from_yaml checks them); `seed` defaults to the top-level seed."""

    vocab_file: Optional[str] = None
    max_txt_len: int = 32
    image_size: int = 224
    image_tokens: int = IMAGE_TOKENS
    transform: Literal["random_resized_crop", "resize"] = "random_resized_crop"
    end_sym: str = "\n"
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    drop_remainder: Optional[bool] = None

    REQUIRED = ("vocab_file",)


@dataclasses.dataclass
class Stage1DatasetConfig(_DatasetConfig):
    """`train_dataset` of type MiniGPT4Stage1Dataset; `datasets` entries: name, shards, sample_ratio."""

    datasets: Optional[list] = None
    iters_per_epoch: Optional[int] = None

    REQUIRED = ("vocab_file", "datasets", "iters_per_epoch")


@dataclasses.dataclass
class Stage2DatasetConfig(_DatasetConfig):
    """`train_dataset` of type MiniGPT4Stage2Dataset (upstream stage-2 values as defaults)."""

    data_dir: Optional[str] = None
    prompt_path: Optional[str] = None
    iters_per_epoch: Optional[int] = None
    prompt_template: str = STAGE2_TEMPLATE
    max_txt_len: int = 160
    end_sym: str = "###"

    REQUIRED = ("vocab_file", "data_dir", "prompt_path")


@dataclasses.dataclass
class WebDatasetSourceConfig(ModelConfig):
    """One entry of a stage-1 `datasets` list."""

    name: Optional[str] = None
    shards: Optional[str] = None
    sample_ratio: float = 1.0


DATASET_TYPES = {"MiniGPT4Stage1Dataset": Stage1DatasetConfig, "MiniGPT4Stage2Dataset": Stage2DatasetConfig}


def build_train_dataset(yaml_config, batch_size, parallel_context=None, resolve_path=None):
    """The dataset the YAML `train_dataset` section describes (its `type`: one of DATASET_TYPES).

    `yaml_config`: the whole config (from research.common.config.load_config, whose ConfigSource
    points errors at file:line) or the section itself. `batch_size` is the trainer's per-process
    batch (runner_config.batch_size); `parallel_context` says this process's rank. Unknown fields
    are refused; relative paths (vocab_file, shards, data_dir, prompt_path) are relative to the
    repository root, as everywhere in this project's YAMLs.
    """
    resolve_path = resolve_path or _resolve_repo_path
    if not hasattr(yaml_config, "get"):
        raise UserInputError(f"expected the YAML config (a mapping), got {type(yaml_config).__name__}")
    source = getattr(yaml_config, "source", None)

    def where(path):
        return source.where(path) if source is not None else path

    section = yaml_config if "type" in yaml_config else yaml_config.get("train_dataset")
    if not hasattr(section, "get"):
        raise UserInputError(f"the config has no train_dataset section (type: {' or '.join(DATASET_TYPES)})")
    kind = section.get("type")
    if kind not in DATASET_TYPES:
        raise UserInputError(f"{where('train_dataset.type')}: unknown MiniGPT-4 dataset type {kind!r}; "
                             f"choose {' or '.join(DATASET_TYPES)}")
    config = DATASET_TYPES[kind].from_dict(section, "train_dataset", source)
    missing = [name for name in config.REQUIRED if getattr(config, name) is None]
    if missing:
        raise UserInputError(f"{where('train_dataset')}: {kind} needs {', '.join(missing)}")
    seed = config.seed
    if seed is None:
        seed = yaml_config.get("seed", 0) if section is not yaml_config else 0
    tokenizer = LlamaTokenizer(resolve_path(config.vocab_file, "train_dataset.vocab_file"))
    common = dict(tokenizer=tokenizer, batch_size=batch_size, parallel_context=parallel_context,
                  max_txt_len=config.max_txt_len, image_tokens=config.image_tokens,
                  image_size=config.image_size, transform=config.transform, end_sym=config.end_sym,
                  seed=seed or 0)
    if kind == "MiniGPT4Stage2Dataset":
        return MiniGPT4Stage2Dataset(resolve_path(config.data_dir, "train_dataset.data_dir"),
                                     resolve_path(config.prompt_path, "train_dataset.prompt_path"),
                                     prompt_template=config.prompt_template,
                                     iters_per_epoch=config.iters_per_epoch, **common)
    if not config.datasets:
        raise UserInputError(f"{where('train_dataset.datasets')}: expected a list of datasets "
                             f"(name, shards, sample_ratio), got {config.datasets!r}")
    sources = []
    for number, entry in enumerate(config.datasets):
        if not hasattr(entry, "get"):
            raise UserInputError(f"{where('train_dataset.datasets')}: entry {number} must be a mapping with "
                                 f"name, shards and sample_ratio, got {entry!r}")
        fields = WebDatasetSourceConfig.from_dict(entry, f"train_dataset.datasets[{number}]", source)
        if fields.name is None or fields.shards is None:
            raise UserInputError(f"{where('train_dataset.datasets')}: entry {number} needs name and shards")
        sources.append(WebDatasetSource(fields.name, repo_path(fields.shards), fields.sample_ratio))
    return MiniGPT4Stage1Dataset(sources, iters_per_epoch=config.iters_per_epoch, **common)
