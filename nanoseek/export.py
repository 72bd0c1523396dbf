"""GGUF export: a checkpoint as llama.cpp's deepseek2 model, for llama.cpp, Ollama and LM Studio.

    nanoseek export gguf CKPT OUT.gguf [--dtype f32|f16|q8_0] [--modelfile Modelfile]

The file spells out every hyperparameter (llama.cpp falls back to DeepSeek-V3's own sizes for a missing
key), holds MLA in the layout llama.cpp runs with the absorbed attention (kv_b_proj split into a transposed
k_b and a v_b), the routed experts stacked per layer, and the tokenizer: byte-level BPE under llama.cpp's
"refact" pre-tokenizer (single digits, then GPT-2's split, as tokenizer.py trains it), BOS in front of raw
text, and the R1 chat template. MTP modules are left out: llama.cpp does not run them.
"""

import json
import math
import os
import tempfile

import gguf
import numpy as np
import torch

from nanoseek import checkpoint
from nanoseek.model import Config, DeepSeekV3, rope_tables, softmax_scale
from nanoseek.tokenizer import ASSISTANT, CHAT_TEMPLATE, END_THINK, EOS, THINK, USER, Tokenizer, pre_tokenizer

ARCH = "deepseek2"
PRE_TOKENIZER = "refact"  # llama.cpp's name for: every digit alone, then the GPT-2 regex
T = gguf.GGMLQuantizationType
DTYPES = {  # --dtype: (file type, type of the matrices); vectors, norms and the router stay f32
    "f32": (gguf.LlamaFileType.ALL_F32, T.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, T.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
}


def export_gguf(ckpt, out, dtype="f32", modelfile=None) -> dict:
    """Write the GGUF file (and an Ollama Modelfile); returns what was written. Nothing is left behind on error."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    for path in (out, modelfile):
        if path:
            _check_writable(path)
    model, tok = checkpoint.load(ckpt)
    if tok is None:
        raise checkpoint.CheckpointError(f"{ckpt} has no tokenizer.json; a GGUF file needs the tokenizer")
    check_supported(model.config, tok)
    file_type, matrix_type = DTYPES[dtype]

    def write_gguf(path):
        writer = gguf.GGUFWriter(path, ARCH)
        add_hyperparameters(writer, model.config)
        add_tokenizer(writer, tok, model.config.vocab_size)
        writer.add_name(os.path.basename(os.path.normpath(ckpt)))
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data in gguf_tensors(model):
            data, kind = encode(name, data, matrix_type)
            writer.add_tensor(name, data, raw_dtype=kind)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    _write_atomic(out, write_gguf)
    if modelfile:
        text = ollama_modelfile(out, modelfile)
        _write_atomic(modelfile, lambda path: _write_text(path, text))
    return {"out": out, "bytes": os.path.getsize(out), "mtp_left_out": len(model.mtp), "modelfile": modelfile}


# ----------------------------------------------------------------------------- what llama.cpp can run


def check_supported(cfg: Config, tok: Tokenizer):
    """Refuse what llama.cpp's deepseek2 would run differently from nanoseek, with what to change."""
    if cfg.n_shared_experts < 1:
        raise ValueError("llama.cpp's deepseek2 needs at least one shared expert (n_shared_experts is 0)")
    if cfg.num_hidden_layers > cfg.first_k_dense_replace and cfg.num_experts_per_tok < 1:
        raise ValueError("num_experts_per_tok must be at least 1")
    if _yarn(cfg):
        rs = cfg.rope_scaling
        if rs["factor"] <= 1:
            raise ValueError(f"YaRN factor {rs['factor']} must be above 1 for llama.cpp")
        if (rs.get("beta_fast") or 32) != 32 or (rs.get("beta_slow") or 1) != 1:
            raise ValueError("llama.cpp's deepseek2 runs YaRN with beta_fast 32 and beta_slow 1 only; "
                             f"this checkpoint has {rs.get('beta_fast')} and {rs.get('beta_slow')}")
    ours = tok.tok.pre_tokenizer.__getstate__()
    if ours != pre_tokenizer().__getstate__() or tok.tok.normalizer is not None:
        raise ValueError("the tokenizer does not split text as `nanoseek tokenizer` trains it (digits, then "
                         "GPT-2's byte-level split), so no llama.cpp pre-tokenizer is known to match it")


def _yarn(cfg):
    rs = cfg.rope_scaling
    return bool(rs) and rs.get("type", rs.get("rope_type")) == "yarn"


# ----------------------------------------------------------------------------- metadata


def add_hyperparameters(w: gguf.GGUFWriter, cfg: Config):
    """Every key llama.cpp's deepseek2 reads, written explicitly (no key falls back to a default)."""
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)  # MTP modules are not written
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as multi-query attention over the shared latent
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # MLA
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: queries use one full projection (attn_q)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    # DeepSeekMoE
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    limited = cfg.n_group > 1 and cfg.topk_group < cfg.n_group  # routing into every group is plain top-k
    w.add_expert_group_count(cfg.n_group if limited else 1)
    w.add_expert_group_used_count(cfg.topk_group if limited else 1)
    if _yarn(cfg):
        add_yarn(w, cfg)


def add_yarn(w: gguf.GGUFWriter, cfg: Config):
    """YaRN keys that make llama.cpp scale attention exactly as model.py does.

    model.py multiplies cos/sin by a factor A and the softmax scale by K^2 (Hugging Face's DeepSeek-V3).
    llama.cpp's deepseek2, for a scale f = 1/freq_scale and g(m) = 1 + 0.1 m ln f, multiplies cos/sin by
    attn_factor (and, with no log multiplier L, by g(1) too) and the softmax scale by (cos/sin factor * g(L))^2.
    So attn_factor = A and L = (K / A - 1) / (0.1 ln f); L = 0 takes the other branch.
    """
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    cos, _ = rope_tables(Config(**{**cfg.to_dict(), "max_position_embeddings": 1}))
    a = float(cos[0, 0])  # position 0: cos = 1 times the attention factor
    k = math.sqrt(softmax_scale(cfg) * math.sqrt(cfg.qk_head_dim))
    log_mul = (k / a - 1) / (0.1 * math.log(factor))
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(factor)
    w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(32.0)
    w.add_rope_scaling_yarn_beta_slow(1.0)
    if abs(log_mul) > 1e-6:
        w.add_rope_scaling_yarn_log_mul(0.1 * log_mul)  # llama.cpp divides the stored value by 0.1
        w.add_rope_scaling_attn_factors(a)
    else:
        w.add_rope_scaling_attn_factors(a / (1 + 0.1 * math.log(factor)))


def add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int):
    """Byte-level BPE (llama.cpp's "gpt2" model): tokens, merges, control tokens, BOS/EOS, the chat template.
    The model's vocabulary is rounded up past the tokenizer's: the extra rows are unused tokens."""
    bpe = json.loads(tok.tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    special = {t.content for t in tok.tok.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tok.tok.id_to_token(i) if i < len(tok) else None
        tokens.append(token if token is not None else f"[PAD{i}]")
        kind = gguf.TokenType.UNUSED if token is None else (
            gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)  # raw text gets BOS, as the Hugging Face files and `nanoseek serve` do
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


# ----------------------------------------------------------------------------- tensors


def gguf_tensors(model: DeepSeekV3):
    """(GGUF name, float32 array) for every tensor llama.cpp reads; MTP modules are skipped.

    Arrays are in numpy order, the reverse of ggml's: a (out, in) weight is ggml's {in, out}.
    """
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, model.config.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name.startswith("mtp."):
            continue
        for hf_name, piece in llama_layout(name, t.detach().float(), model.config):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name}")
            yield gguf_name, piece.contiguous().numpy()


def llama_layout(name, t: torch.Tensor, cfg: Config):
    """One of our tensors as (Hugging Face-style name, tensor) pairs in the layout llama.cpp's converter writes."""
    H, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    if name.endswith("self_attn.kv_b_proj.weight"):  # (H (nope + v), C) -> k_b (H, C, nope) and v_b (H, v, C)
        k_b, v_b = t.view(H, nope + v, cfg.kv_lora_rank).split([nope, v], dim=1)
        yield name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)
        yield name.replace("kv_b_proj", "v_b_proj"), v_b
    elif name.endswith(".mlp.gate_up"):  # (E, D, 2I): [gate.T | up.T] -> gate, up (E, I, D)
        gate, up = t.transpose(1, 2).split(cfg.moe_intermediate_size, dim=1)
        prefix = name[: -len("gate_up")]
        yield prefix + "experts.gate_proj.weight", gate
        yield prefix + "experts.up_proj.weight", up
    elif name.endswith(".mlp.down"):  # (E, I, D) -> (E, D, I)
        yield name[: -len("down")] + "experts.down_proj.weight", t.transpose(1, 2)
    elif name.endswith("e_score_correction_bias"):
        yield name.replace("e_score_correction_bias", "e_score_correction.bias"), t
    else:
        yield name, t


def encode(name, data: np.ndarray, matrix_type):
    """(data, type) as written: vectors, norms and the router in f32 (as llama.cpp's converter keeps them),
    other matrices in matrix_type; q8_0 falls back to f16 for rows that are not whole 32-value blocks."""
    if data.ndim == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return data.astype(np.float32), T.F32
    try:
        return gguf.quants.quantize(data, matrix_type), matrix_type
    except gguf.QuantError:
        return gguf.quants.quantize(data, T.F16), T.F16


# ----------------------------------------------------------------------------- Ollama


def ollama_modelfile(gguf_path, modelfile_path) -> str:
    """An Ollama Modelfile: the GGUF file, the R1 chat format as a Go template, and the stop tokens."""
    here = os.path.dirname(os.path.abspath(modelfile_path))
    source = os.path.relpath(os.path.abspath(gguf_path), here)
    source = source if not source.startswith("..") else os.path.abspath(gguf_path)
    template = (
        "{{ if .System }}{{ .System }}{{ end }}"
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "user" }}}}{USER}{{{{ .Content }}}}'
        f'{{{{ else if eq .Role "assistant" }}}}{ASSISTANT}{{{{ .Content }}}}{EOS}'
        "{{ end }}{{ end }}"
        f"{ASSISTANT}{THINK}\n"
    )
    return (
        f"# Made by `nanoseek export gguf`: `ollama create NAME -f {os.path.basename(modelfile_path)}`\n"
        f"FROM {'./' + source if not os.path.isabs(source) else source}\n"
        f'TEMPLATE """{template}"""\n'
        f'PARAMETER stop "{EOS}"\n'
        f'PARAMETER stop "{USER}"\n'
        f"# the reply holds the reasoning, then {END_THINK}, then the answer\n"
    )


# ----------------------------------------------------------------------------- atomic writes


def _check_writable(path):
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory: give a file name for the output")
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: no permission to write in {parent}")


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_atomic(path, write):
    """write(tmp) to a file beside path, fsync, rename over path; on any error the file is removed."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
