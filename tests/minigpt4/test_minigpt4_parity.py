"""MiniGPT-4 against transformers, from the four upstream files through our converter.

The oracle is transformers' Blip2ForConditionalGeneration with a LLaMA text model (tiny, every
weight random, norms included; `post_layernorm.eps` 1e-5 as LAVIS' ln_vision), which computes
MiniGPT-4's forward: EVA-ViT -> ln_vision -> Q-Former -> llama_proj (`language_projection`) ->
the 32 embeddings written over the `image_token_index` placeholders. tests/minigpt4/upstream_files.py
writes its weights as the four files a MiniGPT-4 user has (LAVIS / MiniGPT-4 key names); they go
through convert_minigpt4 and load into MiniGPT4 from the YAML-style config paths. The Llama-2
variant (no Q-Former, 4 patches merged per token) has its own torch reference from transformers'
parts. Also here: the 7B/13B/Llama-2 parameter counts against transformers' models built on the
meta device, and the converter's refusals (missing, foreign and wrong-variant files).
"""
import copy
import dataclasses
import os

import numpy as np
import pytest
import torch
from mindspore import Tensor

from research.common.errors import UserInputError
from research.common.testing import EXAMPLE_IMAGE
from research.common.generation import GenerationConfig
from research.common.kv_cache import left_padded_positions_and_mask
from research.minigpt4.configuration_minigpt4 import MiniGPT4Config
from research.minigpt4.convert_minigpt4 import MiniGPT4Paths, convert_minigpt4
from research.minigpt4.modeling_minigpt4 import MiniGPT4
from tests.minigpt4 import upstream_files

LOGIT_TOLERANCE = 1e-4
NEW_TOKENS = 10
IMAGE_TOKEN = 5  # an ordinary id: the placeholders' own embeddings are overwritten
PAD = 0


def tiny(name):
    """A tiny preset: the sizes of configs/minigpt4/run_minigpt4{,_llama2}_tiny.yaml."""
    return MiniGPT4Config.from_name(name)


def convert(files, config, out_dir):
    paths = MiniGPT4Paths(eva_vit=files.eva_vit, blip2=files.blip2, vicuna=files.vicuna, minigpt4=files.minigpt4,
                          vit_out=str(out_dir / "vit.ckpt"),
                          qformer_out=str(out_dir / "qformer.ckpt") if files.blip2 else None,
                          llama_out=str(out_dir / "llama.ckpt"), proj_out=str(out_dir / "proj.ckpt"))
    report = convert_minigpt4(paths, config)
    config = copy.deepcopy(config)
    config.vision_config.checkpoint_name_or_path = paths.vit_out
    if files.blip2:
        config.qformer_config.checkpoint_name_or_path = paths.qformer_out
    config.text_config.checkpoint_name_or_path = paths.llama_out
    config.checkpoint_name_or_path = paths.proj_out
    return config, report


def build(config):
    model = MiniGPT4(config)
    model.set_train(False)
    loaded = model.load_checkpoints()
    return model, loaded


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    """(files, converted config, model, conversion report) of the Vicuna (Q-Former) variant."""
    directory = tmp_path_factory.mktemp("minigpt4")
    config = tiny("minigpt4-tiny")
    files = upstream_files.write_upstream_files(str(directory / "upstream"), config.vision_config,
                                                config.qformer_config, config.text_config, seed=0)
    converted, report = convert(files, config, directory)
    model, loaded = build(converted)
    assert len(loaded) == 4
    return files, converted, model, report


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("minigpt4_llama2")
    config = tiny("minigpt4-llama2-tiny")
    files = upstream_files.write_llama2_variant_files(str(directory / "upstream"), config.vision_config,
                                                      config.text_config, seed=1)
    converted, _ = convert(files, config, directory)
    model, loaded = build(converted)
    assert len(loaded) == 3
    return files, converted, model


def images(count, seed, size=56):
    return np.random.RandomState(seed).randn(count, 3, size, size).astype(np.float32)


def prompt_rows(seed, before, after, image_tokens):
    """Rows of ids: bos + `before` random ids + the image placeholders + `after` random ids."""
    rng = np.random.RandomState(seed)
    rows, starts = [], []
    for pre, post in zip(before, after):
        head = [1] + rng.randint(6, 1000, size=pre).tolist()
        rows.append(head + [IMAGE_TOKEN] * image_tokens + rng.randint(6, 1000, size=post).tolist())
        starts.append(len(head))
    return rows, starts


def our_logits(model, rows, image_tokens, pixel_values):
    ids = np.asarray(rows, np.int32)
    position_ids, mask = left_padded_positions_and_mask(ids, [0] * len(rows))
    image_mask = (ids == IMAGE_TOKEN).astype(np.int32)
    assert (image_mask.sum(1) == image_tokens).all()
    return model(Tensor(ids), Tensor(position_ids), Tensor(mask), Tensor(pixel_values), Tensor(image_mask)).asnumpy()


def greedy(use_past=True, **overrides):
    return GenerationConfig(max_new_tokens=NEW_TOKENS, use_past=use_past, pad_token_id=PAD, eos_token_id=None,
                            **overrides)


# ---- parity ------------------------------------------------------------------------------------

def test_the_conversion_reads_four_files_and_writes_four_checkpoints(vicuna):
    _, config, _, report = vicuna
    assert report.num_input_files == 5  # eva, blip2, proj, two Vicuna shards
    labels = [out.label for out in report.outputs]
    assert labels == ["ViT", "ln_vision + Q-Former", "llama_proj", "LLaMA"]
    assert all(out.num_tensors > 0 for out in report.outputs)


def test_logits_match_the_blip2_llama_oracle(mode, vicuna):
    files, config, model, _ = vicuna
    rows, _ = prompt_rows(0, [7, 3], [5, 9], 32)
    pixels = images(2, 0)
    expected = upstream_files.reference_logits(files, pixels, np.asarray(rows), IMAGE_TOKEN)
    ours = our_logits(model, rows, 32, pixels)
    print(f"MiniGPT-4 max |dlogit| vs Blip2ForConditionalGeneration: {np.abs(ours - expected).max():.2g}")
    assert np.abs(ours - expected).max() < LOGIT_TOLERANCE
    # the image matters at and after its placeholders
    other = upstream_files.reference_logits(files, images(2, 1), np.asarray(rows), IMAGE_TOKEN)
    assert np.abs(other[:, -1] - expected[:, -1]).max() > 1e-2


@pytest.mark.parametrize("use_past", [True, False])
def test_greedy_tokens_match_the_oracle_with_and_without_cache(mode, use_past, vicuna):
    files, _, model, _ = vicuna
    rows, starts = prompt_rows(2, [6], [4], 32)
    pixels = images(1, 2)
    expected = upstream_files.reference_greedy(files, pixels, np.asarray(rows), IMAGE_TOKEN, NEW_TOKENS)
    assert len(set(expected[0])) > 3
    assert model.generate(rows, starts, pixels, greedy(use_past)) == expected


def test_the_llama2_variant_matches_its_reference(mode, llama2):
    files, config, model = llama2
    assert config.image_tokens == 4 and config.projection_width == 4 * 48
    rows, starts = prompt_rows(3, [5, 2], [3, 6], 4)
    pixels = images(2, 3)
    expected = upstream_files.reference_logits(files, pixels, np.asarray(rows), IMAGE_TOKEN)
    difference = np.abs(our_logits(model, rows, 4, pixels) - expected).max()
    print(f"Llama-2 variant max |dlogit|: {difference:.2g}")
    assert difference < LOGIT_TOLERANCE
    tokens = upstream_files.reference_greedy(files, pixels[:1], np.asarray(rows[:1]), IMAGE_TOKEN, NEW_TOKENS)
    assert model.generate(rows[:1], starts[:1], pixels[:1], greedy()) == tokens


def test_a_batch_of_images_and_prompts_equals_one_by_one_rows_stopping_apart(vicuna):
    """Three images and prompts of different lengths (left-padded in one batch) give each row's
    tokens alone, which are the oracle's. Then stop sequences, a one-token one (as "▁###", [835])
    and a two-token one (as "##" "#", [2277, 29937]), taken from the rows' own answers: each row
    ends right after the first one it produces, at different steps, as it would alone."""
    files, _, model, _ = vicuna
    rows, starts = prompt_rows(4, [3, 9, 6], [8, 2, 5], 32)
    pixels = images(3, 4)
    free = model.generate(rows, starts, pixels, greedy())
    assert free == [model.generate([r], [s], pixels[i:i + 1], greedy())[0] for i, (r, s) in enumerate(zip(rows, starts))]
    assert free == [upstream_files.reference_greedy(files, pixels[i:i + 1], np.asarray([r]), IMAGE_TOKEN,
                                                    NEW_TOKENS)[0] for i, r in enumerate(rows)]
    assert len({tuple(row) for row in free}) == 3

    stops = [(free[0][2],), tuple(free[1][5:7])]

    def end_of(ids):
        for end in range(1, len(ids) + 1):
            if any(tuple(ids[max(0, end - len(s)):end]) == s for s in stops):
                return end
        return len(ids)

    settings = greedy(stop_sequences=stops)
    stopped = model.generate(rows, starts, pixels, settings)
    ends = [end_of(ids) for ids in free]
    assert stopped == [ids[:end] for ids, end in zip(free, ends)]
    assert len(set(ends)) >= 2 and min(ends) < NEW_TOKENS
    assert stopped == [model.generate([r], [s], pixels[i:i + 1], settings)[0]
                       for i, (r, s) in enumerate(zip(rows, starts))]


# ---- sizes -------------------------------------------------------------------------------------

def meta_count(module_factory):
    with torch.device("meta"):
        module = module_factory()
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,expected", [("minigpt4-7b", 7_832_688_128), ("minigpt4-13b", 14_110_926_336),
                                           ("minigpt4-llama2-7b", 7_747_440_640)])
def test_presets_count_their_parameters_as_transformers_does(name, expected):
    """Counted from shapes here; transformers' Blip2ForConditionalGeneration (or, for the Llama-2
    variant, its vision model + the merge Linear + LlamaForCausalLM) built on the meta device
    has as many."""
    from transformers import Blip2ForConditionalGeneration, Blip2VisionModel
    from transformers import LlamaForCausalLM as HFLlamaForCausalLM

    config = MiniGPT4Config.from_name(name)
    assert config.parameter_count() == expected
    vision = upstream_files.hf_vision_config(config.vision_config)
    text = upstream_files.hf_llama_config(config.text_config)
    if config.has_qformer:
        from transformers import Blip2Config
        blip2 = Blip2Config.from_vision_qformer_text_configs(
            vision, upstream_files.hf_qformer_config(config.qformer_config), text, num_query_tokens=32)
        theirs = meta_count(lambda: Blip2ForConditionalGeneration(blip2))
    else:
        theirs = (meta_count(lambda: Blip2VisionModel(vision)) + meta_count(lambda: HFLlamaForCausalLM(text))
                  + (config.projection_width + 1) * config.text_config.hidden_size)
    assert theirs == expected
    print(f"{name}: {expected:,d} parameters")


# ---- the converter's refusals --------------------------------------------------------------------

def paths_of(files, out_dir, **changes):
    paths = MiniGPT4Paths(eva_vit=files.eva_vit, blip2=files.blip2, vicuna=files.vicuna, minigpt4=files.minigpt4,
                          vit_out=str(out_dir / "v.ckpt"), qformer_out=str(out_dir / "q.ckpt"),
                          llama_out=str(out_dir / "l.ckpt"), proj_out=str(out_dir / "p.ckpt"))
    return dataclasses.replace(paths, **changes)


def refused(files, config, out_dir, match, **changes):
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(UserInputError, match=match) as info:
        convert_minigpt4(paths_of(files, out_dir, **changes), config)
    assert os.listdir(out_dir) == [], "nothing may be written when a file is refused"
    return str(info.value)


def test_each_missing_file_is_named(vicuna, tmp_path):
    files, _, _, _ = vicuna
    config = tiny("minigpt4-tiny")
    for field in ("eva_vit", "blip2", "vicuna", "minigpt4"):
        missing = str(tmp_path / f"no_{field}.pth")
        message = refused(files, config, tmp_path / field, "not found", **{field: missing})
        assert missing in message


def test_foreign_files_say_what_they_should_be(vicuna, tmp_path):
    files, _, _, _ = vicuna
    config = tiny("minigpt4-tiny")
    assert "EVA-ViT-g" in refused(files, config, tmp_path / "a", "is not", eva_vit=files.blip2)
    assert "BLIP-2" in refused(files, config, tmp_path / "b", "is not", blip2=files.eva_vit)
    assert "MiniGPT-4 checkpoint" in refused(files, config, tmp_path / "c", "is not", minigpt4=files.eva_vit)
    assert "LLaMA" in refused(files, config, tmp_path / "d", "not a Hugging Face LLaMA", vicuna=files.eva_vit)
    refused(files, config, tmp_path / "d2", "holds no weights", vicuna=files.minigpt4)  # {'model': ...} wrapped
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "state.pth")
    refused(files, config, tmp_path / "e", "holds no weights", minigpt4=str(tmp_path / "state.pth"))


def test_a_llama_proj_of_another_variant_says_which_model_it_is_for(vicuna, tmp_path):
    files, _, _, _ = vicuna
    for name, shape, variant in (("13b", (5120, 768), "minigpt4-13b"), ("llama2", (4096, 5632), "minigpt4-llama2-7b"),
                                 ("7b", (4096, 768), "minigpt4-7b")):
        path = tmp_path / f"pretrained_minigpt4_{name}.pth"
        torch.save({"model": {"llama_proj.weight": torch.zeros(shape), "llama_proj.bias": torch.zeros(shape[0])}},
                   path)
        config = tiny("minigpt4-tiny")
        message = refused(files, config, tmp_path / name, "llama_proj.weight", minigpt4=str(path))
        assert f"it is for {variant}" in message and str(list(shape)) in message


def test_wrong_sizes_and_wrong_pairings_are_refused(vicuna, tmp_path):
    files, _, _, _ = vicuna
    deeper = tiny("minigpt4-tiny")
    deeper.vision_config.num_hidden_layers = 3
    refused(files, deeper, tmp_path / "a", "missing")
    wider = tiny("minigpt4-tiny")
    wider.text_config.vocab_size = 1100
    refused(files, wider, tmp_path / "b", "vocab_size: 1024")
    refused(files, tiny("minigpt4-llama2-tiny"), tmp_path / "c", "has no Q-Former")
    refused(files, tiny("minigpt4-tiny"), tmp_path / "d", "without", vit_out=None)


def test_convert_weight_then_run_minigpt4_from_the_yaml(vicuna, tmp_path, capsys):
    """The command lines a user runs: convert_weight.py on the four files, the tiny YAML pointed at
    the outputs, run_minigpt4.py answering with the oracle's greedy tokens (no stop: eos never
    comes up in 10 steps here, checked through the reference)."""
    import yaml
    from research.common.config import REPO_ROOT
    from research.minigpt4 import convert_weight, run_minigpt4

    files, _, _, _ = vicuna
    out = {name: str(tmp_path / f"{name}.ckpt") for name in ("vit", "qformer", "llama", "proj")}
    tiny_yaml = os.path.join(REPO_ROOT, "configs", "minigpt4", "run_minigpt4_tiny.yaml")
    convert_weight.main(["--config", tiny_yaml, "--eva_vit_path", files.eva_vit, "--vit_mindspore_path", out["vit"],
                         "--q_former_model", files.blip2, "--qformer_mindspore_path", out["qformer"],
                         "--llama_model", files.vicuna, "--llama_mindspore_path", out["llama"],
                         "--ckpt", files.minigpt4, "--proj_mindspore_path", out["proj"]])
    assert "converted in" in capsys.readouterr().out
    with open(tiny_yaml, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    model = config["model"]["model_config"]
    model["checkpoint_name_or_path"] = out["proj"]
    model["vision_config"]["checkpoint_name_or_path"] = out["vit"]
    model["qformer_config"]["checkpoint_name_or_path"] = out["qformer"]
    model["text_config"]["checkpoint_name_or_path"] = out["llama"]
    path = tmp_path / "converted.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    replies = run_minigpt4.main(["--config", str(path), "--image_path", EXAMPLE_IMAGE, "--prompt", "What is this?",
                                 "--max_new_tokens", "6"])
    assert "weights: ViT checkpoint, Q-Former checkpoint, LLaMA checkpoint, llama_proj checkpoint" in \
        capsys.readouterr().out
    chat_ids = [int(i) for i in replies[0].token_ids]
    # the same prompt through the oracle: the processor's ids with the placeholders as IMAGE_TOKEN
    from research.minigpt4.inference import load_minigpt4
    chat = load_minigpt4(str(path))
    ids, start = chat.processor.encode_prompt("What is this?")
    ids = ids[:start] + [IMAGE_TOKEN] * 32 + ids[start + 32:]
    pixels = chat.processor.image_processor([EXAMPLE_IMAGE])
    expected = upstream_files.reference_greedy(files, pixels, np.asarray([ids]), IMAGE_TOKEN, 6)[0]
    assert chat_ids == expected[:len(chat_ids)] and len(chat_ids) >= 1
