"""`make demo` end to end (slow: trains the tiny VisualGLM for about 4 minutes on 2 cores)."""
import re
import subprocess
import sys

import pytest

from research.common.config import REPO_ROOT


@pytest.mark.slow
def test_demo_learns_the_synthetic_set_and_a_lora_style():
    result = subprocess.run([sys.executable, "-m", "research.visualglm.demo", "--retrain"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)%", result.stdout).group(1))
    assert accuracy >= 95.0, result.stdout[-3000:]
    expected = re.search(r"\(expected: (.+)\):", result.stdout).group(1)
    assert f"答：{expected}'" in result.stdout
    assert re.search(r"\['图里是.+的.+哦！'\]", result.stdout), result.stdout[-2000:]
