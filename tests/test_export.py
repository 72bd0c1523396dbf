"""`nanoseek export gguf`: the file read back with the gguf package, llama.cpp's greedy tokens on it, and
one tokenization of raw text for the Hugging Face files, the server and llama.cpp."""

import importlib.util
import os
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoseek import checkpoint
from nanoseek.cli import main
from nanoseek.export import export_gguf
from nanoseek.model import Config, DeepSeekV3
from nanoseek.tokenizer import CHAT_TEMPLATE

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {  # q_lora off and on, expert groups 1 and 4, YaRN, an MTP module that the file leaves out
    "plain": {},
    "q_lora, groups, yarn, mtp": {"q_lora_rank": 32, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                                  "num_experts_per_tok": 3, "routed_scaling_factor": 2.5, "norm_topk_prob": False,
                                  "rope_scaling": YARN, "num_nextn_predict_layers": 1, "first_k_dense_replace": 1},
}


def make_checkpoint(path, tokenizer, seed=0, **overrides):
    cfg = Config(vocab_size=448, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 max_position_embeddings=256, initializer_range=0.2, bos_token_id=tokenizer.bos_id,
                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **overrides)
    model = DeepSeekV3(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.randn(moe.n_experts, generator=g) * 0.5)
    return checkpoint.save(path, model, tokenizer, {"stage": "init"})


def expected_tensors(ckpt, cfg):
    """The GGUF tensors llama.cpp's deepseek2 reads, built here from the checkpoint's Hugging Face tensors."""
    sd = checkpoint.read_tensors(ckpt)
    H, nope, v, C, E = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                        cfg.n_routed_experts)
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        attn = {"attn_kv_a_mqa": "kv_a_proj_with_mqa", "attn_kv_a_norm": "kv_a_layernorm", "attn_output": "o_proj"}
        attn |= {"attn_q": "q_proj"} if cfg.q_lora_rank is None else {
            "attn_q_a": "q_a_proj", "attn_q_a_norm": "q_a_layernorm", "attn_q_b": "q_b_proj"}
        for ours, theirs in attn.items():
            out[b + ours + ".weight"] = sd[p + "self_attn." + theirs + ".weight"]
        kv_b = sd[p + "self_attn.kv_b_proj.weight"].view(H, nope + v, C)
        out[b + "attn_k_b.weight"] = kv_b[:, :nope].transpose(1, 2)  # (H, C, nope)
        out[b + "attn_v_b.weight"] = kv_b[:, nope:]  # (H, v, C)
        for proj in ("gate", "up", "down"):
            if i < cfg.first_k_dense_replace:
                out[b + f"ffn_{proj}.weight"] = sd[p + f"mlp.{proj}_proj.weight"]
            else:
                out[b + f"ffn_{proj}_exps.weight"] = torch.stack(
                    [sd[p + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(E)])
                out[b + f"ffn_{proj}_shexp.weight"] = sd[p + f"mlp.shared_experts.{proj}_proj.weight"]
        if i >= cfg.first_k_dense_replace:
            out[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
            out[b + "exp_probs_b.bias"] = sd[p + "mlp.gate.e_score_correction_bias"]
    return {k: t.float().numpy() for k, t in out.items()}


def fields(reader):
    return {name: f.contents() for name, f in reader.fields.items()}


@pytest.mark.parametrize("case", CASES)
def test_gguf_reads_back_as_the_checkpoint(tmp_path, tokenizer, case):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer, **CASES[case])
    cfg = checkpoint.load_config(ckpt)
    export_gguf(ckpt, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    kv = fields(reader)
    a = "deepseek2."
    assert kv["general.architecture"] == "deepseek2"
    assert kv[a + "block_count"] == 2 and kv[a + "leading_dense_block_count"] == cfg.first_k_dense_replace
    assert kv[a + "attention.q_lora_rank"] == (cfg.q_lora_rank or 0)
    assert kv[a + "attention.kv_lora_rank"] == 32 and kv[a + "attention.head_count_kv"] == 1
    assert kv[a + "attention.key_length_mla"] == 48 and kv[a + "attention.value_length_mla"] == 32
    assert kv[a + "attention.key_length"] == 32 + 16 and kv[a + "rope.dimension_count"] == 16
    assert kv[a + "expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    assert (kv[a + "expert_count"], kv[a + "expert_used_count"], kv[a + "expert_shared_count"]) == (
        cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts)
    assert (kv[a + "expert_group_count"], kv[a + "expert_group_used_count"]) == (cfg.n_group, cfg.topk_group)
    assert kv[a + "expert_weights_scale"] == cfg.routed_scaling_factor
    assert kv[a + "expert_weights_norm"] == cfg.norm_topk_prob
    if cfg.rope_scaling:
        assert kv[a + "rope.scaling.type"] == "yarn" and kv[a + "rope.scaling.factor"] == 4.0
        assert kv[a + "rope.scaling.original_context_length"] == 64
        assert kv[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)  # mscale_all_dim 1, as converted
    else:
        assert a + "rope.scaling.type" not in kv
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "refact"
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert kv["tokenizer.ggml.tokens"][: len(tokenizer)] == [tokenizer.tok.id_to_token(i) for i in range(400)]
    control = [i for i, kind in enumerate(kv["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    assert control == list(range(11))  # BOS .. </think>, then the four tool tokens
    assert kv["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id
    assert kv["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.chat_template"] == CHAT_TEMPLATE

    expected = expected_tensors(ckpt, cfg)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)  # the MTP module is left out
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml lists dimensions innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want, err_msg=name)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_dtypes_keep_vectors_and_router_in_f32(tmp_path, tokenizer, dtype):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    export_gguf(ckpt, tmp_path / "model.gguf", dtype=dtype)
    expected = expected_tensors(ckpt, checkpoint.load_config(ckpt))
    matrix = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors:
        want = expected[t.name]
        if want.ndim == 1 or "norm" in t.name or "ffn_gate_inp" in t.name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        else:
            assert t.tensor_type == matrix, t.name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        tol = 1e-3 if dtype == "f16" else 1e-2  # q8_0: 8-bit values with one scale per 32
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=t.name)


def test_bad_input_is_a_clear_error_and_leaves_no_file(tmp_path, tokenizer, capsys, monkeypatch):
    out = tmp_path / "out.gguf"
    (tmp_path / "empty").mkdir()
    assert main(["export", "gguf", str(tmp_path / "empty"), str(out)]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    with pytest.raises(ValueError, match="unsupported --dtype 'q4_k': choose one of f32, f16, q8_0"):
        export_gguf(ckpt, out, dtype="q4_k")
    with pytest.raises(ValueError, match="does not exist"):
        export_gguf(ckpt, tmp_path / "no" / "such" / "dir.gguf")
    with pytest.raises(ValueError, match="is a directory"):
        export_gguf(ckpt, tmp_path / "empty")

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(ckpt, out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty"]  # no output and no temporary file beside it


def test_cli_writes_gguf_and_ollama_modelfile(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer, num_nextn_predict_layers=1)
    out, modelfile = tmp_path / "m.gguf", tmp_path / "Modelfile"
    assert main(["export", "gguf", str(ckpt), str(out), "--dtype", "q8_0", "--modelfile", str(modelfile)]) == 0
    printed = capsys.readouterr().out
    assert "left out 1 MTP module(s)" in printed and "ollama create" in printed
    text = modelfile.read_text()
    assert text.splitlines()[1] == "FROM ./m.gguf"
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"' in text and "<｜Assistant｜><think>\n" in text
    assert fields(gguf.GGUFReader(out))["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


# ----------------------------------------------------------------------------- one tokenization


def test_hf_tokenizer_adds_bos_once(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["12 + 30 =", "The quick brown fox", " leading space, 2026\n"]:
        assert hf(text)["input_ids"] == tokenizer.encode_prompt(text) == [tokenizer.bos_id] + tokenizer.encode(text)
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    assert chat["input_ids"].count(tokenizer.bos_id) == 1 and chat["input_ids"][0] == tokenizer.bos_id


def test_server_and_transformers_read_a_raw_prompt_alike(live_server, chat_model):
    """/v1/completions and transformers on the checkpoint's own files: same prompt ids, same greedy text."""
    url, _ = live_server
    hf_tok = AutoTokenizer.from_pretrained(chat_model)
    hf = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32)
    for prompt in ["12 + 30 =", "What is 7 + 5?"]:
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer sekrit"}, timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}).json()
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        assert r["usage"]["prompt_tokens"] == ids.shape[1]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=hf_tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        assert r["usage"]["completion_tokens"] == len(new)
        assert r["choices"][0]["text"] == hf_tok.decode([t for t in new if t != hf_tok.eos_token_id])


# ----------------------------------------------------------------------------- llama.cpp itself


def test_llama_cpp_reproduces_the_engine(tmp_path):
    """Tokenization and 24 greedy tokens on 10 raw and chat prompts, through the real llama.cpp."""
    pytest.importorskip("llama_cpp")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "interop.py"
    spec = importlib.util.spec_from_file_location("interop", path)
    interop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interop)
    case = "q_lora on, n_group 4 (top 2), YaRN mscale 1/1"
    ckpt = interop.random_checkpoint(str(tmp_path / "ckpt"), interop.CASES[case], seed=1, init_std=0.2)
    export_gguf(ckpt, tmp_path / "model.gguf")
    r = interop.compare(ckpt, str(tmp_path / "model.gguf"), n_tokens=24)
    assert r["prompts"] == 10 and r["mismatches"] == []
