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
import tempfile

import numpy as np
import torch

from nanoseek.tokenizer import Tokenizer

SHARD_TOKENS = 50_000_000  # tokens per shard file


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
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    if documents is None:
        documents = (doc for f in expand_inputs(inputs) for doc in read_documents(f))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".data.tmp-", dir=parent)
    writers = {split: _ShardWriter(tmp, split, dtype) for split in ("train", "val")}
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
    manifest = {
        "kind": kind,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "splits": {split: w.close() for split, w in writers.items()},
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    tokenizer.save(tmp)  # training reads the tokenizer from here, so shards and ids cannot drift apart
    from nanoseek.checkpoint import _fsync_tree, _replace_dir

    _fsync_tree(tmp)
    _replace_dir(tmp, os.path.abspath(out_dir))
    return manifest


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
    """Fixed windows of seq_len + 1 tokens, visited in a seeded order that is reshuffled every epoch.

    A step's global batch is the next `global_batch` windows of that order; rank r of `world` takes
    rows r::world. The position is one integer (windows consumed), so resume is exact.
    """

    def __init__(self, data_dir, split, seq_len, global_batch, seed=0, rank=0, world=1, tokenizer=None):
        manifest = load_manifest(data_dir, tokenizer)
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} must divide evenly over {world} ranks")
        self.kind, self.seq_len, self.global_batch = manifest["kind"], seq_len, global_batch
        self.seed, self.rank, self.world = seed, rank, world
        self.tokens, self.masks, self.windows = [], [], []  # per shard; windows: (shard, start)
        for i, shard in enumerate(manifest["splits"][split]):
            path = os.path.join(data_dir, shard["file"])
            self.tokens.append(np.memmap(path, dtype=manifest["dtype"], mode="r"))
            if self.kind == "chat":
                self.masks.append(np.memmap(path.replace(".bin", ".mask.bin"), dtype=np.uint8, mode="r"))
            n = (shard["tokens"] - 1) // seq_len
            self.windows += [(i, j * seq_len) for j in range(n)]
        if not self.windows:
            raise DataError(
                f"{data_dir}: the {split} split has fewer than {seq_len + 1} tokens; add data or shorten --seq"
            )
        self.position = 0
        self._order_epoch, self._order = None, None

    def __len__(self):
        return len(self.windows)

    def _window_order(self, epoch):
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.windows), generator=g), epoch
        return self._order

    def window(self, k):
        """Window k of the endless shuffled sequence -> (input ids, targets) of seq_len tokens each."""
        epoch, idx = divmod(k, len(self.windows))
        shard, start = self.windows[int(self._window_order(epoch)[idx])]
        chunk = torch.from_numpy(self.tokens[shard][start : start + self.seq_len + 1].astype(np.int64))
        x, y = chunk[:-1], chunk[1:].clone()
        if self.kind == "chat":
            mask = torch.from_numpy(self.masks[shard][start + 1 : start + self.seq_len + 1].astype(np.bool_))
            y[~mask] = -100
        return x, y

    def next_batch(self):
        """This rank's rows of the next global batch: (B / world, seq_len) inputs and targets."""
        ks = range(self.position + self.rank, self.position + self.global_batch, self.world)
        self.position += self.global_batch
        xs, ys = zip(*(self.window(k) for k in ks))
        return torch.stack(xs), torch.stack(ys)

    def state(self):
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "windows": len(self.windows)}

    def restore(self, state):
        if state["windows"] != len(self.windows) or state["seq_len"] != self.seq_len:
            raise DataError("the data changed since this checkpoint was written; resume needs the same data and --seq")
        self.position, self.seed = state["position"], state["seed"]


def sequential_batches(data_dir, split, seq_len, batch, max_windows=None, tokenizer=None):
    """The split's windows in stored order, for held-out evaluation."""
    loader = Loader(data_dir, split, seq_len, 1, tokenizer=tokenizer)
    loader._order_epoch, loader._order = 0, torch.arange(len(loader))
    n = len(loader) if max_windows is None else min(max_windows, len(loader))
    for i in range(0, n, batch):
        xs, ys = zip(*(loader.window(k) for k in range(i, min(i + batch, n))))
        yield torch.stack(xs), torch.stack(ys)
