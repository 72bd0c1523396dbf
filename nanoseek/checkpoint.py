"""Checkpoint directories that are Hugging Face model directories.

    ckpt/config.json  model.safetensors  generation_config.json  tokenizer.json  tokenizer_config.json
         nanoseek.json  trainer_state/

Writes go to a sibling directory that is fsynced and renamed into place, so a crash leaves either the
old checkpoint or the new one. Reads validate everything and never unpickle.
"""

import errno
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.model import Config, DeepSeekV3
from nanoseek.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HF_KEYS = {  # constant fields of config.json that every nanoseek checkpoint carries
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rope_interleave": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "num_key_value_heads": None,  # filled with num_attention_heads
    "moe_layer_freq": 1,
    "ep_size": 1,
    "use_cache": True,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and what to do."""


# ----------------------------------------------------------------------------- config


def config_to_json(cfg: Config) -> dict:
    d = {**cfg.extra, **HF_KEYS, **cfg.to_dict()}
    d["num_key_value_heads"] = cfg.num_attention_heads
    d["torch_dtype"] = "float32"
    return d


def config_from_json(d: dict, source="config.json") -> Config:
    if d.get("model_type") != "deepseek_v3":
        raise CheckpointError(
            f"{source}: model_type is {d.get('model_type')!r}, expected 'deepseek_v3'; "
            "this is not a DeepSeek-V3 checkpoint"
        )
    if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise CheckpointError(f"{source}: only scoring_func 'sigmoid' with topk_method 'noaux_tc' is supported")
    if d.get("rope_interleave", True) is not True or d.get("attention_bias", False):
        raise CheckpointError(f"{source}: only rope_interleave=true and attention_bias=false are supported")
    if d.get("tie_word_embeddings", False):
        raise CheckpointError(f"{source}: tie_word_embeddings must be false")
    fields = Config.__dataclass_fields__
    kwargs = {k: v for k, v in d.items() if k in fields and k != "extra"}
    rope = d.get("rope_parameters")  # the newer Hugging Face layout of rope_theta / rope_scaling
    if rope and "rope_scaling" not in d:
        kwargs.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = kwargs[key][0]
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in d]
    if missing:
        raise CheckpointError(f"{source}: missing required keys {missing}")
    dropped = {"rope_parameters", "torch_dtype", "dtype", "transformers_version"}
    kwargs["extra"] = {k: v for k, v in d.items() if k not in fields and k not in HF_KEYS and k not in dropped}
    return Config(**kwargs)


# ----------------------------------------------------------------------------- tensor names


def to_hf_state_dict(model: DeepSeekV3, state_dict=None) -> dict[str, torch.Tensor]:
    """Our parameters under the official names: per-expert tensors, MTP modules as extra layers."""
    n = model.config.num_hidden_layers
    out = {}
    for name, t in (state_dict or model.state_dict()).items():
        name = _mtp_to_hf(name, n)
        if name.endswith(".mlp.gate_up"):
            prefix, inter = name[: -len("gate_up")], t.shape[-1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.gate_proj.weight"] = t[e, :, :inter].T
                out[f"{prefix}experts.{e}.up_proj.weight"] = t[e, :, inter:].T
        elif name.endswith(".mlp.down"):
            prefix = name[: -len("down")]
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.down_proj.weight"] = t[e].T
        else:
            out[name] = t
    for name in out:
        out[name] = out[name].contiguous() if "e_score_correction_bias" not in name else out[name].float()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: Config, source: str) -> dict[str, torch.Tensor]:
    """Official names (per-expert, or Hugging Face's fused 3-D experts) -> our parameter names."""
    n, E = cfg.num_hidden_layers, cfg.n_routed_experts
    out, experts = {}, {}
    for name, t in sd.items():
        if t.numel() == 0:  # transformers saves an empty shared expert when n_shared_experts is 0
            continue
        m = re.match(r"(.*\.mlp\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        elif name.endswith(".mlp.experts.gate_up_proj"):  # (E, 2I, D)
            out[_mtp_from_hf(name[: -len("experts.gate_up_proj")], n) + "gate_up"] = t.transpose(1, 2)
        elif name.endswith(".mlp.experts.down_proj"):  # (E, D, I)
            out[_mtp_from_hf(name[: -len("experts.down_proj")], n) + "down"] = t.transpose(1, 2)
        else:
            out[_mtp_from_hf(name, n)] = t
    for prefix, parts in experts.items():
        try:
            gate_up = [torch.cat([parts[(e, "gate_proj")].T, parts[(e, "up_proj")].T], dim=1) for e in range(E)]
            down = [parts[(e, "down_proj")].T for e in range(E)]
        except KeyError as e:
            raise CheckpointError(f"{source}: {prefix}experts is missing expert tensor {e.args[0]}") from None
        if len(parts) != 3 * E:
            raise CheckpointError(f"{source}: {prefix}experts holds {len(parts) // 3} experts, config says {E}")
        out[_mtp_from_hf(prefix, n) + "gate_up"] = torch.stack(gate_up)
        out[_mtp_from_hf(prefix, n) + "down"] = torch.stack(down)
    return out


_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")


def _mtp_to_hf(name, n):
    m = re.match(r"mtp\.(\d+)\.(.*)$", name)
    if not m:
        return name
    rest = m.group(2)
    rest = rest[len("block.") :] if rest.startswith("block.") else rest
    return f"model.layers.{n + int(m.group(1))}.{rest}"


def _mtp_from_hf(name, n):
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
    if not m or int(m.group(1)) < n:
        return name
    k, rest = int(m.group(1)) - n, m.group(2)
    return f"mtp.{k}.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.{k}.block.{rest}"


# ----------------------------------------------------------------------------- save


def save(out_dir, model: DeepSeekV3, tokenizer: Tokenizer | None, meta: dict | None = None, trainer_state=None,
         state_dict=None):
    """Write a checkpoint directory atomically. trainer_state: {file name: tensors dict} for resume;
    state_dict: the model's full state when it is sharded (FSDP) and model.state_dict() holds only a shard."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_checkpoint(tmp, out_dir, model, tokenizer, meta, trainer_state, state_dict)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the device while writing {out_dir}; nothing was replaced, the previous "
                "checkpoint is intact: free some space and resume with --resume") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_checkpoint(tmp, out_dir, model, tokenizer, meta, trainer_state, state_dict):
    cfg = model.config
    _write_json(os.path.join(tmp, "config.json"), config_to_json(cfg))
    tensors = to_hf_state_dict(model, state_dict)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": [cfg.eos_token_id],
                  "pad_token_id": cfg.pad_token_id, "do_sample": False}
    _write_json(os.path.join(tmp, "generation_config.json"), generation)
    if tokenizer is not None:
        tokenizer.save(tmp, model_max_length=cfg.max_position_embeddings)
    _write_json(os.path.join(tmp, "nanoseek.json"), meta or {})
    if trainer_state:
        os.makedirs(os.path.join(tmp, "trainer_state"))
        for fname, tensors in trainer_state.items():
            save_file(tensors, os.path.join(tmp, "trainer_state", fname))
    fsync_tree(tmp)
    replace_dir(tmp, out_dir)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def fsync_tree(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(src, dst):
    """Move a finished directory to dst; an existing dst is set aside first and removed last."""
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rename(dst, os.path.join(old, "ckpt"))
    os.rename(src, dst)
    _fsync_dir(os.path.dirname(dst))
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def load_config(path) -> Config:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(
            f"{file} is missing: {path} is not a checkpoint directory (make one with `nanoseek init`)"
        )
    try:
        with open(file) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    try:
        return config_from_json(d, file)
    except TypeError as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (or its shards); pickled weights are refused."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        pickles = [f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(
                f"{path} holds pickled weights ({', '.join(pickles)}), which nanoseek refuses to load because "
                "unpickling can run arbitrary code; convert them to model.safetensors with a tool you trust"
            )
        raise CheckpointError(f"{single} is missing: the checkpoint has no weights")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} cannot be read ({e}); the weights are damaged or truncated") from None
    return tensors


def load_model(path, device="cpu") -> DeepSeekV3:
    cfg = load_config(path)
    tensors = read_tensors(path)
    n = cfg.num_hidden_layers
    layer_ids = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    saved_mtp = {i for i in layer_ids if i >= n}
    if saved_mtp != set(range(n, n + len(saved_mtp))):
        raise CheckpointError(f"{path}/model.safetensors: layer numbers {sorted(saved_mtp)} are not contiguous")
    if len(saved_mtp) != cfg.num_nextn_predict_layers:
        # Hugging Face saves no MTP weights but keeps the config field: trust the tensors.
        cfg.num_nextn_predict_layers = len(saved_mtp)
    model = DeepSeekV3(cfg)
    sd = from_hf_state_dict(tensors, cfg, f"{path}/model.safetensors")
    expected = model.state_dict()
    unknown = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd))
    if unknown or missing:
        raise CheckpointError(
            f"{path}/model.safetensors does not match config.json: "
            + (f"unknown tensors {_names(unknown)} " if unknown else "")
            + (f"missing tensors {_names(missing)}" if missing else "")
        )
    for name, t in sd.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}/model.safetensors: tensor {name} has shape {tuple(t.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()})
    return model.to(device).eval()


def _names(names, limit=5):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_meta(path) -> dict:
    file = os.path.join(path, "nanoseek.json")
    if not os.path.exists(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is damaged") from None


def load_trainer_state(path, name) -> dict[str, torch.Tensor]:
    """trainer_state/<name> of a checkpoint, as tensors; a damaged file is a CheckpointError naming it."""
    file = os.path.join(path, "trainer_state", name)
    if not os.path.exists(file):
        raise CheckpointError(f"{file} is missing: this checkpoint cannot be resumed")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}); the trainer state is damaged or truncated") from None


def load(path, device="cpu"):
    """(model, tokenizer) from a checkpoint directory; tokenizer is None when the directory has none."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory: pass a checkpoint directory made by nanoseek")
    model = load_model(path, device)
    tok = Tokenizer.load(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    if tok is not None and len(tok) > model.config.vocab_size:
        raise CheckpointError(
            f"{path}/tokenizer.json has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tok
