"""Side-by-side benchmarks against the projects people use today; each prints a ratio last."""

import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from nanoseek import checkpoint
from nanoseek.aot import cache_dir
from nanoseek.data import Loader, build, sequential_batches
from nanoseek.device import policy
from nanoseek.hardware import matmul_peak_flops
from nanoseek.model import (
    DeepSeekV3,
    config_for_size,
    document_mask,
    flops_per_token,
    param_counts,
    positions_in_documents,
    round_up,
)


def _quiet_transformers():
    """transformers reports the MTP weights it does not use on every load; the benchmarks know."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def task_texts(problems, seed=0):
    """Worked additions and Countdown solutions as plain text, as the cpu recipe pretrains on: data a model of
    the CPU size learns within a few hundred steps, so loss curves mean something."""
    import random

    from nanoseek.tasks import get_task

    rng = random.Random(seed)
    for name, difficulty in (("addition", [2, 3, 3]), ("countdown", 3)):
        task = get_task(name)
        for _ in range(problems):
            problem = task.sample(rng, "train", difficulty)
            reasoning, answer = task.solve(problem)
            yield "text", f"{problem.question}\n{reasoning}\nAnswer: {answer}"


def held_out_loss(loss_of, data, seq, rows):
    """Mean loss per target token over the first `rows` held-out rows; loss_of(x, y, docs) -> mean loss."""
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for x, y, docs in sequential_batches(data, "val", seq, 8, rows):
            n = int((y != -100).sum())
            nats += float(loss_of(x, y, docs)) * n
            tokens += n
    return nats / tokens


def train_transformers_way(init, data, lr, steps, batch, seq, warmup, eval_every, eval_rows, seed, compute):
    """DeepseekV3ForCausalLM trained as a transformers user does: torch AdamW (fused), warmup + cosine from
    transformers, gradient clipping at 1.0; the same rows in the same order as nanoseek's loader gives.
    Returns (seconds per step, [(step, held-out loss)])."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    device = compute.device
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).to(device).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)
    schedule = get_cosine_schedule_with_warmup(opt, warmup, steps)
    loader = Loader(data, "train", seq, batch, seed=seed)

    def loss_of(x, y, docs):  # documents packed in a row attend only to themselves, as in nanoseek
        x, y, docs = x.to(device), y.to(device), docs.to(device)
        mask, positions = document_mask(docs), positions_in_documents(docs)
        with compute.autocast():
            return model(input_ids=x, attention_mask=mask, position_ids=positions, labels=y, shift_labels=y).loss

    times, curve = [], []
    for step in range(steps):
        t = time.perf_counter()
        loss_of(*loader.next_batch()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            curve.append((step + 1, held_out_loss(loss_of, data, seq, eval_rows)))
            model.train()
    return statistics.median(times[3:] or times), curve


def train_nanoseek_way(init, data, lr, steps, batch, seq, warmup, eval_every, eval_rows, seed, compute, out):
    """`nanoseek pretrain` from init with its defaults (optimizer, schedule, compile setting) but the given
    lr, steps, batch and warmup. Returns (seconds per step, [(step, held-out loss)])."""
    from nanoseek.loop import read_metrics
    from nanoseek.train import train

    train({"init": init, "data": data, "out": out, "lr": lr, "steps": steps, "batch": batch, "seq": seq,
           "warmup": warmup, "eval_every": eval_every, "eval_windows": eval_rows, "ckpt_every": 0, "seed": seed,
           "device": compute.device, "dtype": str(compute.dtype).replace("torch.", ""), "progress": False}, "pretrain")
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    times = [batch * seq / r["tokens_per_s"] for r in rows]
    return statistics.median(times[3:] or times), [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def steps_to(curve, target):
    """The first evaluated step whose held-out loss is at or below target (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def bench_train(size=4, batch=8, seq=256, steps=100, sweep=False, lrs=None, peer_lrs=None, eval_every=5,
                eval_rows=32, problems=3000, seed=0, device=None, peer="transformers", say=print):
    """Time to the same held-out loss, nanoseek's way against the transformers way, on task text.

    Same config, initial weights, data order and batch on both sides; each side trains `steps` steps at each
    of its peak learning rates: lrs / peer_lrs, else the three of TRAIN_LRS with sweep, else the best of
    those three in the recorded sweep (BEST_LRS, docs/BENCHMARKS.md). The target is the held-out loss the
    transformers way reaches with its best rate at the end of its run; each side's time to target is its steps
    to target (at its best rate) times its median seconds per step, both measured in this run."""
    if peer != "transformers":
        raise ValueError(f"unknown peer {peer!r}: the train benchmark compares with 'transformers'")
    from nanoseek.tokenizer import train_tokenizer

    _quiet_transformers()
    rates = TRAIN_LRS if sweep else {side: (lr,) for side, lr in BEST_LRS.items()}
    lrs, peer_lrs = lrs or rates["nanoseek"], peer_lrs or rates["transformers"]
    compute = policy(device)
    device, dtype = compute.device, compute.dtype
    warmup = max(1, steps // 10)
    with tempfile.TemporaryDirectory() as tmp:
        texts = list(task_texts(problems, seed))
        tok = train_tokenizer([t for _, t in texts], vocab_size=1024)
        data = os.path.join(tmp, "data")
        build(None, tok, data, val_fraction=0.02, documents=texts)
        cfg = config_for_size(size, vocab_size=round_up(len(tok), 64))
        cfg.num_nextn_predict_layers = 0  # transformers has no MTP training path: compare the same work
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
        model = DeepSeekV3(cfg).init_weights(seed)
        init = os.path.join(tmp, "init")
        checkpoint.save(init, model, tok)
        total, active = param_counts(model)
        args = (init, data)
        kw = {"steps": steps, "batch": batch, "seq": seq, "warmup": warmup, "eval_every": eval_every,
              "eval_rows": eval_rows, "seed": seed, "compute": compute}
        runs = {"transformers": {}, "nanoseek": {}}
        for i in range(max(len(lrs), len(peer_lrs))):  # the sides take turns, so a change in load hits both
            for side, rates in (("transformers", peer_lrs), ("nanoseek", lrs)):
                if i < len(rates):
                    lr = rates[i]
                    runs[side][lr] = (train_transformers_way(*args, lr, **kw) if side == "transformers" else
                                      train_nanoseek_way(*args, lr, **kw, out=os.path.join(tmp, f"ours_{lr}")))
                    sec, curve = runs[side][lr]
                    say(f"{side} at peak lr {lr:g}: held-out loss {curve[-1][1]:.4f} after {steps} steps, "
                        f"{sec * 1000:.0f} ms/step")
    peak = matmul_peak_flops(device, dtype)  # the same peak on both sides: only the ratio matters
    flops = flops_per_token(cfg, active, seq)
    target = min(curve[-1][1] for _, curve in runs["transformers"].values())
    out = {"size": size, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "eval_every": eval_every,
           "eval_rows": eval_rows, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "params_total": total, "params_active": active, "peak_flops": peak,
           "train_documents": len(texts), "vocab_size": len(tok), "target_loss": target}
    for side, by_lr in runs.items():
        reached = {lr: steps_to(curve, target) for lr, (_, curve) in by_lr.items()}
        best = min(by_lr, key=lambda lr: (reached[lr] or math.inf, by_lr[lr][1][-1][1]))
        sec = statistics.median(sec for sec, _ in by_lr.values())  # s/step does not depend on the rate
        tps = batch * seq / sec
        out[side] = {"best_lr": best, "steps_to_target": reached[best], "sec_per_step": sec, "tokens_per_s": tps,
                     "mfu": tps * flops / peak, "optimizer": TRAIN_WAYS[side],
                     "sweep": {lr: {"final_loss": curve[-1][1], "steps_to_target": reached[lr], "curve": curve}
                               for lr, (_, curve) in by_lr.items()}}
        out[side]["time_to_target"] = reached[best] * sec if reached[best] else None
    ours, theirs = out["nanoseek"], out["transformers"]
    out["throughput_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    out["speedup"] = theirs["time_to_target"] / ours["time_to_target"] if ours["time_to_target"] else 0.0
    return out


TRAIN_LRS = {"nanoseek": (6e-3, 1.2e-2, 2.4e-2), "transformers": (1e-3, 2e-3, 4e-3)}  # peak learning rates swept
BEST_LRS = {"nanoseek": 1.2e-2, "transformers": 2e-3}  # the best of each sweep at the defaults (docs/BENCHMARKS.md)
TRAIN_WAYS = {"nanoseek": "nanoseek pretrain defaults (Muon + AdamW, warmup + cosine to 0.1x, eager)",
              "transformers": "torch AdamW fused, betas (0.9, 0.95), weight decay 0.1, "
                              "transformers' warmup + cosine to 0, clip 1.0"}


def print_train(r):
    params = f"{r['params_total'] / 1e6:.1f}M total, {r['params_active'] / 1e6:.1f}M active"
    print(f"bench train: size {r['size']} ({params}), batch {r['batch']} x {r['seq']} tokens, {r['device']} "
          f"{r['dtype']}, {r['threads']} threads; {r['steps']} steps per run (warmup {r['warmup']}), held-out loss "
          f"every {r['eval_every']} steps on {r['eval_rows']} rows")
    print(f"data: {r['train_documents']:,} worked additions and Countdown solutions, a {r['vocab_size']}-token "
          "tokenizer trained on them; the same initial weights and rows in the same order on both sides")
    print(f"matmul peak (measured): {r['peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"target: held-out loss {r['target_loss']:.4f}, the transformers way's best at the end of its run")
    for name in ("nanoseek", "transformers"):
        s = r[name]
        print(f"{name}: {s['optimizer']}")
        for lr, row in s["sweep"].items():
            reached = f"step {row['steps_to_target']}" if row["steps_to_target"] else "not reached"
            print(f"    peak lr {lr:g}: final held-out loss {row['final_loss']:.4f}, target {reached}"
                  + ("  <- best" if lr == s["best_lr"] else ""))
    for name in ("nanoseek", "transformers"):
        s = r[name]
        reached = (f"{s['steps_to_target']:4d} steps x {s['sec_per_step'] * 1000:6.1f} ms/step = "
                   f"{s['time_to_target']:6.1f} s to target" if s["time_to_target"] else "target not reached")
        print(f"{name:>13}: {reached}  {s['tokens_per_s']:7.0f} tokens/s  MFU {100 * s['mfu']:5.1f}%")
    print("time to target = steps to target x median measured s/step (each side timed in this run)")
    print(f"per-step throughput ratio (nanoseek / transformers): {r['throughput_ratio']:.2f}")
    print(f"speedup vs transformers: {r['speedup']:.2f}")


# ----------------------------------------------------------------------------- decode


def bench_decode(ckpt=None, size=6, batches=(1, 16), prompt_len=64, new_tokens=128, seed=0, device=None,
                 peer="transformers", rounds=5):
    """Greedy decoding of new_tokens after prompt_len-token prompts, nanoseek's engine (its compiled decode
    step; with MTP modules, also self-speculative decoding) against a peer on the same checkpoint:
    transformers' generate, or llama.cpp on the checkpoint exported to GGUF f32. With llama.cpp, also
    llama.cpp's own C++ tools (llama-bench, llama-batched-bench) against nanoseek's decode steps, the two
    taking turns for `rounds` rounds; the speedup is then the ratio of their medians."""
    if peer not in DECODE_PEERS:
        raise ValueError(f"unknown peer {peer!r}: the decode benchmark compares with {' or '.join(DECODE_PEERS)}")
    if peer == "llama.cpp" and ckpt is None:
        raise ValueError("bench decode --peer llama.cpp needs --ckpt: a checkpoint with its tokenizer, which the "
                         "GGUF file carries (e.g. runs/cpu/rl/final after make run)")
    from nanoseek.engine import Engine
    from nanoseek.sampling import SamplingParams

    compute = policy(device)
    device, dtype = compute.device, compute.dtype  # decoding casts the weights: no float32 master copy to keep
    with tempfile.TemporaryDirectory() as tmp:
        if ckpt is None:
            ours = DeepSeekV3(config_for_size(size)).init_weights(seed)
            checkpoint.save(os.path.join(tmp, "ckpt"), ours, None)
            ckpt = os.path.join(tmp, "ckpt")
        ours, _ = checkpoint.load(ckpt)
        ours = ours.to(device=device, dtype=dtype).eval()
        theirs = DECODE_PEERS[peer](ckpt, tmp, device, dtype, prompt_len + new_tokens + 8, max(batches))
        tools = native_llama_tools() if peer == "llama.cpp" else None  # built once: minutes the first time
        cfg = ours.config
        g = torch.Generator().manual_seed(seed)
        out = {"device": device, "dtype": str(dtype).replace("torch.", ""), "prompt_len": prompt_len, "peer": peer,
               "new_tokens": new_tokens, "params": param_counts(ours), "threads": torch.get_num_threads(), "runs": []}
        greedy = SamplingParams(max_tokens=new_tokens, temperature=0)
        for batch in batches:
            prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
            row = {"batch": batch}
            for name, spec in (("nanoseek", False), ("nanoseek_mtp", True)):
                if spec and not len(ours.mtp):
                    continue
                engine = Engine(ours, None, max_batch=batch, max_len=prompt_len + new_tokens + 2, speculative=spec,
                                tools=False)  # the peer runs no tool
                engine.stop_ids = set()  # decode exactly new_tokens
                for warm_up in (prompts[:1], prompts):  # compiles the step for one sequence and for more
                    engine.generate(warm_up, SamplingParams(max_tokens=4, temperature=0))
                sec, seqs = _timed(lambda: engine.generate(prompts, greedy), device)  # noqa: B023
                row[name] = {"tokens_per_s": batch * new_tokens / sec, "seconds": sec}
                if spec:
                    row[name]["acceptance"] = engine.acceptance_rate
                else:
                    ours_tokens, plain = [s.tokens for s in seqs], engine
            theirs.generate([p[:8] for p in prompts], 4)  # warm-up
            sec, peer_tokens = _timed(lambda: theirs.generate(prompts, new_tokens), device)  # noqa: B023
            row[peer] = {"tokens_per_s": batch * new_tokens / sec, "seconds": sec}
            row["same_tokens"] = sum(a == b for a, b in zip(peer_tokens, ours_tokens))  # sequences alike
            row["speedup"] = row["nanoseek"]["tokens_per_s"] / row[peer]["tokens_per_s"]
            if tools:
                row["native"] = native_rounds(plain, greedy, tools, theirs.path, prompts, rounds, device)
                row["speedup"] = row["native"]["speedup"]
            out["runs"].append(row)
        theirs.close()
    if tools:
        out["native"] = {"version": llama_cpp_python_version(), "tools": tools, "rounds": rounds}
    return out


def _timed(run, device):
    _sync(device)
    t = time.perf_counter()
    result = run()
    _sync(device)
    return time.perf_counter() - t, result


class TransformersDecoder:
    """transformers' DeepseekV3ForCausalLM.generate, greedy, a batch of equal-length prompts at once."""

    name = "transformers"

    def __init__(self, ckpt, tmp, device, dtype, max_len, max_batch):
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
        self.device = device

    @torch.no_grad()
    def generate(self, prompts, new_tokens):
        ids = torch.tensor(prompts, device=self.device)
        out = self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def close(self):
        pass


class LlamaCppDecoder:
    """llama.cpp (libllama through llama-cpp-python's C API) on the checkpoint exported to GGUF f32 with a
    float32 KV cache (the same arithmetic as ours), one sequence per prompt, all decoded in one batch per
    step; greedy is the argmax of its logits."""

    name = "llama.cpp"

    def __init__(self, ckpt, tmp, device, dtype, max_len, max_batch):
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError('the llama.cpp peer needs llama-cpp-python: pip install -e ".[interop]"') from e
        from nanoseek.export import export_gguf

        self.path = path = os.path.join(tmp, "model.gguf")
        export_gguf(ckpt, path, dtype="f32")
        self.lib = lib = llama_cpp
        self.quiet = lib.llama_log_callback(lambda level, text, data: None)  # kept: llama.cpp calls it later
        lib.llama_log_set(self.quiet, None)
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = max_len * max_batch, max_len * max_batch, max_len * max_batch
        p.n_seq_max, p.kv_unified = max_batch, True
        p.n_threads = p.n_threads_batch = torch.get_num_threads()
        p.type_k = p.type_v = lib.GGML_TYPE_F32
        self.ctx = lib.llama_init_from_model(self.model, p)
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(max_len * max_batch, 0, max_batch)

    def _decode(self, rows):
        """rows: (sequence, position, token) triples; returns the argmax token after each."""
        b = self.batch
        for i, (seq, pos, token) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, True
        b.n_tokens = len(rows)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(len(rows), self.vocab))
        return logits.argmax(-1).tolist()

    def generate(self, prompts, new_tokens):
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        rows = [(s, pos, t) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        picked = self._decode(rows)  # the prefill: keep the token after each prompt's last
        ends = np.cumsum([len(p) for p in prompts]) - 1
        out = [[picked[e]] for e in ends]
        for step in range(1, new_tokens):
            nxt = self._decode([(s, len(p) + step - 1, o[-1]) for s, (p, o) in enumerate(zip(prompts, out))])
            for o, t in zip(out, nxt):
                o.append(t)
        return out

    def close(self):
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


DECODE_PEERS = {"transformers": TransformersDecoder, "llama.cpp": LlamaCppDecoder}


# llama.cpp's own C++ tools, built from the llama.cpp inside llama-cpp-python's source package: the same
# llama.cpp the Python peer runs, measured the way a CPU user measures it.

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the release whose llama.cpp is built when llama-cpp-python is not installed
NATIVE_TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF")  # the server without its web page: no download
BUILD_JOBS = 2
ROUND_TOKENS = 2048  # each side decodes at least this many tokens a round: long enough to time steadily


def llama_cpp_python_version():
    """The installed llama-cpp-python's version, else LLAMA_CPP_PYTHON_VERSION."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return LLAMA_CPP_PYTHON_VERSION


def native_cache_dir(version):
    return cache_dir(f"llama.cpp-{version}")


def native_llama_tools(version=None):
    """{tool: path} for llama.cpp's llama-bench, llama-batched-bench and llama-server (CPU, Release), built
    once from llama-cpp-python's source package and kept in the cache; later calls build nothing."""
    version = version or llama_cpp_python_version()
    cache = native_cache_dir(version)
    tools = {name: os.path.join(cache, "bin", name) for name in NATIVE_TOOLS}
    if all(os.access(path, os.X_OK) for path in tools.values()):
        return tools
    check_build_tools()
    print(f"building llama.cpp's {' and '.join(NATIVE_TOOLS)} (llama-cpp-python {version}'s source) into {cache}: "
          f"once, a few minutes on {BUILD_JOBS} cores", flush=True)
    os.makedirs(os.path.join(cache, "bin"), exist_ok=True)
    sdist = llama_cpp_sdist(version, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = cmake_build(unpack_llama_cpp(sdist, tmp), os.path.join(tmp, "build"), os.path.join(cache, "build.log"))
        for name, path in tools.items():
            shutil.copy2(os.path.join(built, name), path + ".part")
            os.replace(path + ".part", path)
    return tools


def check_build_tools():
    """Raise with what to install when cmake, make or a C++ compiler is missing."""
    needed = {"cmake": ("cmake",), "make": ("make",), "a C++ compiler": ("c++", "g++", "clang++")}
    missing = [what for what, names in needed.items() if not any(shutil.which(n) for n in names)]
    if missing:
        raise RuntimeError(f"building llama.cpp's llama-bench needs {' and '.join(missing)}, which this machine "
                           "lacks: install them, e.g. apt-get install cmake make g++")


def llama_cpp_sdist(version, cache):
    """llama-cpp-python's source package from the cache, downloaded there with pip the first time."""
    path = os.path.join(cache, f"llama_cpp_python-{version}.tar.gz")
    if not os.path.exists(path):
        run_tool([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
                  "--no-deps", "--quiet", "-d", cache])
    return path


def unpack_llama_cpp(sdist, into):
    """Unpack only the package's vendor/llama.cpp; returns its path."""
    import tarfile

    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        source = f"{members[0].name.split('/')[0]}/vendor/llama.cpp"
        tar.extractall(into, members=[m for m in members if m.name.startswith(source + "/")], filter="data")
    return os.path.join(into, source)


def cmake_build(source, build, log):
    """Configure and build NATIVE_TOOLS, the output going to log; returns the folder the binaries are in."""
    with open(log, "w") as f:
        for step in (["cmake", "-S", source, "-B", build, *CMAKE_OPTIONS],
                     ["cmake", "--build", build, "--target", *NATIVE_TOOLS, "-j", str(BUILD_JOBS)]):
            f.write(f"$ {' '.join(step)}\n")
            f.flush()
            if subprocess.run(step, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"building llama.cpp failed at `{' '.join(step[:3])} ...`: see {log}")
    return os.path.join(build, "bin")


def run_tool(command):
    """The command's standard output; raises with the end of its error output if it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{os.path.basename(command[0])} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def llama_bench_command(tool, gguf, threads, new_tokens, repetitions):
    return [tool, "-m", gguf, "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", str(repetitions),
            "-o", "json"]


def batched_bench_command(tool, gguf, threads, batch, prompt_len, new_tokens):
    return [tool, "-m", gguf, "-c", str(batch * (prompt_len + new_tokens)), "-b", "2048", "-ub", "512",
            "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(batch), "-t", str(threads)]


def llama_bench_rate(output):
    """Tokens per second of the generation test in llama-bench's -o json output: its tokens over its time,
    all repetitions together."""
    (test,) = [t for t in json.loads(output) if t["n_gen"] and not t["n_prompt"]]
    return test["n_gen"] * len(test["samples_ns"]) / sum(test["samples_ns"]) * 1e9


def batched_bench_table(output):
    """The rows of llama-batched-bench's results table, each as {column heading: number}."""
    header, rows = None, []
    for line in output.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and set(cells[0]) != {"-"}:
            rows.append(dict(zip(header, map(float, cells))))
    return rows


def batched_bench_output(command, attempts=10):
    """llama-batched-bench's output with its results table. It prints through a logging thread that the
    process does not wait for on exit, so a run now and then ends before its table is printed: such runs
    are run again."""
    for _ in range(attempts):
        output = run_tool(command)
        if batched_bench_table(output):
            return output
    raise RuntimeError(f"llama-batched-bench printed no results table in {attempts} runs")


def batched_bench_rate(outputs):
    """Tokens per second of text generation (S_TG) over llama-batched-bench's outputs: all their rows'
    generated tokens over their generation time."""
    rows = [row for output in outputs for row in batched_bench_table(output)]
    if not rows:
        raise RuntimeError("llama-batched-bench printed no results table")
    tokens = [row["B"] * row["TG"] for row in rows]
    return sum(tokens) / sum(n / row["S_TG t/s"] for n, row in zip(tokens, rows))


def engine_decode_rate(engine, prompts, params, runs, device):
    """Tokens per second of the engine's decode steps over `runs` decodes of the prompts, the prefill not
    counted: a forward of the decode step is a token, as llama.cpp's tools count them."""
    seconds, forwards = 0.0, 0
    for _ in range(runs):
        engine.add(prompts, params)
        _sync(device)
        t = time.perf_counter()
        while not engine.idle:
            engine.step()
        _sync(device)
        seconds += time.perf_counter() - t
        forwards += len(prompts) * (params.max_tokens - 1)  # the prefill gives each sequence's first token
    return forwards / seconds


def interleaved(sides, rounds):
    """{side: [its figure in each round]}: every round measures each side once, in turn, so a change in the
    machine's load hits all sides alike."""
    figures = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            figures[name].append(measure())
    return figures


def spread(figures):
    return {"median": statistics.median(figures), "min": min(figures), "max": max(figures), "rounds": figures}


def compare(ours, theirs):
    """Median and range of each side's figures, and the ratio of the medians."""
    return {"nanoseek": spread(ours), "llama.cpp": spread(theirs),
            "speedup": statistics.median(ours) / statistics.median(theirs)}


def native_rounds(engine, params, tools, gguf, prompts, rounds, device):
    """nanoseek's decode steps against llama.cpp's tool for this batch (llama-bench's tg test for one sequence,
    llama-batched-bench for more), taking turns for `rounds` rounds, with the threads torch uses."""
    batch, prompt_len, new_tokens = len(prompts), len(prompts[0]), params.max_tokens
    runs, threads = max(1, ROUND_TOKENS // (batch * new_tokens)), torch.get_num_threads()
    if batch == 1:
        tool, command = "llama-bench", llama_bench_command(tools["llama-bench"], gguf, threads, new_tokens, runs)

        def theirs():
            return llama_bench_rate(run_tool(command))
    else:
        tool = "llama-batched-bench"
        command = batched_bench_command(tools[tool], gguf, threads, batch, prompt_len, new_tokens)

        def theirs():
            return batched_bench_rate([batched_bench_output(command) for _ in range(runs)])

    def ours():
        return engine_decode_rate(engine, prompts, params, runs, device)

    figures = interleaved({"nanoseek": ours, "llama.cpp": theirs}, rounds)
    return {"tool": tool, "command": command, "runs_per_round": runs, **compare(figures["nanoseek"],
                                                                              figures["llama.cpp"])}


def held_out_conversations(tasks, n, difficulty=None):
    """n held-out problems of each task (the ones `nanoseek eval` asks), as chat messages."""
    from nanoseek.evaluate import test_problems
    from nanoseek.tasks import get_task

    return [p.messages() for name in tasks for p in test_problems(get_task(name), n, 0, difficulty)]


def task_prompts(tokenizer, tasks, n, difficulty=None):
    """held_out_conversations rendered as chat prompts (token ids)."""
    conversations = held_out_conversations(tasks, n, difficulty)
    return [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in conversations]


def timed_generate(engine, prompts, params):
    """engine.generate's sequences, its seconds, and the seconds of its decode steps alone (prefills not
    counted, as llama.cpp's tools count decoding)."""
    spent, step = [0.0], engine.step

    def timed():
        start = time.perf_counter()
        events = step()
        spent[0] += time.perf_counter() - start
        return events

    engine.step = timed  # this call's only: the instance attribute hides the method until deleted
    try:
        start = time.perf_counter()
        seqs = engine.generate(prompts, params)
        return seqs, time.perf_counter() - start, spent[0]
    finally:
        del engine.step


def bench_speculation(ckpt, tasks=("addition", "countdown"), n=50, difficulty=3, batches=(1, 16), new_tokens=256,
                      rounds=5, device=None):
    """MTP self-speculative decoding against plain decoding on held-out prompts of a checkpoint's own tasks,
    asked as chat and decoded greedily to their end by two engines of the checkpoint, taking turns for `rounds`
    rounds: acceptance, whether the tokens are identical, and tokens per second of decode steps and of whole
    requests (medians). At batch 1 every fifth prompt is decoded."""
    from nanoseek.engine import Engine
    from nanoseek.sampling import SamplingParams

    compute = policy(device)
    model, tokenizer = checkpoint.load(ckpt)
    if not len(model.mtp):
        raise ValueError(f"{ckpt} has no MTP module to draft with: speculation needs one (num_nextn_predict_layers)")
    model = model.to(device=compute.device, dtype=compute.dtype).eval()
    prompts = task_prompts(tokenizer, tasks, n, difficulty)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0)
    out = {"ckpt": str(ckpt), "tasks": list(tasks), "difficulty": difficulty, "new_tokens": new_tokens,
           "rounds": rounds, "threads": torch.get_num_threads(), "device": str(compute.device), "runs": []}
    for batch in batches:
        mine = prompts if batch > 1 else prompts[::5]
        engines = {"plain": Engine(model, tokenizer, max_batch=batch, speculative=False),
                   "speculative": Engine(model, tokenizer, max_batch=batch, speculative=True)}
        for engine in engines.values():
            engine.generate(mine[: 2 * batch], greedy)  # compiles the steps for this batch
        engines["speculative"].speculator.drafted = engines["speculative"].speculator.accepted = 0
        out["runs"].append({"batch": batch, **speculation_rounds(engines, mine, greedy, rounds)})
    return out


def speculation_rounds(engines, prompts, params, rounds):
    """The plain and the speculative engine decode the prompts in turn, `rounds` times: their tok/s (median and
    range) in decode steps and in whole requests, acceptance, identical sequences, the ratios of medians."""
    finished = {}

    def side(name):
        def measure():  # -> (seconds of decode steps, seconds of whole requests)
            finished[name], seconds, decoding = timed_generate(engines[name], prompts, params)
            return decoding, seconds
        return measure

    figures = interleaved({name: side(name) for name in engines}, rounds)
    tokens = {name: [s.tokens for s in seqs] for name, seqs in finished.items()}
    n_tokens = sum(len(t) for t in tokens["plain"])
    steps = {name: [f[0] for f in figures[name]] for name in engines}
    whole = {name: [f[1] for f in figures[name]] for name in engines}
    return {"prompts": len(prompts), "tokens": n_tokens,
            **{name: {"decode_steps": spread([n_tokens / s for s in steps[name]]),
                      "whole_requests": spread([n_tokens / s for s in whole[name]])} for name in engines},
            "acceptance": engines["speculative"].acceptance_rate,
            "identical": sum(a == b for a, b in zip(tokens["plain"], tokens["speculative"])),
            "cut": sum(s.finish_reason == "length" for s in finished["plain"]),
            "speedup": statistics.median(steps["plain"]) / statistics.median(steps["speculative"]),
            "speedup_whole": statistics.median(whole["plain"]) / statistics.median(whole["speculative"])}


def _rate(f):
    return f"{f['median']:8.1f} ({f['min']:.1f}-{f['max']:.1f})"


def print_speculation(r):
    print(f"bench decode --prompts tasks: {r['ckpt']}, held-out {' and '.join(r['tasks'])} (difficulty "
          f"{r['difficulty']}) asked as chat, greedy to the end (at most {r['new_tokens']} tokens), {r['device']}, "
          f"{r['threads']} threads; tok/s, median (min-max) of {r['rounds']} rounds taking turns:")
    for row in r["runs"]:
        print(f"batch {row['batch']:>3}: {row['prompts']} prompts, {row['tokens']} tokens ({row['cut']} cut at the "
              f"limit); MTP acceptance {100 * row['acceptance']:.1f}%; identical tokens {row['identical']} of "
              f"{row['prompts']}")
        for what in ("decode_steps", "whole_requests"):
            print(f"  {what.replace('_', ' '):<15} plain {_rate(row['plain'][what])}   "
                  f"speculative {_rate(row['speculative'][what])}")
    for row in r["runs"]:
        print(f"speedup vs plain decoding (batch {row['batch']}, whole requests): {row['speedup_whole']:.2f}")
    for row in r["runs"]:
        print(f"speedup vs plain decoding (batch {row['batch']}): {row['speedup']:.2f}")


def print_decode(r):
    total, active = r["params"]
    peer = r["peer"]
    print(f"bench decode: {total / 1e6:.1f}M total / {active / 1e6:.1f}M active params, {r['device']} {r['dtype']}, "
          f"{r['threads']} threads, greedy, {r['prompt_len']}-token prompts, {r['new_tokens']} new tokens")
    if "native" in r:
        print("prefill and decode, nanoseek's engine against llama.cpp driven from Python (llama-cpp-python):")
    for row in r["runs"]:
        b = row["batch"]
        print(f"batch {b:>3}:  nanoseek {row['nanoseek']['tokens_per_s']:8.1f} tok/s   "
              f"{peer} {row[peer]['tokens_per_s']:8.1f} tok/s   same tokens: {row['same_tokens']} of {b} sequences")
        if "nanoseek_mtp" in row:
            m = row["nanoseek_mtp"]
            print(f"           with MTP self-speculation: {m['tokens_per_s']:8.1f} tok/s, acceptance "
                  f"{100 * m['acceptance']:.0f}%, {m['tokens_per_s'] / row['nanoseek']['tokens_per_s']:.2f}x "
                  "plain nanoseek")
    if "native" in r:
        print_native(r)
    for row in r["runs"]:
        print(f"speedup vs {peer} (batch {row['batch']}): {row['speedup']:.2f}")


def print_native(r):
    native = r["native"]
    print(f"decode alone, nanoseek's decode steps against llama.cpp's own tools (llama-cpp-python "
          f"{native['version']}'s llama.cpp, in {os.path.dirname(native['tools']['llama-bench'])}), "
          f"{r['threads']} threads; tok/s, median (min-max) of {native['rounds']} rounds taking turns:")
    for row in r["runs"]:
        n = row["native"]
        ours, theirs = n["nanoseek"], n["llama.cpp"]
        print(f"batch {row['batch']:>3}:  nanoseek {ours['median']:8.1f} ({ours['min']:.1f}-{ours['max']:.1f})   "
              f"{n['tool']} {theirs['median']:8.1f} ({theirs['min']:.1f}-{theirs['max']:.1f})   "
              f"{n['runs_per_round']} run(s) a round")


# ----------------------------------------------------------------------------- GRPO


def bench_grpo(ckpt, task="addition", difficulty=2, steps=4, prompts=4, group=8, max_new_tokens=64, seed=0,
               peer="trl"):
    """Seconds per GRPO step, nanoseek's rl vs TRL's GRPOTrainer, on the same checkpoint and settings:
    prompts x group rollouts of up to max_new_tokens, one update pass, no KL, clip 0.2 / 0.28, CPU fp32."""
    if peer != "trl":
        raise ValueError(f"unknown peer {peer!r}: the GRPO benchmark compares with 'trl'")
    import random
    import statistics

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.loop import read_metrics
    from nanoseek.rl import rl
    from nanoseek.tasks import get_task

    _quiet_transformers()
    spec = get_task(task)
    out = {"task": task, "steps": steps, "prompts": prompts, "group": group, "max_new_tokens": max_new_tokens,
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        rl({"init": ckpt, "task": task, "difficulty": difficulty, "out": os.path.join(tmp, "ours"), "steps": steps,
            "prompts": prompts, "group": group, "max_new_tokens": max_new_tokens, "lr": 1e-4, "mu": 1, "beta": 0.0,
            "dynamic_sampling": False, "ckpt_every": 0, "eval_every": 0, "progress": False, "device": "cpu",
            "seed": seed})
        rows = [r for r in read_metrics(os.path.join(tmp, "ours", "metrics.jsonl")) if "seconds" in r]  # steps
        out["nanoseek"] = {"sec_per_step": statistics.median(r["seconds"] for r in rows[1:] or rows),
                           "response_length": statistics.mean(r["response_length"] for r in rows)}

        rng = random.Random(seed)
        problems = [spec.sample(rng, "train", difficulty) for _ in range(prompts * (steps + 1))]
        by_question = {p.question: p for p in problems}
        dataset = Dataset.from_list([{"prompt": p.messages(), "question": p.question} for p in problems])

        def reward(completions, question, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [spec.score(by_question[q], t).accuracy for t, q in zip(texts, question)]

        times, lengths = [], []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    lengths.append(logs["completions/mean_length"])

        config = GRPOConfig(
            output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=prompts * group, num_generations=group,
            max_completion_length=max_new_tokens, max_steps=steps, learning_rate=1e-4, beta=0.0, num_iterations=1,
            epsilon=0.2, epsilon_high=0.28, temperature=1.0, use_cpu=True, bf16=False, report_to=[],
            logging_steps=1, save_strategy="no", seed=seed, disable_tqdm=True)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                              reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=AutoTokenizer.from_pretrained(ckpt), callbacks=[Clock()])
        trainer.train()
        out["trl"] = {"sec_per_step": statistics.median(times[1:] or times),
                      "response_length": statistics.mean(lengths) if lengths else float("nan")}
    out["speedup"] = out["trl"]["sec_per_step"] / out["nanoseek"]["sec_per_step"]
    return out


def print_grpo(r):
    print(f"bench grpo: task {r['task']}, {r['prompts']} prompts x {r['group']} completions per step, up to "
          f"{r['max_new_tokens']} new tokens, {r['steps']} steps (median after the first), cpu fp32, "
          f"{r['threads']} threads")
    for name in ("nanoseek", "trl"):
        s = r[name]
        print(f"{name:>9}: {s['sec_per_step']:7.2f} s/step   mean completion {s['response_length']:.1f} tokens")
    print(f"speedup vs trl: {r['speedup']:.2f}")


# ----------------------------------------------------------------------------- data: tokenizing a corpus

# The peer: a plain tokenizers loop over the same documents (one a paragraph), encoding batches of ENCODE_BATCH
# and appending the ids to a file. Run as a script of its own, so its peak memory is its own, not nanoseek's.
PLAIN_TOKENIZERS_LOOP = r"""
import itertools, json, sys, time
import numpy as np
from tokenizers import Tokenizer

corpus, tokenizer, out, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer.from_file(tokenizer)
start_rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
t0 = time.perf_counter()
tokens = 0

def encode(docs, f):
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    array = np.fromiter(itertools.chain.from_iterable(ids), np.uint16, sum(map(len, ids)))
    array.tofile(f)
    return len(array)

with open(corpus, encoding="utf-8") as text, open(out, "wb") as f:
    docs = []
    for line in text:
        if line.strip():
            docs.append(line.rstrip("\n"))
        if len(docs) == batch_size:
            tokens += encode(docs, f)
            docs = []
    if docs:
        tokens += encode(docs, f)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": tokens, "start_rss_kb": start_rss,
                  "peak_rss_kb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}))
"""

DATA_STAGE = r"""
import json, sys, time
from nanoseek.data import build
from nanoseek.tokenizer import Tokenizer

corpus, tokenizer, out = sys.argv[1], sys.argv[2], sys.argv[3]
tok = Tokenizer.load(tokenizer)
start_rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
t0 = time.perf_counter()
manifest = build([corpus], tok, out)
print(json.dumps({"seconds": time.perf_counter() - t0, "start_rss_kb": start_rss,
                  "tokens": sum(s["tokens"] for split in manifest["splits"].values() for s in split),
                  "peak_rss_kb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}))
"""


def generated_text(mb, seed=0):
    """About mb megabytes of made-up prose, one paragraph a document: words of a Zipf-like vocabulary and
    numbers, so a tokenizer has common and rare words to deal with, as in real text."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choices("etaoinshrdlcumwfgypbvkjxqz", k=rng.randint(1, 10))) for _ in range(20000)]
    words += [str(n) for n in range(1000)]
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    written, limit = 0, int(mb * 1e6)
    while written < limit:
        sentences = [" ".join(rng.choices(words, cum_weights=weights, k=rng.randint(5, 25))).capitalize() + "."
                     for _ in range(rng.randint(2, 12))]
        paragraph = " ".join(sentences) + "\n\n"
        written += len(paragraph)
        yield paragraph


def bench_data(sizes_mb=(20, 200), vocab_size=8192, repeats=3, seed=0):
    """MB/s and peak memory of `nanoseek data` and of a plain tokenizers batch-encode loop on the same corpus
    and tokenizer, at each size: each side in a process of its own, the two taking turns `repeats` times
    (the median time and the highest peak memory are kept)."""
    import json
    import subprocess
    import sys

    from nanoseek.data import ENCODE_BATCH
    from nanoseek.tokenizer import train_tokenizer

    r = {"sizes_mb": list(sizes_mb), "vocab_size": vocab_size, "repeats": repeats,
         "cores": len(os.sched_getaffinity(0)), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        sample = "".join(generated_text(2, seed)).split("\n\n")  # the tokenizer: trained on the first 2 MB
        train_tokenizer(sample, vocab_size=vocab_size).save(os.path.join(tmp, "tok"))
        sides = {"nanoseek": [DATA_STAGE, os.path.join(tmp, "tok"), os.path.join(tmp, "data")],
                 "tokenizers": [PLAIN_TOKENIZERS_LOOP, os.path.join(tmp, "tok", "tokenizer.json"),
                                os.path.join(tmp, "plain.bin"), str(ENCODE_BATCH)]}
        for mb in sizes_mb:
            corpus = os.path.join(tmp, f"corpus_{mb}.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                f.writelines(generated_text(mb, seed))
            size = os.path.getsize(corpus)
            figures = {side: [] for side in sides}
            for _ in range(repeats):
                for side, (code, *args) in sides.items():
                    done = subprocess.run([sys.executable, "-c", code, corpus, *args], capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"bench data: the {side} side failed:\n{done.stderr[-3000:]}")
                    figures[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            run = {"mb": size / 1e6}
            for side, runs in figures.items():
                seconds = statistics.median(f["seconds"] for f in runs)
                run[side] = {"seconds": seconds, "mb_per_s": size / 1e6 / seconds, "tokens": runs[0]["tokens"],
                             "start_rss_kb": max(f["start_rss_kb"] for f in runs),
                             "peak_rss_kb": max(f["peak_rss_kb"] for f in runs)}
            run["speedup"] = run["nanoseek"]["mb_per_s"] / run["tokenizers"]["mb_per_s"]
            r["runs"].append(run)
            os.remove(corpus)
    first, last = r["runs"][0]["nanoseek"], r["runs"][-1]["nanoseek"]
    r["rss_ratio"] = last["peak_rss_kb"] / first["peak_rss_kb"]
    r["speedup"] = r["runs"][-1]["speedup"]
    return r


def print_data(r):
    print(f"bench data: a generated corpus, one paragraph a document, tokenizer of {r['vocab_size']} tokens, "
          f"{r['cores']} core(s); each side in a process of its own, median of {r['repeats']} turns")
    for run in r["runs"]:
        print(f"{run['mb']:.0f} MB:")
        for side, name in (("nanoseek", "nanoseek data"), ("tokenizers", "tokenizers loop")):
            s = run[side]
            print(f"  {name:>15}: {s['mb_per_s']:6.2f} MB/s, {s['tokens']:,} tokens in {s['seconds']:.1f} s, "
                  f"peak RSS {s['peak_rss_kb'] / 1024:.0f} MB ({(s['peak_rss_kb'] - s['start_rss_kb']) / 1024:+.0f} "
                  f"MB over its start)")
        print(f"  speedup vs tokenizers: {run['speedup']:.2f}")
    sizes = " / ".join(f"{run['mb']:.0f} MB" for run in (r["runs"][-1], r["runs"][0]))
    print(f"peak RSS of nanoseek data, {sizes}: {r['rss_ratio']:.2f}x")
    print(f"speedup vs tokenizers: {r['speedup']:.2f}")
