"""benchmarks/chatglm2_perf.py runs on the tiny preset and writes its comparison table."""
import csv
import importlib.util
import os
import subprocess
import sys

from benchmarks.measure import NEAR_TIE, parting_rows, transformers_generate
from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.common.config import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "chatglm2_perf.py")


def test_compare_with_transformers_writes_every_row(tmp_path):
    # One thread each: the suite runs two test files at once on a 2-core machine.
    result = subprocess.run([sys.executable, SCRIPT, "--preset", "tiny", "--threads", "1",
                             "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "tokens match: yes" in result.stdout.splitlines()

    with open(tmp_path / "compare_chatglm2.csv", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = {row["case"]: row for row in reader}
    assert reader.fieldnames == ["case", "setting", "unit", "ours", "transformers", "ratio", "goal", "met"]
    assert list(rows) == ["decode batch 1", "decode batch 8", "first token batch 1", "decode batch 1 / floor",
                          "peak RSS while generating", "greedy tokens match"]
    for case, goal in (("decode batch 1", ">= 1.0"), ("decode batch 8", ">= 2.0"), ("first token batch 1", "<= 1.0")):
        row = rows[case]
        assert float(row["ours"]) > 0 and float(row["transformers"]) > 0 and float(row["ratio"]) > 0
        assert row["goal"] == goal and row["met"] in ("yes", "NO")
    assert rows["decode batch 1"]["setting"] == "prompt 8, 8 new"
    assert rows["first token batch 1"]["setting"] == "prompt 32"
    assert float(rows["decode batch 1 / floor"]["ours"]) > 0
    assert float(rows["peak RSS while generating"]["ours"]) > 0
    assert rows["greedy tokens match"]["ours"] == "3 of 3" and rows["greedy tokens match"]["met"] == "yes"


def test_a_parting_row_is_reported_with_its_logit_gap():
    """The token check reports nothing for identical tokens, and for a row that takes another
    token than transformers' greedy one, where it parts and by how much that token's logit trails."""
    spec = importlib.util.spec_from_file_location("chatglm2_perf", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    config = ChatGLM2Config.from_name("tiny")
    reference = benchmark.transformers_model(config)
    prompts = [[5, 6, 7], [8, 9, 10]]
    theirs = transformers_generate(reference, prompts, 3, lambda _tokens: None)
    assert not parting_rows(reference, prompts, theirs, theirs)
    other = (theirs[1][1] + 1) % config.padded_vocab_size
    ours = [theirs[0], [theirs[1][0], other, theirs[1][2]]]
    [(row, step, gap)] = parting_rows(reference, prompts, ours, theirs)
    assert (row, step) == (1, 1) and gap > NEAR_TIE
