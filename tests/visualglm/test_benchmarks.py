"""benchmarks/visualglm_perf.py runs in every mode on the tiny preset and writes what it says."""
import csv
import json
import os
import subprocess
import sys

import pytest

from research.common.config import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "visualglm_perf.py")


def run(tmp_path, *args):
    # torch.distributed settings an in-process SAT model of another test left behind (its port
    # is still taken) must not reach the benchmark's own SAT model.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path), *args], env=env,
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def read_csv(path):
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_performance_writes_seed_002_csvs(tmp_path):
    run(tmp_path, "--mode", "performance", "--batch_sizes", "1", "2", "--lengths", "40", "64", "32")
    for batch in (1, 2):
        rows = read_csv(tmp_path / f"{batch}_batch_performance_visualglm.csv")
        assert [int(r["InputLength"]) for r in rows] == [40, 64]  # 32 cannot hold the image
        for row in rows:
            per_token = float(row["TimePerTokens(ms)"])
            assert per_token > 0
            assert float(row["TokensPerSecond"]) == pytest.approx(1000 / per_token, rel=0.02)
            assert float(row["ThroughputTokensPerSecond"]) == pytest.approx(
                batch * float(row["TokensPerSecond"]), rel=0.02)
            assert 0 < float(row["FirstTokenTime(ms)"]) < float(row["ResponseTime(ms)"])
            assert float(row["ImageEncodeTime(ms)"]) > 0 and float(row["PeakRSS(MB)"]) > 100


def test_precision_matches_sat_on_the_tiny_preset(tmp_path):
    out = run(tmp_path, "--mode", "precision", "--presets", "tiny", "--new_tokens", "6")
    line = [l for l in out.splitlines() if l.startswith("tiny,")][0]
    assert float(line.split(",")[4]) >= 0.9999 and line.endswith("PASS (>= 0.9999)")


def test_predict_answers_every_example(tmp_path):
    run(tmp_path, "--mode", "predict", "--config", "run_visualglm_tiny_image_to_text_generation.yaml")
    with open(tmp_path / "predict_visualglm.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    with open(os.path.join(REPO_ROOT, "examples", "visualglm", "example_inputs.jsonl"), encoding="utf-8") as handle:
        examples = [json.loads(line) for line in handle if line.strip()]
    assert [(r["image"], r["prompt"]) for r in rows] == [(e["image"], e["prompt"]) for e in examples]
    assert all(isinstance(r["answer"], str) for r in rows)


def test_compare_reports_every_goal(tmp_path):
    out = run(tmp_path, "--mode", "compare", "--preset", "tiny", "--new_tokens", "4")
    rows = {r["case"]: r for r in read_csv(tmp_path / "compare_visualglm.csv")}
    for batch in (1, 8):
        decode = rows[f"decode batch {batch} (prompt 32, 4 new)"]
        assert float(decode["ours_tokens_per_s"]) > 0 and float(decode["sat_tokens_per_s"]) > 0
    assert float(rows["decode floor (weight bytes / bandwidth)"]["ours_ms"]) > 0
    assert sum(case.startswith("goal: ") for case in rows) == 4
    assert "copy bandwidth:" in out
