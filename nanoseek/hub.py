"""Hugging Face datasets, streamed: a Hub id ("HuggingFaceFW/fineweb-edu") or a local directory or file that
`datasets.load_dataset` reads (Parquet, JSONL, CSV or text), opened row by row so nothing is held whole.

A source, as [data] hf lists them and `nanoseek data --hf` names one ({path, name, split, column,
max_documents}), is checked here and read as documents, row by row.

`datasets` is an optional extra (pip install nanoseek[hf]), imported only here. A Hub id with no network fails
at once with what to do, rather than after the retries of a download.
"""

import dataclasses
import os
import socket
from urllib.parse import urlparse

from nanoseek.config import HFSource, accepts, type_name
from nanoseek.data import DataError, row_document

HF_KEYS = ("path", "name", "split", "column", "max_documents")  # a source in a recipe: its path, then HFSource's
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
CONNECT_TIMEOUT = 5.0  # seconds to reach the Hub before saying it cannot be reached


class HubError(ValueError):
    """A dataset that cannot be opened; the message says what to do."""


def is_local(path) -> bool:
    return os.path.exists(path)


def open_dataset(path, name=None, split="train"):
    """An iterable of the rows (dicts) of one split of a dataset, streamed; split None: {split: rows} of all."""
    datasets = _import_datasets()
    if is_local(path):
        ext = os.path.splitext(path)[1].lower()
        if os.path.isfile(path) and ext not in FILE_BUILDERS:
            raise HubError(f"{path}: datasets reads files ending in {sorted(FILE_BUILDERS)}; "
                           "or pass the directory that holds the dataset's files")
        args = (FILE_BUILDERS[ext],) if os.path.isfile(path) else (path,)
        kwargs = {"data_files": path} if os.path.isfile(path) else {}
    else:
        check_hub_reachable(path)
        args, kwargs = (path,), {}
    try:
        return datasets.load_dataset(*args, name=name or None, split=split, streaming=True, **kwargs)
    except (ValueError, FileNotFoundError) as e:  # unknown split or config, no data files, a missing dataset
        raise HubError(f"cannot open the dataset {path!r} (config {name!r}, split {split!r}): {e}") from None


def check_hf_source(source, where="--hf"):
    """A Hugging Face source ({path, name, split, column, max_documents}) with every key filled in."""
    example = '{ path = "HuggingFaceFW/fineweb-edu", name = "sample-10BT", column = "text" }'
    if not isinstance(source, dict) or not isinstance(source.get("path"), str) or not source["path"]:
        raise DataError(f"{where}: a Hugging Face source is a table with a path, e.g. {example}")
    unknown = sorted(set(source) - set(HF_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown} in a Hugging Face source; valid keys: {sorted(HF_KEYS)}")
    fields = {f.name: f for f in dataclasses.fields(HFSource)}
    full = {"path": source["path"], **{key: source.get(key, fields[key].default) for key in HF_KEYS[1:]}}
    for key, value in list(full.items())[1:]:
        if not accepts(fields[key].type, value):
            raise DataError(f"{where}: {key} should be {type_name(fields[key].type)}, got {value!r}")
    if full["column"] not in ("text", "messages"):
        raise DataError(f"{where}: column must be 'text' (pretraining) or 'messages' (chat), not {full['column']!r}")
    return full


def read_hf(source):
    """Yield ("text", str) or ("chat", messages) per row of a Hugging Face dataset's column, streamed."""
    source = check_hf_source(source)
    path, column, limit = source["path"], source["column"], source["max_documents"]
    rows = open_dataset(path, source["name"], source["split"])
    for i, row in enumerate(rows):
        if limit and i >= limit:
            break
        if column not in row:
            raise DataError(f"{path}: no column {column!r}, its columns are {sorted(row)}; pick one with --column")
        yield row_document({column: row[column]}, f"{path} ({source['split']}): row {i}")


def split_names(path, name=None):
    """The splits a dataset has, e.g. ["train", "test"]."""
    return list(open_dataset(path, name, split=None))


def check_hub_reachable(path):
    """Fail at once, with what to do, when the Hub cannot be reached (offline mode or no network)."""
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true")]
    fix = (f"to use it with no network, download it where there is one (`hf download {path} --repo-type dataset "
           f"--local-dir DIR`) and pass DIR instead of {path!r}")
    if offline:
        raise HubError(f"{path!r} is not a local path and {offline[0]} is set: nothing can be downloaded; {fix}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise HubError(f"{path!r} is not a local path and the Hugging Face Hub ({endpoint.hostname}) cannot be "
                       f"reached ({e}); {fix}") from None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise HubError("reading Hugging Face datasets needs the datasets library: pip install nanoseek[hf]") from None
    datasets.disable_progress_bars()
    return datasets
