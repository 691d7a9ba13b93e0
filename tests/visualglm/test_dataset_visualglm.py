"""Fine-tuning samples and loaders: upstream FewShotDataset's layout, truncation, dataset.json
and COCO readers, index mapping, deterministic shuffle, lazy decoding and bad-input errors."""
import dataclasses
import json
import os
import random
import re

import numpy as np
import pytest
from PIL import Image

from research.common.config import REPO_ROOT, load_config
from research.common.errors import UserInputError
from research.common.image_processing import BlipImageProcessor
from research.visualglm import dataset_visualglm
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.dataset_visualglm import (
    COLUMNS, CocoCaptionsDataLoader, VisualGLMDataLoader, build_train_dataset, build_training_sample,
    to_generator_dataset)
from research.visualglm.processing_visualglm import VisualGLMProcessor
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer

PAD, MASK, GMASK, SOP, EOP = 3, 4, 5, 8, 9
IMAGE_SIZE = 28
PROMPT = "图片里有什么形状？"
LABEL = "图片里有一个红色的圆形。"
LORA_YAML = os.path.join(REPO_ROOT, "configs", "visualglm", "run_visualglm_lora.yaml")


@pytest.fixture(scope="module")
def tok(tiny_ice_text_model):
    return ChatGLMTokenizer(tiny_ice_text_model, max_length=128)


@pytest.fixture(scope="module")
def proc(tok):
    return VisualGLMProcessor(BlipImageProcessor(IMAGE_SIZE), tok, image_length=32)


@pytest.fixture(scope="module")
def cfg(tok):
    return GLMConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                     inner_hidden_size=128, seq_length=128, bos_token_id=SOP, eos_token_id=EOP,
                     mask_token_id=MASK, gmask_token_id=GMASK, pad_token_id=PAD)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False, max_length=10 ** 6)


def picture(seed=0, size=(20, 14)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_dataset(directory, rows, name="dataset.json"):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(rows, stream, ensure_ascii=False)
    return path


@pytest.fixture
def fewshot(tmp_path):
    """tmp/fewshot-data/{dataset.json, a.png, b.png}, rows using the three path styles."""
    folder = tmp_path / "fewshot-data"
    folder.mkdir()
    for index, name in enumerate(("a.png", "b.png", "c.png")):
        picture(index).save(folder / name)
    rows = [{"img": "a.png", "prompt": PROMPT, "label": LABEL},                    # json folder
            {"img": "fewshot-data/b.png", "prompt": "背景是什么？", "label": "背景是蓝色。"},  # upstream style
            {"img": str(folder / "c.png"), "prompt": "这是什么？", "label": "一只猫。"}]     # absolute
    return write_dataset(str(folder), rows), folder


# ---- one sample --------------------------------------------------------------------------------

def test_sample_layout_matches_upstream_fewshot(proc, tok, cfg):
    image = picture()
    sample = build_training_sample(proc, image, PROMPT, LABEL, 64, 32, cfg)
    before = encode(tok, "<img>")
    after = encode(tok, "</img>问：" + PROMPT + "\n答：")
    answer = encode(tok, LABEL)
    ids = before + [PAD] * 32 + after + [GMASK, SOP] + answer + [EOP]
    length = 64 + 32
    context = len(before) + 32 + len(after) + 1
    assert ids[context] == SOP

    assert set(sample) == set(COLUMNS)
    assert sample["input_ids"].dtype == np.int32 and sample["input_ids"].shape == (length,)
    assert sample["input_ids"].tolist() == ids + [PAD] * (length - len(ids))
    labels = sample["labels"]
    assert labels.dtype == np.int32
    assert labels[:context].tolist() == [-100] * context
    assert labels[context:len(ids)].tolist() == ids[context:]  # <sop>, answer, <eop>
    assert labels[len(ids):].tolist() == [-100] * (length - len(ids))
    # The prompt part is exactly what the processor gives chat() at inference time.
    prompt_ids, pre_image = proc.encode_prompt(PROMPT)
    assert sample["input_ids"][:context + 1].tolist() == prompt_ids and pre_image == len(before)
    # image_mask: exactly the 32 placeholders after "<img>".
    assert sample["image_mask"].dtype == np.int32
    assert np.flatnonzero(sample["image_mask"]).tolist() == list(range(len(before), len(before) + 32))
    # GLM 2D positions: 0..c-1, then the [gMASK] index; block positions 0, then 1, 2, ...
    positions = sample["position_ids"]
    assert positions.shape == (2, length) and positions.dtype == np.int32
    assert positions[0, :context].tolist() == list(range(context))
    assert (positions[0, context:] == context - 1).all()
    assert (positions[1, :context] == 0).all()
    assert positions[1, context:].tolist() == list(range(1, length - context + 1))
    mask = sample["attention_mask"]
    assert mask.shape == (1, length, length) and mask.dtype == np.float32
    assert (mask[0, :, :context] == 1).all()  # the prompt is seen by every position
    assert mask[0, context, context] == 1 and mask[0, context, context + 1] == 0  # causal answer
    expected_mask = np.tril(np.ones((length, length), np.float32))
    expected_mask[:, :context] = 1
    np.testing.assert_array_equal(mask[0], expected_mask)
    # The image is the processor's, float32 [3, S, S].
    assert sample["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and sample["image"].dtype == np.float32
    np.testing.assert_array_equal(sample["image"], proc.image_processor(image)[0])


def test_english_layout(proc, tok, cfg):
    sample = build_training_sample(proc, picture(), "What is it?", "A cat.", 64, 32, cfg, english=True)
    after = encode(tok, "</img>Q:What is it?\nA:")
    start = len(encode(tok, "<img>")) + 32
    assert sample["input_ids"][start:start + len(after)].tolist() == after


def test_truncation_keeps_image_span_and_cuts_text(proc, tok, cfg):
    prefix = len(encode(tok, "<img>")) + 32
    long_prompt = "这张图片的背景里有什么内容？" * 10
    long_label = "这是一张照片，照片中间有红色的猫。" * 10
    max_source, max_target = prefix + 4, 10
    sample = build_training_sample(proc, picture(), long_prompt, long_label, max_source, max_target, cfg)
    ids = sample["input_ids"].tolist()
    full_a = encode(tok, "<img>") + [PAD] * 32 + encode(tok, "</img>问：" + long_prompt + "\n答：")
    a_ids = full_a[:max_source - 1]
    b_ids = encode(tok, long_label)[:max_target - 2]
    assert ids == a_ids + [GMASK, SOP] + b_ids + [EOP]  # fills max_source + max_target exactly
    assert len(ids) == max_source + max_target
    assert ids[prefix:max_source - 1] == full_a[prefix:prefix + 3]  # 3 text tokens survive
    assert np.flatnonzero(sample["image_mask"]).tolist() == list(range(prefix - 32, prefix))
    assert all(ids[i] == PAD for i in range(prefix - 32, prefix))
    assert sample["labels"].tolist()[-1] == EOP and (sample["labels"] != -100).sum() == max_target - 2 + 2


def test_too_small_lengths_are_user_errors(proc, tok, cfg):
    prefix = len(encode(tok, "<img>")) + 32
    with pytest.raises(UserInputError, match=rf"max_source_length {prefix} is too small.*at least {prefix + 1}"):
        build_training_sample(proc, picture(), PROMPT, LABEL, prefix, 32, cfg)
    build_training_sample(proc, picture(), PROMPT, LABEL, prefix + 1, 32, cfg)  # smallest that works
    with pytest.raises(UserInputError, match="max_target_length must be at least 2"):
        build_training_sample(proc, picture(), PROMPT, LABEL, 64, 1, cfg)
    with pytest.raises(UserInputError, match="exceeds the model's text_config.seq_length 128"):
        build_training_sample(proc, picture(), PROMPT, LABEL, 64, 65, cfg)


def test_tokenizer_and_config_must_agree(proc, cfg):
    with pytest.raises(UserInputError, match="bos_token_id: text_config 130004 vs tokenizer 8"):
        VisualGLMDataLoader("unused.json", proc, 64, 32, GLMConfig())
    small = dataclasses.replace(cfg, vocab_size=100)
    with pytest.raises(UserInputError, match="outside the embedding table"):
        dataset_visualglm.check_special_ids(proc.tokenizer, small)


# ---- dataset.json --------------------------------------------------------------------------------

def test_dataset_json_relative_parent_and_absolute_paths(fewshot, proc, cfg):
    path, folder = fewshot
    loader = VisualGLMDataLoader(path, proc, 64, 32, cfg)
    assert len(loader) == 3 and loader.columns == COLUMNS
    assert [row[0] for row in loader.rows] == [str(folder / n) for n in ("a.png", "b.png", "c.png")]
    sample = loader[1]
    expected = build_training_sample(proc, Image.open(folder / "b.png"), "背景是什么？", "背景是蓝色。", 64, 32, cfg)
    for name in COLUMNS:
        np.testing.assert_array_equal(sample[name], expected[name])
    # A folder works as dataset_dir too (its dataset.json).
    assert len(VisualGLMDataLoader(str(folder), proc, 64, 32, cfg)) == 3
    with pytest.raises(IndexError):
        loader[3]


def test_custom_column_names(tmp_path, proc, cfg):
    picture().save(tmp_path / "x.png")
    path = write_dataset(str(tmp_path), [{"image": "x.png", "q": "问题", "a": "回答"}])
    loader = VisualGLMDataLoader(path, proc, 64, 32, cfg, column_names=["image", "q", "a"])
    assert loader.rows == [(str(tmp_path / "x.png"), "问题", "回答")]


def test_random_mapping_scale_mirrors_mindformers(fewshot, proc, cfg):
    path, _ = fewshot
    loader = VisualGLMDataLoader(path, proc, 64, 32, cfg, random_mapping=True, scale=4)
    assert len(loader) == 12

    def mindformers_row(index, rows=3):  # SFTRandomMappingDataSet.__getitem__
        draw = random.Random(index)
        return np.random.RandomState(seed=[draw.randint(0, 2 ** 32 - 1) for _ in range(16)]).randint(rows)

    mapping = [loader.row_index(i) for i in range(12)]
    assert mapping == [mindformers_row(i) for i in range(12)]
    assert set(mapping) <= {0, 1, 2} and len(set(mapping)) > 1
    assert loader.row(5)[0] == mapping[5]
    plain = VisualGLMDataLoader(path, proc, 64, 32, cfg)
    assert len(plain) == 3 and [plain.row_index(i) for i in range(3)] == [0, 1, 2]
    with pytest.raises(UserInputError, match="scale only enlarges the dataset with random_mapping"):
        VisualGLMDataLoader(path, proc, 64, 32, cfg, scale=2)


def test_shuffle_order_is_deterministic_per_epoch(fewshot, proc, cfg):
    path, _ = fewshot
    make = lambda seed: VisualGLMDataLoader(path, proc, 64, 32, cfg, shuffle=True, seed=seed,
                                            random_mapping=True, scale=20)
    first, again = make(7), make(7)
    epochs = [first.order(epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(60)) for order in epochs)
    assert epochs == [again.order(epoch) for epoch in range(3)]  # a resumed run sees the same order
    assert epochs[0] != epochs[1] != epochs[2]
    assert make(8).order(0) != epochs[0]
    assert VisualGLMDataLoader(path, proc, 64, 32, cfg).order(5) == [0, 1, 2]


def test_images_are_decoded_lazily(fewshot, proc, cfg, monkeypatch):
    path, folder = fewshot
    calls = []

    def spy(image_path):
        calls.append(image_path)
        return Image.open(image_path).convert("RGB")

    monkeypatch.setattr(dataset_visualglm, "load_image", spy)
    loader = VisualGLMDataLoader(path, proc, 64, 32, cfg)
    assert calls == []
    loader[2]
    assert calls == [str(folder / "c.png")]


def test_undecodable_images_are_refused_before_training_naming_their_rows(tmp_path, proc, cfg):
    """Issue #12: a broken image stops the run when the dataset is built, not at the step that
    first draws it; a JPEG cut short is caught too (the check reads every byte)."""
    picture().save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    picture().save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    rows = [{"img": name, "prompt": "p", "label": "l"} for name in ("good.png", "bad.png", "whole.jpg", "cut.jpg")]
    path = write_dataset(str(tmp_path), rows)
    with pytest.raises(UserInputError) as caught:
        VisualGLMDataLoader(path, proc, 64, 32, cfg)
    message = str(caught.value)
    assert "2 problem(s) in 4 rows" in message
    assert re.search(r"row 1: image .*bad.png.* not an image", message)
    assert re.search(r"row 3: image .*cut.jpg.* truncated or corrupt", message)
    assert "row 0" not in message and "row 2" not in message


@pytest.mark.parametrize("rows, message", [
    ([{"img": "a.png", "prompt": "p", "label": "l"}, {"img": "missing.png", "prompt": "p", "label": "l"}],
     r"row 1: image 'missing.png' not found \(looked for .*missing.png"),
    ([{"img": "a.png", "prompt": "p", "label": "l"}, ["a.png", "p", "l"]],
     r"row 1: expected an object with fields \['img', 'prompt', 'label'\], got list"),
    ([{"img": "a.png", "prompt": "p"}], r"row 0: field 'label' is missing"),
    ([{"img": "a.png", "prompt": 3, "label": "l"}], r"row 0: field 'prompt' must be a string, got int"),
    ([{"img": "a.png", "prompt": "p <sop> q", "label": "l"}], r"row 0: field 'prompt' contains the special token"),
    ([], r"dataset.json: the dataset contains no samples"),
    ({"img": "a.png"}, r"expected a JSON list .* got a JSON dict"),
])
def test_bad_dataset_json(tmp_path, proc, cfg, rows, message):
    picture().save(tmp_path / "a.png")
    path = write_dataset(str(tmp_path), rows)
    with pytest.raises(UserInputError, match=message):
        VisualGLMDataLoader(path, proc, 64, 32, cfg)


def test_every_bad_row_is_reported(tmp_path, proc, cfg):
    rows = [{"img": f"missing{i}.png", "prompt": "p", "label": "l"} for i in range(8)]
    with pytest.raises(UserInputError, match=r"(?s)8 problem\(s\) in 8 rows.*row 0.*row 4.*and 3 more") as err:
        VisualGLMDataLoader(write_dataset(str(tmp_path), rows), proc, 64, 32, cfg)
    assert "row 5" not in str(err.value)


def test_malformed_json_names_file_and_line(tmp_path, proc, cfg):
    path = tmp_path / "dataset.json"
    path.write_text('[\n {"img": "a.png", "prompt": "p", "label": "l"},\n {"img": oops}\n]\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=rf"{path}:3:\d+: the dataset is not valid JSON"):
        VisualGLMDataLoader(str(path), proc, 64, 32, cfg)


def test_missing_dataset_and_bad_fields(tmp_path, proc, cfg):
    with pytest.raises(UserInputError, match="dataset_dir: .*nowhere.json does not exist"):
        VisualGLMDataLoader(str(tmp_path / "nowhere.json"), proc, 64, 32, cfg)
    picture().save(tmp_path / "a.png")
    path = write_dataset(str(tmp_path), [{"img": "a.png", "prompt": "p", "label": "l"}])
    with pytest.raises(UserInputError, match="unknown data_loader fields \\['colour'\\]"):
        VisualGLMDataLoader(path, proc, 64, 32, cfg, colour="red")
    with pytest.raises(UserInputError, match="file_format 'json'"):
        VisualGLMDataLoader(path, proc, 64, 32, cfg, file_format="parquet")
    with pytest.raises(UserInputError, match="shuffle must be True or False"):
        VisualGLMDataLoader(path, proc, 64, 32, cfg, shuffle="yes")


# ---- COCO ------------------------------------------------------------------------------------------

def make_coco(root, captions=None, images=("000000000009.jpg", "000000000025.jpg")):
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "train2017"))
    for index, name in enumerate(images):
        picture(index).save(os.path.join(root, "train2017", name), format="JPEG")
    data = {"images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
            "annotations": captions if captions is not None else [
                {"image_id": 9, "id": 1, "caption": "A plate of food. "},
                {"image_id": 25, "id": 2, "caption": "A giraffe eating leaves."},
                {"image_id": 9, "id": 3, "caption": "Broccoli and meat on a plate."}]}
    with open(os.path.join(root, "annotations", "captions_train2017.json"), "w", encoding="utf-8") as stream:
        json.dump(data, stream)


def test_coco_captions_one_sample_per_caption(tmp_path, proc, tok, cfg):
    make_coco(str(tmp_path))
    loader = CocoCaptionsDataLoader(str(tmp_path), proc, 80, 32, cfg)
    assert len(loader) == 3
    assert [(os.path.basename(p), q, a) for p, q, a in loader.rows] == [
        ("000000000009.jpg", "What's in the image?", "A plate of food."),
        ("000000000025.jpg", "What's in the image?", "A giraffe eating leaves."),
        ("000000000009.jpg", "What's in the image?", "Broccoli and meat on a plate.")]
    sample = loader[1]
    start = len(encode(tok, "<img>")) + 32
    after = encode(tok, "</img>Q:What's in the image?\nA:")
    assert sample["input_ids"][start:start + len(after)].tolist() == after
    answer = encode(tok, "A giraffe eating leaves.")
    context = start + len(after) + 1
    assert sample["labels"][context + 1:context + 1 + len(answer)].tolist() == answer
    assert len(CocoCaptionsDataLoader(str(tmp_path), proc, 64, 32, cfg, max_samples=2)) == 2


def test_coco_bad_inputs(tmp_path, proc, cfg):
    make_coco(str(tmp_path / "missing"), images=("000000000009.jpg",))
    with pytest.raises(UserInputError, match=r"annotations\[1\]: image .*000000000025.jpg' not found"):
        CocoCaptionsDataLoader(str(tmp_path / "missing"), proc, 64, 32, cfg)
    make_coco(str(tmp_path / "bad"), captions=[{"image_id": 7, "caption": "x"}, {"image_id": 9}])
    with pytest.raises(UserInputError, match=r"(?s)annotations\[0\]: image_id 7 is not in 'images'.*"
                                             r"annotations\[1\]: field 'caption' is missing"):
        CocoCaptionsDataLoader(str(tmp_path / "bad"), proc, 64, 32, cfg)
    with pytest.raises(UserInputError, match="captions_val2017.json does not exist"):
        CocoCaptionsDataLoader(str(tmp_path / "bad"), proc, 64, 32, cfg, split="val2017")


# ---- YAML and MindSpore ------------------------------------------------------------------------------

def test_build_train_dataset_from_the_lora_yaml(fewshot, proc, cfg):
    path, _ = fewshot
    config = load_config(LORA_YAML)
    config.train_dataset.data_loader.dataset_dir = path
    config.train_dataset.max_target_length = 32
    loader = build_train_dataset(config, proc, cfg)
    assert isinstance(loader, VisualGLMDataLoader)
    assert len(loader) == 3 * 4  # random_mapping True, scale 4 in the YAML
    assert (loader.max_source_length, loader.max_target_length, loader.seq_length) == (64, 32, 96)
    assert loader[0]["input_ids"].shape == (96,)

    config.train_dataset.max_target_length = 256  # 64 + 256 > seq_length 128
    with pytest.raises(UserInputError, match="exceeds the model's text_config.seq_length 128"):
        build_train_dataset(config, proc, cfg)
    del config.train_dataset["max_source_length"]
    del config.train_dataset.data_loader["type"]
    with pytest.raises(UserInputError, match=r"missing config field\(s\): train_dataset.max_source_length, "
                                             r"train_dataset.data_loader.type"):
        build_train_dataset(config, proc, cfg)
    with pytest.raises(UserInputError, match="no train_dataset section"):
        build_train_dataset({"seed": 0}, proc, cfg)


def test_build_train_dataset_unknown_loader_type(fewshot, proc, cfg):
    path, _ = fewshot
    section = {"data_loader": {"type": "NoSuchLoader", "dataset_dir": path},
               "max_source_length": 64, "max_target_length": 32}
    with pytest.raises(UserInputError, match="unknown dataset_loader type 'NoSuchLoader'"):
        build_train_dataset(section, proc, cfg)


def test_generator_dataset_batches(fewshot, proc, cfg):
    path, _ = fewshot
    loader = VisualGLMDataLoader(path, proc, 64, 32, cfg, shuffle=True, seed=3)
    dataset = to_generator_dataset(loader, batch_size=2, drop_remainder=False, epoch=1)
    batches = list(dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    assert [b["input_ids"].shape for b in batches] == [(2, 96), (1, 96)]
    assert batches[0]["attention_mask"].shape == (2, 1, 96, 96)
    assert batches[0]["position_ids"].shape == (2, 2, 96)
    expected = np.stack([loader[i]["input_ids"] for i in loader.order(1)[:2]])
    np.testing.assert_array_equal(batches[0]["input_ids"], expected)
