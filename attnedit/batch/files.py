"""Reading job files: JSONL or YAML (each job with its line), the files a job names, the defaults block."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..validate import short
from .data import DEFAULT_KEYS, Entry, Problem, _cap, _close


def read_jobs(path: str | os.PathLike) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    """Parse a JSONL or YAML job file into (defaults, jobs with line numbers, problems)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"job file {path} is a folder, not a job file: give a .jsonl or .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    text = _decode(path, path.read_bytes())
    if path.suffix.lower() in (".yaml", ".yml"):
        return _read_yaml(text)
    return _read_jsonl(text)


_BOMS = (("UTF-32", (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")), ("UTF-16", (b"\xff\xfe", b"\xfe\xff")))


def _decode(path: Path, data: bytes) -> str:
    """The job file's text: UTF-8 (a UTF-8 byte-order mark is dropped); anything else is refused,
    naming the file and the line, instead of a UnicodeDecodeError traceback."""
    for encoding, boms in _BOMS:
        if data.startswith(boms):
            raise ValueError(f"job file {path} is {encoding} text (it starts with a {encoding} byte-order mark); "
                             "save it as UTF-8")
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise ValueError(f"job file {path}: line {line} holds a NUL byte (is the file UTF-16 or binary?); save it "
                         "as UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"job file {path}: line {line} is not UTF-8 (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); save the file as UTF-8") from None


def file_model(path: str | os.PathLike) -> str | None:
    """The `model` of the file's defaults block, if any."""
    model = read_jobs(path)[0].get("model")
    return model if isinstance(model, str) else None


def file_concepts(path: str | os.PathLike) -> Path | None:
    """The AttenCraft concepts (`defaults.concepts`) the model of this job file is loaded with, checked."""
    value = read_jobs(path)[0].get("concepts")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: defaults.concepts must be the path of a concepts file or folder, got {short(value)}")
    found = resolve(Path(path).parent, value)
    if not found.exists():
        raise ValueError(f"{path}: defaults.concepts {short(value)} does not exist "
                         f"(looked for {_cap(str(found), 200)})")
    return found


def load_options(path: str | os.PathLike) -> dict[str, Any]:
    """`attnedit.load` options the job file asks for (its concepts)."""
    concepts = file_concepts(path)
    return {"concepts": str(concepts)} if concepts is not None else {}


def resolve(base: Path | None, name: str | os.PathLike) -> Path:
    """A file named in a job file: absolute, or relative to the job file's folder."""
    path = Path(name).expanduser()
    return path if path.is_absolute() or base is None else base / path


def file_digest(path: Path) -> str:
    """Content digest of a file (or of every file of a folder) for image keys."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def input_file(base: Path | None, name: Any, what: str, files: dict[str, str]) -> Path:
    """Check a file a job reads (exists, is a readable image) and record its digest in `files`."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a file name (relative to the job file), got {short(name)}")
    path = resolve(base, name)
    if not path.is_file():
        raise ValueError(f"{what} {short(name)} does not exist (looked for {_cap(str(path), 200)})")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{what} {short(name)} is not an image the batch can read ({_cap(str(err), 200)})") from None
    files[name] = file_digest(path)
    return path


def _read_jsonl(text: str) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    defaults: dict[str, Any] = {}
    defaults_line: int | None = None
    entries: list[Entry] = []
    problems: list[Problem] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line, object_pairs_hook=_unique_pairs)
        except _DuplicateKey as err:
            problems.append(Problem(no, f"duplicate key {short(err.key)}: a key may appear once in an object "
                                        "(JSON readers would silently keep the last)"))
            continue
        except json.JSONDecodeError as err:
            problems.append(Problem(no, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits, nesting too deep
            problems.append(Problem(no, f"not valid JSON ({type(err).__name__}: {_cap(str(err), 120)})"))
            continue
        if isinstance(data, dict) and set(data) == {"defaults"}:
            if defaults_line is not None:
                problems.append(Problem(no, f"a second defaults line (the first is line {defaults_line})"))
            elif not isinstance(data["defaults"], dict):
                problems.append(Problem(no, "defaults must be an object"))
            else:
                defaults, defaults_line = data["defaults"], no
                problems += _check_defaults(defaults, no)
            continue
        entries.append(Entry(no, data))
    return defaults, entries, problems


class _DuplicateKey(ValueError):
    def __init__(self, key: Any) -> None:
        super().__init__(f"duplicate key {short(key)}")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` hook: an object that names a key twice is refused (not last-wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


@functools.cache
def _yaml_loader() -> tuple[type, type]:
    """(the job files' YAML loader, the error it raises for what it refuses).

    SafeLoader that refuses anchors and aliases while composing, before anything is built from them
    (a few hundred bytes of nested aliases expand to gigabytes), and mappings that name a key twice.
    """
    import yaml

    class Refused(yaml.MarkedYAMLError):
        """An anchor, an alias or a duplicate key: reported as it is, not as a syntax error."""

    class JobLoader(yaml.SafeLoader):
        line_offset = 0  # lines of the file before the text read (messages give file lines)

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise Refused(problem=f"YAML alias *{_cap(event.anchor, 40)} refused: anchors and aliases are not "
                              "supported in job files (they can expand a small file into a huge value); write the "
                              "value out", problem_mark=event.start_mark)
            if getattr(event, "anchor", None) is not None:
                raise Refused(problem=f"YAML anchor &{_cap(event.anchor, 40)} refused: anchors and aliases are not "
                              "supported in job files (they can expand a small file into a huge value); write the "
                              "value out", problem_mark=event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        seen = first.get(key)
                    except TypeError:  # an unhashable key: the constructor says so itself
                        continue
                    if seen is not None:
                        raise Refused(problem=f"duplicate key {short(key)} (first given on line {seen}): a key may "
                                      "appear once in a mapping", problem_mark=key_node.start_mark)
                    first[key] = key_node.start_mark.line + 1 + self.line_offset
            return super().construct_mapping(node, deep=deep)

    return JobLoader, Refused


def _load_yaml(text: str, line_offset: int = 0) -> tuple[Any, Any]:
    """(the root node, the data) of one YAML document (`line_offset` lines into the file), read with the
    job files' loader."""
    loader_class, _ = _yaml_loader()
    loader = loader_class(text)
    loader.line_offset = line_offset
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _read_yaml(text: str) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    import yaml

    try:
        root, data = _load_yaml(text)
    except (yaml.YAMLError, RecursionError):
        return _read_yaml_chunks(text)
    if root is None:
        return {}, [], []
    problems: list[Problem] = []
    defaults: dict[str, Any] = {}
    if isinstance(root, yaml.SequenceNode):
        items, nodes = data, root.value
    elif isinstance(root, yaml.MappingNode):
        items, nodes = [], []
        for key_node, value_node in root.value:
            key = key_node.value
            if key == "defaults":
                if not isinstance(data.get("defaults"), dict):
                    problems.append(Problem(key_node.start_mark.line + 1, "defaults must be a mapping"))
                else:
                    defaults = data["defaults"]
                    problems += _check_defaults(defaults, key_node.start_mark.line + 1)
            elif key == "jobs":
                if not isinstance(value_node, yaml.SequenceNode):
                    problems.append(Problem(key_node.start_mark.line + 1, "jobs must be a list"))
                else:
                    items, nodes = data["jobs"], value_node.value
            else:
                problems.append(Problem(key_node.start_mark.line + 1, f"unknown top-level key {short(key)}; a YAML "
                                        "job file has 'defaults' and 'jobs'"))
    else:
        return {}, [], [Problem(1, "a YAML job file is a list of jobs or a mapping with 'defaults' and 'jobs'")]
    entries = [Entry(node.start_mark.line + 1, item) for item, node in zip(items, nodes)]
    return defaults, entries, problems


def _read_yaml_chunks(text: str) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    """A file YAML cannot parse as a whole: parse the defaults block and each list item on their
    own, so one bad job is reported with its line and the others still run."""
    import yaml

    lines = text.splitlines()
    chunks: list[tuple[str, int, int]] = []  # (kind, first line index, end index)
    top = [i for i, ln in enumerate(lines) if ln and not ln[0].isspace() and not ln.startswith("#")]
    sections: list[tuple[str, int, int]] = []
    for n, i in enumerate(top):
        end = top[n + 1] if n + 1 < len(top) else len(lines)
        head = lines[i].split(":", 1)[0].strip()
        sections.append((head, i, end))
    if not any(h in ("defaults", "jobs") for h, _, _ in sections):  # a bare list: items at column 0
        sections = [("jobs", -1, len(lines))]
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for head, start, end in sections:
        if head in ("defaults", "jobs") and head in first:
            problems.append(Problem(start + 1, f"duplicate top-level key {head!r} (first given on line "
                                               f"{first[head]}); this one is not read"))
            continue
        first.setdefault(head, start + 1)
        if head == "defaults":
            chunks.append(("defaults", start, end))
        elif head == "jobs" or head.startswith("-"):
            body = range(start + 1, end)
            starts = [i for i in body if lines[i].lstrip().startswith("- ") or lines[i].strip() == "-"]
            if not starts:
                continue
            indent = min(len(lines[i]) - len(lines[i].lstrip()) for i in starts)
            starts = [i for i in starts if len(lines[i]) - len(lines[i].lstrip()) == indent]
            for n, i in enumerate(starts):
                chunks.append(("job", i, starts[n + 1] if n + 1 < len(starts) else end))
        else:
            problems.append(Problem(start + 1, f"unknown top-level key {short(head)} (or a YAML syntax error on it)"))
    defaults: dict[str, Any] = {}
    entries: list[Entry] = []
    for kind, start, end in chunks:
        piece = "\n".join(lines[start:end])
        if kind == "job":
            piece = _dedent(lines[start:end])
        try:
            value = _load_yaml(piece, start)[1]
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            at = start + 1 + (mark.line if mark is not None else 0)
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            refused = isinstance(err, _yaml_loader()[1])
            problems.append(Problem(at, what if refused else f"YAML syntax error: {what}"))
            continue
        except RecursionError:
            problems.append(Problem(start + 1, "YAML nesting too deep"))
            continue
        if kind == "defaults":
            value = (value or {}).get("defaults") if isinstance(value, dict) else None
            if not isinstance(value, dict):
                problems.append(Problem(start + 1, "defaults must be a mapping"))
            else:
                defaults = value
                problems += _check_defaults(defaults, start + 1)
        elif isinstance(value, list) and len(value) == 1:
            entries.append(Entry(start + 1, value[0]))
        else:
            problems.append(Problem(start + 1, "could not read this job"))
    return defaults, entries, problems


def _check_defaults(defaults: dict[str, Any], line: int) -> list[Problem]:
    valid = ", ".join(DEFAULT_KEYS)
    return [Problem(line, f"unknown key {short(k)} in defaults{_close(k, DEFAULT_KEYS)}; valid keys: {valid}")
            for k in defaults if k not in DEFAULT_KEYS]


def _dedent(lines: list[str]) -> str:
    indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[indent:] for ln in lines)


def job_file_text(defaults: dict[str, Any], jobs: list[dict[str, Any]]) -> str:
    """The JSONL text `attnedit batch FILE` takes: a defaults line (the model, ...), then one line per job."""
    return "".join(json.dumps(line) + "\n" for line in [{"defaults": defaults}, *jobs])
