"""The results tables of the docs, generated from the measurements under docs/results/.

    python -m benchmarks.results_docs            # rewrite every table between markers in the docs
    python -m benchmarks.results_docs --check    # exit 1 naming each table whose committed text differs

A markdown file holds a table as ``<!-- table: NAME -->`` ... ``<!-- /table -->``; everything between the two
markers is the renderer's, everything outside them is hand-written. ``NAME`` is defined in the ``"tables"`` of
one JSON file under docs/results/; the table's rows are measurement records, each carrying its provenance.
A file may hold, beside whatever a benchmark wrote into it:

- ``"records"``: a list of measurement records, each a flat object of fields (``"id"`` names it for tables
  of other files: ``"STEM:ID"``, STEM being the file name without ``.json``);
- ``"record_defaults"``: fields every record of the file has unless it sets them itself;
- ``"tables"``: NAME -> a table spec (below).

Every record must have ``command``, ``commit``, ``machine``, ``date``, ``seed`` or ``seeds`` (every seed a figure
averages), ``settings``, ``chosen_on`` (the split that chose the settings) and ``weights`` (``raw`` or ``ema``),
from itself, its file's ``record_defaults`` or (rows a table reads from elsewhere) the spec's ``defaults``;
figures copied from an older document say so with ``"transcribed_from"`` (and ``"transcribed_fields"``).

Any value in a record may instead be computed:

- ``{"$ref": "#/rows/0/baseline/asr"}``: the value at a JSON pointer (RFC 6901) in the same file, or in
  another file of docs/results/ (``"other.json#/rows/0"``): a figure is stored once, where the benchmark wrote it;
- ``{"$mean_sd": [v, v, ...]}``: mean and sample standard deviation over seeds (or ``{"$mean_sd": {"mean": m,
  "sd": s, "n": n}}`` where only those were kept), shown ``m ± s``; ``[mean]``, ``[sd]`` and ``[n]`` reach the parts;
- ``{"$sub": [a, b], "scale": k}``: ``(a - b) * k`` (``scale`` defaults to 1), e.g. a difference in points;
  ``{"$div": [a, b]}``: ``a / b``, e.g. seconds as minutes; ``{"$mul": [a, b]}``: ``a * b``, e.g. a share in %.

A record's ``"fields_from"`` (an object, usually a ``$ref`` to one model's metrics, or a list of them) gives the
record every field of that object it does not set itself: ``{"model": "baseline", "fields_from": {"$ref":
"#/baseline"}}`` has the ``clean_acc``, ``asr`` and ``ra`` the benchmark wrote under ``baseline``.

A table spec:

- ``"records"``: where its rows come from: a JSON pointer into the same file (default ``"#/records"``), or
  ``"other.json#/rows"`` (e.g. the ``rows`` of a ``benchmarks/campaign.py`` summary copied under docs/results/);
- ``"defaults"``: fields given to each of those rows that it lacks (e.g. the provenance a campaign row lacks);
- ``"where"``: ``{"field": value}`` keeps the rows whose field, as written, equals the value (a list: any of them);
- ``"rows"``: instead of ``records``/``where``, an explicit list of record ids in order, each ``"ID"`` (this file)
  or ``"STEM:ID"``, or ``{"record": ID, "with": {fields}}`` to add or override fields for this table only;
- ``"columns"``: a list of ``{"header": text, "value": template or [templates], "missing": text}``. A template
  is Python's ``str.format`` over the record's fields (``"{clean_acc:.3f}"``, ``"{baseline[asr]:.3f}"``,
  ``"{flagged:,}"``; an exponent loses its leading zeros: ``6.2e-8``). With several templates the first that
  the record fills wins (a field it lacks, a None, an index into a plain number: not filled), and ``missing``
  is shown when none does (without ``missing`` that is an error naming the table, column and record). Fields
  named in a record's ``"bold"`` (or ``"struck"``) list are shown ``**value**`` (``~~value~~``);
  ``"blank_repeats": true`` leaves a cell blank where it would repeat the cell above (a group's label shown
  once). A record of an irregular table may carry its own template for a column in ``"cells": {header:
  template}``, tried before the column's;
- ``"pivot"`` (optional): ``{"key": field, "columns": [value, ...] or [{"key": value, "header": text}], "value":
  template(s), "missing": text}``: records whose ``columns`` cells render alike make one row, and each pivot
  column shows the record of that row whose ``key`` field has that value.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOCS = (ROOT / "docs" / "RESULTS.md", ROOT / "README.md")
PROVENANCE = ("command", "commit", "machine", "date", "settings", "chosen_on", "weights")
SEED_FIELDS = ("seed", "seeds")
WEIGHTS = ("raw", "ema")
BEGIN = re.compile(r"^<!-- table: (?P<name>[^ ]+) -->$")
END = "<!-- /table -->"
FIELDS_FROM = "fields_from"
EXPONENT = re.compile(r"e([+-])0+(\d)")  # 6.2e-08 -> 6.2e-8


class ResultsError(Exception):
    """A results file, a table spec or a marker that cannot be rendered; the message names it."""


class Unfilled(Exception):
    """A template names a field the record does not have (or cannot be formatted that way)."""


@dataclass(frozen=True)
class Stats:
    """Mean and sample standard deviation over ``n`` runs, shown ``mean ± sd`` (the mean alone when n is 1)."""
    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            raise ResultsError("$mean_sd of no values")
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def __getitem__(self, part: str) -> float | int:
        if part not in ("mean", "sd", "n"):
            raise KeyError(part)
        return getattr(self, part)

    def __format__(self, spec: str) -> str:
        mean = format(self.mean, spec)
        return mean if self.n == 1 else f"{mean} ± {format(self.sd, spec.replace('+', ''))}"


@dataclass(frozen=True)
class _Marked:
    value: Any
    mark: str


class _CellFormatter(string.Formatter):
    """``str.format`` over one record: marks the record's bold and struck fields, refuses missing and None ones."""

    def __init__(self, marks: dict[str, str]) -> None:
        super().__init__()
        self.marks = marks

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        try:
            value, first = super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise Unfilled(field_name) from e
        mark = self.marks.get(str(first))
        return (_Marked(value, mark) if mark else value), first

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, _Marked):
            return f"{value.mark}{self.format_field(value.value, format_spec)}{value.mark}"
        if value is None:
            raise Unfilled("None")
        try:
            text = format(value, format_spec)
        except (ValueError, TypeError) as e:
            raise Unfilled(format_spec) from e
        return EXPONENT.sub(r"e\1\2", text) if format_spec.lower().endswith("e") else text


def _templates(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def fill(templates: str | list[str], record: dict[str, Any], missing: str | None, where: str) -> str:
    """The first of ``templates`` that ``record`` fills, else ``missing``; None for ``missing`` is an error."""
    marks = {**{f: "**" for f in record.get("bold", [])}, **{f: "~~" for f in record.get("struck", [])}}
    formatter = _CellFormatter(marks)
    for template in _templates(templates):
        try:
            return formatter.vformat(template, (), record)
        except Unfilled:
            continue
    if missing is None:
        raise ResultsError(f"{where}: record {record.get('id', '?')!r} fills none of {_templates(templates)} "
                           "(give the column a \"missing\" text if the blank is meant)")
    return missing


def cell(column: dict[str, Any], record: dict[str, Any], where: str) -> str:
    """One cell: the record's own template for this column (its ``"cells"``, by header) first, then the column's."""
    own = record.get("cells", {}).get(column["header"])
    templates = ([own] if own is not None else []) + _templates(column["value"])
    return fill(templates, record, column.get("missing"), f"{where}, column {column['header']!r}")


@dataclass
class ResultsFile:
    path: Path
    data: dict[str, Any]

    @property
    def stem(self) -> str:
        return self.path.stem


@dataclass
class Results:
    """Every JSON file of a results folder, its records by id and its table specs by name."""
    folder: Path
    files: dict[str, ResultsFile] = field(default_factory=dict)
    tables: dict[str, tuple[ResultsFile, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> Results:
        results = cls(folder)
        for path in sorted(folder.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}: not JSON ({e})") from e
            if not isinstance(data, dict):
                continue
            file = ResultsFile(path, data)
            results.files[path.name] = file
            for name, spec in data.get("tables", {}).items():
                if name in results.tables:
                    raise ResultsError(f"table {name!r} is defined twice: in {results.tables[name][0].path.name} "
                                       f"and {path.name}")
                results.tables[name] = (file, spec)
        return results

    def pointer(self, file: ResultsFile, ref: str) -> tuple[ResultsFile, Any]:
        """The file and value a ``"other.json#/a/0/b"`` or ``"#/a/0/b"`` reference names, from ``file``."""
        name, hash_, pointer = ref.partition("#")
        if not hash_:
            raise ResultsError(f"{file.path.name}: reference {ref!r} has no '#'")
        target = self.files.get(name) if name else file
        if target is None:
            raise ResultsError(f"{file.path.name}: reference {ref!r} names no file of {self.folder}")
        value: Any = target.data
        for token in [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]:
            try:
                value = value[int(token)] if isinstance(value, list) else value[token]
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise ResultsError(f"{file.path.name}: reference {ref!r}: nothing at {token!r}") from e
        return target, value

    def resolve(self, file: ResultsFile, value: Any, depth: int = 0) -> Any:
        """``value`` with every ``$ref``, ``$mean_sd``, ``$sub``, ``$div`` and ``$mul`` inside it computed."""
        if depth > 50:
            raise ResultsError(f"{file.path.name}: references nested too deep (a cycle?)")
        if isinstance(value, list):
            return [self.resolve(file, v, depth + 1) for v in value]
        if not isinstance(value, dict):
            return value
        if "$ref" in value:
            target, found = self.pointer(file, value["$ref"])
            return self.resolve(target, found, depth + 1)
        if "$mean_sd" in value:
            inner = self.resolve(file, value["$mean_sd"], depth + 1)
            if isinstance(inner, dict):
                return Stats(float(inner["mean"]), float(inner["sd"]), int(inner["n"]))
            return Stats.of([float(v) for v in inner])
        if "$sub" in value:
            a, b = self.resolve(file, value["$sub"], depth + 1)
            return (a - b) * value.get("scale", 1)
        if "$div" in value:
            a, b = self.resolve(file, value["$div"], depth + 1)
            return a / b
        if "$mul" in value:
            a, b = self.resolve(file, value["$mul"], depth + 1)
            return a * b
        return {k: self.resolve(file, v, depth + 1) for k, v in value.items()}

    def record(self, file: ResultsFile, record_id: str) -> tuple[ResultsFile, dict[str, Any]]:
        """A record by ``ID`` (in ``file``) or ``STEM:ID`` (in ``STEM.json``)."""
        stem, colon, rid = record_id.partition(":")
        owner = self.files.get(f"{stem}.json") if colon else None
        if owner is None:  # an id of this file (ids may hold colons: "badnets:all-to-all/baseline")
            owner, rid = file, record_id
        for r in owner.data.get("records", []):
            if r.get("id") == rid:
                return owner, r
        raise ResultsError(f"{file.path.name}: no record {rid!r} in {owner.path.name}")


def _matches(record: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(record.get(k) in (v if isinstance(v, list) else [v]) for k, v in where.items())


def _check_provenance(record: dict[str, Any], where: str) -> None:
    lacking = [k for k in PROVENANCE if k not in record]
    if not any(k in record for k in SEED_FIELDS):
        lacking.append("seed or seeds")
    if lacking:
        raise ResultsError(f"{where}: record {record.get('id', '?')!r} lacks {', '.join(lacking)}")
    if record["weights"] not in WEIGHTS:
        raise ResultsError(f"{where}: record {record.get('id', '?')!r}: weights {record['weights']!r} is not one "
                           f"of {', '.join(WEIGHTS)}")


def table_records(results: Results, name: str) -> list[dict[str, Any]]:
    """The rows of table ``name``: selected, defaults filled in, values computed, provenance checked."""
    file, spec = results.tables[name]
    where = f"table {name!r} ({file.path.name})"
    chosen: list[tuple[ResultsFile, dict[str, Any], dict[str, Any]]] = []  # owner, record, fields of the spec
    if "rows" in spec:
        for entry in spec["rows"]:
            entry = {"record": entry} if isinstance(entry, str) else entry
            owner, record = results.record(file, entry["record"])
            chosen.append((owner, record, entry.get("with", {})))
    else:
        sources = spec.get("records", "#/records")
        for source in [sources] if isinstance(sources, str) else sources:
            owner, rows = results.pointer(file, source)
            if not isinstance(rows, list):
                raise ResultsError(f"{where}: {source!r} is not a list of records")
            chosen += [(owner, r, {}) for r in rows if _matches(r, spec.get("where", {}))]
    defaults = results.resolve(file, spec.get("defaults", {}))
    out = []
    for owner, record, extra in chosen:
        merged = {**defaults, **results.resolve(owner, {**owner.data.get("record_defaults", {}), **record}),
                  **results.resolve(file, extra)}
        spread = merged.pop(FIELDS_FROM, {})
        for part in spread if isinstance(spread, list) else [spread]:
            if not isinstance(part, dict):
                raise ResultsError(f"{where}: record {merged.get('id', '?')!r}: {FIELDS_FROM} is not an object")
            merged = {**part, **merged}
        _check_provenance(merged, where)
        out.append(merged)
    if not out:
        raise ResultsError(f"{where}: no records")
    return out


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("\n", " ") for c in cells) + " |"


def render_table(results: Results, name: str) -> str:
    """Table ``name`` as markdown (no trailing newline)."""
    if name not in results.tables:
        raise ResultsError(f"unknown table {name!r}: no \"tables\" entry of that name under {results.folder}")
    file, spec = results.tables[name]
    where = f"table {name!r} ({file.path.name})"
    columns = spec.get("columns")
    if not columns:
        raise ResultsError(f"{where}: no columns")
    records = table_records(results, name)
    pivot = spec.get("pivot")
    headers = [c["header"] for c in columns]
    if pivot is None:
        body = [[cell(c, r, where) for c in columns] for r in records]
        for i, c in enumerate(columns):
            if c.get("blank_repeats"):
                shown = [row[i] for row in body]
                for j in range(1, len(body)):
                    if shown[j] == shown[j - 1]:
                        body[j][i] = ""
    else:
        keys = [p if isinstance(p, dict) else {"key": p, "header": p} for p in pivot["columns"]]
        headers += [k.get("header", k["key"]) for k in keys]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in records:
            lead = tuple(cell(c, r, where) for c in columns)
            groups.setdefault(lead, []).append(r)
        body = []
        for lead, group in groups.items():
            cells = list(lead)
            for k in keys:
                hit = [r for r in group if r.get(pivot["key"]) == k["key"]]
                if len(hit) > 1:
                    raise ResultsError(f"{where}: row {lead[0]!r} has {len(hit)} records for {k['key']!r}")
                cells.append(fill(pivot["value"], hit[0], pivot.get("missing"), f"{where}, column {k['key']!r}")
                             if hit else pivot.get("missing", ""))
            body.append(cells)
    return "\n".join([_row(headers), _row(["---"] * len(headers)), *(_row(b) for b in body)])


@dataclass(frozen=True)
class Marker:
    name: str
    start: int  # line index of the opening marker
    end: int    # line index of the closing marker


def markers(text: str, source: str) -> list[Marker]:
    """Every ``<!-- table: NAME -->`` ... ``<!-- /table -->`` pair of ``text``; unclosed or nested ones are errors."""
    found, open_ = [], None
    for i, line in enumerate(text.split("\n")):
        begin = BEGIN.match(line.strip())
        if begin:
            if open_ is not None:
                raise ResultsError(f"{source}:{i + 1}: table {begin['name']!r} opens inside {open_[0]!r}")
            open_ = (begin["name"], i)
        elif line.strip() == END:
            if open_ is None:
                raise ResultsError(f"{source}:{i + 1}: {END} without an opening marker")
            found.append(Marker(open_[0], open_[1], i))
            open_ = None
        elif line.strip().startswith("<!-- table"):
            raise ResultsError(f"{source}:{i + 1}: malformed marker {line.strip()!r} (expected '<!-- table: NAME -->')")
    if open_ is not None:
        raise ResultsError(f"{source}:{open_[1] + 1}: table {open_[0]!r} is never closed with {END}")
    return found


def render_markdown(text: str, results: Results, source: str) -> tuple[str, list[str]]:
    """``text`` with every marked table rendered, and the names of the tables whose text changed."""
    lines = text.split("\n")
    changed = []
    for m in reversed(markers(text, source)):
        table = render_table(results, m.name).split("\n")
        if lines[m.start + 1:m.end] != table:
            changed.append(m.name)
        lines[m.start + 1:m.end] = table
    return "\n".join(lines), changed[::-1]


def unplaced(results: Results, docs: list[Path]) -> list[str]:
    """Tables defined under the results folder that no marker of ``docs`` shows."""
    placed = {m.name for d in docs for m in markers(d.read_text(), str(d))}
    return sorted(set(results.tables) - placed)


def check_records(results: Results) -> None:
    """Every record of every file, shown in a table or not: its references resolve, it carries its provenance
    (from itself or its file's ``record_defaults``) and its id is unique in its file."""
    for file in results.files.values():
        ids = [r["id"] for r in file.data.get("records", []) if "id" in r]
        if len(ids) != len(set(ids)):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ResultsError(f"{file.path.name}: record ids used twice: {twice}")
        for record in file.data.get("records", []):
            merged = results.resolve(file, {**file.data.get("record_defaults", {}), **record})
            _check_provenance(merged, file.path.name)


def run(docs: list[Path], results: Results, check: bool) -> list[str]:
    """Render the tables of ``docs`` (write them unless ``check``); ``DOC: TABLE`` for each table that differed."""
    differing = []
    for doc in docs:
        text = doc.read_text()
        rendered, changed = render_markdown(text, results, str(doc))
        differing += [f"{doc.name}: {name}" for name in changed]
        if not check and rendered != text:
            doc.write_text(rendered)
    return differing


def main(argv: list[str] | None = None) -> int:
    """The command line; 0: the docs show what the JSON holds, 1: a table differed (``--check``), 2: an error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each table that differs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of results JSON (docs/results)")
    parser.add_argument("docs", nargs="*", type=Path,
                        help=f"markdown files (default: {', '.join(str(d.relative_to(ROOT)) for d in DOCS)})")
    args = parser.parse_args(argv)
    docs = args.docs or list(DOCS)
    try:
        results = Results.load(args.results)
        check_records(results)
        differing = run(docs, results, args.check)
        spare = unplaced(results, docs)
    except ResultsError as e:
        print(f"results_docs: {e}", file=sys.stderr)
        return 2
    for name in spare:
        print(f"results_docs: table {name!r} is defined but no marker shows it", file=sys.stderr)
    if differing and args.check:
        print(f"results_docs: tables that differ from what {args.results} renders (run python -m "
              f"benchmarks.results_docs to rewrite them): {', '.join(differing)}", file=sys.stderr)
        return 1
    if differing:
        print(f"results_docs: rewrote {', '.join(differing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
