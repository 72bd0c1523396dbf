"""The training benchmark compares like with like: both sides see the same rows and score them alike; the
decode benchmark reads llama.cpp's own tools and compares medians."""

import os
import shutil
import sys

import pytest
import torch

from nanoseek import checkpoint
from nanoseek.bench import common, llama_cpp, speculation
from nanoseek.bench.train import steps_to, train_nanoseek_way, train_transformers_way
from nanoseek.device import choose_compute
from nanoseek.model import DeepSeekV3, config_for_size, round_up
from nanoseek.tokenizer import Tokenizer


def test_both_ways_start_from_the_same_held_out_loss(text_data, tmp_path):
    tok = Tokenizer.load(text_data)
    cfg = config_for_size(2, vocab_size=round_up(len(tok), 64))
    cfg.num_nextn_predict_layers = 0
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    model = DeepSeekV3(cfg).init_weights(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked logits: the loss depends on which target each position gets
    checkpoint.save(tmp_path / "init", model, tok)
    kw = {"steps": 2, "batch": 4, "seq": 32, "warmup": 1, "eval_every": 1, "eval_rows": 8, "seed": 0,
          "compute": choose_compute("cpu")}
    init = str(tmp_path / "init")
    _, ours = train_nanoseek_way(init, text_data, 0.0, **kw, out=str(tmp_path / "ours"))  # lr 0: the weights stay
    _, theirs = train_transformers_way(init, text_data, 0.0, **kw)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [1, 2]
    # packed rows, document masks, positions and shifted targets agree; only nanoseek's expert-bias
    # balancing (a step of 0.001 in routing) moves its loss at all
    for (_, a), (_, b) in zip(ours, theirs):  # a target shifted once more, or no document mask: 1-10% apart
        assert a == pytest.approx(b, rel=1e-3)


def test_steps_to_target():
    curve = [(10, 2.0), (20, 1.5), (30, 1.2), (40, 1.3)]
    assert steps_to(curve, 1.5) == 20 and steps_to(curve, 1.25) == 30 and steps_to(curve, 1.0) is None


# Printed by llama-cpp-python 0.3.36's llama-bench and llama-batched-bench (`nanoseek bench decode --peer llama.cpp`'s
# commands, 2 threads) on the cpu recipe's final model exported to GGUF f32.
LLAMA_BENCH_JSON = """
[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "model.gguf",
    "model_type": "deepseek2 ?B all F32",
    "model_size": 16321632,
    "model_n_params": 4080408,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 0,
    "test_time": "2026-11-30T23:51:35Z",
    "avg_ns": 64521894,
    "stddev_ns": 4770708,
    "avg_ts": 1991.317244,
    "stddev_ts": 152.103500,
    "samples_ns": [ 59192042, 68392683, 65980958 ],
    "samples_ts": [ 2162.45, 1871.55, 1939.95 ]
  }
]
"""

BATCHED_BENCH_OUTPUT = (
    "\n"
    "llama_batched_bench: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, "
    "is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2\n"
    "\n"
    "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |\n"
    "|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|\n"
    "|    64 |    128 |   16 |   3072 |    0.114 |  8955.67 |    0.448 |  4576.38 |    0.562 |  5467.59 |\n"
    "\n"
)


def test_llama_bench_rate_is_its_tokens_over_its_time():
    rate = llama_cpp.llama_bench_rate(LLAMA_BENCH_JSON)
    assert rate == pytest.approx(3 * 128 / (59192042 + 68392683 + 65980958) * 1e9)
    assert rate == pytest.approx(1991.3, rel=0.01)  # its own avg_ts, the mean of the three runs' rates


def test_batched_bench_table_and_rate():
    (row,) = llama_cpp.batched_bench_table(BATCHED_BENCH_OUTPUT)
    assert (row["PP"], row["TG"], row["B"], row["S_TG t/s"]) == (64, 128, 16, 4576.38)
    assert llama_cpp.batched_bench_rate([BATCHED_BENCH_OUTPUT]) == pytest.approx(4576.38)
    slower = BATCHED_BENCH_OUTPUT.replace("4576.38", "2288.19")  # half the speed: twice the time for the same tokens
    assert llama_cpp.batched_bench_rate([BATCHED_BENCH_OUTPUT, slower]) == pytest.approx(2 * 4576.38 / 3)


def test_batched_bench_runs_again_when_its_table_is_lost(monkeypatch):
    lost = BATCHED_BENCH_OUTPUT.split("|")[0]  # the process ended before its logging thread printed the table
    outputs = iter([lost, lost, BATCHED_BENCH_OUTPUT])
    monkeypatch.setattr(llama_cpp, "run_tool", lambda command: next(outputs))
    assert llama_cpp.batched_bench_output(["llama-batched-bench"]) == BATCHED_BENCH_OUTPUT
    monkeypatch.setattr(llama_cpp, "run_tool", lambda command: lost)
    with pytest.raises(RuntimeError, match="no results table"):
        llama_cpp.batched_bench_output(["llama-batched-bench"], attempts=3)


def test_sides_take_turns_and_the_ratio_is_of_medians():
    calls, figures = [], {"nanoseek": iter([10.0, 30.0, 20.0]), "llama.cpp": iter([40.0, 5.0, 50.0])}
    sides = {name: (lambda name=name: calls.append(name) or next(figures[name])) for name in figures}
    got = common.interleaved(sides, rounds=3)
    assert calls == ["nanoseek", "llama.cpp"] * 3
    c = common.compare(got["nanoseek"], got["llama.cpp"])
    assert c["nanoseek"] == {"median": 20.0, "min": 10.0, "max": 30.0, "rounds": [10.0, 30.0, 20.0]}
    assert (c["llama.cpp"]["median"], c["llama.cpp"]["min"], c["llama.cpp"]["max"]) == (40.0, 5.0, 50.0)
    assert c["speedup"] == 0.5


def test_missing_cmake_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "cmake" else f"/usr/bin/{name}")
    with pytest.raises(RuntimeError, match="needs cmake.*apt-get install cmake"):
        llama_cpp.native_llama_tools("0.3.36")
    assert not (tmp_path / "nanoseek").exists()  # nothing downloaded, nothing built


def test_cached_tools_are_not_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "nanoseek" / "llama.cpp-0.3.36" / "bin"
    folder.mkdir(parents=True)
    for name in llama_cpp.NATIVE_TOOLS:
        (folder / name).write_text("")
        os.chmod(folder / name, 0o755)
    monkeypatch.setattr(llama_cpp, "check_build_tools", lambda: pytest.fail("a cached tool was built again"))
    assert llama_cpp.native_llama_tools("0.3.36") == {name: str(folder / name) for name in llama_cpp.NATIVE_TOOLS}


def test_speculation_on_task_prompts_is_exact_and_prints_its_ratio_last(chat_model, capsys):
    """bench decode --prompt-kind tasks: held-out prompts of the task, decoded plainly and speculatively, the same
    tokens; rates of both sides in every round, the speedups printed last."""
    r = speculation.bench_speculation(chat_model, tasks=["addition"], n=5, difficulty=2, batches=(1, 2), new_tokens=24,
                                rounds=2)
    assert [(row["batch"], row["prompts"]) for row in r["runs"]] == [(1, 1), (2, 5)]
    for row in r["runs"]:
        assert row["identical"] == row["prompts"] and row["tokens"] >= row["prompts"]
        assert 0 <= row["acceptance"] <= 1 and row["speedup"] > 0
        assert all(len(row[side][what]["rounds"]) == 2 for side in ("plain", "speculative")
                   for what in ("decode_steps", "whole_requests"))
    speculation.print_speculation(r)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("speedup vs plain decoding (batch 2): ")


def test_bench_decode_prompts_say_what_is_wrong(capsys):
    from nanoseek.cli import main

    assert main(["bench", "decode", "--prompt-kind", "tasks"]) == 1
    assert "needs --ckpt" in capsys.readouterr().err
    assert main(["bench", "decode", "--prompt-kind", "tasks", "--ckpt", "x", "--peer", "llama.cpp"]) == 1
    assert "drop --peer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--prompt-kind", "words"])
    assert "invalid choice: 'words' (choose from" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # grpo's --prompts counts problems per step, as `nanoseek rl --prompts` does
        main(["bench", "grpo", "--ckpt", "x", "--prompts", "tasks"])
    assert "--prompts: invalid int value: 'tasks'" in capsys.readouterr().err


def test_serve_bench_drives_servers_in_turns_and_compares_replies(chat_model, tmp_path):
    """bench serve's machinery on nanoseek alone: `nanoseek serve` started as a user starts it, waited for,
    asked the same chat requests as both sides (so every reply is the same), and stopped; a server that
    exits at once is reported with its log."""
    from nanoseek.bench.serve import free_port, running, serve_rounds

    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "nanoseek", "serve", chat_model, "--port", url.rsplit(":", 1)[1],
               "--max-batch", "2"]
    conversations = common.held_out_conversations(["addition"], 4, 2)
    with running(command, url, tmp_path / "serve.log") as process:
        row = serve_rounds(url, url, conversations, at_once=2, max_tokens=24, rounds=2)
    assert process.returncode is not None  # stopped on leaving
    assert row["same_replies"] == 4 and row["speedup"] > 0
    assert len(row["nanoseek"]["rounds"]) == len(row["llama.cpp"]["rounds"]) == 2
    assert "decoding with" in (tmp_path / "serve.log").read_text()
    with pytest.raises(RuntimeError, match="did not start; its log .*broken.log.* ends:\n.*no model here"):
        with running([sys.executable, "-c", "raise SystemExit('no model here')"], url, tmp_path / "broken.log"):
            pass
