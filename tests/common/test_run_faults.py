"""Run safety of the shared trainer: a save killed mid-write or failing on a full disk, a kill
between the checkpoint and loss.csv, what a resume says, and the output_dir lock. A child
process does what needs a real kill or a file size limit (`ulimit -f`)."""
import csv
import io
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

import research.common.trainer as trainer_module
from research.common.config import REPO_ROOT
from research.common.convert import CheckpointWriter
from research.common.parallel import ParallelContext
from research.common.runtime import cli_main
from research.common.trainer import Trainer, output_dir_lock
from tests.common.test_trainer import (FakeDataset, TinyNet, make_args, run,
                                       graph_mode_by_default)  # noqa: F401 (autouse fixture)

SAVES = dict(epochs=1, save_checkpoint_steps=2)  # 8 steps, a save every 2
FSIZE_LIMIT = 64 * 1024  # above loss.csv and loss.png, below a checkpoint of TinyNet(width=4096)
STALE = "from a run that ended without releasing it (pid {pid} on " + socket.gethostname()


def child():
    """A training run in a child process (`child(); argv: OUTPUT_DIR FAULT`).

    FAULT `kill`: SIGKILL in the middle of writing the step-4 training state. `fsize`: a file
    size limit below a checkpoint's size; Python ignores SIGXFSZ (set here to say so), so the
    write fails with EFBIG as on a full disk."""
    output_dir, fault = sys.argv[1:]
    net = TinyNet(width=4096 if fault == "fsize" else 16)
    if fault == "kill":
        save = trainer_module.save_checkpoint_atomic

        def save_then_die(params, path):
            if not path.endswith(os.path.join("checkpoint", "rank_0", "tiny_rank_0-4.ckpt")):
                return save(params, path)
            with CheckpointWriter(path) as writer:
                writer.write(*next(iter(params.items())))
                os.kill(os.getpid(), signal.SIGKILL)

        trainer_module.save_checkpoint_atomic = save_then_die
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.RLIM_INFINITY))
    trainer = Trainer(net, net.trainable(), make_args(**SAVES), output_dir=output_dir)
    cli_main(lambda argv: trainer.train(FakeDataset()))()


def run_child(output_dir, fault):
    process = subprocess.Popen(
        [sys.executable, "-c", "from tests.common.test_run_faults import child; child()",
         str(output_dir), fault], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    _, stderr = process.communicate(timeout=300)
    return process, stderr


def temp_files(directory):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                  for name in names if name.endswith(".tmp"))


def loss_csv_steps(output_dir):
    with open(output_dir / "loss.csv", newline="", encoding="utf-8") as stream:
        return [int(row["step"]) for row in csv.DictReader(stream)]


def test_a_save_killed_mid_write_leaves_nothing_after_the_next_start(tmp_path):
    out = tmp_path / "out"
    killed, stderr = run_child(out, "kill")
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]
    debris = temp_files(out)
    assert [os.path.basename(path).split(".")[:2] for path in debris] == [["tiny_rank_0-4", "ckpt"]]
    assert (out / "checkpoint_trainable" / "rank_0" / "tiny_rank_0-4.ckpt").is_file()

    _, trainer, history = run(tmp_path, resume=True, **SAVES)  # no exception: no traceback
    notes = trainer.stream.getvalue()
    assert temp_files(out) == []
    assert f"removed 1 unfinished file(s) of an interrupted save: {debris[0]}\n" in notes
    assert f"taking over {out / '.lock_rank_0'} {STALE.format(pid=killed.pid)}" in notes
    state = out / "checkpoint" / "rank_0" / "tiny_rank_0-2.ckpt"  # step 4's state never completed
    assert f"resuming at step 2 of 8 from {state}\n" in notes
    assert [row["step"] for row in history] == loss_csv_steps(out) == list(range(1, 9))


def test_a_write_that_fails_ends_in_one_line_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "out"
    failed, stderr = run_child(out, "fsize")
    assert failed.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    checkpoint = out / "checkpoint_trainable" / "rank_0" / "tiny_rank_0-2.ckpt"
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        f"error: could not write {checkpoint}: File too large; training stopped; no training "
        f"state was saved yet"]
    assert temp_files(out) == [] and not checkpoint.exists()
    assert loss_csv_steps(out) == [1, 2]  # written before the checkpoint, within the limit


class Killed(BaseException):
    """Stands for a kill: nothing in the trainer handles it."""


def test_a_kill_between_checkpoint_and_loss_csv_leaves_loss_csv_complete(tmp_path, monkeypatch):
    save = trainer_module.save_checkpoint_atomic

    def save_then_die(params, path):
        save(params, path)
        if path.endswith(os.path.join("checkpoint", "rank_0", "tiny_rank_0-4.ckpt")):
            raise Killed

    monkeypatch.setattr(trainer_module, "save_checkpoint_atomic", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path, **SAVES)
    monkeypatch.undo()
    _, trainer, history = run(tmp_path, resume=True, **SAVES)
    assert "resuming at step 4 of 8" in trainer.stream.getvalue()
    assert loss_csv_steps(tmp_path / "out") == [row["step"] for row in history] == list(range(1, 9))


def test_resume_with_nothing_saved_starts_at_step_0(tmp_path):
    _, trainer, history = run(tmp_path, resume=True, epochs=1)
    state_dir = tmp_path / "out" / "checkpoint" / "rank_0"
    assert trainer.stream.getvalue().startswith(
        f"nothing to resume: no tiny_rank_0-<step>.ckpt in {state_dir}; starting at step 0\n")
    assert [row["step"] for row in history] == list(range(1, 9))


def test_ranks_continue_from_the_newest_state_any_rank_saved(tmp_path):
    """A kill during a save can leave rank 1 without the step-4 state rank 0 wrote; both ranks
    hold identical states, so rank 1 continues from rank 0's file."""
    out = tmp_path / "out"
    for rank, steps in ((0, (2, 4)), (1, (2,))):
        (out / "checkpoint" / f"rank_{rank}").mkdir(parents=True)
        for step in steps:
            (out / "checkpoint" / f"rank_{rank}" / f"tiny_rank_{rank}-{step}.ckpt").touch()

    def latest(rank):
        net = TinyNet()
        return Trainer(net, net.trainable(), make_args(), output_dir=str(out),
                       parallel_context=ParallelContext(rank=rank, world_size=2)).latest_state()

    assert latest(0) == latest(1) == str(out / "checkpoint" / "rank_0" / "tiny_rank_0-4.ckpt")
    (out / "checkpoint" / "rank_1" / "tiny_rank_1-4.ckpt").touch()
    assert latest(1) == str(out / "checkpoint" / "rank_1" / "tiny_rank_1-4.ckpt")


# atomic.py alone (standard library only), not the package, which imports MindFormers (slow)
HOLD_LOCK = ("import importlib.util, sys\n"
             "spec = importlib.util.spec_from_file_location('atomic', 'research/common/atomic.py')\n"
             "atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)\n"
             "with atomic.exclusive_lock(sys.argv[1]):\n"
             "    print('held', flush=True); sys.stdin.read()")


def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".lock_rank_0"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as exit_info:
            cli_main(lambda argv: run(tmp_path))()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"error: {out} is in use by another run (pid {holder.pid} on "
                              f"{socket.gethostname()}, started ")
        assert "exclusive_lock" in err and f"lock {lock}); wait for it to end" in err
        assert os.listdir(out) == [".lock_rank_0"]  # the refused run wrote nothing
        with output_dir_lock(str(out), ParallelContext(rank=1, world_size=2)):
            pass  # another rank of the holder's run takes its own lock
    finally:
        holder.kill()
        holder.wait()
    stream = io.StringIO()
    with output_dir_lock(str(out), stream=stream):
        assert f"pid {os.getpid()} " in lock.read_text()
    assert stream.getvalue().startswith(f"taking over {lock} {STALE.format(pid=holder.pid)}")
    assert not lock.exists()  # released cleanly: the next run finds nothing stale
