"""What every model's `make demo` stage shares: its YAMLs moved to another output folder, stamps
that say which inputs a checkpoint was trained from (so a second run reuses it), and the paths and
commands it prints for pasting in the current folder."""
import argparse
import hashlib
import json
import os
import shlex
import sys

import yaml

from research.common.config import REPO_ROOT, resolve_config_path


def _moved(node, prefixes, root):
    """`node` (parsed YAML) with every path starting with one of `prefixes` moved to `root`."""
    if isinstance(node, dict):
        return {key: _moved(value, prefixes, root) for key, value in node.items()}
    if isinstance(node, list):
        return [_moved(value, prefixes, root) for value in node]
    if isinstance(node, str):
        for prefix in prefixes:
            if node.startswith(prefix):
                return os.path.join(root, node[len(prefix):])
    return node


def demo_configs(names, model_dir, default_root, root, writer):
    """{stage: config} for `names` ({stage: YAML name in configs/`model_dir`/}): the bare names
    when the demo writes to `default_root` (output/<demo>, as the YAMLs say), else copies in
    ROOT/configs with their output/<demo> paths moved to ROOT (absolute); `writer` names the
    module that wrote them, in their first line."""
    if os.path.realpath(root) == os.path.realpath(default_root):
        return dict(names)
    relative = os.path.relpath(default_root, REPO_ROOT)
    prefixes = (f"./{relative}/", f"{relative}/")  # how the YAMLs spell the default folder
    folder = os.path.join(root, "configs")
    os.makedirs(folder, exist_ok=True)
    configs = {}
    for stage, name in names.items():
        with open(resolve_config_path(name, model_dir), encoding="utf-8") as stream:
            data = _moved(yaml.safe_load(stream), prefixes, root)
        configs[stage] = os.path.join(folder, name)
        with open(configs[stage], "w", encoding="utf-8") as stream:
            stream.write(f"# configs/{model_dir}/{name} with its {relative} paths in {root} (written by {writer})\n")
            yaml.safe_dump(data, stream, allow_unicode=True, sort_keys=False)
    return configs


def fingerprint(files):
    """sha256 over the contents of `files`, in order; a YAML counts by what it says (its
    comments and layout may change without retraining)."""
    digest = hashlib.sha256()
    for path in files:
        if path.endswith((".yaml", ".yml")):
            with open(path, encoding="utf-8") as stream:
                content = json.dumps(yaml.safe_load(stream), sort_keys=True).encode("utf-8")
        else:
            with open(path, "rb") as stream:
                content = stream.read()
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def read_stamp(path):
    """The fingerprint a stage wrote when it finished, or None."""
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip()
    except OSError:
        return None


def write_stamp(path, text):
    """Written last and atomically, so a stage cut short is never taken as done."""
    with open(path + ".tmp", "w", encoding="utf-8") as stream:
        stream.write(text + "\n")
    os.replace(path + ".tmp", path)


def shown(path):
    """A path to print for pasting in the current folder: relative to it, unless it lies
    outside it (then absolute)."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def activation_line():
    """`source .../bin/activate` of the virtual environment this runs in (else the repository's
    .venv, which `make` creates)."""
    activate = os.path.join(sys.prefix, "bin", "activate")
    if sys.prefix == sys.base_prefix or not os.path.isfile(activate):
        activate = os.path.join(REPO_ROOT, ".venv", "bin", "activate")
    return f"source {shlex.quote(shown(activate))}"


def demo_parser(description, default_dir, stages):
    """The flags every demo takes: --retrain (`stages` trained again) and --output_dir."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true", help=f"train {stages} again")
    parser.add_argument("--output_dir", default=default_dir,
                        help=f"where to write everything (default {os.path.relpath(default_dir, REPO_ROOT)} "
                             f"in the repository)")
    return parser
