"""Side-by-side benchmarks against the projects people use today; each prints a ratio last."""

import os
import tempfile
import time

import numpy as np
import torch

from nanoseek import checkpoint
from nanoseek.device import policy
from nanoseek.model import DeepSeekV3, config_for_size, flops_per_token, matmul_peak_flops, param_counts


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


def _time_steps(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    return (time.perf_counter() - t) / steps, float(loss)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)


def bench_train(size=6, batch=8, seq=256, steps=10, warmup=3, seed=0, device=None, peer="transformers"):
    """Forward + backward + AdamW step on the same config, weights and batch; returns a dict of figures."""
    if peer != "transformers":
        raise ValueError(f"unknown peer {peer!r}: the train benchmark compares with 'transformers'")
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    compute = policy(device)
    device, dtype = compute.device, compute.dtype
    cfg = config_for_size(size)
    cfg.num_nextn_predict_layers = 0  # transformers has no MTP training path: compare the same work
    torch.manual_seed(seed)
    ours = DeepSeekV3(cfg).init_weights(seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, ours, None)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    opt_ours, opt_theirs = _adamw(ours.parameters()), _adamw(theirs.parameters())

    def step_ours():
        with compute.autocast():
            loss = ours(x, targets=y)[0]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.detach()

    def step_theirs():
        with compute.autocast():
            loss = theirs(input_ids=x, labels=x).loss  # it shifts labels itself: position t learns x[t + 1]
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.detach()

    total, active = param_counts(ours)
    peak = matmul_peak_flops(device, dtype)
    flops = flops_per_token(cfg, active, seq)
    out = {"size": size, "batch": batch, "seq": seq, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "params_total": total, "params_active": active, "peak_flops": peak}
    for name, step in (("nanoseek", step_ours), ("transformers", step_theirs)):
        sec, loss = _time_steps(step, steps, warmup, device)
        tps = batch * seq / sec
        out[name] = {"sec_per_step": sec, "tokens_per_s": tps, "mfu": tps * flops / peak, "loss": loss}
    out["speedup"] = out["nanoseek"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    return out


def print_train(r):
    params = f"{r['params_total'] / 1e6:.1f}M total, {r['params_active'] / 1e6:.1f}M active"
    print(f"bench train: size {r['size']} ({params}), "
          f"batch {r['batch']} x {r['seq']} tokens, {r['device']} {r['dtype']}, {r['threads']} threads")
    print(f"matmul peak (measured): {r['peak_flops'] / 1e9:.1f} GFLOP/s")
    for name in ("nanoseek", "transformers"):
        s = r[name]
        print(f"{name:>13}: {s['tokens_per_s']:9.0f} tokens/s  {s['sec_per_step'] * 1000:8.1f} ms/step  "
              f"MFU {100 * s['mfu']:5.1f}%  loss {s['loss']:.4f}")
    print(f"speedup vs transformers: {r['speedup']:.2f}")



# ----------------------------------------------------------------------------- decode


def bench_decode(ckpt=None, size=6, batches=(1, 16), prompt_len=64, new_tokens=128, seed=0, device=None,
                 peer="transformers"):
    """Greedy decoding of new_tokens after prompt_len-token prompts, nanoseek's engine (its compiled decode
    step; with MTP modules, also self-speculative decoding) against a peer on the same checkpoint:
    transformers' generate, or llama.cpp on the checkpoint exported to GGUF f32."""
    if peer not in DECODE_PEERS:
        raise ValueError(f"unknown peer {peer!r}: the decode benchmark compares with {' or '.join(DECODE_PEERS)}")
    from nanoseek.engine import Engine, SamplingParams

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
                engine = Engine(ours, None, max_batch=batch, max_len=prompt_len + new_tokens + 2, speculative=spec)
                engine.stop_ids = set()  # decode exactly new_tokens
                for warm_up in (prompts[:1], prompts):  # compiles the step for one sequence and for more
                    engine.generate(warm_up, SamplingParams(max_tokens=4, temperature=0))
                sec, seqs = _timed(lambda: engine.generate(prompts, greedy), device)  # noqa: B023
                row[name] = {"tokens_per_s": batch * new_tokens / sec, "seconds": sec}
                if spec:
                    row[name]["acceptance"] = engine.acceptance_rate
                else:
                    ours_tokens = [s.tokens for s in seqs]
            theirs.generate([p[:8] for p in prompts], 4)  # warm-up
            sec, peer_tokens = _timed(lambda: theirs.generate(prompts, new_tokens), device)  # noqa: B023
            row[peer] = {"tokens_per_s": batch * new_tokens / sec, "seconds": sec}
            row["same_tokens"] = peer_tokens == ours_tokens
            row["speedup"] = row["nanoseek"]["tokens_per_s"] / row[peer]["tokens_per_s"]
            out["runs"].append(row)
        theirs.close()
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

        path = os.path.join(tmp, "model.gguf")
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


def print_decode(r):
    total, active = r["params"]
    peer = r["peer"]
    print(f"bench decode: {total / 1e6:.1f}M total / {active / 1e6:.1f}M active params, {r['device']} {r['dtype']}, "
          f"{r['threads']} threads, greedy, {r['prompt_len']}-token prompts, {r['new_tokens']} new tokens")
    for row in r["runs"]:
        b = row["batch"]
        print(f"batch {b:>3}:  nanoseek {row['nanoseek']['tokens_per_s']:8.1f} tok/s   "
              f"{peer} {row[peer]['tokens_per_s']:8.1f} tok/s   same tokens: {row['same_tokens']}")
        if "nanoseek_mtp" in row:
            m = row["nanoseek_mtp"]
            print(f"           with MTP self-speculation: {m['tokens_per_s']:8.1f} tok/s, acceptance "
                  f"{100 * m['acceptance']:.0f}%, {m['tokens_per_s'] / row['nanoseek']['tokens_per_s']:.2f}x "
                  "plain nanoseek")
    for row in r["runs"]:
        print(f"speedup vs {peer} (batch {row['batch']}): {row['speedup']:.2f}")


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
            "dynamic_sampling": False, "ckpt_every": 0, "progress": False, "device": "cpu", "seed": seed})
        rows = read_metrics(os.path.join(tmp, "ours", "metrics.jsonl"))
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
