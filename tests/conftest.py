import json
import os
import random
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanoseek.model import Config
from nanoseek.tokenizer import train_tokenizer

os.environ.setdefault("NANOSEEK_COMPILE", "0")  # engines decode eagerly in tests and their subprocesses, unless asked
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread a worker (and its subprocesses): the workers share the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "12 + 35 = 47. Check: 47 - 35 = 12.",
    "Reach 24 from 3, 8 and 1: 3 * 8 = 24, then 24 * 1 = 24.",
    "A model that thinks before it answers.",
] * 20 + [f"{a} + {b} = {a + b}, so the answer is {a + b}." for a in range(0, 300, 7) for b in range(3, 200, 11)] + [
    " ".join("".join(random.Random(i * 31 + j).choices("etaoinshrdlu", k=3 + j % 5)) for j in range(12))
    for i in range(300)
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def random_config(seed: int) -> Config:
    """A small DeepSeek-V3 config with every optional feature drawn at random."""
    r = random.Random(seed)
    layers = r.randint(1, 3)
    n_routed = r.choice([4, 8])
    n_group = r.choice([g for g in (1, 2, 4) if n_routed // g >= 2])
    topk_group = r.randint(1, n_group)
    yarn = r.random() < 0.5
    return Config(
        vocab_size=r.choice([96, 128, 160]),
        hidden_size=r.choice([32, 48, 64]),
        intermediate_size=r.choice([48, 96]),
        moe_intermediate_size=r.choice([16, 32]),
        num_hidden_layers=layers,
        num_attention_heads=r.randint(1, 4),
        n_shared_experts=r.randint(0, 2),
        n_routed_experts=n_routed,
        num_experts_per_tok=r.randint(1, min(4, topk_group * n_routed // n_group)),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=r.choice([1.0, 2.5]),
        norm_topk_prob=r.random() < 0.7,
        first_k_dense_replace=r.randint(0, min(2, layers)),
        q_lora_rank=r.choice([None, 24]),
        kv_lora_rank=r.choice([16, 32]),
        qk_nope_head_dim=r.choice([8, 16]),
        qk_rope_head_dim=r.choice([4, 8]),
        v_head_dim=r.choice([8, 16]),
        max_position_embeddings=256,
        rope_theta=r.choice([10000.0, 50000.0]),
        rope_scaling={
            "type": "yarn", "factor": r.choice([2.0, 4.0]), "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": r.choice([0.707, 1.0]),
        } if yarn else None,
        num_nextn_predict_layers=r.randint(0, 1),
    )


def randomize_router_bias(model, seed):
    g = torch.Generator().manual_seed(seed)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.randn(moe.n_experts, generator=g) * 0.05)


def arithmetic_documents(n=3000, seed=0):
    r = random.Random(seed)
    return [("text", f"{a} + {b} = {a + b}.") for a, b in ((r.randint(0, 99), r.randint(0, 99)) for _ in range(n))]


def chat_documents(n=400, seed=0):
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = r.randint(0, 99), r.randint(0, 99)
        docs.append(("chat", [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": str(a + b), "reasoning_content": f"{a} + {b} = {a + b}"},
        ]))
    return docs


def documents(data_dir, bos_id):
    """Every document of a data directory's shards (train and held out) as a tuple of token ids."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    docs = []
    for shards in manifest["splits"].values():
        for shard in shards:
            ids = np.fromfile(data_dir / shard["file"], dtype=manifest["dtype"]).tolist()
            starts = [i for i, t in enumerate(ids) if t == bos_id] + [len(ids)]
            docs += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]
    return docs


@pytest.fixture(scope="session")
def text_data(tmp_path_factory, tokenizer):
    from nanoseek.data import build

    out = tmp_path_factory.mktemp("data") / "text"
    build(None, tokenizer, out, val_fraction=0.05, documents=arithmetic_documents())
    return str(out)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory, tokenizer):
    from nanoseek.data import build

    out = tmp_path_factory.mktemp("data") / "chat"
    build(None, tokenizer, out, val_fraction=0.05, documents=chat_documents())
    return str(out)


TINY = {"size": 2, "batch": 4, "seq": 32, "warmup": 2, "lr": 3e-3, "eval_every": 0, "eval_windows": 4,
        "progress": False, "device": "cpu"}


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, text_data, chat_data):
    """A tiny model taught the R1 format: it thinks 'a + b = c', closes </think>, answers, and stops."""
    from nanoseek.train import train

    out = tmp_path_factory.mktemp("chat_model")
    train({**TINY, "data": text_data, "out": str(out / "pt"), "steps": 30, "lr": 1e-2}, "pretrain")
    train({**TINY, "data": chat_data, "out": str(out / "sft"), "steps": 120, "lr": 5e-3, "seq": 64,
           "init": str(out / "pt" / "final")}, "sft")
    return str(out / "sft" / "final")


def start_server(app):
    """Run an ASGI app with uvicorn on a free loopback port in a thread; returns (url, stop)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def live_server(chat_model):
    """A nanoseek server of the chat model on loopback, in this process; yields (base url, app)."""
    from nanoseek.checkpoint import load
    from nanoseek.engine import Engine
    from nanoseek.serve import create_app

    model, tok = load(chat_model)
    engine = Engine(model, tok, max_batch=4, tools=False)  # test_export compares its tokens with transformers'
    app = create_app(engine, "tiny", api_key="sekrit", max_body_bytes=100_000)
    url, stop = start_server(app)
    yield url, app
    stop()


@pytest.fixture(scope="session")
def endless_server(tokenizer):
    """A server of a random model whose greedy output runs to max_tokens: for capacity tests."""
    from nanoseek.engine import Engine
    from nanoseek.model import DeepSeekV3, config_for_size
    from nanoseek.serve import create_app

    cfg = config_for_size(2, vocab_size=448)
    model = DeepSeekV3(cfg).init_weights(0)
    engine = Engine(model, tokenizer, max_batch=4)
    engine.stop_ids = set()  # no end-of-sequence token: every request runs to max_tokens
    app = create_app(engine, "endless")
    url, stop = start_server(app)
    yield url
    stop()


def torchrun(args, timeout=900, module=True):
    """`torchrun --nproc_per_node 2` of nanoseek (or of a script) on gloo ranks; its stdout and stderr, after
    asserting it succeeded. Past the timeout every process of the launch is killed and the test fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), *(["-m", "nanoseek"] if module else []), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the launcher stops its ranks (each in a session of its own): SIGTERM,
        try:  # then SIGKILL after 30 s
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        pytest.fail(f"torchrun {' '.join(args)} still running after {timeout} s:\n{out[-5000:]}")
    assert proc.returncode == 0, out[-10000:]
    return out


@pytest.fixture(scope="session")
def random_policy(tmp_path_factory, tokenizer):
    """A size-2 model with random weights and the session's tokenizer, saved as a checkpoint (its path)."""
    from nanoseek import checkpoint
    from nanoseek.model import DeepSeekV3, config_for_size

    cfg = config_for_size(2, vocab_size=448)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    cfg.trained_context_length = 96  # as a fine-tuned policy records it
    path = tmp_path_factory.mktemp("policy") / "init"
    checkpoint.save(path, DeepSeekV3(cfg).init_weights(0), tokenizer)
    return str(path)
