"""Checkpoint directories: what is written, and every way a broken one is refused."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import checkpoint
from nanoseek.checkpoint import CheckpointError
from nanoseek.cli import main as cli
from nanoseek.model import DeepSeekV3, config_for_size, trained_context


@pytest.fixture
def ckpt(tmp_path, tokenizer):
    cfg = config_for_size(2, vocab_size=448)
    model = DeepSeekV3(cfg).init_weights(0)
    return checkpoint.save(tmp_path / "ckpt", model, tokenizer, {"stage": "test", "step": 7}), model


def test_directory_layout_and_names(ckpt):
    path, model = ckpt
    assert sorted(os.listdir(path)) == sorted(["config.json", "model.safetensors", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json", "nanoseek.json"])
    cfg = json.load(open(os.path.join(path, "config.json")))
    for key, value in {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
                       "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True,
                       "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": 1}.items():
        assert cfg[key] == value
    tensors = load_file(os.path.join(path, "model.safetensors"))
    n = cfg["num_hidden_layers"]
    assert tensors["model.layers.1.mlp.experts.7.gate_proj.weight"].shape == (64, 128)
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_b_proj", "mlp.experts.0.up_proj"):
        assert f"model.layers.{n}.{name}.weight" in tensors
    assert json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"] == [1]
    assert json.load(open(os.path.join(path, "nanoseek.json")))["step"] == 7


def test_round_trip_is_exact(ckpt):
    path, model = ckpt
    loaded, tok = nanoseek.load(path)
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
    assert len(loaded.mtp) == 1 and tok.eos_id == 1


def test_missing_files(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(CheckpointError, match="not a directory"):
        nanoseek.load(tmp_path / "nowhere")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        nanoseek.load(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        nanoseek.load(path)


def test_the_trained_context_length_is_kept_and_read(ckpt, tmp_path):
    """config.json records it beside Hugging Face's keys (transformers loads it as an unused attribute); a
    checkpoint without it counts max_position_embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, model = ckpt
    assert trained_context(checkpoint.load_config(path)) == 2048  # never trained: the whole context
    model.config.trained_context_length = 256
    path = checkpoint.save(tmp_path / "trained", model, None)
    assert json.load(open(os.path.join(path, "config.json")))["trained_context_length"] == 256
    assert trained_context(nanoseek.load(path)[0].config) == 256
    assert AutoConfig.from_pretrained(path).trained_context_length == 256
    assert type(AutoModelForCausalLM.from_pretrained(path)).__name__ == "DeepseekV3ForCausalLM"
    file = os.path.join(path, "config.json")
    older = {k: v for k, v in json.load(open(file)).items() if k != "trained_context_length"}
    json.dump(older, open(file, "w"))
    assert trained_context(checkpoint.load_config(path)) == 2048
    json.dump({**older, "trained_context_length": 4096}, open(file, "w"))
    assert trained_context(checkpoint.load_config(path)) == 2048  # never more than the model has positions for


def test_wrong_model_type_and_bad_json(ckpt):
    path, _ = ckpt
    file = os.path.join(path, "config.json")
    cfg = json.load(open(file))
    json.dump({**cfg, "model_type": "llama"}, open(file, "w"))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        nanoseek.load(path)
    open(file, "w").write('{"model_type": "deepseek_v3",')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        nanoseek.load(path)


def _edit_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_shape_mismatch(ckpt):
    path, _ = ckpt
    _edit_tensors(path, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(3,\), config.json implies \(128,\)"):
        nanoseek.load(path)


def test_unknown_and_missing_tensors(ckpt):
    path, _ = ckpt
    _edit_tensors(path, lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match="unknown tensors model.extra.weight"):
        nanoseek.load(path)
    _edit_tensors(path, lambda t: (t.pop("model.extra.weight"), t.pop("lm_head.weight")))
    with pytest.raises(CheckpointError, match="missing tensors lm_head.weight"):
        nanoseek.load(path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.experts.3.down_proj.weight"))
    with pytest.raises(CheckpointError, match="missing expert tensor"):
        nanoseek.load(path)


def test_truncated_weights(ckpt):
    path, _ = ckpt
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        nanoseek.load(path)


def test_pickles_are_refused(ckpt):
    path, _ = ckpt
    os.remove(os.path.join(path, "model.safetensors"))

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(CheckpointError, match="refuses to load"):
        nanoseek.load(path)
    assert not os.path.exists("pwned")


def test_failed_save_leaves_previous_checkpoint_intact(ckpt, monkeypatch, tokenizer):
    path, model = ckpt
    before = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(CheckpointError, match="no space left on the device .* the previous checkpoint is intact"):
        checkpoint.save(path, model, tokenizer, {"step": 8})
    after = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    assert after == before
    assert os.listdir(os.path.dirname(path)) == ["ckpt"]  # no half-written sibling left behind


def test_save_over_existing_checkpoint(ckpt, tokenizer):
    path, model = ckpt
    checkpoint.save(path, model, tokenizer, {"step": 9})
    assert checkpoint.load_meta(path)["step"] == 9
    assert os.listdir(os.path.dirname(path)) == ["ckpt"]


def test_cli_init_and_info(tmp_path, capsys, tokenizer):
    tokenizer.save(tmp_path)
    assert cli(["init", "--size", "2", "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path), "--seed", "3"]) == 0
    assert cli(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "active per token" in out and "bytes/token" in out
    model, tok = nanoseek.load(tmp_path / "c")
    assert model.config.vocab_size == 448 and len(tok) == 400
    assert cli(["info", str(tmp_path / "missing")]) == 1
    assert "is not a checkpoint directory" in capsys.readouterr().err


def test_cli_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(50)))
    assert cli(["tokenizer", "--input", str(corpus), "--vocab-size", "270", "--out", str(tmp_path / "tok")]) == 0
    assert len(nanoseek.Tokenizer.load(tmp_path / "tok")) == 270
    corpus.write_text('{"txt": "wrong field"}\n')
    capsys.readouterr()
    assert cli(["tokenizer", "--input", str(corpus), "--out", str(tmp_path / "tok2")]) == 1
    assert 'c.jsonl:1: expected an object with "text"' in capsys.readouterr().err
