"""Reading and layering params: schema defaults <- the profile's preset <- ``params.yaml`` <- ``--set`` overrides.

YAML is read safely (no Python tags, no key given twice), and every error is a ``ParamsError`` line naming the
file or override, the key, what was expected and what was found.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sd_distill.params.presets import PROFILES
from sd_distill.params.schema import PROFILE_NAMES, SECTIONS, Params, ParamsError, Section


def _merge(into: dict, patch: dict) -> dict:
    out = copy.deepcopy(into)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a
    second ``teacher:`` section would drop the first without a word)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first_line
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"found duplicate key {key!r} (first given on line {first_line[key]})", key_node.start_mark)
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_error(where: str, exc: yaml.YAMLError) -> str:
    """One line: ``where:LINE:COLUMN: not valid YAML: problem (context)``; PyYAML's own message spans lines."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        problem += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        problem += f" ({context})"
    return f"{at}: not valid YAML: {problem}"


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely (no Python tags, no duplicate keys); errors are one ``ParamsError`` line naming
    ``where``, the line and the column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # nosec B506: _StrictLoader is a yaml.SafeLoader
    except yaml.MarkedYAMLError as exc:
        raise ParamsError(_yaml_error(where, exc)) from None
    except yaml.reader.ReaderError as exc:  # a control character: position is an offset into the text
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ParamsError(f"{where}:{line}:{column}: not valid YAML: {exc.reason} (character #x{char:02x})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(_yaml_error(where, exc)) from None


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["teacher.unet_train.steps=10"]`` -> ``{"teacher": {"unet_train": {"steps": 10}}}`` (values are YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ParamsError(f"--set {item!r}: expected section.key=value, for example teacher.unet_train.steps=100")
        if parts[0] not in SECTIONS:
            raise ParamsError(f"--set {item!r}: unknown section {parts[0]!r}; allowed: {', '.join(SECTIONS)}")
        node = tree
        for depth, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is already set to a value, "
                                  "so it has no keys to set")
        node[parts[-1]] = load_yaml(raw, f"--set {item!r}") if raw.strip() else None
    return tree


def _given(tree: Any, loc: tuple) -> bool:
    """Whether the nested ``tree`` (a params layer) holds a value at ``loc``."""
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and isinstance(part, int) and 0 <= part < len(tree):
            tree = tree[part]
        else:
            return False
    return True


# keys that were renamed (old dotted key -> new) or removed (old -> why): a params file with one is refused by a line
# that names what to write instead, never silently read under the new name
RENAMED = {"evaluate.steps": "evaluate.sampling_steps", "evaluate.baseline_steps": "evaluate.baseline_sampling_steps",
           "evaluate.grid_steps": "evaluate.grid_sampling_steps", "halve.round_steps": "halve.round_train_steps"}
REMOVED = {"halve.steps_from": "the first round's teacher always samples in 64 steps, twice the first round's 32 "
                               "(the rounds in dvc.yaml); delete the key"}


def _format_error(origin, section: str, err: ValidationError, model: type[Section]) -> str:
    """One line per error: ``<where the value came from>: section.key: what is wrong (found value)``."""
    lines = []
    for e in err.errors():
        where = origin((section, *e["loc"]))
        loc = ".".join(str(x) for x in (section, *e["loc"]))
        if e["type"] == "extra_forbidden" and loc in RENAMED:
            lines.append(f"{where}: {loc}: renamed to {RENAMED[loc]}; write that key instead")
        elif e["type"] == "extra_forbidden" and loc in REMOVED:
            lines.append(f"{where}: {loc}: no longer a param: {REMOVED[loc]}")
        elif e["type"] == "extra_forbidden":
            parent = model
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                ann = getattr(field, "annotation", None)
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
            allowed = ", ".join(parent.model_fields)
            lines.append(f"{where}: {loc}: unknown key; allowed keys here: {allowed}")
        else:
            found = e.get("input")
            if isinstance(found, dict):  # a section-level check sees the whole section: its message names the keys
                found_s = "" if e["type"] == "value_error" else " (found a mapping)"
            else:
                found_s = f" (found {found!r})"
            lines.append(f"{where}: {loc}: {e['msg']}{found_s}")
    return "\n".join(lines)


def read_params_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, expected a params YAML file")
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ParamsError(f"{path}:{line}:{column}: not UTF-8 text (byte {data[exc.start]:#04x}); save the params "
                          "file as UTF-8") from None
    raw = load_yaml(text, str(path))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level (section: {{key: value}}), "
                          f"found {type(raw).__name__} {_short(raw)}")
    allowed = {"profile", *SECTIONS}
    unknown = sorted((k for k in raw if k not in allowed), key=str)
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    for name in SECTIONS:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ParamsError(f"{path}: section {name!r} must be a mapping of keys to values, found "
                              f"{type(raw[name]).__name__} {_short(raw[name])}")
    return raw


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def overrides_to_set(overrides: Any, where: str = "--overrides") -> list[str]:
    """``{"teacher.unet_train.steps": 10}`` (an orchestrator's run parameter) -> ``--set`` items.

    Values are JSON, which is YAML, so they parse back exactly as ``--set`` values do.
    """
    if not isinstance(overrides, dict):
        raise ParamsError(f"{where}: expected a mapping of section.key to value, found {type(overrides).__name__}")
    items = []
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ParamsError(f"{where}: key {key!r}: expected a string section.key")
        items.append(f"{key}={json.dumps(value)}")
    return items


def resolve(path: Path | str = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
            profile: str | None = None) -> "Params":
    """Read, layer and validate all sections; raises ``ParamsError`` naming every bad key.

    ``profile`` (an orchestrator's run parameter) replaces the file's ``profile:``; with it a missing
    params file means "no project overrides": the profile's preset and ``overrides`` alone.
    """
    path = Path(path)
    raw = read_params_file(path) if profile is None or path.exists() else {}
    where = str(path)
    if profile is not None:
        raw, where = {**raw, "profile": profile}, "profile"
    profile = raw.get("profile", "tiny")
    if not isinstance(profile, str) or profile not in PROFILES:
        raise ParamsError(f"{where}: profile: expected one of {', '.join(PROFILE_NAMES)}, found {_short(profile)}")
    patch = parse_set(overrides)

    def origin(loc: tuple) -> str:
        """Where the value at ``loc`` came from, for the error line."""
        if _given(patch, loc):
            return "overrides"  # --set or an orchestrator's --overrides
        if _given(raw, loc):
            return str(path)
        return f"profile {profile}" if _given(PROFILES[profile], loc) else (str(path) if path.exists() else "defaults")

    sections, errors = {}, []
    for name, model in SECTIONS.items():
        # start from the full defaults so that setting one nested key keeps its siblings' defaults
        data = _merge(model().model_dump(), PROFILES[profile].get(name, {}))
        data = _merge(data, raw.get(name) or {})
        data = _merge(data, patch.get(name, {}))
        try:
            sections[name] = model.model_validate(data)
        except ValidationError as exc:
            errors.append(_format_error(origin, name, exc, model))
    if errors:
        raise ParamsError("\n".join(errors))
    return Params(profile=profile, **sections)
