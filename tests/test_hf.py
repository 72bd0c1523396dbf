"""Hugging Face datasets in: local datasets in the Hub's layout through `nanoseek data --hf` and [data] hf,
giving the same tokens as the same documents in JSONL; a GSM8K-format task through SFT data, GRPO and eval;
and a Hub id with no network failing at once. Nothing here touches the network."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY

from nanoseek import cli
from nanoseek.data import DataError, build, load_manifest
from nanoseek.evaluate import evaluate
from nanoseek.hub import HubError, read_hf
from nanoseek.pipeline import RecipeError, load_recipe, run
from nanoseek.rl import rl
from nanoseek.tasks import get_task, task_documents
from nanoseek.tokenizer import Tokenizer

TEXTS = [f"Document {i}: {i} + {i * 7} = {i * 8}, and the fox ran {i % 5} miles." for i in range(120)]
CHATS = [[{"role": "user", "content": f"What is {i} + {i}?"},
          {"role": "assistant", "content": str(2 * i), "reasoning_content": f"{i} doubled is {2 * i}"}]
         for i in range(80)]
GSM8K = [{"question": f"Ann has {i} apples and buys {i * 3} more. How many apples does she have?",
          "answer": f"She buys {i * 3} apples.\nShe has {i} + {i * 3} = <<{i}+{i * 3}={i * 4}>>{i * 4} apples.\n"
                    f"#### {i * 4:,}"} for i in range(1, 400, 13)]


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """Datasets laid out as on the Hub: text in two Parquet shards, chat as Parquet and as JSONL, GSM8K-format
    problems with train and test splits; and the same documents as plain JSONL files."""
    root = tmp_path_factory.mktemp("hub")
    (root / "text" / "data").mkdir(parents=True)
    for k, part in enumerate((TEXTS[:70], TEXTS[70:])):
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}),
                       root / "text" / "data" / f"train-0000{k}-of-00002.parquet")
    (root / "chat" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"messages": CHATS}), root / "chat" / "data" / "train-00000-of-00001.parquet")
    (root / "chat_jsonl").mkdir()
    (root / "chat_jsonl" / "train.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in CHATS))
    (root / "gsm" / "main").mkdir(parents=True)
    test = [p for i, p in enumerate(GSM8K) if i % 5 == 0]
    pq.write_table(pa.Table.from_pylist([p for p in GSM8K if p not in test]),
                   root / "gsm" / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(test), root / "gsm" / "main" / "test-00000-of-00001.parquet")
    (root / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    (root / "chats.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in CHATS))
    return root


def _same_shards(a, b):
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma["kind"] == mb["kind"] and ma["splits"] == mb["splits"]  # token counts, documents and checksums
    return sum(s["tokens"] for s in ma["splits"]["train"])


def test_cli_hf_data_pretrain_sft_match_jsonl(hub_layout, tmp_path, capsys):
    out = tmp_path / "o"
    tok = str(out / "tok")
    assert cli.main(["tokenizer", "--hf", str(hub_layout / "text"), "--vocab-size", "300", "--out", tok]) == 0
    assert cli.main(["tokenizer", "--input", str(hub_layout / "texts.jsonl"), "--vocab-size", "300",
                     "--out", str(out / "tok_jsonl")]) == 0
    assert (out / "tok" / "tokenizer.json").read_bytes() == (out / "tok_jsonl" / "tokenizer.json").read_bytes()

    def data(name, *args):
        return cli.main(["data", "--tokenizer", tok, "--out", str(out / name), "--val-fraction", "0.05", *args])

    assert data("text", "--hf", str(hub_layout / "text")) == 0
    assert data("text_jsonl", "--input", str(hub_layout / "texts.jsonl")) == 0
    assert _same_shards(out / "text", out / "text_jsonl") > 1000
    assert data("chats", "--input", str(hub_layout / "chats.jsonl")) == 0
    for name in ("chat", "chat_jsonl"):  # a chat set in Parquet, and one in JSONL, both read by datasets
        assert data(name, "--hf", str(hub_layout / name), "--column", "messages") == 0
        assert _same_shards(out / name, out / "chats") > 1000
    assert data("few", "--hf", str(hub_layout / "text" / "data" / "train-00001-of-00002.parquet"),
                "--max-documents", "7") == 0
    assert sum(s["documents"] for split in load_manifest(out / "few")["splits"].values() for s in split) == 7
    opts = {**TINY, "steps": 2, "progress": False}
    assert cli.main(["pretrain", "--data", str(out / "text"), "--out", str(out / "pt"), *_flags(opts)]) == 0
    assert cli.main(["sft", "--data", str(out / "chat"), "--out", str(out / "sft"), "--init",
                     str(out / "pt" / "final"), *_flags(opts)]) == 0
    assert json.loads((out / "sft" / "final" / "nanoseek.json").read_text())["stage"] == "sft"


def _flags(opts):
    flags = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


def test_recipe_hf_key_runs_data_pretrain_sft(hub_layout, tmp_path):
    sources = [{"path": str(hub_layout / "text")}, {"path": str(hub_layout / "chat"), "column": "messages"}]
    recipe = load_recipe("smoke", {"run.out": str(tmp_path / "run"), "run.device": "cpu",
                                   "run.stages": ["pretrain", "sft"], "eval.stages": ["sft"], "data.tasks": [],
                                   "data.smalltalk": 0, "data.hf": sources, "data.vocab_size": 300,
                                   "data.val_fraction": 0.05, "pretrain.steps": 2, "sft.steps": 2})
    paths = run(recipe, stop_after="sft", log=lambda line: None)
    tok = Tokenizer.load(paths["tokenizer"])
    for kind, jsonl in (("text", "texts.jsonl"), ("chat", "chats.jsonl")):  # the same documents as JSONL
        build([str(hub_layout / jsonl)], tok, tmp_path / kind, val_fraction=recipe["data"]["val_fraction"])
        _same_shards(paths[kind], tmp_path / kind)
    timings = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert timings["pretrain"]["tokens"] == 2 * 8 * 128 and timings["sft"]["steps"] == 2
    assert timings["data"]["pretrain_tokens"] == sum(
        s["tokens"] for s in load_manifest(tmp_path / "text")["splits"]["train"])


def test_bad_hf_sources_say_what_to_do(hub_layout, tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match=r"\[data\] hf\[0\]: unknown keys \['colum'\].*valid keys"):
        load_recipe("smoke", {"data.hf": [{"path": "x", "colum": "text"}]})
    with pytest.raises(RecipeError, match=r"column must be 'text' \(pretraining\) or 'messages'"):
        load_recipe("smoke", {"data.hf": [{"path": "x", "column": "body"}]})
    with pytest.raises(RecipeError, match=r"a table with a path"):
        load_recipe("smoke", {"data.hf": ["HuggingFaceFW/fineweb-edu"]})
    with pytest.raises(DataError, match=r"no column 'messages', its columns are \['id', 'text'\]; pick one"):
        list(read_hf({"path": str(hub_layout / "text"), "column": "messages"}))
    with pytest.raises(HubError, match=r"Bad split: test"):
        read_hf({"path": str(hub_layout / "text"), "split": "test"}).__next__()
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(HubError, match=r"pip install nanoseek\[hf\]"):
        next(read_hf({"path": str(hub_layout / "text")}))


def test_hub_id_with_no_network_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set.*hf download HuggingFaceFW/fineweb-edu"):
        next(read_hf({"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as a machine with no network
    with pytest.raises(HubError, match=r"Hub \(127.0.0.1\) cannot be reached.*pass DIR instead"):
        get_task("hf:openai/gsm8k:main").problems("test")
    assert time.time() - t0 < 10
    assert cli.main(["tokenizer", "--hf", "openai/gsm8k", "--name", "main", "--out", str(tmp_path / "t")]) == 1
    assert "cannot be reached" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_gsm8k_format_task_through_sft_data_grpo_and_eval(hub_layout, random_policy, tmp_path):
    spec = f"hf:{hub_layout / 'gsm'}"
    task = get_task(spec)
    assert (get_task("hf:openai/gsm8k:main").path, get_task("hf:openai/gsm8k:main").config) == ("openai/gsm8k", "main")
    assert task.name == "gsm" and len(task.problems("test")) == 7 and len(task.problems("train")) == 24
    docs = list(task_documents(spec, 5, "chat", seed=0))
    big = next(p for p in task.problems("train") if p.question.startswith("Ann has 300 "))
    assert task.solve(big) == ("She buys 900 apples.\nShe has 300 + 900 = 1200 apples.", "1200")  # 1,200 parsed
    messages = docs[0][1]
    assert messages[0]["content"] in {p.question for p in task.problems("train")} and "<<" not in str(docs)
    assert task.score(big, "300 + 900 = 1200\n</think>\n\n1200").accuracy == 1.0
    assert task.score(big, "300 + 900 = 1200\n</think>\n\n$1,200").accuracy == 1.0  # the math checker
    assert task.score(big, "300 + 900\n</think>\n\n1100").accuracy == 0.0
    assert task.score(big, "1200").format == 0.0
    last = rl({"init": random_policy, "task": spec, "out": str(tmp_path / "rl"), "steps": 2, "prompts": 2,
               "group": 2, "max_new_tokens": 8, "dynamic_sampling": False, "progress": False, "device": "cpu",
               "eval_every": 0, "ckpt_every": 0})
    assert last["step"] == 2 and 0.0 <= last["accuracy"] <= 1.0
    results = evaluate([str(tmp_path / "rl" / "final")], [spec], n=4, max_new_tokens=8, device="cpu")
    example = results[str(tmp_path / "rl" / "final")]["gsm"]
    assert example["all"]["n"] == 4 and {e["question"] for e in example["examples"]} <= {
        p.question for p in task.problems("test")}


def test_shards_stream_in_flushes_and_close_at_the_shard_size(tmp_path, tokenizer, monkeypatch):
    from nanoseek import data

    monkeypatch.setattr(data, "WRITE_TOKENS", 50)
    monkeypatch.setattr(data, "ENCODE_BATCH", 7)
    docs = [("text", t) for t in TEXTS]
    whole = build(None, tokenizer, tmp_path / "whole", val_fraction=0, documents=docs)
    monkeypatch.setattr(data, "SHARD_TOKENS", 500)
    parts = build(None, tokenizer, tmp_path / "parts", val_fraction=0, documents=docs)["splits"]["train"]
    assert len(parts) > 3 and all(s["tokens"] >= 500 for s in parts[:-1])
    tokens = np.concatenate([np.fromfile(tmp_path / "parts" / s["file"], dtype=np.uint16) for s in parts])
    assert tokens.tobytes() == (tmp_path / "whole" / "train_000.bin").read_bytes()
    assert sum(s["documents"] for s in parts) == whole["splits"]["train"][0]["documents"] == len(TEXTS)


def test_gpu_chat_recipe_streams_fineweb_smoltalk_and_gsm8k():
    recipe = load_recipe("gpu-chat")
    assert [(s["path"], s["name"], s["column"]) for s in recipe["data"]["hf"]] == [
        ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"), ("HuggingFaceTB/smoltalk", "all", "messages")]
    assert all(s["max_documents"] > 0 for s in recipe["data"]["hf"])  # a sample, never the whole corpus
    assert recipe["data"]["tasks"] == recipe["eval"]["tasks"] == recipe["rl"]["task"]
    task = get_task(recipe["rl"]["task"][0])  # read lazily: nothing is downloaded here
    assert (task.path, task.config, task.name) == ("openai/gsm8k", "main", "gsm8k")


def test_tokenizer_reads_only_its_sample():
    from nanoseek.tokenizer import train_tokenizer

    def texts():
        yield "abc " * 10
        yield "xyz " * 10
        raise AssertionError("read past the sample")

    tok = train_tokenizer(texts(), vocab_size=300, max_chars=42)  # all of the first text, 2 characters of the next
    assert tok.encode("abc") == [tok.tok.token_to_id("abc")] and tok.tok.token_to_id("xyz") is None
