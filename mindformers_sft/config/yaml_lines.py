"""Load YAML keeping the line of every mapping key, so errors can say `file.yaml:37`."""
from __future__ import annotations

import yaml

from ..errors import ConfigError


class LineDict(dict):
    """A dict that remembers the 1-based source line of each key (`.lines[key]`) and its file."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lines: dict = {}
        self.file: str = ""


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node):
    explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)      # `<<: *anchor` entries come first; explicit keys may override them
    d = LineDict()
    d.file = loader.name
    first_explicit = len(node.value) - explicit
    seen = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if i >= first_explicit and key in seen:
            raise ConfigError(f"{loader.name}:{key_node.start_mark.line + 1}: key '{key}' appears twice")
        if i >= first_explicit:
            seen.add(key)
        d[key] = loader.construct_object(value_node, deep=True)
        d.lines[key] = key_node.start_mark.line + 1
    return d


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads "1.e-5" as a string; MindFormers configs write learning rates like that.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", __import__("re").X),
    list("-+0123456789."))


def load_yaml(path: str) -> LineDict:
    try:
        with open(path, encoding="utf-8") as f:
            loader = _Loader(f)
            loader.name = path
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise ConfigError(f"{path}:{line}: invalid YAML: {e.problem}") from None
    if data is None:
        data = LineDict()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def where(d, key) -> str:
    """'file:line' of key in a LineDict, or the file alone."""
    if isinstance(d, LineDict):
        line = d.lines.get(key)
        if isinstance(line, str):
            return line
        return f"{d.file}:{line}" if line else d.file
    return "<config>"


def parse_value(raw: str):
    """A --options value parsed as YAML with the same float rules as config files ('1e-3' is a float)."""
    loader = _Loader(raw)
    loader.name = "--options"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
