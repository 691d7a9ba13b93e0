"""`make demo`, ChatGLM2: its data (held-out dev rows, a tokenizer that covers the text), the
configs it writes for another folder and the commands it prints (fast); end to end (slow: trains
the tiny base from random weights, then P-Tuning v2 and LoRA), where both adapted models must
beat the base model by a clear margin and the printed commands give the demo's numbers."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from research.chatglm2 import demo, synthetic_adgen
from research.chatglm2.configuration_chatglm2 import load_chatglm2_config
from research.chatglm2.dataset_chatglm2 import read_adgen
from research.chatglm2.tokenization_chatglm2 import ChatGLM2Tokenizer
from research.common.config import REPO_ROOT


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The demo's data with fewer rows (the tokenizer is trained on them)."""
    paths = demo.DemoPaths(str(tmp_path_factory.mktemp("demo_chatglm2")))
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "BASE_COUNT", 300)
    patch.setattr(demo, "TRAIN_COUNT", 200)
    demo.ensure_data(paths)
    patch.undo()
    return paths


def test_dev_rows_are_held_out_and_the_tasks_differ(small_data):
    rows = {name: read_adgen(small_data.rows(name)).rows for name in ("base", "train", "dev")}
    assert [len(rows[name]) for name in ("base", "train", "dev")] == [300, 200, demo.DEV_COUNT]
    bare = lambda row: row.prompt.removeprefix(demo.INSTRUCTION)
    assert not {bare(row) for row in rows["base"] + rows["train"]} & {row.prompt for row in rows["dev"]}
    assert len({row.prompt for row in rows["dev"]}) == demo.DEV_COUNT
    attributes = lambda row: dict(part.split("#") for part in bare(row).split("*"))
    for row in rows["train"] + rows["dev"]:  # ADGEN's task: the ad for the bare attribute string
        assert row.response == synthetic_adgen.describe(attributes(row)) and row.response.startswith("这款")
    asked = [row for row in rows["base"] if row.prompt.startswith(demo.INSTRUCTION)]
    assert len(asked) == 150  # the base task: half asked in words for the ad ...
    for row in asked:
        assert row.response == synthetic_adgen.describe(attributes(row))
    for row in rows["base"]:  # ... half the values listed for the bare string, garment first
        if row not in asked:
            values = list(attributes(row).values())
            assert row.response == f"{values[0]}：{'、'.join(values[1:])}。"


def test_the_tokenizer_covers_the_demo_text_in_few_pieces(small_data):
    tokenizer = ChatGLM2Tokenizer(small_data.tokenizer)
    for row in read_adgen(small_data.rows("dev")).rows[:20]:
        for text in (row.prompt, row.response):
            ids = tokenizer.encode(text)
            assert tokenizer.decode(ids) == text
            assert len(ids) <= len(text) + 3  # no byte pieces: [gMASK] sop "▁", then at most one a character


def test_data_is_kept_until_its_format_changes(small_data, monkeypatch, capsys):
    before = os.path.getmtime(small_data.tokenizer)
    demo.ensure_data(small_data)
    assert capsys.readouterr().out == "" and os.path.getmtime(small_data.tokenizer) == before
    monkeypatch.setattr(demo, "DATA_FORMAT", demo.DATA_FORMAT + "-next")
    monkeypatch.setattr(demo, "BASE_COUNT", 300)
    monkeypatch.setattr(demo, "TRAIN_COUNT", 200)
    demo.ensure_data(small_data)
    assert "wrote the synthetic set" in capsys.readouterr().out


def test_another_output_dir_gets_its_own_configs(tmp_path):
    paths = demo.DemoPaths(str(tmp_path / "demo"))
    configs = demo.demo_configs(paths)
    assert set(configs) == {"base", "ptuning2", "lora"}
    for stage, path in configs.items():
        yaml_config, model_config = load_chatglm2_config(path)
        assert "output/demo_chatglm2" not in open(path, encoding="utf-8").read().split("\n", 1)[1], stage
        named = [yaml_config.processor["tokenizer"]["vocab_file"], yaml_config.output_dir,
                 yaml_config.train_dataset["data_loader"]["dataset_dir"],
                 yaml_config.eval_dataset["data_loader"]["dataset_dir"], model_config.checkpoint_name_or_path]
        for name in filter(None, named):
            assert name.startswith(paths.root + os.sep), (stage, name)
        if stage != "base":
            assert model_config.checkpoint_name_or_path == paths.base_checkpoint
    assert demo.demo_configs(demo.DemoPaths()) == demo.CONFIGS  # output/demo_chatglm2: the bare names


def test_printed_commands_name_each_model_and_its_weights(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    paths = demo.DemoPaths()
    monkeypatch.setattr(paths, "trained", lambda stage: os.path.join(paths.stage(stage), "x.ckpt"))
    lines = [shlex.split(line) for line in demo.printed_commands(paths, demo.CONFIGS, "类型#裙*颜色#红色")]
    assert lines[0][0] == "source"
    evaluate_pt, evaluate_lora, run_base, run_pt, run_lora, chat = lines[1:]
    assert evaluate_pt[:3] == ["python", "-m", "research.chatglm2.run_chatglm2_eval"]
    assert evaluate_pt[evaluate_pt.index("--ptuning_checkpoint") + 1] == "output/demo_chatglm2/ptuning2/x.ckpt"
    assert evaluate_lora[evaluate_lora.index("--lora_checkpoint") + 1] == "output/demo_chatglm2/lora/x.ckpt"
    assert run_base[run_base.index("--checkpoint") + 1] == "output/demo_chatglm2/base/chatglm2_tiny_base.ckpt"
    for line in (run_base, run_pt, run_lora):
        assert line[2] == "research.chatglm2.run_chatglm2" and line[line.index("--prompt") + 1] == "类型#裙*颜色#红色"
    assert chat[2] == "research.chatglm2.cli_demo" and chat[chat.index("--config") + 1] == demo.CONFIGS["ptuning2"]


SCORES = re.compile(r"^(base model|P-Tuning v2|LoRA) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", re.M)


@pytest.mark.slow
def test_demo_adapts_the_base_model_by_a_clear_margin(tmp_path):
    """The demo from scratch in a folder of its own: P-Tuning v2 and LoRA each beat the base model
    by >= 30 BLEU-4 and >= 30 ROUGE-L points on the held-out rows; a second run reuses the three
    checkpoints; the printed evaluation command, pasted, gives the demo's P-Tuning scores."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "research.chatglm2.demo", "--output_dir", "demo"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    out = result.stdout
    print(out)  # the numbers, for `pytest -rP`
    assert result.returncode == 0, result.stderr[-3000:]
    scores = {name: [float(v) for v in values] for name, *values in SCORES.findall(out)}
    base, ptuning, lora = scores["base model"], scores["P-Tuning v2"], scores["LoRA"]
    for adapted in (ptuning, lora):
        assert adapted[0] >= base[0] + 30 and adapted[3] >= base[3] + 30, scores

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained before") == 3
    assert {name: [float(v) for v in values] for name, *values in SCORES.findall(again.stdout)} == scores

    lines = out.rstrip("\n").split("\n")
    commands = lines[lines.index("evaluate and chat with the models it trained (paste these lines in this folder):") + 1:]
    evaluate = commands[1].replace("python -m", f"{shlex.quote(sys.executable)} -m", 1)
    done = subprocess.run(["bash", "-c", evaluate], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout.strip().split("\n")[-1])
    assert [round(metrics[name], 2) for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")] == ptuning
