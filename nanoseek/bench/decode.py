"""`nanoseek bench decode`: greedy decoding, nanoseek's engine against transformers' generate or llama.cpp on
the same checkpoint; with llama.cpp also its own tools against nanoseek's decode steps, taking turns."""

import os
import tempfile
import time

import numpy as np
import torch

from nanoseek import checkpoint
from nanoseek.bench.common import compare, interleaved, quiet_transformers, spread_text, sync
from nanoseek.bench.llama_cpp import (
    batched_bench_command,
    batched_bench_output,
    batched_bench_rate,
    llama_bench_command,
    llama_bench_rate,
    llama_cpp_python_version,
    native_llama_tools,
    run_tool,
)
from nanoseek.device import choose_compute
from nanoseek.model import DeepSeekV3, config_for_size, param_counts


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

    compute = choose_compute(device)
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
    sync(device)
    t = time.perf_counter()
    result = run()
    sync(device)
    return time.perf_counter() - t, result


class TransformersDecoder:
    """transformers' DeepseekV3ForCausalLM.generate, greedy, a batch of equal-length prompts at once."""

    name = "transformers"

    def __init__(self, ckpt, tmp, device, dtype, max_len, max_batch):
        from transformers import AutoModelForCausalLM

        quiet_transformers()
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

ROUND_TOKENS = 2048  # each side decodes at least this many tokens a round: long enough to time steadily


def engine_decode_rate(engine, prompts, params, runs, device):
    """Tokens per second of the engine's decode steps over `runs` decodes of the prompts, the prefill not
    counted: a forward of the decode step is a token, as llama.cpp's tools count them."""
    seconds, forwards = 0.0, 0
    for _ in range(runs):
        engine.add(prompts, params)
        sync(device)
        t = time.perf_counter()
        while not engine.idle:
            engine.step()
        sync(device)
        seconds += time.perf_counter() - t
        forwards += len(prompts) * (params.max_tokens - 1)  # the prefill gives each sequence's first token
    return forwards / seconds


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
        print(f"batch {row['batch']:>3}:  nanoseek {spread_text(n['nanoseek'])}   {n['tool']} "
              f"{spread_text(n['llama.cpp'])}   {n['runs_per_round']} run(s) a round")
