"""Test YAMLs: a shipped config with a few fields changed."""
import yaml


def write_yaml(path, source, changes):
    """`source` with `changes` ({dotted YAML path: value}) written to `path`; returns the path."""
    with open(source, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    with open(path, "w", encoding="utf-8") as stream:
        yaml.safe_dump(config, stream, allow_unicode=True)
    return str(path)
