"""nanoseek <command> [options]: every stage of the pipeline from one entry point."""

import argparse
import dataclasses
import json
import os
import sys
import typing

import torch


def _hf_source(args):
    """The Hugging Face source that --hf, --name, --split, --column and --max-documents name."""
    from nanoseek.hub import HF_KEYS

    return {key: getattr(args, "hf" if key == "path" else key) for key in HF_KEYS}


def cmd_tokenizer(args):
    from nanoseek.data import document_texts, read_texts
    from nanoseek.hub import read_hf
    from nanoseek.tokenizer import train_tokenizer

    if bool(args.input) == bool(args.hf):
        raise ValueError("give either --input files or --hf DATASET")
    texts = read_texts(args.input) if args.input else document_texts(read_hf(_hf_source(args)))
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, max_chars=args.max_chars)
    os.makedirs(args.out, exist_ok=True)
    tok.save(args.out)
    print(f"tokenizer with {len(tok)} tokens written to {args.out}")


def cmd_init(args):
    from nanoseek import checkpoint
    from nanoseek.model import DeepSeekV3, config_for_size, round_up
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:  # bytes and special tokens only: a valid tokenizer for any text until you train one
        tok = train_tokenizer([], vocab_size=263)
    cfg = config_for_size(args.size, vocab_size=round_up(len(tok), 64))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(args.seed)
    model = DeepSeekV3(cfg).init_weights(args.seed)
    meta = {"stage": "init", "size": args.size, "seed": args.seed, "step": 0, "tokens_seen": 0, "parent": None}
    checkpoint.save(args.out, model, tok, meta)
    print(f"initialised size {args.size} checkpoint in {args.out}")
    _print_info(args.out)


def _print_info(path):
    from nanoseek import checkpoint
    from nanoseek.model import kv_bytes_per_token, param_counts

    model = checkpoint.load_model(path)
    cfg = model.config
    total, active = param_counts(model)
    print(json.dumps(checkpoint.config_to_json(cfg), indent=2))
    meta = checkpoint.load_meta(path)
    if meta:
        print("nanoseek.json:", json.dumps(meta))
    print(f"parameters: {total:,} total, {active:,} active per token")
    print(f"KV cache: {kv_bytes_per_token(cfg, 2):,} bytes/token in bf16 ({kv_bytes_per_token(cfg, 4):,} in fp32)")


def cmd_info(args):
    _print_info(args.ckpt)


def cmd_bench(args):
    if args.what == "decode" and args.prompt_kind == "tasks" and args.peer:
        raise ValueError("bench decode --prompt-kind tasks compares MTP self-speculation with plain decoding, no "
                         "peer: drop --peer (it compares with a peer on random prompts)")
    if args.what != "serve":
        args.peer = args.peer or ("trl" if args.what == "grpo" else "transformers")
    if args.what == "train":
        from nanoseek.bench.train import bench_train, print_train

        r = bench_train(size=args.size or 4, batch=args.batch, seq=args.seq, steps=args.steps or 100,
                        sweep=args.sweep, device=args.device, peer=args.peer)
        print_train(r)
    elif args.what == "decode" and args.prompt_kind == "tasks":
        from nanoseek.bench.speculation import bench_speculation, print_speculation

        if not args.ckpt:
            raise ValueError("bench decode --prompt-kind tasks needs --ckpt: a checkpoint with an MTP module and its "
                             "tokenizer, e.g. runs/cpu/rl/final after make run")
        r = bench_speculation(args.ckpt, tasks=args.task or ["addition", "countdown"], n=args.n,
                              difficulty=args.difficulty or 3, batches=tuple(args.batches),
                              new_tokens=args.new_tokens, rounds=args.rounds, device=args.device)
        print_speculation(r)
    elif args.what == "decode":
        from nanoseek.bench.decode import bench_decode, print_decode

        r = bench_decode(ckpt=args.ckpt, size=args.size or 6, batches=tuple(args.batches),
                         prompt_len=args.prompt_len, new_tokens=args.new_tokens, device=args.device,
                         peer=args.peer, rounds=args.rounds)
        print_decode(r)
    elif args.what == "grpo":
        from nanoseek.bench.grpo import bench_grpo, print_grpo

        if not args.ckpt:
            raise ValueError("bench grpo needs --ckpt (an SFT checkpoint, e.g. runs/cpu/sft/final)")
        task = args.task or ["addition"]
        if len(task) > 1:
            raise ValueError("bench grpo takes one --task")
        r = bench_grpo(args.ckpt, task=task[0], difficulty=args.difficulty or 2, steps=args.steps or 10,
                       prompts=args.prompts, group=args.group, max_new_tokens=args.new_tokens,
                       peer=args.peer)
        print_grpo(r)
    elif args.what == "serve":
        from nanoseek.bench.serve import bench_serve, print_serve

        if not args.ckpt:
            raise ValueError("bench serve needs --ckpt: a checkpoint with its tokenizer, e.g. runs/cpu/rl/final")
        if args.peer not in (None, "llama.cpp"):
            raise ValueError("bench serve compares with llama.cpp's llama-server: --peer llama.cpp (the default)")
        r = bench_serve(args.ckpt, at_once=tuple(args.at_once), tasks=args.task or ["addition", "countdown"],
                        n=args.n, difficulty=args.difficulty or 3, max_tokens=args.new_tokens, rounds=args.rounds)
        print_serve(r)
    elif args.what == "data":
        from nanoseek.bench.data import bench_data, print_data

        r = bench_data(sizes_mb=tuple(args.sizes), vocab_size=args.vocab_size, repeats=args.repeats)
        print_data(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


def cmd_data(args):
    from nanoseek.config import DataConfig
    from nanoseek.data import build
    from nanoseek.hub import read_hf
    from nanoseek.tasks import task_documents
    from nanoseek.tokenizer import Tokenizer

    if sum(map(bool, (args.input, args.task, args.hf))) != 1:
        raise ValueError("give one of --input files, --task NAME or --hf DATASET")
    tok = Tokenizer.load(args.tokenizer)
    documents = None
    o = from_args(DataConfig, args)
    if o.task:
        documents = (d for spec in o.task for d in task_documents(spec, o.n, o.kind, o.seed, o.levels, o.checker))
    if o.hf:
        documents = read_hf(_hf_source(args))
    manifest = build(o.input, tok, args.out, val_fraction=o.val_fraction, documents=documents)
    for split, shards in manifest["splits"].items():
        tokens, docs = sum(s["tokens"] for s in shards), sum(s["documents"] for s in shards)
        print(f"{split}: {docs:,} documents, {tokens:,} tokens in {len(shards)} shard(s)")
    print(f"{manifest['kind']} data written to {args.out}")


def from_args(cls, args):
    """A stage's config from its parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def cmd_train(args):
    from nanoseek.config import TrainConfig
    from nanoseek.train import train

    last = train(from_args(TrainConfig, args), args.command)
    if last and os.environ.get("RANK", "0") == "0":
        summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("main_loss", "val_loss", "val_bpb") if k in last)
        print(f"{args.command} finished: {summary}; model in {os.path.join(args.out, 'final')}")


def cmd_rl(args):
    from nanoseek.config import RLConfig
    from nanoseek.rl import rl

    last = rl(from_args(RLConfig, args))
    if last and os.environ.get("RANK", "0") == "0":
        print(f"rl finished: reward {last['reward']:.3f}, accuracy {last['accuracy']:.3f}; "
              f"model in {os.path.join(args.out, 'final')}")


def cmd_rs(args):
    from nanoseek.config import RSConfig
    from nanoseek.rejection import rejection_sampling

    result = rejection_sampling(from_args(RSConfig, args))
    if os.environ.get("RANK", "0") == "0":
        print(f"rs finished: fine-tuned on {result['kept']} kept completions for {result['steps']} steps; "
              f"model in {os.path.join(args.out, 'final')}")


def cmd_mtp(args):
    from nanoseek.config import MTPConfig
    from nanoseek.mtp import align_mtp

    result = align_mtp(from_args(MTPConfig, args))
    print(f"mtp finished: the MTP module trained on {result['conversations']} of the model's own conversations "
          f"for {result['step']} steps (MTP loss {result['mtp_loss'][0]:.3f}); model in "
          f"{os.path.join(args.out, 'final')}")


def cmd_eval(args):
    from nanoseek.config import EvalConfig, Scoring, values
    from nanoseek.evaluate import evaluate, markdown_table

    o = from_args(EvalConfig, args)
    results = evaluate(args.ckpt, o.task, **values(o, Scoring), seed=o.seed, out=o.out, device=o.device,
                       checker=o.checker, difficulty=o.levels, dtype=o.dtype)
    print(markdown_table(results, o.k))
    if o.out:
        print(f"written to {args.out}/eval.json, eval.md, eval.png")


def add_flags(s, cls, func):
    """A flag for each field of a stage's config: --name-with-dashes, with the field's default, type and help."""
    from nanoseek.config import default

    for f in dataclasses.fields(cls):
        s.add_argument("--" + f.name.replace("_", "-"), default=default(f), help=f.metadata["help"], **_reading(f.type))
    s.set_defaults(func=func)


def _reading(kind):
    """How argparse reads a value of a field's type: a list as one or more items, a bool as --x or --no-x."""
    from nanoseek.config import list_type

    if list_type(kind):
        return {"nargs": "+", "type": typing.get_args(list_type(kind))[0]}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": next(k for k in typing.get_args(kind) if k is not type(None)) if typing.get_args(kind) else kind}


def cmd_serve(args):
    from nanoseek.serve import serve

    serve(args.ckpt, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          model_name=args.model_name, device=args.device, threads=args.threads)


def cmd_chat(args):
    from nanoseek.chat import chat

    chat(args.ckpt, temperature=args.temperature, max_tokens=args.max_tokens, device=args.device,
         repetition_stop=args.repetition_stop)


def cmd_export(args):
    from nanoseek.export import export_gguf

    r = export_gguf(args.ckpt, args.out, dtype=args.dtype, modelfile=args.modelfile)
    print(f"wrote {r['out']} ({r['bytes']:,} bytes, {args.dtype}) for llama.cpp's deepseek2")
    if r["mtp_left_out"]:
        print(f"left out {r['mtp_left_out']} MTP module(s): llama.cpp does not run them")
    if r["modelfile"]:
        print(f"wrote {r['modelfile']}: `ollama create NAME -f {r['modelfile']}`")


def cmd_run(args):
    from nanoseek.pipeline import builtin_recipes, main_run

    if args.list:
        recipes = builtin_recipes()
        width = max(map(len, recipes), default=0)
        for name, purpose in recipes.items():
            print(f"{name:<{width}}  {purpose}")
        return

    main_run(args.recipe, force=args.force or (), overrides=recipe_overrides(args.set), stop_after=args.stop_after)


def recipe_overrides(items):
    """--set section.key=value ... as {"section.key": value}, values read as JSON where they parse."""
    overrides = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if "." not in key or not _:
            raise ValueError(f"--set takes section.key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def cmd_plan(args):
    from nanoseek.pipeline import load_recipe
    from nanoseek.plan import PlanError, plan_recipe

    text, problem = plan_recipe(load_recipe(args.recipe, recipe_overrides(args.set)), args.gpu, args.gpus)
    print(text)
    if problem:
        raise PlanError(problem)


def build_parser():
    from nanoseek import __version__

    p = argparse.ArgumentParser(prog="nanoseek", description="Train your own DeepSeek-style reasoning model.")
    p.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    from nanoseek import config
    from nanoseek.text import CHAT_TEMPERATURE, DEFAULT_REPETITION_STOP

    s = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with the chat format")
    s.add_argument("--input", nargs="+", help="files or globs: .txt, .jsonl, .parquet")
    s.add_argument("--vocab-size", type=int, default=4096, help="tokens, including 256 bytes and 7 special tokens")
    s.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    s.add_argument("--max-chars", type=int, default=1_000_000_000, help="train on the first this many characters")
    add_flags(s, config.HFSource, cmd_tokenizer)

    s = sub.add_parser("data", help="tokenize text, JSONL or Parquet corpora into shards")
    s.add_argument("--tokenizer", required=True, help="tokenizer or checkpoint directory")
    s.add_argument("--out", required=True, help="data directory to write")
    add_flags(s, config.DataConfig, cmd_data)

    for mode, text in (("pretrain", "train on text shards"), ("sft", "fine-tune on chat shards (assistant tokens)")):
        add_flags(sub.add_parser(mode, help=text), config.TrainConfig, cmd_train)
    add_flags(sub.add_parser("rl", help="GRPO on a task with rule-checked rewards"), config.RLConfig, cmd_rl)
    add_flags(sub.add_parser("rs", help="rejection sampling: fine-tune the RL model on its own checked completions"),
              config.RSConfig, cmd_rs)
    add_flags(sub.add_parser("mtp", help="train the MTP module to draft the model's own answers (speculative "
                                         "decoding), the main model frozen"), config.MTPConfig, cmd_mtp)

    s = sub.add_parser("eval", help="held-out pass@1 / pass@k per task and difficulty")
    s.add_argument("ckpt", nargs="+", help="one or more checkpoints, compared side by side")
    add_flags(s, config.EvalConfig, cmd_eval)

    s = sub.add_parser("run", help="every stage of a recipe: tokenizer, data, pretrain, sft, rl, eval, report",
                       epilog=config.recipe_reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--recipe", default="cpu", help="a built-in recipe's name (see --list) or a .toml file")
    s.add_argument("--list", action="store_true", help="list the built-in recipes and what each is for")
    s.add_argument("--force", nargs="*", help="stages to redo (or 'all'), even if their output is complete")
    s.add_argument("--set", nargs="+", action="extend", help="override recipe values: section.key=value (JSON values)")
    s.add_argument("--stop-after", help="stop after this stage")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("plan", help="memory, FLOPs and time per rank for each stage of a recipe, before any work")
    s.add_argument("--recipe", default="cpu", help="a built-in recipe's name or a .toml file")
    s.add_argument("--gpu", help="plan for this GPU (H100, H200, A100, L40S, L4, RTX 4090; default: this machine)")
    s.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) the run uses")
    s.add_argument("--set", nargs="+", action="extend", help="override recipe values: section.key=value (JSON values)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    s.add_argument("ckpt")
    s.add_argument("--temperature", type=float, default=CHAT_TEMPERATURE,
                   help="sampling temperature (0: greedy; the default writes the most right answers, docs/SPEEDRUN.md)")
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--repetition-stop", type=int, default=DEFAULT_REPETITION_STOP,
                   help="end a reply whose last N tokens repeat one block (0: off)")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible API and a web chat")
    s.add_argument("ckpt")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"), help="require this bearer key")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together; more get 429")
    s.add_argument("--model-name", help="model id in the API (default: the directory name)")
    s.add_argument("--device", default=None)
    s.add_argument("--threads", type=int, help="CPU threads for decoding (default: torch's, one a core)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("init", help="write a randomly initialised checkpoint")
    s.add_argument("--size", type=int, default=6, help="the size dial: depth (2 = test, 6 = CPU default, 12 = GPU)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    s.add_argument("--tokenizer", help="tokenizer directory (default: bytes-only tokenizer)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("info", help="print a checkpoint's config, parameter counts and KV-cache size")
    s.add_argument("ckpt")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp, Ollama and LM Studio")
    s.add_argument("format", choices=["gguf"])
    s.add_argument("ckpt", help="checkpoint directory")
    s.add_argument("out", help="GGUF file to write")
    s.add_argument("--dtype", default="f32", help="f32, f16 or q8_0 (matrices; norms and the router stay f32)")
    s.add_argument("--modelfile", help="also write an Ollama Modelfile here (template and stop tokens)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("bench", help="benchmark against a peer and print the speedup")
    s.add_argument("what", choices=["train", "decode", "grpo", "serve", "data"])
    s.add_argument("--sizes", type=float, nargs="+", default=[20, 200], help="data: corpus sizes in MB")
    s.add_argument("--vocab-size", type=int, default=8192, help="data: tokenizer vocabulary")
    s.add_argument("--repeats", type=int, default=3, help="data: turns of each side (the median time is kept)")
    s.add_argument("--task", nargs="+", help="grpo: the task (default addition); decode --prompt-kind tasks: the "
                   "tasks whose held-out prompts are decoded (default addition countdown)")
    s.add_argument("--difficulty", type=int, help="grpo: task difficulty (default 2); decode --prompt-kind tasks: 3")
    s.add_argument("--prompt-kind", choices=["random", "tasks"], default="random", help="decode: random (random "
                   "tokens) or tasks (held-out prompts of --task, asked as chat and decoded to their end, plain "
                   "against MTP self-speculation)")
    s.add_argument("--prompts", type=int, default=4, help="grpo: problems per step")
    s.add_argument("--n", type=int, default=50, help="decode --prompt-kind tasks, serve: held-out problems per task")
    s.add_argument("--at-once", type=int, nargs="+", default=[1, 8], help="serve: requests in flight at a time")
    s.add_argument("--group", type=int, default=8, help="grpo: completions per problem")
    s.add_argument("--ckpt", help="decode: checkpoint to benchmark (default: a random model of --size); "
                   "grpo, serve: the checkpoint")
    s.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decode: batch sizes")
    s.add_argument("--prompt-len", type=int, default=64, help="decode: prompt tokens")
    s.add_argument("--new-tokens", type=int, default=128, help="decode: tokens to generate")
    s.add_argument("--rounds", type=int, default=5, help="decode with --peer llama.cpp or --prompt-kind tasks, "
                   "serve: rounds in which the two sides take turns (the medians are compared)")
    s.add_argument("--peer", default=None, choices=["transformers", "llama.cpp", "trl"],
                   help="transformers (train, decode), llama.cpp (decode, serve) or trl (grpo)")
    s.add_argument("--size", type=int, help="size dial (depth; default: train 4, the cpu recipe's; decode 6)")
    s.add_argument("--batch", type=int, default=8, help="train: sequences per step")
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--steps", type=int, help="train: optimizer steps per run (default 100); grpo: steps (default 10)")
    s.add_argument("--sweep", action="store_true", help="train: each side at three peak learning rates, not its best")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--json", help="also write the figures to this JSON file")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    from nanoseek.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
