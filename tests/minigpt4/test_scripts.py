"""run_minigpt4.py and cli_demo.py on the tiny presets, the shipped YAMLs against the presets, and
bad input (exit code 2 with a one-line message naming the problem)."""
import dataclasses
import io
import os

import numpy as np
import pytest
import yaml

from research.common.config import REPO_ROOT
from research.common.testing import EXAMPLE_IMAGE, images_in_every_mode
from research.minigpt4 import cli_demo, run_minigpt4
from research.minigpt4.configuration_minigpt4 import MINIGPT4_PRESETS, load_minigpt4_config
from research.minigpt4.inference import load_minigpt4

CONFIGS = os.path.join(REPO_ROOT, "configs", "minigpt4")
TINY = os.path.join(CONFIGS, "run_minigpt4_tiny.yaml")
FAST = ["--max_new_tokens", "5"]
YAML_PRESETS = {"run_minigpt4_7b.yaml": "minigpt4-7b", "run_minigpt4_13b.yaml": "minigpt4-13b",
                "run_minigpt4_llama2_7b.yaml": "minigpt4-llama2-7b", "run_minigpt4_tiny.yaml": "minigpt4-tiny",
                "run_minigpt4_llama2_tiny.yaml": "minigpt4-llama2-tiny",
                "minigpt4_stage1_pretrain.yaml": "minigpt4-13b", "minigpt4_stage2_finetune.yaml": "minigpt4-13b",
                "minigpt4_7b_stage1_pretrain.yaml": "minigpt4-7b", "minigpt4_7b_stage2_finetune.yaml": "minigpt4-7b",
                "minigpt4_tiny_stage1_pretrain.yaml": "minigpt4-tiny",
                "minigpt4_tiny_stage2_finetune.yaml": "minigpt4-tiny"}
# Fields that are not architecture: where the weights are, precision, and decoding.
NOT_ARCHITECTURE = {"checkpoint_name_or_path", "param_init_type", "compute_dtype", "dtype", "use_past", "do_sample",
                    "top_k", "top_p", "temperature", "repetition_penalty", "max_decode_length"}


def architecture(config):
    """The config as a flat {field path: value} without NOT_ARCHITECTURE fields."""
    flat = {}

    def walk(values, prefix):
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif key not in NOT_ARCHITECTURE:
                flat[prefix + key] = value
    walk(config.to_dict(), "")
    return flat


def test_every_shipped_yaml_is_its_preset():
    assert set(os.listdir(CONFIGS)) == set(YAML_PRESETS)
    for name, preset in YAML_PRESETS.items():
        _, config = load_minigpt4_config(os.path.join(CONFIGS, name))
        expected = MINIGPT4_PRESETS[preset]()
        ours, theirs = architecture(config), architecture(expected)
        assert ours == theirs, {k: (ours.get(k), theirs.get(k)) for k in ours.keys() | theirs.keys()
                                if ours.get(k) != theirs.get(k)}
    # the full-size YAMLs name the four (three) upstream-derived files as placeholders
    for name in ("run_minigpt4_7b.yaml", "run_minigpt4_13b.yaml"):
        _, config = load_minigpt4_config(os.path.join(CONFIGS, name))
        assert all(path.startswith("/path/to/") for path in (
            config.checkpoint_name_or_path, config.vision_config.checkpoint_name_or_path,
            config.qformer_config.checkpoint_name_or_path, config.text_config.checkpoint_name_or_path))


@pytest.fixture(scope="module")
def chat():
    return load_minigpt4(TINY)


def test_images_in_every_mode_run_batched_and_equal_one_by_one(chat, tmp_path):
    """Grayscale, RGBA, CMYK and 16-bit files with four prompts, in one left-padded batch, give
    what each gives alone (the upstream-weights version of this, with rows stopping apart, is in
    test_minigpt4_parity.py)."""
    pairs = list(zip(images_in_every_mode(str(tmp_path)),
                     ["What is this?", "Describe this image in detail.", "What shape is it?", "What colour?"]))
    settings = dataclasses.replace(chat.generation_config(max_new_tokens=6), stop_sequences=(), eos_token_id=None)
    batched = chat.answer(pairs, batch_size=4, settings=settings)
    alone = [chat.answer([pair], settings=settings)[0] for pair in pairs]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert all(len(r.token_ids) == 6 for r in batched)


def test_the_template_and_its_stop_spellings_come_from_the_tokenizer(chat):
    tokenizer = chat.processor.tokenizer
    settings = chat.generation_config()
    sep = tuple(tokenizer.encode("###", add_special_tokens=False))
    assert sep in settings.stop_sequences  # "###" alone
    assert any(seq != sep for seq in settings.stop_sequences)  # and glued to text
    assert settings.max_new_tokens == 300 and settings.top_p == 0.9 and settings.temperature == 1.0
    reply = chat.answer([(EXAMPLE_IMAGE, "What is this?")], settings=chat.generation_config(max_new_tokens=3))[0]
    assert reply.prompt.endswith("###Human: <Img><ImageHere></Img> What is this?###Assistant:")
    assert reply.history == [("What is this?", reply.answer)]


def test_a_long_chat_keeps_the_system_line_and_the_image(chat):
    history = [("What is this?", "A red circle on a white background, drawn in the middle.")]
    history += [(f"And question number {i}?", "Answer " * 12) for i in range(12)]
    reply = chat.answer([(EXAMPLE_IMAGE, "Last one?")], histories=[history],
                        settings=chat.generation_config(max_new_tokens=8))[0]
    assert reply.dropped_turns > 0
    assert reply.prompt.startswith(chat.processor.template.system)
    assert "###Human: <Img><ImageHere></Img> What is this?###" in reply.prompt
    assert "question number 0?" not in reply.prompt and "question number 11?" in reply.prompt
    assert reply.history[0] == history[0] and reply.history[-1][0] == "Last one?"
    assert len(reply.history) == len(history) + 1 - reply.dropped_turns


def test_run_minigpt4_answers_and_reports(capsys):
    replies = run_minigpt4.main(["--config", TINY, "--image_path", f"{EXAMPLE_IMAGE},{EXAMPLE_IMAGE}",
                                 "--prompt", "What is this?", "--prompt", "Describe it.", "--batch_size", "2"] + FAST)
    out = capsys.readouterr().out
    assert len(replies) == 2 and all(0 < len(r.token_ids) <= 5 for r in replies)
    assert "UNTRAINED" in out and "batch_size=2" in out and "| Describe it." in out


def test_the_llama2_variant_runs_with_its_template(capsys):
    replies = run_minigpt4.main(["--config", os.path.join(CONFIGS, "run_minigpt4_llama2_tiny.yaml")] + FAST)
    assert replies[0].prompt.endswith("<s>[INST] <Img><ImageHere></Img> Describe this image in detail. [/INST] ")
    assert "3 part(s) without a checkpoint" in capsys.readouterr().out


def test_cli_demo_chats_resets_and_stops():
    stdout = io.StringIO()
    script = f"What is this?\nAnd the colour?\nreset\n{EXAMPLE_IMAGE}\nOnce more?\nstop\n"
    history = cli_demo.main(["--config", TINY, "--image_path", EXAMPLE_IMAGE] + FAST,
                            stdin=io.StringIO(script), stdout=stdout)
    assert [question for question, _ in history] == ["Once more?"]
    assert stdout.getvalue().count("MiniGPT-4: ") == 3


def run_exit_code(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def write_yaml(tmp_path, edit, source=TINY):
    with open(source, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    edit(config)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def bad_images(tmp_path):
    good = (tmp_path / "good.png")
    from PIL import Image
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(good)
    data = good.read_bytes()
    files = {"empty.png": b"", "notes.txt": b"just text, not an image\n", "truncated.png": data[:len(data) // 2]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.png")]


def test_bad_images_are_one_line_errors(tmp_path, capsys):
    for path in bad_images(tmp_path):
        code, err = run_exit_code(run_minigpt4.main, ["--config", TINY, "--image_path", path] + FAST, capsys)
        assert code == 2 and path in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv,message", [
    (["--raw_prompt", "True", "--prompt", "###Human: describe it###Assistant:"], "no <ImageHere> placeholder"),
    (["--raw_prompt", "True", "--prompt", "<ImageHere> and <ImageHere>"], "2 <ImageHere> placeholders"),
    (["--prompt", "What is <ImageHere>?"], "the template places the image"),
    (["--image_path", f"{EXAMPLE_IMAGE},{EXAMPLE_IMAGE}", "--prompt", "a", "--prompt", "b", "--prompt", "c"],
     "2 images but 3 prompts"),
    (["--num_beams", "3"], "only 1 is supported"),
    (["--prompt", "word " * 400], "text_config.seq_length"),
    (["--batch_size", "0"], "batch_size must be positive"),
    (["--ckpt", "/nowhere/llama_proj.ckpt"], "/nowhere/llama_proj.ckpt"),
])
def test_bad_arguments(argv, message, capsys):
    code, err = run_exit_code(run_minigpt4.main, ["--config", TINY] + argv + FAST, capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["model"]["model_config"].update(low_resource=True), "8-bit"),
    (lambda c: c["model"]["model_config"]["vision_config"].update(checkpoint_name_or_path="/path/to/eva_vit_g.ckpt"),
     "ViT checkpoint"),
    (lambda c: c["model"]["model_config"].update(has_qformer=False), "qformer_config"),
    (lambda c: c["model"]["model_config"]["text_config"].update(eos_token_id=5), "eos_token_id"),
    (lambda c: c["model"]["model_config"]["text_config"].update(vocab_size=300), "pieces"),
    (lambda c: c["processor"].update(template="vicuna"), "unknown MiniGPT-4 template"),
    (lambda c: c["processor"]["image_processor"].update(image_size=224), "image_size"),
    (lambda c: c["model"]["arch"].update(type="LlamaForCausalLM"), "not MiniGPT-4's"),
])
def test_bad_yaml(tmp_path, edit, message, capsys):
    code, err = run_exit_code(run_minigpt4.main, ["--config", write_yaml(tmp_path, edit)] + FAST, capsys)
    assert code == 2 and message in err, err


def test_registry_names_leave_mindformers_llama_alone():
    from mindformers.tools.register import MindFormerModuleType as Kind
    from mindformers.tools.register import MindFormerRegister

    import research.minigpt4 as package

    for kind, name, ours in ((Kind.CONFIG, "ResearchLlamaConfig", package.LlamaConfig),
                             (Kind.MODELS, "ResearchLlamaForCausalLM", package.LlamaForCausalLM),
                             (Kind.TOKENIZER, "ResearchLlamaTokenizer", package.LlamaTokenizer),
                             (Kind.CONFIG, "MiniGPT4Config", package.MiniGPT4Config),
                             (Kind.MODELS, "MiniGPT4", package.MiniGPT4),
                             (Kind.PROCESSOR, "MiniGPT4Processor", package.MiniGPT4Processor)):
        assert MindFormerRegister.get_cls(kind, name) is ours
    for kind, name in ((Kind.CONFIG, "LlamaConfig"), (Kind.MODELS, "LlamaForCausalLM"),
                       (Kind.TOKENIZER, "LlamaTokenizer")):
        assert MindFormerRegister.get_cls(kind, name).__module__.startswith("mindformers")
