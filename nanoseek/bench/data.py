"""`nanoseek bench data`: MB/s and peak memory of `nanoseek data` against a plain tokenizers loop tokenizing the
same generated corpus, each side in a process of its own."""

import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

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
