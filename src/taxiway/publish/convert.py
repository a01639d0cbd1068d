"""Turn CSV, TSV, JSON/NDJSON and .csv.gz files into tables of one SQLite database.

CSV is the hot path: rows stream straight from ``csv.reader`` into a staging
table of TEXT columns with ``executemany`` (C speed, flat memory), then each
column's type is detected in SQL and the rows are copied once into the final
typed table. JSON goes through sqlite-utils, which handles nested values.

Everything is written into a temporary database that is renamed into place
only when every file converted cleanly: a bad file leaves nothing behind.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.errors import InvalidInput
from taxiway.fsutil import atomic_path

#: The largest CSV field read by default (``--max-field-size`` raises it); a line may be 4 times that.
#: Without a cap one huge field (or an unclosed quote) is read into memory whole.
MAX_FIELD = 16 << 20

SQLITE_MAGIC = b"SQLite format 3\x00"
#: SQLite's default limit is 2,000 result columns, and Datasette's table page selects the rowid too.
MAX_COLUMNS = 1999
#: Delimiters tried when a CSV does not say (``--delimiter`` overrides).
DELIMITERS = (",", ";", "\t", "|")
_SNIFF_CHARS = 1 << 16
_BATCH = 10_000

#: Column names datasette-cluster-map (and people) use for coordinates.
LATITUDE_NAMES = ("latitude", "lat", "y")
LONGITUDE_NAMES = ("longitude", "lon", "lng", "long", "x")


@dataclass
class TableInfo:
    """What one input file became."""

    source: str
    table: str
    rows: int
    columns: dict[str, str]
    latitude: str | None = None
    longitude: str | None = None
    fts: list[str] = field(default_factory=list)
    database: str | None = None
    delimiter: str | None = None

    def to_json(self) -> dict:
        return {
            "source": self.source, "table": self.table, "rows": self.rows, "columns": self.columns,
            "latitude_column": self.latitude, "longitude_column": self.longitude, "fts": self.fts,
            "database": self.database, "delimiter": self.delimiter,
        }


def kind_of(path: Path) -> str:
    """'csv', 'tsv', 'json', 'ndjson' or 'sqlite', from the file name (and magic for databases)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, kind in ((".csv", "csv"), (".tsv", "tsv"), (".tab", "tsv"), (".ndjson", "ndjson"),
                         (".jsonl", "ndjson"), (".json", "json"), (".db", "sqlite"), (".sqlite", "sqlite"),
                         (".sqlite3", "sqlite")):
        if name.endswith(suffix):
            return kind
    raise InvalidInput(f"{path}: unknown file type", "publish takes .csv, .tsv, .json, .ndjson, .csv.gz, .db or .sqlite files")


def check_sqlite(path: Path) -> None:
    """Fail clearly unless ``path`` is a readable SQLite database."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head != SQLITE_MAGIC:
        raise InvalidInput(f"{path}: not a SQLite database", "give a .db file made by SQLite, or a CSV/JSON file to convert")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        con.execute("select count(*) from sqlite_master").fetchone()
        con.close()
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from None


def _damaged(path: Path, e: Exception) -> InvalidInput:
    return InvalidInput(f"{path}: damaged SQLite database ({e})",
                        f"check it with `sqlite3 {path} 'pragma integrity_check'` and recover it (`.recover`) first")


def copy_sqlite(src: Path, dest: Path) -> None:
    """A consistent copy of a user's database at ``dest``, WAL content included, made with SQLite's backup API.

    The source is opened read-only (never ``immutable``, which would ignore
    transactions still in ``-wal``), so a database that an application is
    writing right now is copied as of one committed transaction. The copy is
    switched out of WAL mode (it is served immutable), checked, and renamed
    into place; the source database is never written.
    """
    from urllib.request import pathname2url

    check_sqlite(src)
    s = d = None
    try:
        with atomic_path(dest) as tmp:  # fsynced and renamed once the copy is checked and closed
            try:
                s = sqlite3.connect(f"file:{pathname2url(str(src.resolve()))}?mode=ro", uri=True)
                d = sqlite3.connect(tmp, isolation_level=None)
                try:
                    s.backup(d)
                except sqlite3.OperationalError as e:
                    if "locked" in str(e) or "busy" in str(e):
                        raise InvalidInput(f"{src}: the database stayed locked by another process",
                                           "publish again when the writer has finished its transaction") from None
                    if "readonly" in str(e).replace(" ", "").replace("-", "") or "unable to open" in str(e):
                        raise InvalidInput(f"{src}: cannot read the database's WAL or journal ({e})",
                                           "open it once with sqlite3 (or checkpoint it) where it is writable, "
                                           "then publish") from None
                    raise _damaged(src, e) from None
                d.execute("pragma journal_mode=delete")
                problems = [r[0] for r in d.execute("pragma quick_check(3)")]
                if problems != ["ok"]:
                    raise _damaged(src, Exception("; ".join(problems)))
            finally:
                for c in (s, d):
                    with contextlib.suppress(Exception):
                        c.close()
    except sqlite3.DatabaseError as e:
        raise _damaged(src, e) from None


def table_name_for(path: Path) -> str:
    """A table name from a file name: ``airports.csv.gz`` -> ``airports``."""
    name = path.name
    for suffix in (".gz", ".csv", ".tsv", ".tab", ".ndjson", ".jsonl", ".json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "data"


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        encoding = "utf-8-sig"
    return io.TextIOWrapper(raw, encoding=encoding, errors="strict", newline="")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _checked_rows(reader: Iterator[list[str]], ncols: int, path: Path, delimiter: str,
                  given: bool) -> Iterator[list[str]]:
    how = "given by --delimiter" if given else "detected; pass --delimiter if the file uses another"
    for row in reader:
        if len(row) != ncols:
            if not row:  # blank line
                continue
            raise InvalidInput(
                f"{path}: row {reader.line_num} has {len(row)} fields, the header has {ncols} "
                f"(delimiter {delimiter_name(delimiter)}, {how})",
                "fix the ragged row (a missing or extra delimiter, or an unclosed quote) and publish again",
            )
        yield row


def check_width(path: Path | str, table: str, ncols: int) -> None:
    """Refuse a table wider than Datasette can show (its table page would answer 400)."""
    if ncols > MAX_COLUMNS:
        raise InvalidInput(
            f"{path}: table {table!r} has {ncols:,} columns, more than the {MAX_COLUMNS:,} Datasette can show "
            f"(SQLite returns at most 2,000 columns and the table page adds the rowid)",
            f"split the file or drop columns so each table has at most {MAX_COLUMNS:,}")


def delimiter_name(d: str) -> str:
    """How a delimiter is shown to people: ``','``, ``tab``."""
    return {"\t": "tab", " ": "space"}.get(d, repr(d))


def sniff_delimiter(path: Path, encoding: str, default: str) -> str:
    """The delimiter of ``path``, judged on its first lines (``default`` is the one its name implies).

    ``default`` wins when it splits the header into several fields and every
    sampled row into as many; otherwise the candidate that splits the header
    and matches the most rows (then the most columns); otherwise ``default``.
    A ragged row is then reported against the delimiter chosen.
    """
    try:
        with _open_text(path, encoding) as f:
            sample = f.read(_SNIFF_CHARS)
            more = bool(f.read(1))
    except (UnicodeDecodeError, OSError, EOFError):
        return default  # the conversion itself reports these
    if more and "\n" in sample:
        sample = sample[: sample.rindex("\n") + 1]  # whole lines only
    scores: dict[str, tuple[float, int]] = {}
    for d in (default, *[c for c in DELIMITERS if c != default]):
        try:
            widths = [len(r) for r in csv.reader(io.StringIO(sample, newline=""), delimiter=d) if r]
        except csv.Error:
            continue
        if more and len(widths) > 2:
            widths = widths[:-1]  # the sample may end inside a quoted row
        if widths and widths[0] > 1:
            scores[d] = (sum(w == widths[0] for w in widths) / len(widths), widths[0])
    if not scores or scores.get(default, (0, 0))[0] == 1:
        return default
    return max(scores, key=lambda d: scores[d])  # max keeps the first of equals: the default


def _detect_types(con: sqlite3.Connection, table: str, columns: list[str]) -> dict[str, str]:
    """INTEGER, REAL or TEXT per column, judged over every non-empty value, in SQL."""
    types: dict[str, str] = {}
    for c in columns:
        q = _quote(c)
        nonempty, ints, nums = con.execute(
            f"select count(*), "
            f"sum(printf('%d', cast({q} as integer)) = {q}), "
            f"sum({q} glob '*[0-9]*' and not {q} glob '*[^0-9.eE+-]*' and cast({q} as real) is not null "
            f"and ({q} glob '[0-9+-.]*') and not {q} glob '*[eE]*[eE]*' and not {q} glob '*.*.*' and not {q} glob '0[0-9]*' and not {q} glob '-0[0-9]*') "
            f"from {_quote(table)} where {q} != ''"
        ).fetchone()
        if nonempty and ints == nonempty:
            types[c] = "INTEGER"
        elif nonempty and nums == nonempty:
            types[c] = "REAL"
        else:
            types[c] = "TEXT"
    return types


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _capped_lines(f: io.TextIOBase, cap: int, path: Path) -> Iterator[str]:
    """The file's lines, refusing one longer than ``cap`` characters before reading it whole."""
    n = 0
    while line := f.readline(cap + 1):
        n += 1
        if len(line) > cap:
            raise InvalidInput(f"{path}: line {n} is longer than {_mib(cap)}",
                               "check for an unclosed quote, or raise --max-field-size (a line may be 4 times it)")
        yield line


def convert_delimited(con: sqlite3.Connection, path: Path, table: str, delimiter: str | None, encoding: str,
                      default: str = ",", max_field: int = MAX_FIELD) -> TableInfo:
    """Stream one CSV/TSV into ``table`` with detected column types (``delimiter`` None: sniffed)."""
    stage = f"_taxiway_stage_{table}"
    given = delimiter is not None
    delimiter = delimiter if given else sniff_delimiter(path, encoding, default)
    csv.field_size_limit(max_field)
    reader = None
    try:
        with _open_text(path, encoding) as f:
            reader = csv.reader(_capped_lines(f, 4 * max_field, path), delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                raise InvalidInput(f"{path}: the file is empty", "give a CSV with a header row and at least one data row") from None
            header = [h.strip() for h in header]
            if not any(header):
                raise InvalidInput(f"{path}: the header row is empty", "the first row must name the columns")
            seen: dict[str, int] = {}
            for i, h in enumerate(header, 1):
                if not h:
                    raise InvalidInput(f"{path}: column {i} of the header has no name", "name every column in the header row")
                key = h.lower()
                if key in seen:
                    raise InvalidInput(f"{path}: duplicated column name {h!r} (columns {seen[key]} and {i})",
                                       "rename one of them in the header row")
                seen[key] = i
            check_width(path, table, len(header))
            cols = ", ".join(f"{_quote(h)} TEXT" for h in header)
            con.execute(f"drop table if exists {_quote(stage)}")
            con.execute(f"create table {_quote(stage)} ({cols})")
            marks = ", ".join("?" * len(header))
            con.executemany(f"insert into {_quote(stage)} values ({marks})",
                            _checked_rows(reader, len(header), path, delimiter, given))
    except UnicodeDecodeError as e:
        line = _line_of_byte(path, e.start if hasattr(e, "start") else 0)
        raise InvalidInput(
            f"{path}: not valid {encoding} text near line {line} ({e.reason})",
            "re-save the file as UTF-8, or pass --encoding latin-1 (or the file's real encoding)",
        ) from None
    except csv.Error as e:
        if "field limit" in str(e):
            row = reader.line_num if reader is not None else 0
            raise InvalidInput(f"{path}: a field on line {row} is larger than {_mib(max_field)}",
                               "check for an unclosed quote, or raise the limit with --max-field-size 64m") from None
        raise InvalidInput(f"{path}: malformed CSV ({e})", "check quoting in the file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InvalidInput(f"{path}: cannot read the file ({e})", "check that the file is complete and readable") from None
    rows = con.execute(f"select count(*) from {_quote(stage)}").fetchone()[0]
    if rows == 0:
        raise InvalidInput(f"{path}: the file has a header but no data rows", "add rows, or leave the file out")
    types = _detect_types(con, stage, header)
    cols = ", ".join(f"{_quote(h)} {types[h]}" for h in header)
    con.execute(f"drop table if exists {_quote(table)}")
    con.execute(f"create table {_quote(table)} ({cols})")
    exprs = ", ".join(
        _quote(h) if types[h] == "TEXT" else f"case when {_quote(h)} = '' then null else cast({_quote(h)} as {types[h]}) end"
        for h in header
    )
    con.execute(f"insert into {_quote(table)} select {exprs} from {_quote(stage)}")
    con.execute(f"drop table {_quote(stage)}")
    return TableInfo(str(path), table, rows, types, delimiter=delimiter)


def _line_of_byte(path: Path, offset: int) -> int:
    """The 1-based line number of a byte offset (only computed on errors)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    n, pos = 1, 0
    with opener(path, "rb") as f:
        for line in f:
            pos += len(line)
            if pos > offset:
                return n
            n += 1
    return n


def _json_records(path: Path, kind: str, encoding: str) -> Iterable[dict]:
    with _open_text(path, encoding) as f:
        if kind == "ndjson":
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidInput(f"{path}: line {i} is not JSON ({e.msg})", "each line of an NDJSON file must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise InvalidInput(f"{path}: line {i} is not a JSON object", "each line must be an object like {\"col\": value}")
                yield obj
            return
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}: not valid JSON (line {e.lineno}: {e.msg})", "give a JSON array of objects") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InvalidInput(f"{path}: JSON must be an array of objects", "give [{\"col\": value}, ...]")
    yield from data


def convert_json(con: sqlite3.Connection, path: Path, table: str, kind: str, encoding: str) -> TableInfo:
    """Load a JSON array or NDJSON file with sqlite-utils (types detected, nested values as JSON)."""
    import sqlite_utils

    db = sqlite_utils.Database(con)
    if table in db.table_names():
        db[table].drop()
    try:
        db[table].insert_all(_json_records(path, kind, encoding), alter=True, batch_size=_BATCH)
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path}: not valid {encoding} text ({e.reason})", "re-save the file as UTF-8 or pass --encoding") from None
    except sqlite3.OperationalError as e:
        if "too many" not in str(e):
            raise
        check_width(path, table, MAX_COLUMNS + 1)
    except ValueError as e:
        if "maximum of" not in str(e):
            raise
        raise InvalidInput(f"{path}: records with more keys than sqlite-utils inserts ({e})",
                           "drop keys, or publish the data as CSV (up to 1,999 columns)") from None
    if table not in db.table_names() or db[table].count == 0:
        raise InvalidInput(f"{path}: no records", "give at least one JSON object")
    t = db[table]
    check_width(path, table, len(t.columns))
    return TableInfo(str(path), table, t.count, {c.name: c.type for c in t.columns})


def _fits(con: sqlite3.Connection, table: str, column: str, limit: float) -> bool:
    q = _quote(column)
    total, ok = con.execute(
        f"select count({q}), sum(typeof({q}) in ('integer','real') and {q} between ? and ?) from {_quote(table)}",
        (-limit, limit),
    ).fetchone()
    return bool(total) and total == ok


def find_coordinates(con: sqlite3.Connection, table: str, columns: Iterable[str]) -> tuple[str | None, str | None]:
    """Latitude and longitude columns under their common names, when the values fit."""
    by_lower = {c.lower(): c for c in columns}
    lat = next((by_lower[n] for n in LATITUDE_NAMES if n in by_lower and _fits(con, table, by_lower[n], 90)), None)
    lon = next((by_lower[n] for n in LONGITUDE_NAMES if n in by_lower and _fits(con, table, by_lower[n], 180)), None)
    if lat is None or lon is None:
        return None, None
    return lat, lon


def enable_fts(con: sqlite3.Connection, table: str, columns: list[str]) -> None:
    """A full-text index over ``columns`` (the database is served immutable: no triggers)."""
    import sqlite_utils

    db = sqlite_utils.Database(con)
    t = db[table]
    missing = [c for c in columns if c not in t.columns_dict]
    if missing:
        raise InvalidInput(f"--fts {missing[0]}: table {table!r} has no such column",
                           f"choose from: {', '.join(t.columns_dict)}")
    t.enable_fts(columns, create_triggers=False, replace=True)


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ .-]{0,62}$")


def check_table_name(name: str, where: str) -> None:
    """Refuse a table name for a converted file that SQLite reserves or Datasette can't show."""
    if name.lower().startswith("sqlite_"):
        raise InvalidInput(f"{where}: {name!r} is a name SQLite reserves (sqlite_*)", "pass --table with another name")
    if not _NAME_RE.match(name):
        raise InvalidInput(f"{where}: {name!r} is not a usable table name",
                           "pass --table NAME (letters, digits, _ . - and spaces, up to 63 characters)")


def check_served_names(path: Path | str, table: str, columns: Iterable[str], kind: str = "table") -> None:
    """Refuse a table or column name with ``]``: Datasette quotes names as ``[name]``, so its pages would fail."""
    for what, name in ((kind, table), *(("column", c) for c in columns)):
        if "]" in name:
            where = f"{kind} {table!r}" if what == kind else f"column {name!r} of {kind} {table!r}"
            fix = (f"ALTER TABLE {_quote(table)} RENAME TO new_name" if what == "table"
                   else f"ALTER TABLE {_quote(table)} RENAME COLUMN {_quote(name)} TO new_name" if kind == "table"
                   else "recreate the view under a name without ]")
            raise InvalidInput(f"{path}: {where} has a ']' in its name, which Datasette can't serve",
                               f"rename it, e.g. sqlite3 {path} '{fix}'")


def build_database(files: list[Path], dest: Path, *, table: str | None = None, fts: list[str] | None = None,
                   encoding: str = "utf-8", delimiter: str | None = None,
                   max_field: int = MAX_FIELD) -> list[TableInfo]:
    """Convert ``files`` into one SQLite database at ``dest`` (written atomically).

    ``delimiter`` applies to CSV/TSV files; without it each file's is detected.
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InvalidInput(f"unknown encoding {encoding!r}", "use a Python codec name such as utf-8, latin-1 or cp1252") from None
    if table and len(files) != 1:
        raise InvalidInput("--table names the table of a single file", "publish one file with --table, or leave --table out")
    infos: list[TableInfo] = []
    with atomic_path(dest) as tmp:  # fsynced and renamed once the database is committed and closed
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("pragma journal_mode=off")
            con.execute("pragma synchronous=off")
            con.execute("pragma temp_store=memory")
            con.execute("pragma cache_size=-65536")
            con.execute("begin")
            used: set[str] = set()
            for path in files:
                kind = kind_of(path)
                name = table or table_name_for(path)
                check_table_name(name, str(path))
                if name.lower() in used:
                    raise InvalidInput(f"{path}: a second file would also become table {name!r}", "rename one of the files")
                used.add(name.lower())
                if kind in ("csv", "tsv"):
                    info = convert_delimited(con, path, name, delimiter, encoding, "," if kind == "csv" else "\t",
                                             max_field)
                elif kind in ("json", "ndjson"):
                    info = convert_json(con, path, name, kind, encoding)
                else:
                    raise InvalidInput(f"{path}: a SQLite database can't be merged with other files", "publish .db files as they are")
                info.latitude, info.longitude = find_coordinates(con, name, info.columns)
                infos.append(info)
            if fts:
                if len(infos) != 1:
                    raise InvalidInput("--fts needs exactly one converted table", "publish one file when using --fts")
                enable_fts(con, infos[0].table, list(fts))
                infos[0].fts = list(fts)
            con.execute("commit")
        finally:
            con.close()
    return infos


def describe_sqlite(path: Path, source: Path | None = None) -> list[TableInfo]:
    """Tables (with coordinates found) of a database without a WAL (a :func:`copy_sqlite` copy), read only.

    ``source`` is the user's file the copy was made from, named in errors.
    """
    source = source or path
    check_sqlite(path)
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        infos = []
        for (name,) in con.execute("select name from sqlite_master where type='view'").fetchall():
            cols: list[str] = []
            with contextlib.suppress(sqlite3.DatabaseError):  # a view on a missing table: Datasette shows its error
                cols = [r[1] for r in con.execute(f"pragma table_info({_quote(name)})")]
            check_served_names(source, name, cols, "view")
        for (name,) in con.execute("select name from sqlite_master where type='table' and name not like 'sqlite_%'"):
            cols = {r[1]: r[2] for r in con.execute(f"pragma table_info({_quote(name)})")}
            check_served_names(source, name, cols)
            check_width(source, name, len(cols))
            rows = con.execute(f"select count(*) from {_quote(name)}").fetchone()[0]
            info = TableInfo(str(source), name, rows, cols)
            with contextlib.suppress(sqlite3.DatabaseError):
                info.latitude, info.longitude = find_coordinates(con, name, cols)
            infos.append(info)
        return infos
    except sqlite3.DatabaseError as e:
        raise _damaged(source, e) from None
    finally:
        con.close()


def cluster_map_metadata(database: str, infos: list[TableInfo]) -> dict:
    """Metadata telling datasette-cluster-map which columns hold coordinates."""
    tables = {}
    for info in infos:
        if info.latitude and info.longitude:
            tables[info.table] = {"plugins": {"datasette-cluster-map": {
                "latitude_column": info.latitude, "longitude_column": info.longitude}}}
    return {"databases": {database: {"tables": tables}}} if tables else {}
