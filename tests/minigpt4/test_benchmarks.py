"""benchmarks/minigpt4_perf.py runs on the tiny preset and writes its comparison table."""
import csv
import importlib.util
import os
import subprocess
import sys

from benchmarks.measure import NEAR_TIE, parting_rows, transformers_generate
from research.common.config import REPO_ROOT
from research.minigpt4.configuration_minigpt4 import LlamaConfig

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "minigpt4_perf.py")


def test_compare_with_transformers_writes_every_row(tmp_path):
    # One thread each: the suite runs two test files at once on a 2-core machine.
    result = subprocess.run([sys.executable, SCRIPT, "--preset", "tiny", "--threads", "1",
                             "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "tokens match: yes" in lines
    assert "image outputs match: yes" in lines

    with open(tmp_path / "compare_minigpt4.csv", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = {row["case"]: row for row in reader}
    assert reader.fieldnames == ["case", "setting", "unit", "ours", "transformers", "ratio", "goal", "met"]
    assert list(rows) == ["decode batch 1", "decode batch 8", "first token batch 1", "decode batch 1 / floor",
                          "peak RSS while generating", "greedy tokens match", "image encoding per image"]
    for case, goal in (("decode batch 1", ">= 1.0"), ("decode batch 8", ">= 2.0"), ("first token batch 1", "<= 1.0"),
                       ("image encoding per image", "<= 1.0")):
        row = rows[case]
        assert float(row["ours"]) > 0 and float(row["transformers"]) > 0 and float(row["ratio"]) > 0
        assert row["goal"] == goal and row["met"] in ("yes", "NO")
    assert rows["decode batch 1"]["setting"] == "prompt 8, 8 new"
    assert rows["first token batch 1"]["setting"] == "prompt 32"
    assert rows["image encoding per image"]["setting"] == "batch 4, 56 px"
    assert rows["image encoding per image"]["unit"] == "ms"
    assert float(rows["decode batch 1 / floor"]["ours"]) > 0
    assert float(rows["peak RSS while generating"]["ours"]) > 0
    assert rows["greedy tokens match"]["ours"] == "3 of 3" and rows["greedy tokens match"]["met"] == "yes"


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("minigpt4_perf", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_a_parting_row_is_reported_with_its_logit_gap():
    """The token check reports nothing for identical tokens, and for a row that takes another
    token than transformers' greedy one, where it parts and by how much that token's logit trails."""
    benchmark = _benchmark_module()
    config = LlamaConfig.from_name("tiny")
    reference = benchmark.transformers_model(config)
    prompts = [[5, 6, 7], [8, 9, 10]]
    theirs = transformers_generate(reference, prompts, 3, lambda _tokens: None)
    assert not parting_rows(reference, prompts, theirs, theirs)
    other = (theirs[1][1] + 1) % config.vocab_size
    ours = [theirs[0], [theirs[1][0], other, theirs[1][2]]]
    [(row, step, gap)] = parting_rows(reference, prompts, ours, theirs)
    assert (row, step) == (1, 1) and gap > NEAR_TIE
