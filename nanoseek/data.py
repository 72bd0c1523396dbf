"""Corpora to token shards, and a loader that streams them in a seeded order it can resume exactly.

A data directory holds flat token arrays and a manifest:

    data/manifest.json        kind ("text" or "chat"), dtype, tokenizer fingerprint, per split: shards
    data/train_000.bin        tokens (uint16 when the vocabulary fits, else uint32), documents back to back
    data/train_000.mask.bin   chat data only: 1 where the token is the assistant's (a loss target)
    data/val_000.bin ...      the held-out split

Text documents are [BOS] text [EOS]; chat documents are rendered with the chat template.
"""

import glob
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import torch

from nanoseek.tokenizer import Tokenizer

SHARD_TOKENS = 50_000_000  # tokens per shard file
OPTIONS = {  # the options of `nanoseek data` beside --tokenizer and --out: (default, meaning)
    "input": ([], "files or globs: .txt, .jsonl ({text} or {messages}), .parquet"),
    "task": ([], "make data from tasks instead (worked solutions as <think> traces)"),
    "n": (10000, "--task: problems per task"),
    "kind": ("chat", "--task: chat (SFT) or text data"),
    "difficulty": (0, "--task: one difficulty (0: all)"),
    "checker": ("exact", "--task with a JSONL file: its checker"),
    "seed": (0, "--task: seed of the problems"),
    "val_fraction": (0.01, "share of documents held out"),
}


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    vocab = json.dumps(sorted(tok.tok.get_vocab(with_added_tokens=True).items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- reading corpora


def expand_inputs(patterns) -> list[str]:
    files = []
    for p in patterns:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise DataError(f"no files match {p!r}")
        files += matches
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"input file {f} does not exist")
    return files


def read_corpus(patterns):
    """Yield ("text", str) or ("chat", messages) per document of every file the patterns name."""
    for file in expand_inputs(patterns):
        yield from read_documents(file)


def read_texts(patterns):
    """The text of every document the patterns name, to train a tokenizer on: a text document whole, a
    conversation message by message (its reasoning too)."""
    for kind, doc in read_corpus(patterns):
        if kind == "text":
            yield doc
        else:
            for m in doc:
                yield m["content"]
                if isinstance(m.get("reasoning_content"), str):
                    yield m["reasoning_content"]


def read_documents(file):
    """Yield ("text", str) or ("chat", messages) per document of a .txt, .jsonl or .parquet file."""
    if file.endswith(".parquet"):
        yield from _read_parquet(file)
    elif file.endswith((".jsonl", ".json")):
        yield from _read_jsonl(file)
    else:  # plain text: documents are separated by blank lines
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {file} as UTF-8 text: {e}") from None
        for doc in text.split("\n\n"):
            if doc.strip():
                yield "text", doc.strip("\n")


def _read_jsonl(file):
    try:
        f = open(file, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {file}: {e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
                yield _row_document(row, f"{file}:{lineno}")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e})") from None


def _read_parquet(file):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f"cannot read {file} as Parquet: {e}") from None
    columns = set(table.column_names)
    if not columns & {"text", "messages"}:
        raise DataError(f"{file}: expected a 'text' or 'messages' column, found {sorted(columns)}")
    for i, row in enumerate(table.to_pylist()):
        yield _row_document(row, f"{file}: row {i}")


def _row_document(row, where):
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return "text", row["text"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        messages = row["messages"]
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise DataError(f"{where}: message {j} needs a role of 'system', 'user' or 'assistant'")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {j} needs a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: a conversation needs at least one assistant message to learn from")
        return "chat", messages
    raise DataError(f'{where}: expected an object with "text" (a string) or "messages" (a list)')


# ----------------------------------------------------------------------------- writing shards


def _in_val(doc_index, val_every):
    return val_every > 0 and doc_index % val_every == val_every - 1


def build(inputs, tokenizer: Tokenizer, out_dir, val_fraction=0.01, documents=None):
    """Tokenize corpora (files, or an iterable of ("text"|"chat", doc)) into out_dir; returns the manifest.

    Every round(1 / val_fraction)-th document goes to the held-out split, so the split is deterministic.
    """
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    if documents is None:
        documents = read_corpus(inputs)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".data.tmp-", dir=parent)
    try:
        kind, splits = _write_shards(documents, tokenizer, tmp, dtype, val_every)
    except BaseException:  # bad input partway through: leave nothing half made behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {
        "kind": kind,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "splits": splits,
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    tokenizer.save(tmp)  # training reads the tokenizer from here, so shards and ids cannot drift apart
    from nanoseek.checkpoint import _fsync_tree, _replace_dir

    _fsync_tree(tmp)
    _replace_dir(tmp, os.path.abspath(out_dir))
    return manifest


def _write_shards(documents, tokenizer, root, dtype, val_every):
    """Tokenize the documents into train and val shards under root; returns (kind, {split: shards})."""
    writers = {split: _ShardWriter(root, split, dtype) for split in ("train", "val")}
    kind = None
    for i, (doc_kind, doc) in enumerate(documents):
        if kind is None:
            kind = doc_kind
        elif doc_kind != kind:
            raise DataError(f"document {i} is {doc_kind} but earlier ones are {kind}: keep text and chat data apart")
        if doc_kind == "text":
            ids, mask = [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id], None
        else:
            ids, mask = tokenizer.render_chat(doc)
        writers["val" if _in_val(i, val_every) else "train"].add(ids, mask)
    if kind is None:
        raise DataError("the input holds no documents")
    return kind, {split: w.close() for split, w in writers.items()}


class _ShardWriter:
    def __init__(self, root, split, dtype):
        self.root, self.split, self.dtype = root, split, dtype
        self.shards, self.ids, self.mask, self.docs = [], [], [], 0

    def add(self, ids, mask):
        self.ids += ids
        if mask is not None:
            self.mask += mask
        self.docs += 1
        if len(self.ids) >= SHARD_TOKENS:
            self._flush()

    def _flush(self):
        if not self.ids:
            return
        name = f"{self.split}_{len(self.shards):03d}.bin"
        tokens = np.asarray(self.ids, dtype=self.dtype)
        tokens.tofile(os.path.join(self.root, name))
        shard = {"file": name, "tokens": len(tokens), "documents": self.docs, "sha256": _sha256(tokens)}
        if self.mask:
            mask = np.asarray(self.mask, dtype=np.uint8)
            mask.tofile(os.path.join(self.root, name.replace(".bin", ".mask.bin")))
            shard["mask_sha256"] = _sha256(mask)
        self.shards.append(shard)
        self.ids, self.mask, self.docs = [], [], 0

    def close(self):
        self._flush()
        return self.shards


def _sha256(array):
    return hashlib.sha256(array.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- reading shards


def load_manifest(data_dir, tokenizer: Tokenizer | None = None, verify=False):
    file = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(file):
        raise DataError(f"{file} is missing: make the data directory with `nanoseek data`")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not valid JSON ({e}); rebuild the data with `nanoseek data`") from None
    if tokenizer is not None and manifest.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise DataError(
            f"{file}: these shards were made with a different tokenizer than the model's; "
            "rebuild them with `nanoseek data --tokenizer` pointing at the model's checkpoint"
        )
    for split in manifest["splits"].values():
        for shard in split:
            path = os.path.join(data_dir, shard["file"])
            size = os.path.getsize(path) if os.path.exists(path) else -1
            if size != shard["tokens"] * np.dtype(manifest["dtype"]).itemsize:
                raise DataError(f"{path} is missing or has the wrong size; rebuild the data with `nanoseek data`")
            if verify and _sha256(np.fromfile(path, dtype=manifest["dtype"])) != shard["sha256"]:
                raise DataError(f"{path} does not match its checksum in manifest.json; the shard is damaged")
    return manifest


class Loader:
    """Rows of seq_len tokens in a seeded order that is reshuffled every epoch.

    rows="documents": a row holds whole documents back to back, padded at its end; a document longer than a
    row is cut into row-sized pieces. Each token carries its piece's number in the row (-1 on padding), so
    attention and positions stay inside a document, as at inference. rows="windows": fixed windows of the
    token stream, documents attending across their boundaries (plain windows for long free text).

    A step's global batch is the next `global_batch` rows of that order; rank r of `world` takes rows
    r::world. The position is one integer (rows consumed), so resume is exact.
    """

    def __init__(self, data_dir, split, seq_len, global_batch, seed=0, rank=0, world=1, tokenizer=None,
                 rows="documents", shuffle=True):
        manifest = load_manifest(data_dir, tokenizer)
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} must divide evenly over {world} ranks")
        if rows not in ("documents", "windows"):
            raise ValueError(f"rows must be 'documents' or 'windows', not {rows!r}")
        self.kind, self.seq_len, self.global_batch, self.rows = manifest["kind"], seq_len, global_batch, rows
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        own = Tokenizer.load(data_dir)  # the tokenizer the shards were made with
        self.pad_id = own.pad_id
        self.tokens, self.masks, pieces = [], [], []  # pieces: (shard, start, inputs) of up to seq_len inputs
        for i, shard in enumerate(manifest["splits"][split]):
            path = os.path.join(data_dir, shard["file"])
            tokens = np.memmap(path, dtype=manifest["dtype"], mode="r")
            self.tokens.append(tokens)
            if self.kind == "chat":
                self.masks.append(np.memmap(path.replace(".bin", ".mask.bin"), dtype=np.uint8, mode="r"))
            pieces.append(self._pieces(i, tokens, own.bos_id))
        self.pieces = np.concatenate(pieces) if pieces else np.zeros((0, 3), dtype=np.int64)
        if not len(self.pieces):
            raise DataError(
                f"{data_dir}: the {split} split has no {'document' if rows == 'documents' else 'window'} "
                f"of {seq_len + 1 if rows == 'windows' else 2}+ tokens; add data or shorten --seq"
            )
        self.position = 0
        self._epochs = []  # rows of each epoch packed so far: lists of piece indices

    def _pieces(self, shard, tokens, bos_id):
        """(shard, start, n): inputs tokens[start:start + n], targets one token later, never past a document."""
        L = self.seq_len
        if self.rows == "windows":
            starts = np.arange((len(tokens) - 1) // L, dtype=np.int64) * L
            return np.stack([np.full_like(starts, shard), starts, np.full_like(starts, L)], 1)
        doc_starts = np.flatnonzero(np.asarray(tokens) == bos_id)
        doc_ends = np.append(doc_starts[1:], len(tokens))
        out = []
        for s, e in zip(doc_starts.tolist(), doc_ends.tolist()):
            for p in range(s, e - 1, L):  # a document of n tokens has n - 1 (input, target) pairs
                out.append((shard, p, min(L, e - 1 - p)))
        return np.asarray(out, dtype=np.int64).reshape(-1, 3)

    def __len__(self):
        return len(self._epoch(0))

    def _epoch(self, epoch):
        """The rows of an epoch: pieces in a seeded order, each row filled until the next piece does not fit."""
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            order = torch.randperm(len(self.pieces), generator=g).tolist() if self.shuffle else range(len(self.pieces))
            rows, row, used = [], [], 0
            for i in order:
                n = int(self.pieces[i, 2])
                if row and (self.rows == "windows" or used + n > self.seq_len):
                    rows.append(row)
                    row, used = [], 0
                row.append(i)
                used += n
            rows.append(row)
            self._epochs.append(rows)
        return self._epochs[epoch]

    def row(self, k):
        """Row k of the endless sequence -> (inputs, targets, piece number per token), seq_len tokens each."""
        epoch = 0
        while k >= len(self._epoch(epoch)):
            k -= len(self._epoch(epoch))
            epoch += 1
        x = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        y = torch.full((self.seq_len,), -100, dtype=torch.long)
        doc = torch.full((self.seq_len,), -1, dtype=torch.long)
        at = 0
        for number, i in enumerate(self._epoch(epoch)[k]):
            shard, start, n = (int(v) for v in self.pieces[i])
            chunk = torch.from_numpy(self.tokens[shard][start : start + n + 1].astype(np.int64))
            x[at : at + n], y[at : at + n], doc[at : at + n] = chunk[:-1], chunk[1:], number
            if self.kind == "chat":
                mask = torch.from_numpy(self.masks[shard][start + 1 : start + n + 1].astype(np.bool_))
                y[at : at + n][~mask] = -100
            at += n
        return x, y, doc

    def next_batch(self):
        """This rank's rows of the next global batch: inputs, targets and piece numbers, (B / world, seq_len)
        each; the piece numbers are None for plain windows."""
        ks = range(self.position + self.rank, self.position + self.global_batch, self.world)
        self.position += self.global_batch
        xs, ys, docs = zip(*(self.row(k) for k in ks))
        return torch.stack(xs), torch.stack(ys), torch.stack(docs) if self.rows == "documents" else None

    def state(self):
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "rows": self.rows,
                "pieces": len(self.pieces)}

    def restore(self, state):
        same = (state.get("pieces"), state["seq_len"], state.get("rows")) == (len(self.pieces), self.seq_len, self.rows)
        if not same:
            raise DataError("the data changed since this checkpoint was written; resume needs the same data, "
                            "--seq and --rows")
        self.position, self.seed = state["position"], state["seed"]
        self._epochs = []


def sequential_batches(data_dir, split, seq_len, batch, max_rows=None, tokenizer=None, rows="documents"):
    """The split's rows in stored order, for held-out evaluation: (inputs, targets, piece numbers) batches."""
    loader = Loader(data_dir, split, seq_len, 1, tokenizer=tokenizer, rows=rows, shuffle=False)
    n = len(loader) if max_rows is None else min(max_rows, len(loader))
    for i in range(0, n, batch):
        xs, ys, docs = zip(*(loader.row(k) for k in range(i, min(i + batch, n))))
        yield torch.stack(xs), torch.stack(ys), torch.stack(docs) if rows == "documents" else None
