"""YAML configs in MindFormers' format, read safely and checked field by field.

`load_config` reads a YAML file (safe loading) into a `MindFormerConfig` and remembers the
line of every key, so that `ModelConfig.from_dict` can say "file:line: field must be int, got 'x'"
instead of failing later inside MindSpore. Model configs are dataclasses that subclass
`ModelConfig`; their annotations are the schema.
"""
import dataclasses
import difflib
import os
import types
import typing

import yaml
from mindformers.tools.register import MindFormerConfig
from mindformers.tools.register.template import CONFIG_NAME_TO_CLASS, GeneralConfig

from research.common.errors import UserInputError

# Precision fields of every model config (param_init_type, compute_dtype, ...).
DTYPES = typing.Literal["float32", "float16", "bfloat16"]

# Prefix of the names this project registers in MindFormers' registry where MindFormers has a
# class of the same name (ChatGLM2Config, LlamaConfig, ...), which would otherwise be replaced.
REGISTRY_PREFIX = "Research"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")


def repo_path(path):
    """A path written in a YAML: relative ones are relative to the repository root, so a config
    names the same files from whichever folder a script starts (command-line paths, by
    contrast, are relative to the current folder, as the shell completes them)."""
    return path if not path or os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))


# The top-level fields MindFormers' YAMLs may have, from MindFormers' own config template (its
# sections and the fields of its general section). Each task refuses those it does not read;
# any other top-level key is a typo.
TOP_LEVEL_FIELDS = tuple(sorted(
    (set(CONFIG_NAME_TO_CLASS) - {GeneralConfig._name})  # pylint: disable=protected-access
    | {name for name in vars(GeneralConfig) if not name.startswith("_")}))


def _index_lines(node, path, prefix=()):
    """{('a', 'b'): line} for every mapping key of a composed YAML node tree; a key given twice
    in one mapping is an error (YAML loaders silently keep the last)."""
    index = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            keys = prefix + (str(key_node.value),)
            line = key_node.start_mark.line + 1
            if keys in index:
                raise UserInputError(f"{path}:{line}: {'.'.join(keys)} is given twice (first at "
                                     f"line {index[keys]}); keep one")
            index[keys] = line
            index.update(_index_lines(value_node, path, keys))
    return index


def resolve_config_path(config, model_dir):
    """A path as given, or a bare file name looked up in `configs/<model_dir>/`."""
    candidates = [config]
    if not os.path.isabs(config):
        name = config if config.endswith((".yaml", ".yml")) else config + ".yaml"
        candidates.append(os.path.join(CONFIG_ROOT, model_dir, name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UserInputError(
        f"config not found: {config!r} (looked for {', '.join(repr(c) for c in candidates)})")


def load_config(path):
    """Read a YAML config; returns a MindFormerConfig with `.source` = (path, line index)."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
        data = yaml.safe_load(text)
        lines = _index_lines(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except OSError as err:
        raise UserInputError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise UserInputError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a YAML mapping at the top level")
    for key in data:
        if key not in TOP_LEVEL_FIELDS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_FIELDS, n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"MindFormers' top-level fields are {', '.join(TOP_LEVEL_FIELDS)}")
            raise UserInputError(f"{path}:{lines.get((str(key),), 1)}: unknown top-level field {key!r}; {hint}")
    config = MindFormerConfig(**data)
    config.source = ConfigSource(path, lines)
    return config


class ConfigSource:
    """Where a config came from, to point errors at a file and line."""

    def __init__(self, path, lines):
        self.path = path
        self.lines = lines

    def where(self, field_path):
        """'file:line: dotted.path' for a field, as precise as is known."""
        keys = tuple(field_path.split("."))
        while keys and keys not in self.lines:
            keys = keys[:-1]
        line = f":{self.lines[keys]}" if keys else ""
        return f"{self.path}{line}: {field_path}"


def type_name(annotation):
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_value(value, annotation):
    """True if `value` fits `annotation` (int/float/bool/str, Optional, list, tuple, Literal)."""
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(check_value(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and (
            not args or all(check_value(v, args[0]) for v in value))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_int(name, value, minimum=1):
    """`value` if it is an int >= `minimum` (a YAML `true` is not), else a UserInputError naming `name`."""
    if not check_value(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserInputError(f"{name} must be {wanted}, got {value!r}")
    return value


class FieldError(UserInputError):
    """A `validate()` error about one field; `from_dict` points it at the field's file:line."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclasses.dataclass
class ModelConfig:
    """Base for model configs: typed fields, built from YAML with checked types."""

    # Fields of MindFormers' YAML that this model does not implement: name -> why (refused).
    UNSUPPORTED_FIELDS = {}

    @classmethod
    def from_dict(cls, values, where="model_config", source=None):
        """Build from a mapping; unknown fields and wrong types raise UserInputError."""
        values = dict(values or {})
        values.pop("type", None)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}

        def location(name):
            path = f"{where}.{name}"
            return source.where(path) if source is not None else path

        unsupported = sorted(set(values) & set(cls.UNSUPPORTED_FIELDS))
        if unsupported:
            name = unsupported[0]
            raise UserInputError(f"{location(name)}: not supported by {cls.__name__}: "
                                 f"{cls.UNSUPPORTED_FIELDS[name]}")
        unknown = sorted(set(values) - fields)
        if unknown:
            raise UserInputError(
                f"{location(unknown[0])}: unknown field(s) {unknown} for {cls.__name__}; "
                f"known fields: {sorted(fields)}")
        kwargs = {}
        for name, value in values.items():
            annotation = hints[name]
            sub = _sub_config_class(annotation)
            if value == "None" and check_value(None, annotation):
                value = None  # MindFormers' YAMLs write `None` (a string to YAML) for "not set"
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value, f"{where}.{name}", source)
            elif not check_value(value, annotation):
                raise UserInputError(
                    f"{location(name)}: expected {type_name(annotation)}, "
                    f"got {value!r} ({type(value).__name__})")
            if annotation is float and isinstance(value, int):
                value = float(value)
            kwargs[name] = value
        config = cls(**kwargs)
        try:
            config.validate()
        except FieldError as err:
            raise UserInputError(f"{location(err.field)}: {err.message}") from err
        except UserInputError as err:
            raise UserInputError(f"{source.path + ': ' if source else ''}{where}: {err}") from err
        return config

    def validate(self):
        """Cross-field checks; subclasses raise UserInputError."""

    def to_dict(self):
        return dataclasses.asdict(self)


def preset(presets, name):
    """A fresh config of the named preset; `presets` maps names to factories."""
    if name not in presets:
        raise UserInputError(f"unknown preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]()


def _sub_config_class(annotation):
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, ModelConfig):
            return arg
    return None
