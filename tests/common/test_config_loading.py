"""YAML loading as a newcomer meets it (issue #12): a key given twice or a misspelt top-level
key is refused with the file and line, and a YAML's relative paths mean the same files from
whichever folder a script starts."""
import os

import pytest

from research.common.config import REPO_ROOT, load_config, repo_path
from research.common.errors import UserInputError
from research.common.runtime import resolve_path


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "seed: 0\nmodel:\n  arch: a\n  model_config: {}\n  arch: b\n")
    with pytest.raises(UserInputError, match=rf"{path}:5: model.arch is given twice \(first at line 3\)"):
        load_config(path)


def test_an_unknown_top_level_key_is_refused_with_a_suggestion(tmp_path):
    path = write(tmp_path, "seed: 0\nprocesor:\n  type: VisualGLMProcessor\n")
    with pytest.raises(UserInputError, match=rf"{path}:2: unknown top-level field 'procesor'; "
                                             r"did you mean 'processor'\?"):
        load_config(path)


def test_the_shipped_configs_use_only_known_top_level_keys():
    folder = os.path.join(REPO_ROOT, "configs")
    names = [os.path.join(root, name) for root, _, files in os.walk(folder) for name in files
             if name.endswith(".yaml")]
    assert names
    for name in names:
        load_config(name)


def test_yaml_paths_are_relative_to_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a script started elsewhere finds the same file
    assert resolve_path("examples/tiny/ice_text.model", "vocab_file") == os.path.join(
        REPO_ROOT, "examples", "tiny", "ice_text.model")
    assert repo_path(str(tmp_path / "x")) == str(tmp_path / "x")  # absolute paths stay
    with pytest.raises(UserInputError, match=r"vocab_file not found: no/such.model \(a relative path in "
                                             r"a YAML is relative to the repository root: "):
        resolve_path("no/such.model", "vocab_file")
