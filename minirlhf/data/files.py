"""Raw rows from the files given with --data-files, as plain Python dicts; every problem with a file is one InputError
that names the file, says what is wrong with it and what was expected.

    .json / .jsonl (optionally .gz)   JSON lines (one object per line) or one JSON array of objects
    .parquet                          any parquet file (the Hub's format)

A path may be a glob or an fsspec URL (hf://datasets/...). JSON is read whole with the json module, parquet with
pyarrow, only the columns asked for.

Why not datasets.load_dataset("json"): it gives each column ONE arrow type, and a column holding a number in one row
and strings in the others becomes a JSON column in which the string "2" comes back as the number 2, so good rows were
skipped as "non-string response". The json module keeps every value as the file wrote it (it also reads NaN and
Infinity, which schema.checked then skips), and its errors carry the line number the message needs. Parquet is typed
by its writer, so it has no such problem (but a datasets-written JSON column in it has already lost the difference).
"""
import glob
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError

FLAG = "--data-files"
JSON_EXPECTED = "expected JSON lines (one object per line) or a JSON array of objects"
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_rows(patterns, columns, schema):
    """The rows of every file that `patterns` (a list of paths, globs or URLs) names, in order, each reduced to
    `columns`; a column a JSON row lacks is None (as in datasets' loader). `schema` names the raw schema the files
    should hold, for the message when a column is missing from a whole file."""
    rows = []
    for file, path in [found for pattern in patterns for found in _files(pattern)]:
        kind = _kind(path)
        if file.fs.size(file.path) == 0:
            raise InputError(f"{FLAG} {path}: the file is empty; {_expected(kind)}")
        with file as stream:
            if kind == "json":
                file_rows, present = _json_rows(_read(stream, path), path)
            else:
                file_rows, present = _parquet_rows(stream, path, columns)
        if not file_rows:
            raise InputError(f"{FLAG} {path}: the file holds no rows; {_expected(kind)}")
        missing = [c for c in columns if c not in present]
        if missing:
            raise InputError(f"{FLAG} {path}: lacks column(s) {missing} of the {schema} raw schema; has {present}")
        rows += [{c: row.get(c) for c in columns} for row in file_rows]
    return rows


def _files(pattern):
    """(fsspec file, its name for messages) for each file one path, glob or URL names; an InputError when none."""
    files = fsspec.open_files(pattern, "rb", compression="infer")
    if len(files) == 1 and files[0].fs.isdir(files[0].path):
        raise InputError(f"{FLAG} {pattern}: is a directory; expected .json, .jsonl or .parquet files (a glob such "
                         f"as {pattern.rstrip('/')}/*.jsonl names those in it)")
    files = [file for file in files if file.fs.isfile(file.path)]
    if not files:
        what = "pattern" if glob.has_magic(pattern) else "path"
        raise InputError(f"{FLAG} {pattern}: no file matches this {what}; expected existing .json, .jsonl or "
                         f".parquet files")
    return [(file, file.full_name if "://" in pattern else file.path) for file in files]


def _kind(path):
    """"json" or "parquet", from the file name."""
    name = path.removesuffix(".gz")
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".parquet") and name == path:
        return "parquet"
    raise InputError(f"{FLAG} {path}: data files must be .json, .jsonl or .parquet files (JSON may be .gz)")


def _expected(kind):
    return JSON_EXPECTED if kind == "json" else "expected a parquet file with at least one row"


def _read(stream, path):
    """All bytes of a (possibly gzip-compressed) file; a broken or cut .gz is an InputError."""
    try:
        return stream.read()
    except (OSError, EOFError) as error:
        raise InputError(f"{FLAG} {path}: cannot be read ({' '.join(str(error).split())}); {JSON_EXPECTED}") from None


def _json_rows(data, path):
    """(rows, column names in first-seen order) of a JSON lines file or a JSON array, from its bytes."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"{FLAG} {path}: not a text file (line {line}: byte 0x{data[error.start]:02x} is not "
                         f"UTF-8); {JSON_EXPECTED}") from None
    if not text.strip():
        raise InputError(f"{FLAG} {path}: the file is empty (only whitespace); {JSON_EXPECTED}")
    if text.lstrip().startswith("["):  # one JSON array
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{FLAG} {path}: not JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                             f"{JSON_EXPECTED}") from None
        return _objects(rows, path, "item"), _columns(rows)
    lines = text.split("\n")  # not splitlines(): that also splits at U+2028 etc., which JSON strings may hold raw
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            cut = "; the last line has no newline: the file looks truncated" if number == len(lines) else ""
            raise InputError(f"{FLAG} {path}: not JSON lines (line {number}, column {error.colno}: {error.msg}{cut}); "
                             f"{JSON_EXPECTED}") from None
        _objects(rows[-1:], path, f"line {number}")
    return rows, _columns(rows)


def _objects(rows, path, where):
    """`rows`, after checking that each is a JSON object."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            place = f"item {i + 1} of the array" if where == "item" else where
            raise InputError(f"{FLAG} {path}: not JSON objects ({place} is {_JSON_TYPES[type(row)]}); "
                             f"{JSON_EXPECTED}")
    return rows


def _columns(rows):
    """The keys of all rows, in first-seen order (a key a row lacks is None there)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _parquet_rows(stream, path, columns):
    """(rows, column names) of a parquet file, reading only `columns`. JSON columns (arrow.json, written by datasets
    for a column of mixed types) hold JSON text: decoded, as datasets does."""
    try:
        parquet = pq.ParquetFile(stream)
        schema = parquet.schema_arrow
        wanted = [c for c in columns if c in schema.names]
        rows = [row for batch in parquet.iter_batches(columns=wanted) for row in batch.to_pylist()]
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{FLAG} {path}: not a readable parquet file ({' '.join(str(error).split())})") from None
    for name in wanted:
        if getattr(schema.field(name).type, "extension_name", None) == "arrow.json":
            for row in rows:
                row[name] = None if row[name] is None else json.loads(row[name])
    return rows, schema.names
