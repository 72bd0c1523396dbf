"""Corpora to shards, the seeded loader, and every bad-input message."""

import json

import numpy as np
import pytest
import torch
from conftest import arithmetic_documents, chat_documents

from nanoseek.data import DataError, Loader, build, load_manifest, pack, read_texts
from nanoseek.tokenizer import train_tokenizer


def test_manifest_and_shards(text_data, tokenizer):
    m = load_manifest(text_data, tokenizer, verify=True)
    assert m["kind"] == "text" and m["dtype"] == "uint16"
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert sum(s["documents"] for s in train) + sum(s["documents"] for s in val) == 3000
    assert sum(s["documents"] for s in val) == 150  # every 20th document, deterministically
    tokens = np.fromfile(f"{text_data}/{train[0]['file']}", dtype=np.uint16)
    assert tokens[0] == tokenizer.bos_id and (tokens == tokenizer.eos_id).sum() == train[0]["documents"]


def test_text_jsonl_and_parquet_inputs_agree(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for _, d in arithmetic_documents(50)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    sums = {build([str(tmp_path / f"a.{ext}")], tokenizer, tmp_path / ext)["splits"]["train"][0]["sha256"]
            for ext in ("txt", "jsonl", "parquet")}
    assert len(sums) == 1


def test_text_files_split_at_blank_lines_piece_by_piece(tmp_path, monkeypatch):
    from nanoseek import data

    text = "a\n\nb\n\n\nc\n\n\n\nd e\nf\n\n\n\n\ng\n\n" + "word " * 50 + "\n\nlast\n"
    (tmp_path / "a.txt").write_text(text)
    monkeypatch.setattr(data, "READ_CHARS", 3)  # blank lines cut by the pieces read
    assert list(data._read_paragraphs(str(tmp_path / "a.txt"))) == text.split("\n\n")
    assert [d for _, d in data.read_documents(str(tmp_path / "a.txt"))] == [
        d.strip("\n") for d in text.split("\n\n") if d.strip()]


def test_tokenizer_text_of_text_and_chat_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]}))
    assert list(read_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])) == ["one", "two", "q", "a", "r"]
    with pytest.raises(DataError, match="no files match"):
        list(read_texts([str(tmp_path / "*.parquet")]))


def test_chat_mask_covers_assistant_tokens_only(chat_data, tokenizer):
    shard = load_manifest(chat_data)["splits"]["train"][0]
    tokens = np.fromfile(f"{chat_data}/{shard['file']}", dtype=np.uint16)
    mask = np.fromfile(f"{chat_data}/{shard['file'].replace('.bin', '.mask.bin')}", dtype=np.uint8)
    ids, expected = [], []
    for i, (_, messages) in enumerate(chat_documents()):
        if i % 20 != 19:  # the training split
            doc_ids, doc_mask = tokenizer.render_chat(messages)
            ids += doc_ids
            expected += doc_mask
    assert tokens.tolist() == ids and mask.tolist() == expected
    learned = tokenizer.decode(tokens[mask == 1].tolist())
    assert "What is" not in learned and "<think>" in learned and "<｜end▁of▁sentence｜>" in learned
    assert tokenizer.assistant_id not in tokens[mask == 1] and tokenizer.user_id not in tokens[mask == 1]
    loader = Loader(chat_data, "train", 64, 4, seed=0, rows="windows")
    for k in range(8):  # a target is learned exactly where the mask marks the assistant
        x, y, _ = loader.row(k)
        order, bounds = loader._epoch(0)
        _, start, _ = loader.pieces[order[bounds[k]]]
        assert torch.equal(x, torch.from_numpy(tokens[start : start + 64].astype(np.int64)))
        assert ((y != -100).numpy() == (mask[start + 1 : start + 65] == 1)).all()


def _documents(tokens, bos_id):
    starts = np.flatnonzero(tokens == bos_id).tolist() + [len(tokens)]
    return [tuple(tokens[s:e].tolist()) for s, e in zip(starts, starts[1:])]


def test_document_rows_hold_whole_conversations(chat_data, tokenizer):
    """Every row is whole conversations from BOS to EOS, never cut; an epoch holds each conversation once."""
    shard = load_manifest(chat_data)["splits"]["train"][0]
    tokens = np.fromfile(f"{chat_data}/{shard['file']}", dtype=np.uint16)
    mask = np.fromfile(f"{chat_data}/{shard['file'].replace('.bin', '.mask.bin')}", dtype=np.uint8)
    conversations = _documents(tokens, tokenizer.bos_id)
    loader = Loader(chat_data, "train", 64, 4, seed=0)
    seen = []
    for k in range(len(loader)):
        x, y, doc = loader.row(k)
        real = int((doc >= 0).sum())
        assert (doc[real:] == -1).all() and (doc[1:real] - doc[: real - 1] >= 0).all()  # padding only at the end
        for d in range(int(doc.max()) + 1):
            inputs, targets = x[doc == d], y[doc == d]
            whole = tuple(inputs.tolist()) + (tokenizer.eos_id,)
            assert inputs[0] == tokenizer.bos_id and whole in conversations  # starts at BOS, ends at EOS
            at = int(np.flatnonzero(tokens == inputs[0].item())[conversations.index(whole)])
            learned = mask[at + 1 : at + len(whole)] == 1
            assert ((targets != -100).numpy() == learned).all()
            seen.append(whole)
        assert (y[doc == -1] == -100).all() and (x[doc == -1] == tokenizer.pad_id).all()
    assert sorted(seen) == sorted(conversations)


def test_long_documents_are_cut_into_rows(text_data, tokenizer):
    loader = Loader(text_data, "train", 8, 4, seed=0)
    assert (loader.pieces[:, 2] <= 8).all()
    shard = load_manifest(text_data)["splits"]["train"][0]
    tokens = np.fromfile(f"{text_data}/{shard['file']}", dtype=np.uint16)
    n_docs = len(_documents(tokens, tokenizer.bos_id))
    assert loader.pieces[:, 2].sum() == len(tokens) - n_docs  # every (input, target) pair inside a document, once


def test_loader_order_is_seeded_and_resumable(text_data):
    a = Loader(text_data, "train", 32, 8, seed=1)
    batches = [a.next_batch()[0] for _ in range(5)]
    b = Loader(text_data, "train", 32, 8, seed=1)
    b.next_batch(), b.next_batch()
    state = json.loads(json.dumps(b.state()))
    c = Loader(text_data, "train", 32, 8, seed=1)
    c.restore(state)
    assert all(torch.equal(c.next_batch()[0], batches[i]) for i in range(2, 5))
    other = Loader(text_data, "train", 32, 8, seed=2)
    assert not torch.equal(other.next_batch()[0], batches[0])


def test_ranks_split_the_global_batch(text_data):
    whole = Loader(text_data, "train", 32, 8, seed=0).next_batch()[0]
    parts = [Loader(text_data, "train", 32, 8, seed=0, rank=r, world=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.stack([parts[0], parts[1]], 1).reshape(8, 32), whole)


def test_epochs_reshuffle_and_cover_every_row(text_data):
    loader = Loader(text_data, "train", 32, 1, seed=0)
    epochs = [[order[a:b].tolist() for a, b in zip(bounds, bounds[1:])] for order, bounds in map(loader._epoch, (0, 1))]
    for rows in epochs:  # each epoch packs every piece exactly once, in at most seq_len tokens a row
        assert sorted(i for row in rows for i in row) == list(range(len(loader.pieces)))
        assert all(loader.pieces[row, 2].sum() <= 32 for row in rows)
    assert epochs[0] != epochs[1]
    n = len(epochs[0])
    assert torch.equal(loader.row(n)[0], Loader(text_data, "train", 32, 1, seed=0).row(n)[0])  # 2nd epoch's first


def test_pack_fills_rows_and_keeps_the_order_nearly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, 3000).tolist()
    rows = pack(lengths, 256, window=64)
    assert sorted(i for row in rows for i in row) == list(range(3000))  # every piece once
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)  # rows start in the given order
    placed = [i for row in rows for i in row]
    assert max(abs(i - at) for at, i in enumerate(placed)) <= 2 * 64  # each piece near its place
    next_fit, used = 1, 0
    for n in lengths:
        next_fit, used = (next_fit + 1, n) if used + n > 256 else (next_fit, used + n)
    fill = sum(lengths) / (256 * len(rows))
    assert fill > 0.95 and len(rows) < 0.85 * next_fit, (fill, len(rows), next_fit)
    assert pack([], 256) == [] and pack([256, 1, 256], 256) == [[0], [1], [2]]


def test_bad_inputs_name_the_file_and_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        build([str(bad)], tokenizer, tmp_path / "o")
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2: expected an object with "text"'):
        build([str(bad)], tokenizer, tmp_path / "o")
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: message 1 needs a role"):
        build([str(bad)], tokenizer, tmp_path / "o")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"cannot read .*bin.txt as UTF-8"):
        build([str(tmp_path / "bin.txt")], tokenizer, tmp_path / "o")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"cannot read .*x.parquet as Parquet"):
        build([str(tmp_path / "x.parquet")], tokenizer, tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        build([str(tmp_path / "nope.txt")], tokenizer, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".data.tmp-*"))  # nothing half-written


def test_wrong_tokenizer_for_shards(text_data):
    other = train_tokenizer(["completely different text for another vocabulary"] * 10, vocab_size=300)
    with pytest.raises(DataError, match="different tokenizer"):
        load_manifest(text_data, other)
    with pytest.raises(DataError, match="different tokenizer"):
        Loader(text_data, "train", 32, 8, tokenizer=other)


def test_damaged_shard_is_caught(tmp_path, tokenizer):
    build(None, tokenizer, tmp_path / "d", documents=arithmetic_documents(100))
    shard = next((tmp_path / "d").glob("train_*.bin"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its checksum"):
        load_manifest(tmp_path / "d", verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="wrong size"):
        load_manifest(tmp_path / "d")
