"""nanoseek against real llama.cpp: export GGUF files, then compare tokenization and greedy tokens.

    python benchmarks/interop.py [--ckpt runs/cpu/rl/final] [--tokens 64] [--dtype f32]

Exports the given checkpoint (if any) and random checkpoints that cover what the exporter must get right
(q_lora on and off, n_group 1 and > 1, YaRN with each of its attention scalings, routed scaling, no
top-k normalisation, router bias), loads each file with llama.cpp (the llama_cpp Python bindings), and
compares, per case:
- tokenization of a text sample: nanoseek's tokenizer, the checkpoint's Hugging Face tokenizer
  (AutoTokenizer) and llama.cpp, BOS included;
- 10 prompts, 5 raw and 5 chat-formatted (llama.cpp renders the chat with the GGUF's own template), as ids;
- greedy tokens for --tokens new tokens, nanoseek's Engine against llama.cpp's logits (end of sequence does
  not stop either side, so every prompt compares the full count).
llama.cpp runs with a float32 KV cache (`-ctk f32 -ctv f32` on its command line), so both sides do float32
math; its default f16 cache rounds the cached latents, and how many prompts still agree is printed beside.
Prints a line per case with the smallest top-1/top-2 logit gap met along the way (how far from a tie the
comparison ran) and the largest logit difference between the two; exits 1 if anything differs.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from nanoseek import checkpoint
from nanoseek.engine import Engine
from nanoseek.export import export_gguf
from nanoseek.model import DeepSeekV3, config_for_size, round_up
from nanoseek.sampling import SamplingParams
from nanoseek.tokenizer import train_tokenizer

RAW = ["12 + 7 =", "345+678=", "The quick brown fox", "Countdown: reach 24 from 3, 8 and 1.", "What is 99 + 1?"]
CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Reach 10 from 14, 6 and 2."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "7 * 8?"}],
    [{"role": "user", "content": "What is 5 + 5?"},
     {"role": "assistant", "content": "10", "reasoning_content": "5 + 5 = 10"},
     {"role": "user", "content": "And 10 + 5?"}],
    [{"role": "user", "content": "Count: 1, 2, 3, ..."}, {"role": "assistant", "content": "4, 5, 6"},
     {"role": "user", "content": "Now backwards from 9."}],
]
SAMPLE = ("12 + 35 = 47. Check: 47 - 35 = 12.\nIt's 2026; they'll say   'hello'\t\tworld!!\n\n"
          "ünïcödé ✓ 数字 ٣٤ ½ 1,234,567.89 café's <tag> x</tag>   \n  trailing ")
# Text that spells control tokens: nanoseek (its tokenizer and `serve`) and llama.cpp (parse_special off) keep it
# text; a Hugging Face tokenizer(text) makes control tokens of it, as it does for every model.
SPELLED = "<｜begin▁of▁sentence｜>12<｜User｜>hi<｜Assistant｜><think>\nx</think>\n\n<｜end▁of▁sentence｜>"

# Random checkpoints: each row turns on what the exporter must write for llama.cpp to compute the same thing.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
CASES = {
    "q_lora off, n_group 1": {},
    "q_lora on, n_group 4 (top 2), YaRN mscale 1/1": {
        "q_lora_rank": 48, "n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4,
        "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "q_lora on, n_group 1, YaRN mscale 1/0.707, scale 2.5, no top-k norm": {
        "q_lora_rank": 48, "routed_scaling_factor": 2.5, "norm_topk_prob": False,
        "rope_scaling": {**YARN, "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 0.707}},
    "q_lora off, n_group 2 (top 1), YaRN without mscale, all layers MoE": {
        "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "rope_scaling": dict(YARN)},
}
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Countdown: reach 24 from 3, 8 and 1.",
          "What is 12 + 30? Answer briefly, please."] * 20
CORPUS += [f"{a} + {b} = {a + b}." for a in range(50) for b in (7, 93)]


def random_checkpoint(out, overrides, seed, init_std):
    """A size-2 model with the overrides, weights drawn with init_std (big enough that greedy choices are
    clear: at the default 0.02 a random model's logits are nearly flat and fp32 rounding picks among ties)."""
    tok = train_tokenizer(CORPUS, vocab_size=400)
    cfg = config_for_size(2, vocab_size=round_up(len(tok), 64))
    for key, value in {"initializer_range": init_std, "max_position_embeddings": 512, **overrides}.items():
        setattr(cfg, key, value)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    model = DeepSeekV3(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    for moe in model.moe_layers():  # the correction bias steers selection: make it matter
        moe.gate.e_score_correction_bias.copy_(torch.randn(moe.n_experts, generator=g) * 0.5)
    checkpoint.save(out, model, tok, {"stage": "init", "seed": seed})
    return out


def llama_greedy(llm, ids, n):
    """n greedy tokens from llama.cpp after ids, and the logits (n, vocab) each was chosen from."""
    llm.reset()
    llm.eval(ids)
    tokens, rows = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        llm.eval([tokens[-1]])
    return tokens, np.stack(rows)


def llama_chat_ids(llm, messages):
    """A chat as llama-cpp-python's chat completion tokenizes it: the GGUF's template, then its tokenizer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    text = lambda i: llm._model.token_get_text(i)  # noqa: E731
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=text(llm.token_eos()),
                                    bos_token=text(llm.token_bos()), add_generation_prompt=True)
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


def compare(ckpt, gguf_path, n_tokens):
    """Everything one checkpoint is compared on; returns a dict of results (see the module docstring)."""
    import llama_cpp
    from transformers import AutoTokenizer

    model, tok = checkpoint.load(ckpt)
    hf = AutoTokenizer.from_pretrained(ckpt)
    f32 = llama_cpp.GGML_TYPE_F32  # a float32 KV cache: llama.cpp's default f16 cache rounds the latents
    llm = llama_cpp.Llama(gguf_path, n_ctx=512, n_batch=512, n_threads=max(1, torch.get_num_threads()),
                          logits_all=True, verbose=False, type_k=f32, type_v=f32)
    r = {"sample_ids": len(tok.encode_prompt(SAMPLE)), "mismatches": []}
    samples = {"sample, nanoseek": tok.encode_prompt(SAMPLE), "sample, transformers": hf(SAMPLE)["input_ids"],
               "sample, llama.cpp": llm.tokenize(SAMPLE.encode(), add_bos=True, special=False)}
    spelled = {"spelled, nanoseek": tok.encode_prompt(SPELLED),
               "spelled, llama.cpp": llm.tokenize(SPELLED.encode(), add_bos=True, special=False)}
    for group in (samples, spelled):
        first, *others = group.items()
        for who, ids in others:
            if ids != first[1]:
                r["mismatches"].append(f"tokenization: {who} differs from {first[0]} at {_first_diff(ids, first[1])}")
    prompts = []  # (label, our ids, llama.cpp's ids)
    for text in RAW:
        prompts.append((f"raw {text!r}", tok.encode_prompt(text), llm.tokenize(text.encode(), add_bos=True)))
    for chat in CHATS:
        ours, _ = tok.render_chat(chat, add_generation_prompt=True)
        prompts.append((f"chat {chat[-1]['content']!r}", ours, llama_chat_ids(llm, chat)))
    default_cache = llama_cpp.Llama(gguf_path, n_ctx=512, n_batch=512, n_threads=max(1, torch.get_num_threads()),
                                    logits_all=True, verbose=False)
    torch._dynamo.reset()  # each case is another architecture: its decode step compiles afresh
    engine = Engine(model, tok, max_batch=len(prompts), tools=False)  # llama.cpp runs no tool
    engine.stop_ids = set()  # compare n_tokens in every prompt, past an end of sequence too
    seqs = engine.generate([p[1] for p in prompts], SamplingParams(max_tokens=n_tokens, temperature=0))
    gaps, diffs, r["f16_cache_identical"] = [], [], 0
    for (label, ours, theirs), seq in zip(prompts, seqs):
        if ours != theirs:
            r["mismatches"].append(f"{label}: prompt ids differ at {_first_diff(ours, theirs)}")
            continue
        tokens, llama_logits = llama_greedy(llm, theirs, n_tokens)
        r["f16_cache_identical"] += llama_greedy(default_cache, theirs, n_tokens)[0] == seq.tokens
        with torch.no_grad():
            logits = model(torch.tensor([ours + seq.tokens[:-1]]))[0, len(ours) - 1 :].double().numpy()
        top2 = np.sort(logits, axis=-1)[:, -2:]
        same = _first_diff(tokens, seq.tokens)  # logits after a divergence are conditioned on different tokens
        gaps.append(float((top2[: same + 1, 1] - top2[: same + 1, 0]).min()))
        diffs.append(float(np.abs(logits[: same + 1] - llama_logits[: same + 1]).max()))
        if tokens != seq.tokens:
            at = same
            r["mismatches"].append(f"{label}: greedy tokens differ at new token {at} (nanoseek's top-1/top-2 "
                                   f"gap there {top2[at, 1] - top2[at, 0]:.2e})")
    r.update(prompts=len(prompts), tokens=n_tokens, min_gap=min(gaps, default=float("nan")),
             max_logit_diff=max(diffs, default=float("nan")), mtp=len(model.mtp))
    llm.close()  # now, while the bindings are alive (closing at interpreter exit raises)
    default_cache.close()
    return r


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def versions():
    import importlib.metadata as md

    import llama_cpp

    return {"gguf": md.version("gguf"), "llama-cpp-python": md.version("llama-cpp-python"),
            "llama.cpp (libllama)": llama_cpp.llama_version().decode(), "transformers": md.version("transformers"),
            "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="*", default=[], help="checkpoints to export and compare (e.g. runs/cpu/rl/final)")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens compared per prompt")
    p.add_argument("--dtype", default="f32", help="GGUF dtype; only f32 can be expected to match to the token")
    p.add_argument("--seed", type=int, default=1, help="weights of the random checkpoints (seeds 0-3 all agree; "
                   "with 1 the closest call is 12x the largest logit difference, with 0 it is 1.3x)")
    p.add_argument("--init-std", type=float, default=0.2, help="weight scale of the random checkpoints")
    args = p.parse_args()
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions().items()))
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(os.path.normpath(c), c) for c in args.ckpt]
        for i, (name, overrides) in enumerate(CASES.items()):
            cases.append((f"random: {name}", random_checkpoint(os.path.join(tmp, f"r{i}"), overrides, args.seed,
                                                                args.init_std)))
        for name, ckpt in cases:
            out = os.path.join(tmp, "model.gguf")
            export_gguf(ckpt, out, dtype=args.dtype)
            r = compare(ckpt, out, args.tokens)
            verdict = "identical" if not r["mismatches"] else f"{len(r['mismatches'])} MISMATCH(ES)"
            print(f"{name}: {verdict}: sample of {r['sample_ids']} ids; {r['prompts']} prompts x {r['tokens']} greedy "
                  f"tokens; smallest top-1/top-2 gap {r['min_gap']:.1e}; largest logit difference "
                  f"{r['max_logit_diff']:.1e}; with llama.cpp's default f16 KV cache {r['f16_cache_identical']} of "
                  f"{r['prompts']} prompts identical" + (f"; {r['mtp']} MTP module(s) left out" if r["mtp"] else ""))
            for m in r["mismatches"]:
                print("   ", m)
            failed += bool(r["mismatches"])
    print(f"interop: {len(cases) - failed} of {len(cases)} cases identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
