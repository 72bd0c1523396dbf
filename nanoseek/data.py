"""Corpora to token shards, and a loader that streams them in a seeded order it can resume exactly.

A data directory holds flat token arrays and a manifest:

    data/manifest.json        kind ("text" or "chat"), dtype, tokenizer fingerprint, per split: shards
    data/train_000.bin        tokens (uint16 when the vocabulary fits, else uint32), documents back to back
    data/train_000.mask.bin   chat data only: 1 where the token is the assistant's (a loss target)
    data/val_000.bin ...      the held-out split

Text documents are [BOS] text [EOS], their tool markup as control tokens; chat documents are rendered with the chat
template.

Everything streams, so memory does not grow with the corpus: files are read piece by piece (Parquet a batch of
rows at a time), Hugging Face datasets row by row (nanoseek/hub.py), documents are encoded ENCODE_BATCH at a
time, tokens appended to their shard as they come, and the loader indexes each shard with numpy.
"""

import bisect
import glob
import hashlib
import itertools
import json
import os
import shutil
import tempfile

import numpy as np
import torch

from nanoseek.tokenizer import Tokenizer

SHARD_TOKENS = 50_000_000  # tokens per shard file
ENCODE_BATCH = 1000  # documents encoded together (tokenizers encodes a batch on every core)
WRITE_TOKENS = 1 << 18  # tokens held before they are appended to their shard file
READ_CHARS = 1 << 20  # characters of a text file read at a time


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
    """The text of every document the patterns name, to train a tokenizer on (see document_texts)."""
    return document_texts(read_corpus(patterns))


def document_texts(documents):
    """The text of every ("text"|"chat", doc) document: a text document whole, a conversation message by message
    (its reasoning too)."""
    for kind, doc in documents:
        if kind == "text":
            yield doc
        else:
            for m in doc:
                yield m["content"]
                if isinstance(m.get("reasoning_content"), str):
                    yield m["reasoning_content"]


def read_documents(file):
    """Yield ("text", str) or ("chat", messages) per document of a .txt, .jsonl or .parquet file, streamed."""
    if file.endswith(".parquet"):
        yield from _read_parquet(file)
    elif file.endswith((".jsonl", ".json")):
        yield from _read_jsonl(file)
    else:  # plain text: documents are separated by blank lines
        for doc in _read_paragraphs(file):
            if doc.strip():
                yield "text", doc.strip("\n")


def _read_paragraphs(file):
    """The pieces of a text file split at every blank line ("\n\n"), as str.split would give them, read a
    READ_CHARS piece at a time."""
    try:
        with open(file, encoding="utf-8") as f:
            rest = ""
            while chunk := f.read(READ_CHARS):
                *done, rest = (rest + chunk).split("\n\n")
                yield from done
            yield rest
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {file} as UTF-8 text: {e}") from None


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
                yield row_document(row, f"{file}:{lineno}")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e})") from None


def _read_parquet(file):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f"cannot read {file} as Parquet: {e}") from None
    columns = [c for c in ("text", "messages") if c in parquet.schema_arrow.names]
    if not columns:
        raise DataError(f"{file}: expected a 'text' or 'messages' column, found {sorted(parquet.schema_arrow.names)}")
    i = 0
    for batch in parquet.iter_batches(batch_size=ENCODE_BATCH, columns=columns):
        for row in batch.to_pylist():
            yield row_document(row, f"{file}: row {i}")
            i += 1


def row_document(row, where):
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
    from nanoseek.checkpoint import fsync_tree, replace_dir

    fsync_tree(tmp)
    replace_dir(tmp, os.path.abspath(out_dir))
    return manifest


def _write_shards(documents, tokenizer, root, dtype, val_every):
    """Tokenize the documents, ENCODE_BATCH at a time, into train and val shards under root; returns
    (kind, {split: shards})."""
    writers = {split: _ShardWriter(root, split, dtype) for split in ("train", "val")}
    kind, i = None, 0
    for batch in _batches(documents, ENCODE_BATCH):
        for doc_kind, _ in batch:
            kind = kind or doc_kind
            if doc_kind != kind:
                raise DataError(f"document {i} is {doc_kind} but earlier ones are {kind}: keep text and chat data "
                                "apart")
            i += 1
        if kind == "text":
            encoded = tokenizer.encode_documents([doc for _, doc in batch])
            batch = [([tokenizer.bos_id, *ids, tokenizer.eos_id], None) for ids in encoded]
        else:
            batch = tokenizer.render_chats([doc for _, doc in batch])
        for j, (ids, mask) in enumerate(batch, i - len(batch)):
            writers["val" if _in_val(j, val_every) else "train"].add(ids, mask)
    if kind is None:
        raise DataError("the input holds no documents")
    return kind, {split: w.close() for split, w in writers.items()}


def _batches(items, n):
    items = iter(items)
    return iter(lambda: list(itertools.islice(items, n)), [])


class _ShardWriter:
    """Appends documents to the split's current shard file as they come, WRITE_TOKENS at a time, and starts a new
    shard once one holds SHARD_TOKENS; checksums are kept as the bytes go by."""

    def __init__(self, root, split, dtype):
        self.root, self.split, self.dtype = root, split, dtype
        self.shards, self.files = [], None
        self.ids, self.mask, self.held = [], [], 0  # documents not yet written
        self.tokens, self.docs = 0, 0  # in the current shard

    def add(self, ids, mask):
        self.ids.append(ids)
        if mask is not None:
            self.mask.append(mask)
        self.held += len(ids)
        self.tokens += len(ids)
        self.docs += 1
        if self.tokens >= SHARD_TOKENS:
            self._close_shard()
        elif self.held >= WRITE_TOKENS:
            self._write()

    def _write(self):
        if not self.held:
            return
        name = f"{self.split}_{len(self.shards):03d}.bin"
        if self.files is None:
            names = [name] + ([name.replace(".bin", ".mask.bin")] if self.mask else [])
            self.files = [(open(os.path.join(self.root, n), "wb"), hashlib.sha256()) for n in names]
        arrays = [np.fromiter(itertools.chain.from_iterable(self.ids), self.dtype, self.held)]
        if self.mask:
            arrays.append(np.fromiter(itertools.chain.from_iterable(self.mask), np.uint8, self.held))
        for (f, sha), values in zip(self.files, arrays):
            f.write(memoryview(values))
            sha.update(memoryview(values))
        self.ids, self.mask, self.held = [], [], 0

    def _close_shard(self):
        self._write()
        if self.files is None:
            return
        for f, _ in self.files:
            f.close()
        shard = {"file": f"{self.split}_{len(self.shards):03d}.bin", "tokens": self.tokens, "documents": self.docs,
                 "sha256": self.files[0][1].hexdigest()}
        if len(self.files) > 1:
            shard["mask_sha256"] = self.files[1][1].hexdigest()
        self.shards.append(shard)
        self.files, self.tokens, self.docs = None, 0, 0

    def close(self):
        self._close_shard()
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
        self._epochs = []  # rows of each epoch packed so far: (order, bounds) as _epoch says

    def _pieces(self, shard, tokens, bos_id):
        """(shard, start, n): inputs tokens[start:start + n], targets one token later, never past a document."""
        L = self.seq_len
        if self.rows == "windows":
            starts = np.arange((len(tokens) - 1) // L, dtype=np.int64) * L
            return np.stack([np.full_like(starts, shard), starts, np.full_like(starts, L)], 1)
        doc_starts = np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)
        doc_ends = np.append(doc_starts[1:], len(tokens))
        pairs = doc_ends - 1 - doc_starts  # a document of n tokens has n - 1 (input, target) pairs
        counts = np.maximum(0, -(-pairs // L))  # pieces per document
        doc = np.repeat(np.arange(len(counts)), counts)
        nth = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)  # piece number in its document
        starts = doc_starts[doc] + nth * L
        return np.stack([np.full_like(starts, shard), starts, np.minimum(L, doc_ends[doc] - 1 - starts)], 1)

    def __len__(self):
        return len(self._epoch(0)[1]) - 1

    def _epoch(self, epoch):
        """The rows of an epoch as (order, bounds): pieces in a seeded order, packed (see pack), row k holding
        the pieces order[bounds[k]:bounds[k + 1]]."""
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            order = torch.randperm(len(self.pieces), generator=g).numpy() if self.shuffle else \
                np.arange(len(self.pieces))
            if self.rows == "windows":
                bounds = np.arange(len(order) + 1)
            else:
                rows = pack(self.pieces[order, 2].tolist(), self.seq_len)
                bounds = np.cumsum([0] + [len(row) for row in rows])
                order = order[np.concatenate(rows)] if rows else order
            self._epochs.append((order, bounds))
        return self._epochs[epoch]

    def row(self, k):
        """Row k of the endless sequence -> (inputs, targets, piece number per token), seq_len tokens each."""
        epoch = 0
        while k >= len(self._epoch(epoch)[1]) - 1:
            k -= len(self._epoch(epoch)[1]) - 1
            epoch += 1
        order, bounds = self._epoch(epoch)
        x = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        y = torch.full((self.seq_len,), -100, dtype=torch.long)
        doc = torch.full((self.seq_len,), -1, dtype=torch.long)
        at = 0
        for number, i in enumerate(order[bounds[k] : bounds[k + 1]].tolist()):
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


def pack(lengths, capacity, window=256):
    """Pieces of these lengths (each <= capacity), in their order, into rows of at most capacity tokens ->
    the rows as lists of indices. A row starts with the oldest piece not yet placed; its room is then filled
    best-fit (the longest piece that fits, the oldest of that length) from the next `window` pieces not yet
    placed, so rows come out nearly full (next-fit packing of the cpu recipe's SFT conversations pads a sixth
    of every row, this 5%) and each piece lands about where the order put it."""
    rows, fits = [], []  # fits: sorted (length, index) of the unplaced pieces in view
    placed = bytearray(len(lengths))
    seen = first = 0  # pieces taken into view; the oldest piece not yet placed
    while True:
        while seen < len(lengths) and len(fits) < window:
            bisect.insort(fits, (lengths[seen], seen))
            seen += 1
        while first < len(lengths) and placed[first]:
            first += 1
        if first == len(lengths):
            return rows
        row, room = [first], capacity - lengths[first]
        placed[first] = 1
        fits.remove((lengths[first], first))
        while fits and fits[0][0] <= room:
            length = fits[bisect.bisect_right(fits, (room, len(lengths))) - 1][0]
            i = fits.pop(bisect.bisect_left(fits, (length, -1)))[1]
            row.append(i)
            placed[i] = 1
            room -= length
        rows.append(row)


def sequential_batches(data_dir, split, seq_len, batch, max_rows=None, tokenizer=None, rows="documents"):
    """The split's rows in stored order, for held-out evaluation: (inputs, targets, piece numbers) batches."""
    loader = Loader(data_dir, split, seq_len, 1, tokenizer=tokenizer, rows=rows, shuffle=False)
    n = len(loader) if max_rows is None else min(max_rows, len(loader))
    for i in range(0, n, batch):
        xs, ys, docs = zip(*(loader.row(k) for k in range(i, min(i + batch, n))))
        yield torch.stack(xs), torch.stack(ys), torch.stack(docs) if rows == "documents" else None
