"""Checkpoints: every file a model is loaded from or saved to, in our layout and in the official one, both ways.

Ours (train.py --out RUN): RUN/step-N/ holds model.safetensors (what trained, and what no base file holds: a LoRA
run on pretrained weights saves its adapter), optim.safetensors, state.json (config, Train options, history, "base":
the files the rest comes from) and the tokenizers (tokenizer.model, added_tokens.json, vocab.txt); RUN/latest names
the newest step.
Official (E.T. Chat stage-2/3 and D²VLM, merged Hugging Face folders): config.json (`model_type: etchat_phi3`), the
weights sharded with model.safetensors.index.json in HF Phi-3 and LAVIS names, tokenizer.model + added_tokens.json;
or peft's adapter layout (adapter_model.safetensors, + pytorch_model.safetensors) on top of such a folder.
Safetensors only (nothing is unpickled), read tensor by tensor into the allocated parameters; every file is written
under a temporary name and renamed, so a reader never sees half of one.
"""
import json
import os
import shutil
import warnings
from dataclasses import asdict, replace

import torch
from safetensors import safe_open

from nanod2vlm.files import InputError, read_json, write_atomic
from nanod2vlm.model import CONFIGS, Config, D2VLM, LoRALinear, Phi3, add_lora, is_adapter
from nanod2vlm.tokenizer import Tokenizer, WordPiece


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and what is wrong (a
    JSON file of one that cannot be read: files.read_json's InputError)."""


def load_model(path, dev="cpu", bert_vocab="", base="", cfg=None):
    """A run of ours (its latest step), a step folder, an official merged folder, or an official adapter folder on
    `base` (default: the folder its adapter_config.json names) -> (model, tokenizer, WordPiece, state). An official
    folder brings its tokenizer and Phi-3 config.json; the BERT vocabulary comes from `bert_vocab` (the official code
    downloads bert-base-uncased) and the other sizes from cfg (default: the full preset, no LoRA)."""
    path = latest(path)
    if os.path.exists(os.path.join(path, "state.json")):
        return _load_run(path, dev)
    if adapter := os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        peft = read_json(os.path.join(path, "adapter_config.json"), "adapter config")
        base = base or peft.get("base_model_name_or_path") or ""
        if not os.path.isdir(base):
            raise CheckpointError(f"{path}: an adapter whose base {base!r} is not a folder here; give --base "
                                  "PATH (the merged E.T. Chat / D²VLM folder it was trained on)")
    folder = base if adapter else path
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{path}: not a checkpoint: no state.json (a nanod2vlm run), config.json (an official "
                              "merged folder) or adapter_model.safetensors (an official adapter)")
    if not os.path.isfile(bert_vocab):
        raise CheckpointError(f"{path}: an official checkpoint needs bert-base-uncased's vocab.txt for the Q-Former's "
                              f"question text: give --bert_vocab PATH/vocab.txt (got {bert_vocab!r})")
    hf = read_json(os.path.join(folder, "config.json"), "config file")
    if hf.get("model_type") != "etchat_phi3":
        raise CheckpointError(f"{folder}/config.json: model_type {hf.get('model_type')!r}, not 'etchat_phi3' (an E.T. "
                              "Chat / D²VLM folder); a plain Phi-3 folder goes to train.py --hf_llm")
    # Phi-3's sizes from config.json; the rest from cfg, else from the config an export of ours recorded, else the
    # full preset without LoRA; the special ids from the tokenizer
    cfg = cfg or (_config(hf["nanod2vlm"]) if "nanod2vlm" in hf else replace(CONFIGS["full"], lora_r=0))
    tok_dir = path if os.path.exists(os.path.join(path, "tokenizer.model")) else folder
    tok = Tokenizer.phi3(tok_dir)
    if not _knows_evi(tok_dir):
        warnings.warn(f"{tok_dir}: an E.T. Chat tokenizer (no <evi>): evi_head and frm_head start fresh, untrained")
    cfg = replace(cfg, **phi3_fields(folder), **{k: getattr(tok, k) for k in TOKEN_IDS})
    if adapter:
        cfg = replace(cfg, lora_r=peft["r"], lora_alpha=float(peft["lora_alpha"]),
                      lora_targets=tuple(peft["target_modules"]), lora_dropout=peft.get("lora_dropout", 0.0))
    model = build_d2vlm(cfg, official=folder)
    if adapter:  # the LoRA matrices must all be there; anything else the files hold replaces the base's
        files = [os.path.join(path, f) for f in ("adapter_model.safetensors", "pytorch_model.safetensors")]
        sd = model.state_dict()
        _load_tensors(sd, [f for f in files if os.path.exists(f)], etchat_rename, tuple(k for k in sd if "lora_" not in k))
    return model.to(dev).eval(), tok, WordPiece(bert_vocab), dict(base=dict(official=folder))


def _load_run(path, dev):
    try:
        state = json.load(open(os.path.join(path, "state.json")))
        cfg = _config(state["config"])
        tok = Tokenizer(open(os.path.join(path, "tokenizer.model"), "rb").read(),
                        json.load(open(os.path.join(path, "added_tokens.json"))))
        wp = WordPiece(os.path.join(path, "vocab.txt"))
        base = dict(state["base"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a nanod2vlm checkpoint ({e}); train one with `python train.py`") from None
    model = build_d2vlm(cfg, **base)
    frozen = tuple(k for k in model.state_dict() if _in_base(base, k) and not is_adapter(k))  # the base files hold them
    load_safetensors_into(model, os.path.join(path, "model.safetensors"), missing_ok=frozen)
    return model.to(dev).eval(), tok, wp, state


def _in_base(base, key):
    """Whether the files that state["base"] names hold `key` (an official folder: all; --hf_llm: the decoder; --eva:
    the ViT). A checkpoint stores the rest and what trained."""
    return bool(base.get("official") or base.get("hf_llm") and key.startswith("llm.")
                or base.get("eva") and key.startswith("visual."))


def _knows_evi(folder):
    """D²VLM's tokenizer files name <evi> (added for its training); E.T. Chat's do not."""
    files = [os.path.join(folder, f) for f in ("added_tokens.json", "tokenizer_config.json")]
    return any("<evi>" in open(f, encoding="utf-8").read() for f in files if os.path.exists(f))


TOKEN_IDS = ("image_id", "evi_id", "evi_end_id", "end_id")  # the Config fields that name a tokenizer's special ids


def _config(d):
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_d2vlm(cfg, hf_llm="", eva="", official=""):
    """D2VLM(cfg) with pretrained weights where paths are given: an HF Phi-3 folder and EVA-CLIP ViT-G safetensors,
    or an official merged folder; then LoRA on the decoder if cfg asks for it. An E.T. Chat folder (its tokenizer
    files do not know <evi>) has no evi_head / frm_head: they start fresh, as the released SFT starts them."""
    model = D2VLM(cfg)
    if hf_llm:
        load_phi3(hf_llm, cfg, into=model.llm)
    if eva:
        load_safetensors_into(model.visual, eva, rename=eva_rename(cfg))
    if official:
        fresh = () if _knows_evi(official) else ("evi_head", "frm_head")
        load_safetensors_into(model, official, etchat_rename, missing_ok=fresh)  # before LoRA: no lora_ keys yet
    if cfg.lora_r:
        add_lora(model.llm, cfg)
    return model


# ---------------------------------------------------------------------------------------------------------
# Phi-3 from a Hugging Face folder (and the Phi-3 part of an official one)

PHI3 = dict(vocab_size="vocab_size", n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
            n_mlp="intermediate_size", rms_eps="rms_norm_eps", max_pos="max_position_embeddings")  # ours: config.json's


def phi3_fields(folder):
    """The Config fields of a Phi-3 config.json. A field our decoder does not implement is refused. Not applied:
    `sliding_window` (2047 in Phi-3-mini), as in the released model, whose eager attention ignores it."""
    hf = read_json(os.path.join(folder, "config.json"), "config file")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # transformers prefers the latter
    implemented = {"rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
                   "partial_rotary_factor": (rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)), 1.0),
                   "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
                   "num_key_value_heads": (hf.get("num_key_value_heads", hf.get("num_attention_heads")),
                                           hf.get("num_attention_heads"))}
    if bad := [f"{k} {got!r} (implemented: {want!r})" for k, (got, want) in implemented.items() if got != want]:
        raise CheckpointError(f"{folder}/config.json: not supported: {'; '.join(bad)}; use Phi-3-mini-4k-instruct")
    if missing := [k for k in PHI3.values() if k not in hf]:
        raise CheckpointError(f"{folder}/config.json: no {', '.join(missing)}: not a Phi-3 config")
    return dict({ours: hf[k] for ours, k in PHI3.items()}, rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e4)))


def load_phi3(hf_dir, cfg=None, into=None):
    """An HF Phi-3 folder (config.json + safetensors) -> Phi3, or its weights into `into` (D2VLM's llm). cfg, if
    given, must agree with config.json. synth.py --llm, bench.py and build_d2vlm load Phi-3 this way."""
    found = phi3_fields(hf_dir)
    if bad := [f"{k}: config.json {v}, cfg {getattr(cfg, k)}" for k, v in found.items() if cfg and v != getattr(cfg, k)]:
        raise CheckpointError(f"{hf_dir}/config.json does not match cfg: " + "; ".join(bad))
    if into is None:
        with torch.device("meta"):
            into = Phi3(replace(cfg or Config(), **found))
        into = into.to_empty(device="cpu")  # allocated once, uninitialised: every weight comes from the files
    load_safetensors_into(into, hf_dir)
    return into


# ---------------------------------------------------------------------------------------------------------
# Official names: E.T. Chat's merged checkpoints (`ETChatPhi3ForCausalLM`), whose names D²VLM's keep

def eva_rename(cfg):
    """Key filter for an EVA-CLIP ViT-G checkpoint (timm `Eva` or LAVIS `eva_vit_g` keys, converted to
    safetensors): keep blocks < cfg.vit_layers and drop the final norm / fc_norm / head, so the 40-block
    checkpoint gives the 39-block tower. Use: load_safetensors_into(vit, path, rename=eva_rename(cfg))."""
    def rename(k):
        head = k.split(".")[0] in ("norm", "fc_norm", "head")
        deep = k.startswith("blocks.") and int(k.split(".")[1]) >= cfg.vit_layers
        return None if head or deep else k
    return rename


# Official names and ours, both ways from one table: the first prefix that fits is swapped (Phi-3's HF names sit
# under `llm.`), then, inside the Q-Former's BERT, the LAVIS spellings of the HF names that ours follow.
PREFIXES = (("model.vision_tower.vision_tower.", "visual."), ("model.qformer_bert.bert.", "compressor.qformer_bert."),
            ("model.qformer_", "compressor.qformer_"), ("frm_head.", "frm_head."), ("evi_head.", "evi_head."),
            ("", "llm."))
BERT_NAMES = (("attention.self.", "attention.attention."), ("embeddings.LayerNorm", "embeddings.layernorm"))


def official_name(key, inverse=False):
    """Our D2VLM key -> the official merged checkpoint's (inverse: the official key -> ours)."""
    a, b = (0, 1) if inverse else (1, 0)
    old, new = next((p[a], p[b]) for p in PREFIXES if key.startswith(p[a]))
    key = new + key.removeprefix(old)
    for pair in BERT_NAMES if "qformer_bert." in key else ():
        key = key.replace(pair[a], pair[b])
    return key


def etchat_rename(key):
    """Official E.T. Chat / D²VLM key (peft's `base_model.model.` names too) -> our D2VLM key, or None to drop it: the
    BERT LM head, position_ids, and E.T. Chat's `vid_head` (its <vid> matching head). The ViT sits at
    `model.vision_tower.vision_tower.` (LAVIS names, 39 blocks), the Q-Former at `model.qformer_*`."""
    key = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
    if "qformer_bert.cls." in key or key.endswith("embeddings.position_ids") or key.startswith("vid_head."):
        return None
    return official_name(key, inverse=True)


def export(model, tok, wp, out, base="", shard_bytes=4 << 30):
    """Write `model` (LoRA merged in) in the official merged layout, so the official scripts can evaluate it:
    model-0000K-of-0000N.safetensors + model.safetensors.index.json in official names (position_ids included),
    config.json (`model_type: etchat_phi3`; our Config under "nanod2vlm"), the tokenizers; the base folder's other
    tokenizer and generation settings are copied along."""
    state = model.state_dict()
    state.update({f"{name}.weight": m.merged().detach() for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    state = {official_name(k): v for k, v in state.items() if "lora_" not in k}
    state["model.qformer_bert.bert.embeddings.position_ids"] = torch.arange(model.cfg.qf_max_pos)[None]
    shards = [[]]  # the names in order, a new shard where one would pass shard_bytes
    for k, v in state.items():
        if shards[-1] and sum(state[x].nbytes for x in shards[-1]) + v.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(k)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_atomic(os.path.join(out, name), {k: state[k] for k in shard})
        weight_map.update(dict.fromkeys(shard, name))
    index = dict(metadata=dict(total_size=sum(v.nbytes for v in state.values())), weight_map=weight_map)
    write_atomic(os.path.join(out, "model.safetensors.index.json"), json.dumps(index, indent=1))
    cfg = replace(model.cfg, lora_r=0)
    hf = read_json(os.path.join(base, "config.json"), "config file") if base else dict(architectures=["ETChatPhi3ForCausalLM"])
    hf.update({k: getattr(cfg, ours) for ours, k in PHI3.items()}, model_type="etchat_phi3", hidden_act="silu",
              rope_theta=cfg.rope_theta, num_key_value_heads=cfg.n_head, tie_word_embeddings=False, nanod2vlm=asdict(cfg))
    write_atomic(os.path.join(out, "config.json"), json.dumps(hf, indent=1))
    for f in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if base and os.path.exists(os.path.join(base, f)):
            write_atomic(os.path.join(out, f), open(os.path.join(base, f), "rb").read())
    save_tokenizers(tok, wp, out)


# ---------------------------------------------------------------------------------------------------------
# Our run layout

def latest(path):
    """A run folder -> the step folder its `latest` names; any other path as it is."""
    f = os.path.join(path, "latest")
    return os.path.join(path, open(f).read().strip()) if os.path.isfile(f) else path


def save_checkpoint(out, model, opt, tok, wp, state):
    """Write {out}/step-N (weights, optimizer, tokenizers, state + config) under a temporary name, rename it, then
    point `latest` at it: a kill at any moment leaves the last good checkpoint intact. Keeps the last two."""
    final = os.path.join(out, f"step-{state['step']:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in model.state_dict().items() if k in trained or not _in_base(state["base"], k)}
    write_atomic(os.path.join(tmp, "model.safetensors"), weights)
    opt_state = {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    write_atomic(os.path.join(tmp, "optim.safetensors"), opt_state)
    save_tokenizers(tok, wp, tmp)
    write_atomic(os.path.join(tmp, "state.json"), json.dumps(dict(state, config=asdict(model.cfg))))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(os.path.join(out, "latest"), os.path.basename(final))
    for old in sorted(d for d in os.listdir(out) if d.startswith("step-") and d != os.path.basename(final))[:-1]:
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)


def save_tokenizers(tok, wp, folder):
    """The sentencepiece model, the special tokens' ids (added_tokens.json, as Hugging Face writes them) and the
    WordPiece vocab.txt: a checkpoint folder carries the tokenizers it was trained with."""
    write_atomic(os.path.join(folder, "tokenizer.model"), tok.proto)
    write_atomic(os.path.join(folder, "added_tokens.json"), json.dumps(tok.special, indent=1))
    write_atomic(os.path.join(folder, "vocab.txt"), "".join(w + "\n" for w in sorted(wp.vocab, key=wp.vocab.get)))


def load_optimizer(opt, path):
    """AdamW's state ({i}.step, {i}.exp_avg, {i}.exp_avg_sq of the i-th parameter), checked as weights are: a corrupt
    or foreign file fails here, naming itself, rather than inside the first opt.step()."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {f"{i}.{k}": torch.zeros(()) if k == "step" else torch.zeros_like(p) for i, p in enumerate(params)
             for k in ("step", "exp_avg", "exp_avg_sq")}
    sd = opt.state_dict()
    # any key may be absent ("" is in every name): a parameter that has had no gradient yet has no state
    for key in _load_tensors(state, [path], missing_ok=("",)):
        i, name = key.split(".")
        sd["state"].setdefault(int(i), {})[name] = state[key]
    opt.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------------------
# Tensors in and out

def load_safetensors_into(module, path, rename=None, missing_ok=("lora_A", "lora_B")):
    """Copy a checkpoint into module's parameters (cast to their dtype) and check it fits exactly.

    path: a .safetensors file, or an HF directory with model.safetensors or a sharded
    model.safetensors.index.json. rename(key) -> module key, or None to skip the tensor (for official
    E.T. Chat / timm names). Module keys containing one of `missing_ok` may be absent from the file."""
    files = [os.path.join(path, "model.safetensors") if os.path.isdir(path) else path]
    if os.path.isfile(index := os.path.join(path, "model.safetensors.index.json")):  # sharded
        files = [os.path.join(path, f) for f in sorted(set(read_json(index, "index file")["weight_map"].values()))]
    if not os.path.exists(files[0]):
        raise CheckpointError(f"{files[0]}: no such checkpoint (expected a .safetensors file or an HF directory "
                              "with model.safetensors or model.safetensors.index.json)")
    _load_tensors(module.state_dict(), files, rename, missing_ok)


def _load_tensors(targets, files, rename=None, missing_ok=()):
    """Copy the tensors of safetensors `files` (a later file replaces what an earlier one holds) into `targets` (name
    -> tensor), after checking from the headers alone that they fit exactly: a bad checkpoint fails before anything
    is overwritten. -> the names loaded."""
    plan = {}  # target name -> (file, its open handle, the file's key)
    unexpected = []
    shapes = []
    for f in files:
        try:
            sf = safe_open(f, framework="pt")
        except Exception as e:  # safetensors raises its own error type on a corrupt or foreign file
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        for key in sf.keys():
            name = rename(key) if rename else key
            if name is None:
                continue
            if name not in targets:
                unexpected.append(key)
                continue
            plan[name] = (f, sf, key)
            if (shape := tuple(sf.get_slice(key).get_shape())) != tuple(targets[name].shape):
                shapes.append(f"{name} (checkpoint {shape}, model {tuple(targets[name].shape)})")
    missing = [k for k in targets if k not in plan and not any(m in k for m in missing_ok)]
    if report := "".join(f"\n  {len(items)} {what}: " + ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
                         for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                             ("shape mismatches", shapes)) if items):
        raise CheckpointError(f"checkpoint {os.path.dirname(files[0]) if len(files) > 1 else files[0]} does not fit "
                              f"the model:{report}")
    with torch.no_grad():
        for name, (f, sf, key) in plan.items():
            x = sf.get_tensor(key)  # one tensor in RAM at a time
            if not torch.isfinite(x).all():  # garbage bytes under an intact header
                raise CheckpointError(f"{f}: {key} holds NaN or infinite values: a corrupt file")
            targets[name].copy_(x)
    return plan
