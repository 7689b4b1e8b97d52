"""Checkpoint I/O (nanod2vlm/checkpoint.py): exact safetensors loading with one clear error, atomic saves; Phi-3's
config.json read honestly; the official E.T. Chat / D²VLM layouts in (merged and adapter) and out (export), on tiny
checkpoints written by the fixture in exactly the official layout from real HF / timm / peft modules."""
import contextlib
import io
import json
import shutil

import peft
import pytest
import sentencepiece as spm
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import sample
import train
from nanod2vlm.checkpoint import (CheckpointError, etchat_rename, export, load_model, load_phi3, load_safetensors_into,
                                  official_name, phi3_fields)
from nanod2vlm.files import write_atomic
from nanod2vlm.data import read_annotations
from nanod2vlm.model import CONFIGS, D2VLM, Config, Phi3, build_mask, is_adapter
from nanod2vlm.tokenizer import PHI3_ADDED, Tokenizer, WordPiece

CFG = Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_mlp=128)


def model(seed):
    torch.manual_seed(seed)
    return Phi3(CFG)


# ---------------------------------------------------------------------------------------------------------
# safetensors in and out

def test_round_trip(tmp_path):
    src, dst = model(0), model(1)
    write_atomic(tmp_path / "ck.safetensors", src.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # the temporary file was renamed
    load_safetensors_into(dst, tmp_path / "ck.safetensors")
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n


def test_rename_and_skip(tmp_path):
    src, dst = model(0), model(1)
    state = {"llm." + k: v for k, v in src.state_dict().items()} | {"vision.extra": torch.zeros(3)}
    write_atomic(tmp_path / "ck.safetensors", state)
    load_safetensors_into(dst, tmp_path / "ck.safetensors",
                          rename=lambda k: k.removeprefix("llm.") if k.startswith("llm.") else None)
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)


def test_mismatch_names_keys_and_path(tmp_path):
    state = model(0).state_dict()
    state["model.norm.weight"] = torch.ones(65)  # wrong shape
    del state["lm_head.weight"]  # missing
    state["model.bogus"] = torch.zeros(2)  # unexpected
    path = tmp_path / "bad.safetensors"
    write_atomic(path, state)
    dst = model(1)
    before = dst.model.embed_tokens.weight.clone()
    with pytest.raises(CheckpointError) as e:
        load_safetensors_into(dst, path)
    msg = str(e.value)
    assert str(path) in msg
    assert "lm_head.weight" in msg and "model.bogus" in msg and "model.norm.weight" in msg and "(65,)" in msg
    assert torch.equal(dst.model.embed_tokens.weight, before)  # nothing was overwritten


def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        load_safetensors_into(model(0), path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_safetensors_into(model(0), tmp_path / "nothing_here")


# ---------------------------------------------------------------------------------------------------------
# loader honesty: Phi-3 config.json fields the decoder does not implement are refused

PHI3_JSON = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 rms_norm_eps=1e-5, max_position_embeddings=128, hidden_act="silu", sliding_window=2047)


@pytest.mark.parametrize("field, words", [
    (dict(rope_scaling={"type": "longrope"}), "rope type 'longrope'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5"),
    (dict(partial_rotary_factor=0.75), "partial_rotary_factor 0.75"),
    (dict(hidden_act="gelu_new"), "hidden_act 'gelu_new'"),
    (dict(num_key_value_heads=2), "num_key_value_heads 2"),
])
def test_unimplemented_phi3_fields_are_refused(tmp_path, field, words):
    (tmp_path / "config.json").write_text(json.dumps(PHI3_JSON | field))
    with pytest.raises(CheckpointError) as e:
        load_phi3(tmp_path)
    assert f"{tmp_path}/config.json: not supported: {words}" in str(e.value)


def test_rope_theta_is_read_where_transformers_reads_it(tmp_path):
    """transformers 5 writes rope_theta inside rope_parameters and prefers it there over a top-level value; our
    decoder then gives HF's logits (a wrong theta changes them)."""
    (tmp_path / "config.json").write_text(json.dumps(PHI3_JSON | dict(rope_theta=1e4, rope_parameters=dict(
        rope_type="default", rope_theta=5e5))))
    assert phi3_fields(tmp_path)["rope_theta"] == 5e5
    (tmp_path / "config.json").write_text(json.dumps(PHI3_JSON | dict(rope_theta=2e5)))  # Phi-3's own config.json
    assert phi3_fields(tmp_path)["rope_theta"] == 2e5
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **{k: v for k, v in PHI3_JSON.items() if k != "sliding_window"}, rope_parameters=dict(
            rope_type="default", rope_theta=5e5), pad_token_id=0, eos_token_id=2, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["rope_theta"] == 5e5
    ours = load_phi3(tmp_path / "hf").eval()
    ids = torch.randint(3, 100, (1, 40))
    with torch.no_grad():
        logits = ours.lm_head(ours(ours.model.embed_tokens(ids), torch.arange(40)[None], build_mask(torch.ones_like(ids) > 0))[0])
        ref = hf(ids).logits
    assert ours.cfg.rope_theta == 5e5 and torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()


# ---------------------------------------------------------------------------------------------------------
# official names -> ours, and back (facts from PolyU-ChenLab/ETBench etchat/model/*.py and nusnlp/d2vlm
# d2vlm/model/*.py)

OFFICIAL = {
    "model.embed_tokens.weight": "llm.model.embed_tokens.weight",
    "model.layers.31.self_attn.qkv_proj.weight": "llm.model.layers.31.self_attn.qkv_proj.weight",
    "model.layers.0.mlp.gate_up_proj.weight": "llm.model.layers.0.mlp.gate_up_proj.weight",
    "model.norm.weight": "llm.model.norm.weight",
    "lm_head.weight": "llm.lm_head.weight",
    "model.vision_tower.vision_tower.pos_embed": "visual.pos_embed",
    "model.vision_tower.vision_tower.patch_embed.proj.weight": "visual.patch_embed.proj.weight",
    "model.vision_tower.vision_tower.blocks.38.attn.q_bias": "visual.blocks.38.attn.q_bias",
    "model.qformer_bert.bert.embeddings.LayerNorm.weight": "compressor.qformer_bert.embeddings.layernorm.weight",
    "model.qformer_bert.bert.embeddings.word_embeddings.weight":
        "compressor.qformer_bert.embeddings.word_embeddings.weight",
    "model.qformer_bert.bert.encoder.layer.1.attention.self.query.weight":
        "compressor.qformer_bert.encoder.layer.1.attention.attention.query.weight",
    "model.qformer_bert.bert.encoder.layer.10.crossattention.self.key.weight":
        "compressor.qformer_bert.encoder.layer.10.crossattention.attention.key.weight",
    "model.qformer_bert.bert.encoder.layer.0.attention.output.LayerNorm.bias":
        "compressor.qformer_bert.encoder.layer.0.attention.output.LayerNorm.bias",
    "model.qformer_bert.bert.encoder.layer.11.output_query.dense.weight":
        "compressor.qformer_bert.encoder.layer.11.output_query.dense.weight",
    "model.qformer_query": "compressor.qformer_query",
    "model.qformer_ln.weight": "compressor.qformer_ln.weight",
    "model.qformer_proj.bias": "compressor.qformer_proj.bias",
    "model.qformer_v_proj.1.weight": "compressor.qformer_v_proj.1.weight",
    "evi_head.3.weight": "evi_head.3.weight",
    "frm_head.0.bias": "frm_head.0.bias",
    # dropped
    "model.qformer_bert.cls.predictions.decoder.weight": None,
    "model.qformer_bert.bert.embeddings.position_ids": None,
    "vid_head.1.weight": None,
}


def test_official_names_map_onto_the_full_model_and_back():
    with torch.device("meta"):
        keys = set(D2VLM(CONFIGS["full"]).state_dict())
    for official, ours in OFFICIAL.items():
        assert etchat_rename(official) == ours, official
        assert ours is None or ours in keys, ours
        assert ours is None or official_name(ours) == official, ours
    assert all(etchat_rename(official_name(k)) == k for k in keys)
    # peft's names of the adapter layout
    assert etchat_rename("base_model.model.model.layers.3.self_attn.o_proj.lora_B.weight") == \
        "llm.model.layers.3.self_attn.o_proj.lora_B"
    assert etchat_rename("base_model.model.lm_head.weight") == "llm.lm_head.weight"


# ---------------------------------------------------------------------------------------------------------
# <evi> = 32011 and </evi> = 32012 on Phi-3's real 32000-piece layout

def piece(text):
    """A serialized SentencePiece (piece = text, score 0, type USER_DEFINED), appended to a ModelProto's pieces."""
    body = b"\x0a" + bytes([len(text)]) + text.encode() + b"\x15\x00\x00\x00\x00\x18\x04"
    return b"\x0a" + bytes([len(body)]) + body


def llama_like(folder, texts, n_pieces=None):
    """A Llama-style sentencepiece tokenizer.model (BPE, byte fallback) in folder; padded to n_pieces pieces."""
    folder.mkdir(exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   normalization_rule_name="identity", num_threads=1, minloglevel=2)
    proto = (folder / "tokenizer.model").read_bytes()
    base = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    if n_pieces:
        proto += b"".join(piece(f"<pad{i}>") for i in range(n_pieces - base))
        (folder / "tokenizer.model").write_bytes(proto)
        base = n_pieces
    return base


def phi3_added(base):
    """Phi-3-mini-4k-instruct's added_tokens.json: its 11 added tokens at base + i."""
    return {s: base + i for i, s in enumerate(PHI3_ADDED)}


@pytest.mark.parametrize("folder", ["stage-2", "d2vlm"])
def test_evi_ids_on_phi3s_real_layout(tmp_path, folder):
    """Phi-3's 32000 pieces and its 11 added tokens at 32000-32010: E.T. Chat stage-2's added_tokens.json (no <evi>),
    or D²VLM's tokenizer_config.json as transformers 5 writes it (<unk> <s> </s> too, and <evi>, </evi>)."""
    assert llama_like(tmp_path, ["the red square appears", "a blue circle spins"] * 10, n_pieces=32000) == 32000
    added = phi3_added(32000)
    assert added["<|endoftext|>"] == 32000 and added["<|end|>"] == 32007 and added["<|user|>"] == 32010
    if folder == "stage-2":
        (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    else:
        added |= {"<unk>": 0, "<s>": 1, "</s>": 2, "<evi>": 32011, "</evi>": 32012}
        decoder = {str(i): dict(content=s, special=True) for s, i in added.items()}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(added_tokens_decoder=decoder)))
    tok = Tokenizer.phi3(tmp_path)
    assert (tok.evi_id, tok.evi_end_id) == (32011, 32012)  # Phi-3's spare rows, as in the released model
    assert tok.encode("<evi></evi><|end|><|user|>") == [32011, 32012, 32007, 32010]
    assert tok.end_id == 32007 and tok.pad_id == 32000 and tok.vocab_size <= 32064


# ---------------------------------------------------------------------------------------------------------
# a tiny official checkpoint, in exactly the official layout

H, V, W = 32, 16, 24  # Phi-3 hidden, ViT width, Q-Former width (all different: a transposed shape cannot fit)


def rand(state, seed):
    """The same keys with random values (fresh LayerNorm weights are all ones: a swapped pair would pass)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def write_official(folder, parts, added, n_shards=2):
    """Sharded safetensors + model.safetensors.index.json, config.json, tokenizer.model + added_tokens.json."""
    keys = list(parts)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = keys[i * len(keys) // n_shards:(i + 1) * len(keys) // n_shards]
        save_file({k: parts[k].contiguous() for k in shard}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    (folder / "added_tokens.json").write_text(json.dumps(added))


@pytest.fixture(scope="module")
def official(tiny_world, tmp_path_factory):
    """E.T. Chat stage-2 (no heads, no <evi> in its tokenizer) and D²VLM (both) folders, the bert vocab.txt, the
    tensors by our names, and the tiny model standing in for the full preset's ViT-G and BERT-base sizes."""
    d = tmp_path_factory.mktemp("official")
    texts = [c["value"].replace("<image>\n", "") for r in read_annotations(tiny_world / "world" / "train.json")
             for c in r["conversations"]]
    stage2, d2vlm = d / "ETChat-Phi3-Mini-Stage-2", d / "D2VLM"
    base = llama_like(stage2, [t.replace("</evi>", "").replace("<evi>", "") for t in texts])
    d2vlm.mkdir()
    (d2vlm / "tokenizer.model").write_bytes((stage2 / "tokenizer.model").read_bytes())
    wp = WordPiece.build(texts, str(d / "vocab.txt"))
    phi3 = transformers.Phi3Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=base + 20, max_position_embeddings=4096, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    llm = rand(transformers.Phi3ForCausalLM(phi3).state_dict(), 1)  # model.* and lm_head.weight
    eva = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, depth=1, embed_dim=V, num_heads=2,
                            img_size=28, num_classes=0)
    vit = rand({k: v for k, v in eva.state_dict().items() if not k.startswith("norm.")}, 2)  # LAVIS: no final norm
    qf = transformers.InstructBlipQFormerConfig(vocab_size=len(wp.vocab), hidden_size=W, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=40, encoder_hidden_size=V,
                                                cross_attention_frequency=2)
    bert = rand(transformers.InstructBlipQFormerModel(qf).state_dict(), 3)  # our names are HF's
    own = rand(dict(qformer_query=torch.zeros(1, 2, W), **{"qformer_ln.weight": torch.zeros(V),
               "qformer_ln.bias": torch.zeros(V), "qformer_proj.weight": torch.zeros(V, W), "qformer_proj.bias":
               torch.zeros(V)}, **{f"qformer_{p}_proj.{k}": torch.zeros(shape) for p, n_out in (("q", V), ("k", V),
               ("v", H)) for k, shape in (("0.weight", V), ("0.bias", V), ("1.weight", (n_out, V)), ("1.bias", n_out))}), 4)
    heads = rand({f"{h}.{k}": torch.zeros(shape) for h in ("evi_head", "frm_head") for k, shape in (
        ("0.weight", H), ("0.bias", H), ("1.weight", (H // 2, H)), ("1.bias", H // 2), ("3.weight", (H, H // 2)),
        ("3.bias", H))}, 5)
    # LAVIS names for the BERT part (BertLMHeadModel: .bert. and its LM head .cls.; .self.; embeddings.LayerNorm)
    lavis = {"model.qformer_bert.bert." + k.replace("attention.attention.", "attention.self.").replace(
        "embeddings.layernorm", "embeddings.LayerNorm"): v for k, v in bert.items()}
    lavis["model.qformer_bert.bert.embeddings.position_ids"] = torch.arange(512)[None]
    lavis |= rand({"model.qformer_bert.cls.predictions.bias": torch.zeros(len(wp.vocab)),
                   "model.qformer_bert.cls.predictions.transform.dense.weight": torch.zeros(W, W),
                   "model.qformer_bert.cls.predictions.decoder.weight": torch.zeros(len(wp.vocab), W)}, 6)
    files = llm | {"model.vision_tower.vision_tower." + k: v for k, v in vit.items()} | lavis | \
        {"model." + k: v for k, v in own.items()}
    ours = {"llm." + k: v for k, v in llm.items()} | {"visual." + k: v for k, v in vit.items()} | \
        {"compressor.qformer_bert." + k: v for k, v in bert.items()} | {"compressor." + k: v for k, v in own.items()}
    hf = phi3.to_dict() | dict(model_type="etchat_phi3", architectures=["ETChatPhi3ForCausalLM"])
    for folder in stage2, d2vlm:
        (folder / "config.json").write_text(json.dumps(hf))
    write_official(stage2, files, phi3_added(base))
    write_official(d2vlm, files | heads, phi3_added(base) | {"<evi>": base + 11, "</evi>": base + 12})
    tiny = Config(img_size=28, patch=14, vit_width=V, vit_layers=1, vit_heads=2, vit_mlp=eva.blocks[0].mlp.fc1.out_features,
                  qf_width=W, qf_layers=2, qf_heads=2, qf_mlp=40, qf_queries=2, qf_vocab=len(wp.vocab), lora_r=4,
                  lora_alpha=8.0, lora_dropout=0.05)
    return dict(stage2=stage2, d2vlm=d2vlm, vocab=d / "vocab.txt", ours=ours, heads=heads, base=base, tiny=tiny,
                world=tiny_world / "world", dir=d)


@pytest.fixture
def full_is_tiny(official, monkeypatch):
    """The full preset's ViT-G / BERT-base sizes replaced by the fixture's (Phi-3's come from config.json)."""
    monkeypatch.setitem(CONFIGS, "full", official["tiny"])


def test_the_d2vlm_folder_loads_exactly(official, full_is_tiny):
    model, tok, wp, state = load_model(str(official["d2vlm"]), bert_vocab=str(official["vocab"]))
    want = official["ours"] | official["heads"]
    got = model.state_dict()
    assert sorted(got) == sorted(want)  # every parameter came from the files (no LoRA: merged weights)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    base = official["base"]
    assert (tok.evi_id, tok.evi_end_id, tok.end_id) == (base + 11, base + 12, base + 7)
    assert (model.cfg.evi_id, model.cfg.n_embd, model.cfg.vocab_size, model.cfg.lora_r) == (base + 11, H, base + 20, 0)
    assert state == dict(base=dict(official=str(official["d2vlm"])))


def ask(capsys, official, ckpt, *more):
    video = official["world"] / "videos" / "test_0000.mp4"
    sample.main([str(video), "When does the red square appear?", "--ckpt", str(ckpt), "--json", "--max-new-tokens=6",
                 *map(str, more)])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("folder", ["d2vlm", "stage2"])
def test_sample_answers_from_an_official_folder(official, full_is_tiny, capsys, folder):
    """`python sample.py video "question" --ckpt FOLDER --bert_vocab vocab.txt`; a stage-2 folder's heads are fresh."""
    if folder == "stage2":
        with pytest.warns(UserWarning, match="evi_head and frm_head start fresh"):
            r = ask(capsys, official, official[folder], "--bert_vocab", official["vocab"])
    else:
        r = ask(capsys, official, official[folder], "--bert_vocab", official["vocab"])
    assert 10 <= r["frames"] <= 15 and isinstance(r["text"], str) and len(r["raw"]) > 0
    with pytest.raises(SystemExit) as e:
        ask(capsys, official, official[folder])
    assert e.value.code.startswith("error: ") and "give --bert_vocab PATH/vocab.txt" in e.value.code


def test_a_d2vlm_folder_without_heads_is_an_error(official, full_is_tiny, tmp_path):
    """Heads may be missing only where the tokenizer shows an E.T. Chat folder; a D²VLM one must have them."""
    bad = tmp_path / "D2VLM-no-heads"
    shutil.copytree(official["stage2"], bad)
    (bad / "added_tokens.json").write_text((official["d2vlm"] / "added_tokens.json").read_text())
    with pytest.raises(CheckpointError, match="missing keys: evi_head.0.weight"):
        load_model(str(bad), bert_vocab=str(official["vocab"]))


def test_a_plain_phi3_folder_is_named_as_such(official, full_is_tiny, tmp_path):
    cfg = json.loads((official["d2vlm"] / "config.json").read_text()) | dict(model_type="phi3")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'phi3', not 'etchat_phi3'"):
        load_model(str(tmp_path), bert_vocab=str(official["vocab"]))


def test_the_adapter_layout_loads_on_its_base(official, full_is_tiny, tmp_path):
    """peft's adapter_model.safetensors (base_model.model.…lora_A.weight) + pytorch_model.safetensors (the heads) on the
    stage-2 folder: the LoRA matrices land in ours, and the decoder computes what peft's model computes."""
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config.from_dict(json.loads(
        (official["stage2"] / "config.json").read_text())))
    hf.load_state_dict({k.removeprefix("llm."): v for k, v in official["ours"].items() if k.startswith("llm.")})
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv_proj", "o_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # peft starts B at 0: make the adapter change something
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in saved
    save_file(official["heads"], adapter / "pytorch_model.safetensors")
    for f in ("tokenizer.model", "added_tokens.json"):  # D²VLM's tokenizer, with <evi>
        shutil.copy(official["d2vlm"] / f, adapter / f)
    with pytest.raises(CheckpointError, match="give --base PATH"):
        load_model(str(adapter), bert_vocab=str(official["vocab"]))
    model, tok, wp, state = load_model(str(adapter), bert_vocab=str(official["vocab"]), base=str(official["stage2"]))
    got = model.state_dict()
    assert torch.equal(got["llm.model.layers.1.self_attn.o_proj.lora_B"],
                       saved["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"])
    assert all(torch.equal(got[k], v) for k, v in official["heads"].items())
    assert model.cfg.lora_r == 4 and model.llm.model.layers[0].self_attn.qkv_proj.scale == 4.0
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        ours = model.llm.lm_head(model.llm(model.llm.model.embed_tokens(ids), torch.arange(12)[None], build_mask(ids > 0))[0])
        ref = lora.eval()(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


# ---------------------------------------------------------------------------------------------------------
# the released SFT start: train.py --config=full --init a stage-2 folder

# beside LoRA, what the released D²VLM trains, written out by name: the embedding and output layers, both heads, the
# compressor's own layers and the BERT self- and cross-attention (its embeddings and FFNs stay frozen)
RELEASED = ("llm.model.embed_tokens.", "llm.lm_head.", "evi_head.", "frm_head.", "compressor.qformer_query",
            "compressor.qformer_ln.", "compressor.qformer_proj.", "compressor.qformer_q_proj.",
            "compressor.qformer_k_proj.", "compressor.qformer_v_proj.")


def released(name):
    if name.endswith(("lora_A", "lora_B")) or name.startswith(RELEASED):
        return True
    return name.startswith("compressor.qformer_bert.encoder.layer.") and name.split(".")[5] in ("attention",
                                                                                                "crossattention")

def et_instruct(official):
    """The world's training records in the released annotation form (flat `tgt` seconds, `task`), plus one video
    longer than 350 s and one answer over 200 words, which the released filters drop."""
    records = json.loads((official["world"] / "train.json").read_text())
    out = [dict({k: v for k, v in r.items() if k != "time_gt"}, tgt=[x for s in r["time_gt"]["evidence_grounding"]
                                                                     for x in s]) for r in records]
    long_answer = "<evi> </evi> " + "word " * 200 + "in <evi>."
    out.append(dict(out[0], duration=400.0))
    out.append(dict(out[0], tgt=[1, 3], conversations=[out[0]["conversations"][0], {"from": "gpt", "value": long_answer}]))
    path = official["world"] / "et_instruct.json"  # videos are relative to it
    path.write_text(json.dumps(out))
    return path, len(out)


@pytest.fixture(scope="module")
def stage2_run(official):
    """`python train.py --config=full --init .../ETChat-Phi3-Mini-Stage-2 --bert_vocab ... --train_json ...`, 2 steps."""
    train_json, n = et_instruct(official)
    out = official["dir"] / "sft-from-stage2"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setitem(CONFIGS, "full", official["tiny"])
        train.main(["--config=full", "--init", str(official["stage2"]), "--bert_vocab", str(official["vocab"]),
                    f"--train_json={train_json}", f"--data={official['world']}", f"--out={out}", "--steps=2",
                    "--eval_json=none"])
    return out, n, printed.getvalue()


def test_full_sft_starts_from_stage2_the_released_way(official, full_is_tiny, stage2_run):
    out, n, printed = stage2_run
    assert f"2 of {n} records dropped" in printed
    step = out / "step-000002"
    state = json.loads((step / "state.json").read_text())
    t = state["train"]
    assert (t["soft_alpha"], t["w_gnd"], t["w_cons"], t["lr"], t["lora_lr"], t["beta2"], t["warmup"]) == \
        (2.0, 10.0, 10.0, 2e-5, 5e-5, 0.999, 0.03)
    assert (t["min_duration"], t["max_duration"], t["max_words"], t["batch_size"]) == (5.0, 350.0, 200, 1)
    assert state["base"] == dict(official=str(official["stage2"])) and state["config"]["lora_r"] == 4
    saved = load_file(step / "model.safetensors")
    model, *_ = load_model(str(out))
    names = [n for n, _ in model.named_parameters()]
    assert sorted(saved) == sorted(n for n in names if released(n))  # what trained: LoRA + the released set
    assert sorted(saved) == sorted(n for n in names if is_adapter(n))
    bert = [n for n in names if n.startswith("compressor.qformer_bert.")]
    assert not {n for n in bert if ".embeddings." in n or ".intermediate" in n or ".output_query." in n} & set(saved)
    assert "compressor.qformer_bert.encoder.layer.0.crossattention.attention.key.weight" in saved
    assert "compressor.qformer_bert.encoder.layer.0.output.dense.weight" not in saved  # the FFN's output
    got = model.state_dict()
    for k, v in official["ours"].items():  # the frozen rest is stage-2's, bit for bit
        assert k in saved or torch.equal(got[k], v), k
    for k in ("compressor.qformer_v_proj.1.weight", "compressor.qformer_bert.encoder.layer.1.attention.attention."
              "query.weight", "compressor.qformer_query", "llm.lm_head.weight"):
        assert not torch.equal(got[k], official["ours"][k]), k  # trained
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    assert not torch.equal(saved["llm.model.layers.0.self_attn.qkv_proj.lora_B"], torch.zeros(3 * H, 4))


def test_presets_apply_unless_the_flag_is_given():
    t, cfg, _ = train.parse(["--config=full"])
    assert all(getattr(t, k) == v for k, v in train.FULL.items()) and cfg.lora_r == 128
    t, _, _ = train.parse(["--config=full", "--lr=1e-3", "--max_words=0"])
    assert (t.lr, t.max_words, t.w_cons) == (1e-3, 0, 10.0)
    t, _, _ = train.parse([])
    assert (t.soft_alpha, t.beta2, t.max_words, t.max_duration) == (0.0, 0.95, 0, float("inf"))  # nano: no filter


# ---------------------------------------------------------------------------------------------------------
# official layout out: export, then load back

def test_export_loads_back_with_identical_tensors(official, full_is_tiny, tmp_path):
    """A model of ours (random, every tensor distinct) exported in several shards and loaded back: the same tensors, under
    the official names (LAVIS ones, position_ids included), with its config and tokenizers."""
    tok = Tokenizer.phi3(official["d2vlm"])
    wp = WordPiece(str(official["vocab"]))
    cfg = Config(n_embd=H, n_layer=2, n_head=2, n_mlp=64, vocab_size=official["base"] + 20, image_id=tok.image_id,
                 evi_id=tok.evi_id, evi_end_id=tok.evi_end_id, end_id=tok.end_id, qf_vocab=len(wp.vocab))
    torch.manual_seed(0)
    m = D2VLM(cfg)
    m.load_state_dict(rand(m.state_dict(), 7))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    export(m, tok, wp, str(tmp_path), shard_bytes=sum(v.nbytes for v in want.values()) // 3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    files = {k: v for f in set(index["weight_map"].values()) for k, v in load_file(tmp_path / f).items()}
    assert torch.equal(files["model.qformer_bert.bert.embeddings.position_ids"], torch.arange(512)[None])
    assert "model.qformer_bert.bert.encoder.layer.0.crossattention.self.key.weight" in files
    assert "model.qformer_bert.bert.embeddings.LayerNorm.weight" in files and "lm_head.weight" in files
    assert torch.equal(files["model.vision_tower.vision_tower.pos_embed"], want["visual.pos_embed"])
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "etchat_phi3"
    back, tok2, _, _ = load_model(str(tmp_path), bert_vocab=str(tmp_path / "vocab.txt"))
    assert back.cfg == cfg and tok2.encode("<evi> in </evi><|end|>") == tok.encode("<evi> in </evi><|end|>")
    got = back.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_export_of_a_lora_run_merges_it(official, full_is_tiny, stage2_run, capsys, tmp_path):
    """`python sample.py --ckpt RUN --export DIR` on the LoRA run from stage-2: the exported weights are W + (alpha/r)
    B A, the rest as trained; loaded back (no LoRA) it computes what the run computes."""
    run = stage2_run[0]
    model, *_ = load_model(str(run))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    sample.main(["--ckpt", str(run), "--export", str(tmp_path / "merged")])
    assert f"to {tmp_path / 'merged'} in the official merged layout" in capsys.readouterr().out
    hf = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf["architectures"] == ["ETChatPhi3ForCausalLM"] and hf["nanod2vlm"]["lora_r"] == 0  # stage-2's, updated
    back, *_ = load_model(str(tmp_path / "merged"), bert_vocab=str(official["vocab"]))
    got = back.state_dict()
    qkv = "llm.model.layers.1.self_attn.qkv_proj."
    assert torch.allclose(got[qkv + "weight"], want[qkv + "weight"] + 2.0 * want[qkv + "lora_B"] @ want[qkv + "lora_A"])
    assert not any("lora_" in k for k in got) and back.cfg.lora_r == 0
    for k in got:
        if "qkv_proj" not in k and "o_proj" not in k:
            assert torch.equal(got[k], want[k]), k
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        a, _ = model.llm(model.llm.model.embed_tokens(ids), torch.arange(12)[None], build_mask(ids > 0))
        b, _ = back.llm(back.llm.model.embed_tokens(ids), torch.arange(12)[None], build_mask(ids > 0))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()  # fp32 rounding of the merge
