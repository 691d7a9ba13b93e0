"""tools/hccl_tools.py (rank table), run_singlenode.sh (launcher) and CPU data-parallel
training through it: two msrun processes with gradient averaging end with the same weights as
one process on the whole batch."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HCCL_TOOLS = os.path.join(REPO_ROOT, "tools", "hccl_tools.py")
RUN_SINGLENODE = os.path.join(REPO_ROOT, "run_singlenode.sh")
DP_TRAIN = "tests/parallel_scripts/dp_train.py"
RANK_ENV = os.path.join(REPO_ROOT, "tests", "parallel_scripts", "rank_env.py")
LAUNCHER_ENV = ("RANK_ID", "RANK_SIZE", "RANK_TABLE_FILE", "DEVICE_ID", "MS_ROLE", "MS_WORKER_NUM",
                "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_NODE_ID", "MASTER_PORT", "SINGLENODE_LAUNCHER")

HCCN_CONF = """\
address_0=192.168.100.101
netmask_0=255.255.255.0
address_1=192.168.101.101
netmask_1=255.255.255.0
address_2 = 192.168.102.101
address_3=192.168.103.101
"""


def clean_env(**extra):
    """This environment without any launcher variables, the venv's python first on PATH."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_ENV}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def hccl_tools(*args, cwd):
    return subprocess.run([sys.executable, HCCL_TOOLS, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=clean_env())


def run_singlenode(*args, cwd, timeout=60, **env):
    return subprocess.run(["bash", RUN_SINGLENODE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env))


@pytest.fixture
def hccn_conf(tmp_path):
    path = tmp_path / "hccn.conf"
    path.write_text(HCCN_CONF)
    return str(path)


# ----------------------------------------------------------------------------- hccl_tools


def test_hccl_tools_writes_rank_table_from_hccn_conf(tmp_path, hccn_conf):
    out = tmp_path / "tables"
    result = hccl_tools("--device_num", "[0,4)", "--server_ip", "10.1.2.3", "--hccn_conf", hccn_conf,
                        "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = out / "hccl_4p_0123_10.1.2.3.json"
    assert os.listdir(out) == [path.name]
    assert str(path) in result.stdout
    table = json.loads(path.read_text())
    assert table == {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": "10.1.2.3",
            "device": [{"device_id": str(i), "device_ip": f"192.168.10{i}.101", "rank_id": str(i)}
                       for i in range(4)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }


def test_hccl_tools_visible_devices_default_ip_and_current_folder(tmp_path, hccn_conf):
    # logical devices [0,2) are physical 2 and 3; ranks follow the logical order
    result = hccl_tools("--device_num", "[0, 2)", "--visible_devices", "2,3", "--hccn_conf", hccn_conf,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [name for name in os.listdir(tmp_path) if name.endswith(".json")]
    assert len(names) == 1
    match = re.fullmatch(r"hccl_2p_01_(.+)\.json", names[0])
    assert match, names
    table = json.loads((tmp_path / names[0]).read_text())
    server = table["server_list"][0]
    assert server["server_id"] == match.group(1)
    assert [(d["rank_id"], d["device_id"], d["device_ip"]) for d in server["device"]] == [
        ("0", "2", "192.168.102.101"), ("1", "3", "192.168.103.101")]


@pytest.mark.parametrize("device_num, message", [
    ("0,8", "expected \"[START,END)\""),
    ("[0,8", "expected \"[START,END)\""),
    ("[a,2)", "expected \"[START,END)\""),
    ("[4,2)", "START must be less than END"),
    ("[2,2)", "START must be less than END"),
    ("[0,9)", "END must be at most 8"),
    ("[3,6)", "must stay in one group"),
])
def test_hccl_tools_bad_range(tmp_path, hccn_conf, device_num, message):
    result = hccl_tools("--device_num", device_num, "--hccn_conf", hccn_conf, "--server_ip", "10.0.0.1",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path))


def test_hccl_tools_missing_conf_and_missing_device(tmp_path, hccn_conf):
    result = hccl_tools("--device_num", "[0,2)", "--hccn_conf", str(tmp_path / "nope.conf"), cwd=tmp_path)
    assert result.returncode == 2
    assert "error: cannot read --hccn_conf" in result.stderr
    result = hccl_tools("--device_num", "[0,8)", "--hccn_conf", hccn_conf, cwd=tmp_path)
    assert result.returncode == 2
    assert "no IP address for device(s) 4, 5, 6, 7" in result.stderr
    result = hccl_tools("--device_num", "[0,4)", "--visible_devices", "0,1", "--hccn_conf", hccn_conf,
                        cwd=tmp_path)
    assert result.returncode == 2
    assert "--visible_devices lists 2" in result.stderr
    result = hccl_tools("--device_num", "[0,2)", "--server_ip", "not-an-ip", "--hccn_conf", hccn_conf,
                        cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid --server_ip" in result.stderr


@pytest.mark.skipif(shutil.which("hccn_tool") is not None or os.path.exists("/etc/hccn.conf"),
                    reason="this host has Ascend device IPs (hccn_tool or /etc/hccn.conf), so "
                           "hccl_tools finds them and the missing-information error cannot occur")
def test_hccl_tools_without_device_information(tmp_path):
    result = hccl_tools("--device_num", "[0,8)", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: no device IP information" in result.stderr
    assert "/etc/hccn.conf" in result.stderr


# ----------------------------------------------------------------------------- run_singlenode.sh


@pytest.mark.parametrize("args, message", [
    (("python x.py", "t.json", "[0,2)"), "expected 4 arguments, got 3"),
    (("python x.py", "t.json", "[0,2)", "2", "extra"), "expected 4 arguments, got 5"),
    (("  ", "t.json", "[0,2)", "2"), "command (first argument) is empty"),
    (("python x.py", "t.json", "0,2", "2"), "is not of the form [START_ID,END_ID)"),
    (("python x.py", "t.json", "[0,2", "2"), "is not of the form [START_ID,END_ID)"),
    (("python x.py", "t.json", "[2,2)", "0"), "START_ID must be less than END_ID"),
    (("python x.py", "t.json", "[0,2)", "two"), "CARD_COUNT 'two' is not a number"),
    (("python x.py", "t.json", "[0,8)", "4"), "CARD_COUNT is 4 but the range [0,8) has 8 devices"),
])
def test_run_singlenode_usage_errors(tmp_path, args, message):
    result = run_singlenode(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Usage: bash run_singlenode.sh" in result.stderr


def test_run_singlenode_launcher_specific_errors(tmp_path):
    result = run_singlenode("python x.py", "missing.json", "[0,2)", "2", cwd=tmp_path,
                            SINGLENODE_LAUNCHER="rank_table")
    assert result.returncode == 2
    assert "rank table file 'missing.json' does not exist" in result.stderr
    result = run_singlenode("./train.sh", "t.json", "[0,2)", "2", cwd=tmp_path, SINGLENODE_LAUNCHER="msrun")
    assert result.returncode == 2
    assert "must start with python, not './train.sh'" in result.stderr
    result = run_singlenode("python x.py", "t.json", "[0,2)", "2", cwd=tmp_path, SINGLENODE_LAUNCHER="mpi")
    assert result.returncode == 2
    assert "SINGLENODE_LAUNCHER must be auto, rank_table or msrun" in result.stderr


def test_run_singlenode_rank_table_launch(tmp_path):
    """The Ascend branch, forced on this host with a stand-in command: env and per-rank logs."""
    (tmp_path / "table.json").write_text("{}")
    marker = tmp_path / "done"
    marker.mkdir()
    result = run_singlenode(f"python {RANK_ENV} --marker {marker}", "table.json", "[4,6)", "2", cwd=tmp_path,
                            SINGLENODE_LAUNCHER="rank_table")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 2 ranks finished" in result.stdout
    for rank in (0, 1):
        log = tmp_path / "output" / "log" / f"rank_{rank}" / "mindformer.log"
        assert f"log: ./output/log/rank_{rank}/mindformer.log" in result.stdout
        assert log.read_text().split() == [f"RANK_ID={rank}", f"DEVICE_ID={4 + rank}", "RANK_SIZE=2",
                                           f"RANK_TABLE_FILE={tmp_path / 'table.json'}"]
    assert sorted(os.listdir(marker)) == ["rank_0.done", "rank_1.done"]


def test_run_singlenode_rank_table_failure_stops_the_others(tmp_path):
    (tmp_path / "table.json").write_text("{}")
    result = run_singlenode(f"python {RANK_ENV} --fail_rank 1", "table.json", "[0,3)", "3", cwd=tmp_path,
                            timeout=30, SINGLENODE_LAUNCHER="rank_table", RUN_LOG_DIR="logs")
    assert result.returncode == 1
    assert "error: rank 1 (device 1) exited with code 3; see logs/rank_1/mindformer.log" in result.stderr
    assert "rank 0 (device 0) stopped" in result.stderr and "rank 2 (device 2) stopped" in result.stderr
    assert "failing on purpose" in (tmp_path / "logs" / "rank_1" / "mindformer.log").read_text()


# ----------------------------------------------------------------------------- CPU data parallel


def test_cpu_data_parallel_matches_one_process(tmp_path, hccn_conf):
    """2 msrun processes, each on half of the global batch of 8, gradients averaged: the ranks end
    identical, and equal to one process training on all 8 (within 1e-6)."""
    result = hccl_tools("--device_num", "[0,2)", "--server_ip", "127.0.0.1", "--hccn_conf", hccn_conf,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rank_table = tmp_path / "hccl_2p_01_127.0.0.1.json"

    parallel_out, single_out, logs = tmp_path / "parallel", tmp_path / "single", tmp_path / "logs"
    result = run_singlenode(f"python {DP_TRAIN} --out {parallel_out}", str(rank_table), "[0,2)", "2",
                            cwd=REPO_ROOT, timeout=240, SINGLENODE_LAUNCHER="msrun", RUN_LOG_DIR=str(logs))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"logs: {logs}/worker_<rank>.log" in result.stdout
    assert sorted(os.listdir(logs)) == ["scheduler.log", "worker_0.log", "worker_1.log"]
    assert "rank 1/2 step 2" in (logs / "worker_1.log").read_text()

    single = subprocess.run([sys.executable, DP_TRAIN, "--out", str(single_out), "--use_parallel", "False"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert single.returncode == 0, single.stderr[-3000:]
    assert "rank 0/1 step 2" in single.stdout

    rank0, rank1 = np.load(parallel_out / "rank_0.npy"), np.load(parallel_out / "rank_1.npy")
    reference = np.load(single_out / "rank_0.npy")
    np.testing.assert_array_equal(rank0, rank1)
    np.testing.assert_allclose(rank0, reference, rtol=0, atol=1e-6)
    rng = np.random.RandomState(1)  # dp_train.build_net's initial weights: training moved them
    initial = np.concatenate([(rng.standard_normal((2, 4)) * 0.5).ravel(), rng.standard_normal(2) * 0.1])
    assert np.abs(rank0 - initial).max() > 0.05


def test_use_parallel_false_under_launcher_fails(tmp_path):
    """A YAML left at use_parallel False would train two separate copies: every process refuses,
    and the launcher exits non-zero."""
    logs = tmp_path / "logs"
    result = run_singlenode(f"python {DP_TRAIN} --out {tmp_path / 'out'} --use_parallel False", "unused.json",
                            "[0,2)", "2", cwd=REPO_ROOT, timeout=120, SINGLENODE_LAUNCHER="msrun",
                            RUN_LOG_DIR=str(logs))
    assert result.returncode != 0
    assert "error: msrun exited with code" in result.stderr
    assert "set use_parallel: True and parallel_config.data_parallel: 2" in (logs / "worker_0.log").read_text()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- parallel.py helpers


def test_rank_table_launch_uses_device_id(monkeypatch):
    import mindspore as ms

    from research.common import parallel
    from research.common.errors import UserInputError

    calls = []
    real_exists = os.path.exists
    monkeypatch.setattr(parallel.os.path, "exists",
                        lambda path: True if path == "/dev/davinci0" else real_exists(path))
    monkeypatch.setattr(ms, "set_device", lambda *args: calls.append(args))
    monkeypatch.setenv("RANK_TABLE_FILE", "/tmp/table.json")
    monkeypatch.setenv("DEVICE_ID", "3")
    monkeypatch.delenv("MS_ROLE", raising=False)
    parallel._use_rank_table_device()
    assert calls == [("Ascend", 3)]

    def refuse(*args):
        raise RuntimeError("The 'mindspore.set_device' can not be modified.")

    monkeypatch.setattr(ms, "set_device", refuse)
    with pytest.raises(UserInputError, match="launched on Ascend device 3 .DEVICE_ID. but MindSpore is already"):
        parallel._use_rank_table_device()

    monkeypatch.setenv("RANK_SIZE", "2")
    with pytest.raises(UserInputError, match="one of 2 started by a launcher"):
        parallel.init_data_parallel({"use_parallel": False})
    monkeypatch.setenv("RANK_SIZE", "1")
    assert parallel.init_data_parallel({"use_parallel": False}) == parallel.ParallelContext(0, 1)
