"""The model is numerically Hugging Face's DeepseekV3ForCausalLM, in both directions."""

import os

import pytest
import torch
from conftest import random_config, randomize_router_bias
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.utils import logging as hf_logging

import nanoseek
from nanoseek import checkpoint
from nanoseek.model import DeepSeekV3, MoE, config_for_size, kv_bytes_per_token, param_counts

hf_logging.set_verbosity_error()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def rel_err(a, b, mask=None):
    diff = (a - b).abs()
    if mask is not None:
        diff = diff * mask[..., None]
    return float(diff.max() / b.abs().max())


def batch_with_padding(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, 12:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("seed", range(20))
def test_nanoseek_checkpoint_matches_transformers(seed, tmp_path):
    cfg = random_config(seed)
    torch.manual_seed(seed)
    ours = DeepSeekV3(cfg).init_weights(seed).eval()
    randomize_router_bias(ours, seed)
    checkpoint.save(tmp_path / "ckpt", ours, None)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ids, mask = batch_with_padding(cfg, seed)
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids).logits) <= 1e-5
        assert rel_err(ours(ids, mask), theirs(ids, attention_mask=mask).logits, mask) <= 1e-5


@pytest.mark.parametrize("seed", range(100, 108))
def test_transformers_checkpoint_loads_in_nanoseek(seed, tmp_path):
    cfg = random_config(seed)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in checkpoint.config_to_json(cfg).items() if k != "architectures"})
    torch.manual_seed(seed)
    theirs = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # give the router bias and the norms values that matter
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in theirs.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    ours, tok = nanoseek.load(tmp_path / "hf")
    assert tok is None and len(ours.mtp) == 0
    ids, mask = batch_with_padding(cfg, seed)
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids).logits) <= 1e-5
        assert rel_err(ours(ids, mask), theirs(ids, attention_mask=mask).logits, mask) <= 1e-5


def naive_moe(moe: MoE, x):
    """Token by token, expert by expert: the definition the grouped kernel must reproduce."""
    weights, experts, _ = moe.gate(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t]):
            h = x[t] @ moe.gate_up[e]
            gate, up = h.split(moe.inter)
            out[t] += w * ((torch.nn.functional.silu(gate) * up) @ moe.down[e])
    return out + moe.shared_experts(x)


def test_grouped_experts_equal_naive_loop():
    cfg = random_config(3)
    cfg.first_k_dense_replace, cfg.n_shared_experts = 0, 1
    model = DeepSeekV3(cfg).init_weights(0)
    moe = model.model.layers[0].mlp
    x = torch.randn(23, cfg.hidden_size)
    routing = {}
    with torch.no_grad():
        torch.testing.assert_close(moe(x, routing), naive_moe(moe, x), rtol=1e-5, atol=1e-6)
    load, scores, choice = routing[moe]
    assert int(load.sum()) == 23 * cfg.num_experts_per_tok and scores.shape == (23, cfg.n_routed_experts)
    assert torch.equal(load, torch.bincount(choice.flatten(), minlength=cfg.n_routed_experts))


@pytest.mark.parametrize("tokens", [1, 2, 23])
def test_compiled_inference_paths_equal_the_sorted_one(tokens):
    """A compiled inference step sends a handful of tokens through their gathered experts and more through
    every expert (dense): both equal the sorted grouped matmul that training and eager inference run, in one
    graph."""
    cfg = random_config(3)
    cfg.first_k_dense_replace, cfg.n_shared_experts = 0, 1
    moe = DeepSeekV3(cfg).init_weights(0).moe_layers()[0].eval()
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        weights, experts, _ = moe.gate(x)
        sorted_y = moe.sorted_experts(x, weights, experts)[0]
        torch.testing.assert_close(moe.dense_experts(x, weights, experts), sorted_y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe.gathered_experts(x, weights, experts), sorted_y, rtol=1e-5, atol=1e-6)
        explained = torch._dynamo.explain(moe)(x)
        torch.testing.assert_close(torch.compile(moe, dynamic=False)(x), moe(x), rtol=1e-5, atol=1e-6)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def moe_pass(moe, x, autocast):
    """Output, routing and gradients of one forward and backward, under bfloat16 autocast or not."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    routing = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = moe(x, routing)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * probe).sum().backward()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    return y.detach().float(), routing[moe].choice, routing[moe].scores, x.grad.float(), grads


@pytest.mark.parametrize("kernel", ["grouped_mm", "per-expert loop"])
@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
def test_moe_under_bf16_autocast_matches_float32(kernel, activations, monkeypatch):
    """CUDA's dtypes on the CPU: float32 weights, bfloat16 autocast, float32 or bfloat16 activations.
    Output and gradients agree with float32 to bfloat16 precision; routing is float32 and identical."""
    if kernel == "per-expert loop":  # what CUDA runs for float32 inputs and where F.grouped_mm is missing
        monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    cfg = config_for_size(2)
    moe = DeepSeekV3(cfg).init_weights(0).moe_layers()[0]
    x = torch.randn(96, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(activations)
    y16, choice16, scores16, dx16, grads16 = moe_pass(moe, x, autocast=True)
    y32, choice32, scores32, dx32, grads32 = moe_pass(moe, x.float(), autocast=False)
    assert scores16.dtype == torch.float32 and torch.equal(scores16, scores32) and torch.equal(choice16, choice32)
    assert rel_err(y16, y32) < 2e-2 and rel_err(dx16, dx32) < 2e-2
    for name, g in grads32.items():
        assert grads16[name].dtype == torch.float32 and rel_err(grads16[name], g) < 2e-2, name


def test_router_bias_changes_selection_not_weights():
    cfg = config_for_size(2)
    model = DeepSeekV3(cfg).init_weights(0)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size)
    w0, e0, s0 = gate(x)
    gate.e_score_correction_bias[3] = 10.0  # expert 3 must now be picked by every token
    w1, e1, s1 = gate(x)
    assert (e1 == 3).any(dim=1).all() and not (e0 == 3).any(dim=1).all()
    torch.testing.assert_close(s0, s1)  # scores, and so the weights of any chosen expert, ignore the bias
    chosen = torch.gather(s1, 1, e1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_mtp_loss_trains_every_module():
    cfg = config_for_size(2)
    cfg.num_nextn_predict_layers = 2
    model = DeepSeekV3(cfg).init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    total, main, mtp = model(ids[:, :-1], targets=ids[:, 1:], mtp_weight=0.3)
    assert len(mtp) == 2
    torch.testing.assert_close(total, main + 0.3 * (mtp[0] + mtp[1]) / 2)
    total.backward()
    for k in range(2):
        assert model.mtp[k].eh_proj.weight.grad.abs().sum() > 0
    main_only = model(ids[:, :-1], targets=ids[:, 1:], mtp_weight=0.0)
    assert main_only[2] == [] and torch.equal(main_only[0], main_only[1])


def test_context_limit_is_a_clear_error():
    cfg = config_for_size(2)
    cfg.max_position_embeddings = 16
    model = DeepSeekV3(cfg).init_weights(0)
    with pytest.raises(ValueError, match="context of 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_size_dial_spans_test_to_1b():
    def counts(size):
        cfg = config_for_size(size)
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
        return param_counts(model), cfg

    (total, active), cfg = counts(2)
    assert total < 1_000_000 and active < total
    (total, _), _ = counts(6)
    assert 5e6 <= total <= 20e6
    (total, _), _ = counts(10)
    assert 100e6 <= total <= 150e6
    (total, active), cfg = counts(18)
    assert 0.7e9 <= total <= 1.5e9 and active < total / 2
    assert kv_bytes_per_token(cfg, 2) == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    with pytest.raises(ValueError, match="--size"):
        config_for_size(0)


@pytest.mark.parametrize("seed", range(3))
def test_packed_row_equals_each_document_alone(seed):
    """Documents packed in one row (block-diagonal attention, positions restarting) give each document's own
    logits, and the packed loss is the loss of the documents run one by one."""
    cfg = random_config(seed)
    cfg.num_nextn_predict_layers = 1
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg).init_weights(seed).eval()
    randomize_router_bias(model, seed)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (7, 12, 5)]
    row = torch.cat(docs + [torch.zeros(4, dtype=torch.long)])[None]  # 4 tokens of padding at the end
    ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((4,), -1)])[None]
    with torch.no_grad():
        packed = model(row, document_ids=ids)[0]
        alone = [model(d[None])[0] for d in docs]
    at = 0
    for d, logits in zip(docs, alone):
        assert rel_err(packed[at : at + len(d)], logits) < 1e-5
        at += len(d)
    targets = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs] + [torch.full((4,), -100)])[None]
    with torch.no_grad():
        _, _, (mtp_packed,) = model(row, targets=targets, document_ids=ids, mtp_weight=1.0)
        total, count = 0.0, 0
        for d in docs:  # MTP depth 1 predicts token t + 2 from inside the same document only
            _, _, (mtp,) = model(d[None], targets=torch.cat([d[1:], torch.tensor([-100])])[None], mtp_weight=1.0)
            total, count = total + float(mtp) * (len(d) - 2), count + len(d) - 2
    assert abs(float(mtp_packed) - total / count) < 1e-5


def test_loss_in_chunks_equals_the_whole(monkeypatch):
    """With the logits made a few tokens at a time (and again in the backward) the losses and the gradient are
    those of the whole (tokens x vocab) at once, with documents packed, ignored targets and MTP on."""
    import nanoseek.model

    torch.manual_seed(0)
    model = DeepSeekV3(config_for_size(2, vocab_size=320)).init_weights(0).train()
    x, y = torch.randint(0, 320, (2, 24)), torch.randint(0, 320, (2, 24))
    y[:, :5] = -100
    docs = (torch.arange(24) >= 10).long().expand(2, 24)
    results = []
    for elements in (nanoseek.model.LOGIT_ELEMENTS, 320 * 7):  # whole, then 7 tokens per chunk
        monkeypatch.setattr(nanoseek.model, "LOGIT_ELEMENTS", elements)
        model.zero_grad()
        loss, main, mtp = model(x, targets=y, mtp_weight=0.3, document_ids=docs)
        loss.backward()
        losses = [float(v.detach()) for v in (main, *mtp)]
        results.append((losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (losses, grads), (losses_chunked, grads_chunked) = results
    assert losses_chunked == pytest.approx(losses, rel=1e-5) and len(losses) == 2
    for a, b in zip(grads_chunked, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_training_forward_has_no_graph_breaks():
    """torch.compile sees one training forward of a MoE model (packed documents, MTP, the loss) as one graph in
    bf16, the dtype of the GPU path: routing counts without host syncs, grouped_mm traced. (fp32 keeps an eager
    grouped_mm: the traced kernel takes bf16 only.)"""
    import torch._dynamo

    torch._dynamo.reset()
    model = DeepSeekV3(config_for_size(2, vocab_size=320)).init_weights(0).train()
    x, docs = torch.randint(0, 320, (2, 32)), (torch.arange(32) // 10).expand(2, 32)

    def step(x, docs):
        routing = {}  # as the trainer passes it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, targets=x, mtp_weight=0.3, document_ids=docs, routing=routing)[0]
        return loss, [r.load for r in routing.values()]

    explained = torch._dynamo.explain(step)(x, docs)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
