"""Starting a script on two CPU processes through run_singlenode.sh (msrun), as a user would."""
import os
import subprocess

from research.common.config import REPO_ROOT

# Set in-process by other tests (torch.distributed, SAT): a launcher must not inherit them.
LAUNCH_VARS = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK_ID", "RANK_SIZE",
               "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_ROLE")


def run_two_processes(command, tmp_path, timeout=600):
    """`bash research/run_singlenode.sh COMMAND RANK_TABLE [0,2) 2` in a clean launcher environment,
    the ranks' logs in tmp_path/logs; returns the CompletedProcess after checking it succeeded."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS}
    env["RUN_LOG_DIR"] = str(tmp_path / "logs")
    env["CLUSTER_TIME_OUT"] = "120"
    result = subprocess.run(["bash", "research/run_singlenode.sh", command, str(tmp_path / "unused_rank_table.json"),
                             "[0,2)", "2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
