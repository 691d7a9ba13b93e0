"""The pieces every model's demo shares (research.common.demo)."""
import os

from research.common.config import REPO_ROOT
from research.common.demo import fingerprint, read_stamp, shown, write_stamp


def test_fingerprint_follows_content_not_yaml_comments(tmp_path):
    base = tmp_path / "a.yaml"
    base.write_text("seed: 0\nrunner_config:\n  epochs: 12\n", encoding="utf-8")
    commented = tmp_path / "b.yaml"
    commented.write_text("# a comment\nseed: 0   # here too\nrunner_config: {epochs: 12}\n", encoding="utf-8")
    changed = tmp_path / "c.yaml"
    changed.write_text("seed: 0\nrunner_config:\n  epochs: 13\n", encoding="utf-8")
    data = tmp_path / "d.json"
    data.write_text("[]", encoding="utf-8")
    first = fingerprint([str(data), str(base)])
    assert first == fingerprint([str(data), str(commented)])
    assert first != fingerprint([str(data), str(changed)])
    assert first != fingerprint([str(base), str(data)])


def test_shown_paths_paste_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown(str(tmp_path / "out" / "a.yaml")) == os.path.join("out", "a.yaml")
    assert shown(REPO_ROOT) == REPO_ROOT  # outside the current folder: absolute


def test_a_stamp_is_written_whole_or_not_at_all(tmp_path):
    stamp = str(tmp_path / "inputs.sha256")
    assert read_stamp(stamp) is None
    write_stamp(stamp, "abc")
    assert read_stamp(stamp) == "abc" and os.listdir(tmp_path) == ["inputs.sha256"]
