"""MiniGPT-4 training data on tiny tar shards and a tiny cc_sbu_align built here (tarfile, json,
PIL). Expected ids are written from the layout rules (notes/minigpt4.md §2.6: bos, image
placeholders, text + end_sym, -100 labels) with the tokenizer's encode of the literal strings."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from research.common.config import load_config
from research.common.errors import UserInputError
from research.common.image_processing import BlipImageTrainProcessor
from research.common.parallel import ParallelContext
from research.common.trainer import rank_batch_indices
from research.minigpt4.dataset_minigpt4 import (
    COLUMNS, MiniGPT4Stage1Dataset, MiniGPT4Stage2Dataset, WebDatasetSource, build_train_dataset, clean_caption)
from research.minigpt4.synthetic_data import ALIGNMENT_PROMPTS as PROMPTS
from research.minigpt4.synthetic_data import write_shard
from research.minigpt4.tokenization_minigpt4 import LlamaTokenizer

VOCAB = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny", "llama_tokenizer.model")
SIZE = 28  # a small image side keeps the tests fast; the layout does not depend on it


@pytest.fixture(scope="module")
def tok():
    return LlamaTokenizer(VOCAB)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def jpeg(number, size=(40, 30)):
    pixels = np.random.default_rng(number).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def caption_json(caption):
    return json.dumps({"caption": caption, "url": "http://example.com/x.jpg"}).encode()


def make_shards(folder, name, shards, per_shard, first=0):
    """`shards` shards of `per_shard` good samples; key = shard * 1000 + n, caption names it."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        samples = [(f"{first + shard:05d}{n:04d}", {"jpg": jpeg(shard * 1000 + n),
                                                   "json": caption_json(f"{name} shard {shard} n {n}"),
                                                   "txt": b"ignored"})
                   for n in range(per_shard)]
        write_shard(folder / f"{first + shard:05d}.tar", samples)
    return str(folder)


def stage1(sources, tok, **kwargs):
    kwargs = {"batch_size": 2, "iters_per_epoch": 3, "image_size": SIZE, **kwargs}
    return MiniGPT4Stage1Dataset(sources, tok, **kwargs)


# ---- captions and stage-1 samples --------------------------------------------------------------

def test_clean_caption_is_upstream_pre_caption():
    assert clean_caption("A Dog: on the (Bench)!  Really...\n") == "a dog on the bench really"
    assert clean_caption('"Quote"; x*y~z#w') == "quote x y z w"
    assert clean_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert clean_caption("one\ntwo") == "one\ntwo"  # a single newline inside is kept, as upstream


def test_stage1_sample_by_hand(tmp_path, tok):
    image = jpeg(7)
    write_shard(tmp_path / "00000.tar", [("000000007", {"jpg": image, "json": caption_json("A Dog: on the (Bench)!")})])
    data = stage1([WebDatasetSource("laion", str(tmp_path / "00000.tar"))], tok, batch_size=1, seed=5)
    assert data.columns == COLUMNS == ("image", "input_ids", "labels", "image_mask")
    sample = data[0]
    text = encode(tok, "a dog on the bench\n")
    length = 1 + 32 + 32
    pad = tok.pad_token_id
    assert data.seq_length == length
    assert sample["input_ids"].tolist() == [tok.bos_token_id] + [pad] * 32 + text + [pad] * (32 - len(text))
    assert sample["labels"].tolist() == [-100] * 33 + text + [-100] * (32 - len(text))
    assert sample["image_mask"].tolist() == [0] + [1] * 32 + [0] * 32
    assert {k: v.dtype for k, v in sample.items()} == {"image": np.float32, "input_ids": np.int32,
                                                       "labels": np.int32, "image_mask": np.int32}
    expected = BlipImageTrainProcessor(SIZE)(Image.open(io.BytesIO(image)), (5, 0, 0))
    np.testing.assert_array_equal(sample["image"], expected)
    assert sample["image"].shape == (3, SIZE, SIZE)


def test_stage1_caption_cut_at_max_txt_len(tmp_path, tok):
    caption = " ".join(["red square blue circle"] * 20)
    write_shard(tmp_path / "0.tar", [("k", {"jpg": jpeg(1), "json": caption_json(caption)})])
    data = stage1([WebDatasetSource("cc_sbu", str(tmp_path / "0.tar"))], tok, batch_size=1, max_txt_len=8,
                  image_tokens=4)
    sample = data[0]
    text = encode(tok, clean_caption(caption) + "\n")[:8]
    assert data.seq_length == 1 + 4 + 8
    assert sample["input_ids"].tolist() == [tok.bos_token_id] + [tok.pad_token_id] * 4 + text
    assert sample["labels"].tolist() == [-100] * 5 + text
    assert encode(tok, "\n")[-1] not in text[-1:]  # the cut text lost its "\n"


# ---- shards: skipped samples, patterns, folders, bad input -------------------------------------

def test_missing_json_and_corrupt_jpg_are_counted(tmp_path, tok, capsys):
    write_shard(tmp_path / "00000.tar", [("000000000", {"jpg": jpeg(0), "json": caption_json("a")}),
                                         ("000000001", {"jpg": jpeg(1), "txt": b"no json"})])
    write_shard(tmp_path / "00001.tar", [("000000016", {"jpg": jpeg(2), "json": caption_json("b")}),
                                         ("000000017", {"jpg": jpeg(3)[:200], "json": caption_json("c")}),
                                         ("000000018", {"jpg": jpeg(4), "json": caption_json("d")})])
    data = stage1([WebDatasetSource("laion", str(tmp_path))], tok)
    line = ("laion: 3 samples from 2 shards; skipped 2 (1 without json, 1 undecodable image: "
            "shard 00001.tar key 000000017)")
    assert data.summaries == [line]
    assert line in capsys.readouterr().err
    keys = sorted(data.sample_source(i)[2] for i in range(3))
    assert keys == ["000000000", "000000016", "000000018"]


def test_no_usable_samples_is_an_error_naming_the_pattern(tmp_path, tok):
    write_shard(tmp_path / "00000.tar", [("a", {"jpg": jpeg(0)}), ("b", {"jpg": b"not a jpeg", "json": caption_json("x")})])
    with pytest.raises(UserInputError, match=r"no usable samples in .*00000\.tar': laion: 0 samples from 1 shard; "
                                             r"skipped 2 \(1 without json, 1 undecodable image"):
        stage1([WebDatasetSource("laion", str(tmp_path / "00000.tar"))], tok)


def test_brace_patterns_and_folders_give_the_same_samples(tmp_path, tok):
    folder = make_shards(tmp_path / "laion", "laion", shards=3, per_shard=2)
    by_folder = stage1([WebDatasetSource("laion", folder)], tok)
    by_pattern = stage1([WebDatasetSource("laion", folder + "/{00000..00002}.tar")], tok)
    assert by_folder.summaries == by_pattern.summaries == ["laion: 6 samples from 3 shards"]
    assert [by_folder.sample_source(i) for i in range(6)] == [by_pattern.sample_source(i) for i in range(6)]
    partial = stage1([WebDatasetSource("laion", folder + "/{00001..00002}.tar")], tok)
    assert partial.summaries == ["laion: 4 samples from 2 shards"]


def test_bad_shard_lists_name_the_pattern(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"laion: the folder .*empty holds no \.tar shards"):
        stage1([WebDatasetSource("laion", str(tmp_path / "empty"))], tok)
    make_shards(tmp_path / "some", "x", shards=2, per_shard=1)
    pattern = str(tmp_path / "some" / "{00000..00003}.tar")
    with pytest.raises(UserInputError, match=r"laion: 2 of the 4 shards of .*\{00000\.\.00003\}\.tar.* do not "
                                             r"exist: .*00002\.tar, .*00003\.tar"):
        stage1([WebDatasetSource("laion", pattern)], tok)
    with pytest.raises(UserInputError, match="needs a name"):
        WebDatasetSource("", pattern)
    with pytest.raises(UserInputError, match="sample_ratio must be a positive number"):
        WebDatasetSource("laion", pattern, 0)
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(UserInputError, match=r"laion: cannot read the shard .*broken\.tar"):
        stage1([WebDatasetSource("laion", str(tmp_path / "broken.tar"))], tok)


# ---- stage-1 order: mixing, ranks, determinism -----------------------------------------------

@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    return [WebDatasetSource("laion", make_shards(root / "laion", "laion", shards=4, per_shard=3), 115),
            WebDatasetSource("cc_sbu", make_shards(root / "cc_sbu", "cc_sbu", shards=2, per_shard=3), 14)]


def test_mixing_is_115_to_14_one_dataset_per_global_batch(two_sources, tok):
    data = stage1(two_sources, tok, iters_per_epoch=20000)
    draws = data.dataset_draws(0)
    assert abs(np.mean(draws == 0) - 115 / 129) < 0.01  # 3 sigma is about 0.0066
    small = stage1(two_sources, tok, iters_per_epoch=40, batch_size=3)
    order = small.order(0).reshape(40, 3)
    draws = small.dataset_draws(0)
    assert set(draws) == {0, 1}
    for batch, row in enumerate(order):
        names = {small.sample_source(int(i))[0] for i in row}
        assert names == {two_sources[draws[batch]].name}


def test_each_rank_reads_its_own_shards(two_sources, tok, capsys):
    seen = {}
    for rank in range(2):
        context = ParallelContext(rank=rank, world_size=2)
        data = stage1(two_sources, tok, iters_per_epoch=12, batch_size=2, parallel_context=context)
        order = data.order(0)
        assert len(order) == len(data) == 12 * 4
        paths = set()
        for position in range(12):
            rows = rank_batch_indices(order, position, 2, context)
            paths |= {data.sample_source(int(i))[1] for i in rows}
            others = rank_batch_indices(order, position, 2, ParallelContext(rank=1 - rank, world_size=2))
            assert (others == -1).all()
        seen[rank] = {os.path.basename(p) for p in paths}
    assert seen[0] <= {"00000.tar", "00002.tar"} and seen[1] <= {"00001.tar", "00003.tar"}
    assert "rank 1 of 2: laion: 6 samples from 2 shards" in capsys.readouterr().err
    with pytest.raises(UserInputError, match=r"cc_sbu: 2 shards in .* for 3 ranks; .* at least one shard per rank"):
        stage1(two_sources, tok, parallel_context=ParallelContext(rank=0, world_size=3))


def test_order_and_samples_repeat_in_a_fresh_object(two_sources, tok):
    first = stage1(two_sources, tok, iters_per_epoch=8)
    order = first.order(1)
    samples = [first[int(i)] for i in order[:4]]
    fresh = stage1(two_sources, tok, iters_per_epoch=8)
    np.testing.assert_array_equal(fresh.order(1), order)
    for index, sample in zip(order[:4], samples):
        for column in COLUMNS:
            np.testing.assert_array_equal(fresh[int(index)][column], sample[column])
    assert not np.array_equal(fresh.order(2), order)
    other_epoch = fresh[int(order[0])]["image"]
    assert not np.array_equal(other_epoch, samples[0]["image"])  # the crop is seeded by the epoch too
    # every sample of a dataset is used before any repeats (6 cc_sbu, 12 laion samples here)
    laion = [int(i) for i in stage1(two_sources, tok, iters_per_epoch=60).order(0)
             if first.sample_source(int(i))[0] == "laion"]
    assert sorted(laion[:12]) == sorted(set(laion[:12]))


# ---- stage 2 -----------------------------------------------------------------------------------

def make_align(root, captions, prompts=PROMPTS[:1]):
    """A tiny cc_sbu_align: filter_cap.json, image/{id}.jpg (ids not contiguous) and a prompt file."""
    (root / "image").mkdir(parents=True)
    notes = []
    for number, caption in enumerate(captions):
        image_id = str(2 * number + 2)
        (root / "image" / f"{image_id}.jpg").write_bytes(jpeg(100 + number))
        notes.append({"image_id": image_id, "caption": caption})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": notes}))
    (root / "alignment.txt").write_text("\n".join(prompts) + "\n")
    return str(root), str(root / "alignment.txt")


def stage2(data_dir, prompt_path, tok, **kwargs):
    return MiniGPT4Stage2Dataset(data_dir, prompt_path, tok, **{"batch_size": 1, "image_size": SIZE, **kwargs})


def test_stage2_sample_by_hand(tmp_path, tok):
    caption = "The image shows a Red Square."  # used raw: no cleaning
    data_dir, prompts = make_align(tmp_path, [caption])
    data = stage2(data_dir, prompts, tok, seed=3)
    before = encode(tok, "###Human: <Img>")
    after = encode(tok, "</Img> Describe this image in detail. ###Assistant: ")
    answer = encode(tok, caption + "###")
    pad = tok.pad_token_id
    assert data.seq_length == 1 + len(before) + 32 + len(after) + 160
    sample = data[0]
    prompt = [tok.bos_token_id] + before + [pad] * 32 + after
    padding = data.seq_length - len(prompt) - len(answer)
    assert sample["input_ids"].tolist() == prompt + answer + [pad] * padding
    assert sample["labels"].tolist() == [-100] * len(prompt) + answer + [-100] * padding
    assert sample["image_mask"].tolist() == ([0] * (1 + len(before)) + [1] * 32
                                             + [0] * (len(after) + len(answer) + padding))
    expected = BlipImageTrainProcessor(SIZE)(os.path.join(data_dir, "image", "2.jpg"), (3, 0, 0))
    np.testing.assert_array_equal(sample["image"], expected)


def test_stage2_cut_answer_loses_its_end_sym_and_llama2_layout(tmp_path, tok):
    caption = " ".join(["A red square next to a blue circle."] * 10)
    data_dir, prompts = make_align(tmp_path, [caption])
    data = stage2(data_dir, prompts, tok, max_txt_len=12)
    answer = encode(tok, caption + "###")
    sample = data[0]
    kept = sample["labels"][sample["labels"] != -100].tolist()
    assert kept == answer[:12] and encode(tok, "###")[-1] not in kept
    llama2 = stage2(data_dir, prompts, tok, prompt_template="[INST] {} [/INST] ", end_sym="</s>", image_tokens=64)
    sample = llama2[0]
    before, after = encode(tok, "[INST] <Img>"), encode(tok, "</Img> Describe this image in detail. [/INST] ")
    answer = encode(tok, caption) + [tok.eos_token_id]  # "</s>" = eos = pad, still a label
    assert sample["labels"][sample["labels"] != -100].tolist() == answer
    assert sample["input_ids"][:1 + len(before)].tolist() == [tok.bos_token_id] + before
    assert sample["image_mask"].sum() == 64 and llama2.seq_length == 1 + len(before) + 64 + len(after) + 160


def test_stage2_one_prompt_per_global_batch(tmp_path, tok):
    data_dir, prompts = make_align(tmp_path, [f"Caption {n}." for n in range(24)], PROMPTS)
    data = stage2(data_dir, prompts, tok, batch_size=2, parallel_context=ParallelContext(rank=1, world_size=2))
    order = data.order(0)
    assert sorted(order) == list(range(24))
    per_batch = [{data.prompt_of(int(i)) for i in order[b * 4:(b + 1) * 4]} for b in range(6)]
    assert all(len(drawn) == 1 for drawn in per_batch)
    assert len(set.union(*per_batch)) > 1
    for index in order[:4]:  # the prompt in the ids is the drawn one
        sample = data[int(index)]
        _, after = data.prompt_of(int(index)).split("<ImageHere>")
        start = int(np.flatnonzero(sample["image_mask"])[-1]) + 1
        assert sample["input_ids"][start:start + len(encode(tok, after))].tolist() == encode(tok, after)
    fresh = stage2(data_dir, prompts, tok, batch_size=2, parallel_context=ParallelContext(rank=1, world_size=2))
    fresh.order(1)
    np.testing.assert_array_equal(fresh.order(0), order)
    assert [fresh.prompt_of(int(i)) for i in order] == [data.prompt_of(int(i)) for i in order]


def test_stage2_iters_per_epoch_cycles_through_shuffled_passes(tmp_path, tok):
    """Upstream's stage 2 runs 200 iterations an epoch whatever the data's size: 5 annotations,
    global batches of 2, 4 iterations = 8 positions: one whole shuffled pass, then 3 of the next."""
    captions = [f"Caption {n}." for n in range(5)]
    data_dir, prompts = make_align(tmp_path, captions, PROMPTS)
    data = stage2(data_dir, prompts, tok, batch_size=2, iters_per_epoch=4)
    assert len(data) == 8 and data.order(0).tolist() == list(range(8))
    seen = [data.annotation_of(position)[1] for position in range(8)]
    assert sorted(seen[:5]) == captions and len(set(seen[5:])) == 3
    assert [data.prompt_of(p) for p in (0, 2, 4, 6)] == [data.prompt_of(p) for p in (1, 3, 5, 7)]
    fresh = stage2(data_dir, prompts, tok, batch_size=2, iters_per_epoch=4)
    fresh.order(0)
    assert [fresh.annotation_of(p)[1] for p in range(8)] == seen
    np.testing.assert_array_equal(fresh[5]["input_ids"], data[5]["input_ids"])


def test_stage2_bad_inputs_name_the_file(tmp_path, tok):
    data_dir, prompts = make_align(tmp_path / "ok", ["A cat."])
    bad = tmp_path / "no_annotations"
    (bad / "image").mkdir(parents=True)
    (bad / "filter_cap.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserInputError, match=r"no_annotations/filter_cap\.json: .*no 'annotations' list"):
        stage2(str(bad), prompts, tok)
    os.remove(os.path.join(data_dir, "image", "2.jpg"))
    with pytest.raises(UserInputError, match=r"filter_cap\.json: annotations\[0\]: image_id '2' has no image: "
                                             r".*image/2\.jpg does not exist"):
        stage2(data_dir, prompts, tok)
    data_dir, prompts = make_align(tmp_path / "prompts", ["A cat."])
    with open(prompts, "a") as stream:
        stream.write("Describe this image.\n")
    with pytest.raises(UserInputError, match=r"alignment\.txt:2: no <ImageHere> in 'Describe this image\.'"):
        stage2(data_dir, prompts, tok)
    with pytest.raises(UserInputError, match="prompt_template must hold one '{}'"):
        stage2(data_dir, prompts, tok, prompt_template="###Human: ###Assistant: ")
    with open(prompts, "w") as stream:
        stream.write("\n")
    with pytest.raises(UserInputError, match=r"alignment\.txt: the prompt file holds no prompts"):
        stage2(data_dir, prompts, tok)


# ---- from the YAML -----------------------------------------------------------------------------

def test_build_from_yaml_and_unknown_fields(two_sources, tmp_path, tok):
    data_dir, prompts = make_align(tmp_path / "align", ["A cat."])
    path = tmp_path / "stage2.yaml"
    path.write_text(f"seed: 4\ntrain_dataset:\n  type: MiniGPT4Stage2Dataset\n  data_dir: {data_dir}\n"
                    f"  prompt_path: {prompts}\n  vocab_file: {os.path.abspath(VOCAB)}\n  image_size: {SIZE}\n"
                    f"  transform: resize\n  batch_size: 1\n")
    data = build_train_dataset(load_config(str(path)), batch_size=1)
    assert isinstance(data, MiniGPT4Stage2Dataset) and data.seed == 4 and data.max_txt_len == 160
    assert data.image_processor.transform == "resize" and data.end_sym == "###"
    path.write_text(path.read_text() + "  max_text_len: 20\n")
    with pytest.raises(UserInputError, match=r"stage2\.yaml:10: train_dataset\.max_text_len: unknown field"):
        build_train_dataset(load_config(str(path)), batch_size=1)
    section = {"type": "MiniGPT4Stage1Dataset", "vocab_file": os.path.abspath(VOCAB), "iters_per_epoch": 5,
               "image_size": SIZE, "datasets": [{"name": s.name, "shards": s.shards, "sample_ratio": s.sample_ratio}
                                               for s in two_sources]}
    data = build_train_dataset(section, batch_size=2)
    assert isinstance(data, MiniGPT4Stage1Dataset) and len(data) == 10 and data.seq_length == 65
    section["datasets"][0]["weight"] = 2
    with pytest.raises(UserInputError, match=r"train_dataset\.datasets\[0\]\.weight: unknown field"):
        build_train_dataset(section, batch_size=2)
    del section["datasets"][0]["weight"], section["iters_per_epoch"]
    with pytest.raises(UserInputError, match="MiniGPT4Stage1Dataset needs iters_per_epoch"):
        build_train_dataset(section, batch_size=2)
