"""The full-scale path (--hf_llm, --eva, --bert_vocab, --lora_r) end to end on tiny checkpoints in the real formats:
an HF Phi3ForCausalLM folder with a sentencepiece tokenizer.model, a timm EVA (ViT-G family) in safetensors, a BERT
vocab.txt. Loading is exact, only LoRA and the named extras train, the checkpoint holds only those, and sample.py
rebuilds the same model from the recorded base paths. Also: the official E.T. Chat / D²VLM key map."""
import json
import math

import pytest
import sentencepiece as spm
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import sample
import train
from nanod2vlm.data import read_annotations, read_video
from nanod2vlm.model import CONFIGS, D2VLM, etchat_rename
from nanod2vlm.tokenizer import D2VLM_ADDED, PHI3_ADDED, WordPiece

EXTRA = ("evi_head", "frm_head", "compressor", "embed_tokens", "lm_head")  # what train.py trains beside LoRA
VIT_LAYERS = 1


@pytest.fixture(scope="module")
def ckpts(tiny_world):
    """Tiny HF Phi-3 (+ tokenizer.model), timm EVA with one block more than the model keeps, bert vocab.txt."""
    d = tiny_world
    texts = [c["value"].replace("<image>\n", "") for r in read_annotations(d / "world" / "train.json")
             for c in r["conversations"]]
    plain = [t.replace("</evi>", "").replace("<evi>", "") for t in texts]
    hf_dir = d / "phi3"
    hf_dir.mkdir()
    spm.SentencePieceTrainer.train(  # Llama-like: BPE, byte fallback, dummy prefix, <unk> <s> </s> = 0 1 2
        sentence_iterator=iter(plain), model_prefix=str(hf_dir / "tokenizer"), vocab_size=320, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    base = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model")).get_piece_size()
    vocab = base + len(PHI3_ADDED) + len(D2VLM_ADDED) + 3  # room for every added token, plus unused rows
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_scaling=None, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False))
    hf.save_pretrained(hf_dir)
    eva = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, depth=VIT_LAYERS + 1, embed_dim=16,
                            num_heads=2, img_size=28, num_classes=0)
    save_file(eva.state_dict(), d / "eva.safetensors")
    WordPiece.build(texts, str(d / "vocab.txt"))
    args = [f"--hf_llm={hf_dir}", f"--eva={d / 'eva.safetensors'}", f"--bert_vocab={d / 'vocab.txt'}",
            "--lora_r=4", "--lora_alpha=8", f"--vocab_size={vocab}", "--n_embd=32", "--n_layer=2", "--n_head=2",
            "--n_mlp=64", "--img_size=28", "--patch=14", "--vit_width=16", f"--vit_layers={VIT_LAYERS}",
            "--vit_heads=2", f"--vit_mlp={eva.blocks[0].mlp.fc1.out_features}", "--qf_width=16", "--qf_layers=1",
            "--qf_heads=2", "--qf_mlp=32", "--qf_queries=2"]
    return args, load_file(hf_dir / "model.safetensors"), load_file(d / "eva.safetensors")


@pytest.fixture(scope="module")
def run(tiny_world, ckpts):
    """train.py on the tiny world; the model is caught (by reference, and copied) when train.py marks what trains,
    i.e. after loading and add_lora, before the first step."""
    args, _, _ = ckpts
    seen = {}

    def spy(model, extra=()):
        train_mark(model, extra)
        seen.update(model=model, before={k: v.clone() for k, v in model.state_dict().items()}, extra=extra)
    train_mark, mp = train.mark_trainable, pytest.MonkeyPatch()
    mp.setattr(train, "mark_trainable", spy)
    try:
        out = tiny_world / "run"
        train.main([f"--data={tiny_world}/world", f"--out={out}", *args, "--steps=3", "--batch_size=2",
                    "--lr=1e-2", "--lora_lr=1e-2", "--eval_json=none", "--seed=0"])
    finally:
        mp.undo()
    return out, seen


def test_base_weights_load_exactly_from_the_checkpoints(ckpts, run):
    _, llm, eva = ckpts
    before = run[1]["before"]
    for k, v in llm.items():  # every HF tensor, under llm.
        assert torch.equal(before["llm." + k], v), k
    kept = {k: v for k, v in eva.items() if not k.startswith((f"blocks.{VIT_LAYERS}.", "norm."))}
    assert len(kept) < len(eva)  # the extra block and the final norm exist in the file and were dropped
    for k, v in kept.items():
        assert torch.equal(before["visual." + k], v), k
    assert sorted(k for k in before if k.startswith("visual.")) == sorted("visual." + k for k in kept)


def test_only_lora_and_the_extras_train(ckpts, run):
    _, llm, eva = ckpts
    model, before = run[1]["model"], run[1]["before"]
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, _ in model.named_parameters()]
    assert trains == {n for n in names if n.endswith(("lora_A", "lora_B")) or any(e in n for e in EXTRA)}
    assert {n.rsplit(".", 2)[-2] for n in trains if "lora_" in n} == {"qkv_proj", "o_proj"}
    after = model.state_dict()
    for k, v in after.items():
        if k not in trains:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
        elif k.endswith("lora_B") or "evi_head" in k:
            assert not torch.equal(v, before[k]), f"{k} did not train"  # B starts at 0, so this is a real update
    q = "model.layers.1.self_attn.qkv_proj.weight"
    assert torch.equal(after["llm." + q], llm[q])  # frozen base weights: bit-identical to the checkpoint
    assert torch.equal(after["visual.blocks.0.attn.qkv.weight"], eva["blocks.0.attn.qkv.weight"])


def test_checkpoint_holds_only_trained_tensors(run):
    out, seen = run
    saved = load_file(out / open(out / "latest").read().strip() / "model.safetensors")
    model = seen["model"]
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "llm.model.layers.0.self_attn.qkv_proj.lora_A" in saved and "llm.lm_head.weight" in saved
    assert "llm.model.layers.0.mlp.down_proj.weight" not in saved
    assert "llm.model.layers.0.self_attn.qkv_proj.weight" not in saved
    assert not any(k.startswith("visual.") for k in saved)


def test_sample_rebuilds_the_trained_model_and_answers(tiny_world, run):
    out, seen = run
    model, tok, wp, state = sample.load_model(str(out))
    assert state["train"]["hf_llm"].endswith("phi3") and state["train"]["eva"].endswith("eva.safetensors")
    trained = seen["model"].state_dict()
    rebuilt = model.state_dict()
    assert sorted(rebuilt) == sorted(trained)
    for k, v in trained.items():  # base weights from the recorded paths, the rest from model.safetensors
        assert torch.equal(rebuilt[k], v), k
    lora = "llm.model.layers.0.self_attn.qkv_proj.lora_B"
    assert rebuilt[lora].abs().sum() > 0
    assert tok.evi_id == tok.special["<evi>"] and tok.vocab_size <= model.cfg.vocab_size
    cfg = model.cfg
    frames, times = read_video(str(tiny_world / "world" / "videos" / "test_0000.mp4"), cfg.fps, cfg.img_size,
                               cfg.max_frames)
    r = sample.answer(model, tok, wp, frames, times, "When does the red square appear?", max_new_tokens=8)
    assert isinstance(r["text"], str) and r["frames"] == len(frames) >= 10
    for e in r["evis"]:
        assert len(e["sim"]) == len(frames) and 0 <= e["span"][0] <= e["span"][1] < len(frames)


def test_fpo_on_the_lora_run_trains_its_adapter(tiny_world, run):
    """FPO from the LoRA SFT run: the checkpoint is an adapter again, with the same tensors, and LoRA moved."""
    out, _ = run
    fpo = tiny_world / "run-fpo"
    train.main([f"--data={tiny_world}/world", f"--out={fpo}", "--stage=fpo", f"--init={out}", "--steps=2",
                "--batch_size=2", "--lr=1e-2", "--lora_lr=1e-2", "--eval_json=none"])
    step = fpo / open(fpo / "latest").read().strip()
    hist = json.load(open(step / "state.json"))["history"]
    assert len(hist) == 2 and all(math.isfinite(h["fpo"]) for h in hist)
    sft, after = (load_file(d / "model.safetensors") for d in (out / open(out / "latest").read().strip(), step))
    assert set(after) == set(sft)  # an adapter again, the same tensors
    assert not torch.equal(after["llm.model.layers.0.self_attn.qkv_proj.lora_B"],
                           sft["llm.model.layers.0.self_attn.qkv_proj.lora_B"])


# ---------------------------------------------------------------------------------------------------------
# official key names -> ours (facts from PolyU-ChenLab/ETBench etchat/model/*.py and nusnlp/d2vlm d2vlm/model/*.py)

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


def test_etchat_rename_maps_official_keys_onto_the_full_model():
    with torch.device("meta"):
        keys = set(D2VLM(CONFIGS["full"]).state_dict())
    for official, ours in OFFICIAL.items():
        assert etchat_rename(official) == ours, official
        assert ours is None or ours in keys, ours


def test_synth_llm_asks_phi3_through_our_sampler(tiny_world, ckpts, tmp_path, capsys):
    """synth.py --llm PHI3_DIR: the distorter's answer is HF's greedy continuation of the chat prompt, decoded; the
    CLI runs end to end with it (a random model's answer rarely has one <evi>, so distort falls back to other
    sub-factors, and every written pair still differs from its chosen side)."""
    import synth
    from nanod2vlm.tokenizer import Tokenizer
    hf_dir = tiny_world / "phi3"
    ask = synth.llm_distorter(str(hf_dir), max_new_tokens=12)
    tok, hf = Tokenizer.phi3(hf_dir), transformers.Phi3ForCausalLM.from_pretrained(hf_dir).eval()
    chunk = "The red square appears in <evi>."
    prompt = tok.chat(synth.LLM_PROMPT.format(chunk=chunk))
    ids = torch.tensor([tok.encode(prompt)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                      eos_token_id=tok.end_id, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert ask(chunk) == tok.decode(ref).replace("<|end|>", "")
    out = tmp_path / "pairs.json"
    synth.main([str(tiny_world / "world" / "train.json"), str(out), "--llm", str(hf_dir)])
    pairs = json.loads(out.read_text())
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert f"wrote {len(pairs)} pairs" in capsys.readouterr().out
