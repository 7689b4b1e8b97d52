"""EVA-CLIP vision tower vs timm's Eva, Q-Former vs transformers' InstructBLIP Q-Former, and the frame compressor."""
from dataclasses import replace

import timm
import torch
import transformers
from safetensors.torch import save_file

from nanod2vlm.model import CONFIGS
from nanod2vlm.checkpoint import eva_rename, load_safetensors_into
from nanod2vlm.model import EVAViT, FrameCompressor, QFormer


def _randomize(module, std=0.2):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module.eval()


def test_eva_loads_timm_checkpoint_and_matches_penultimate_block(tmp_path):
    # a 3-block ViT of the EVA-CLIP ViT-G family (fused qkv, q/v biases, mlp_ratio 6144/1408 -> 279)
    ref = _randomize(timm.create_model("eva_giant_patch14_clip_224", pretrained=False, depth=3, embed_dim=64,
                                       num_heads=4, img_size=28, num_classes=0))
    save_file(ref.state_dict(), tmp_path / "eva.safetensors")
    cfg = replace(CONFIGS["nano"], img_size=28, patch=14, vit_width=64, vit_layers=2, vit_heads=4, vit_mlp=279)
    rename = eva_rename(cfg)
    assert rename("blocks.2.attn.qkv.weight") is None and rename("norm.weight") is None
    vit = EVAViT(cfg).eval()
    load_safetensors_into(vit, str(tmp_path / "eva.safetensors"), rename=rename)  # strict: same keys and shapes

    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref.forward_intermediates(images, indices=[1], norm=False, output_fmt="NLC",
                                         intermediates_only=True)[0]  # block 1's output, prefix token dropped
        got = vit(images)
    assert got.shape == (2, 4, 64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_full_vision_tower_has_one_billion_parameters():
    with torch.device("meta"):
        vit = EVAViT(CONFIGS["full"])
    n = sum(p.numel() for p in vit.parameters())
    assert n == 985_894_528  # 39 of the 40 blocks of EVA-CLIP ViT-G/14 (~1.0B)
    assert abs(n / 1.0e9 - 1) < 0.02


def _tiny_qformer_pair(qf_dropout=0.0):
    cfg = replace(CONFIGS["nano"], qf_width=32, qf_heads=4, qf_mlp=48, qf_layers=3, qf_cross_every=2,
                  qf_vocab=50, qf_max_pos=20, vit_width=24, qf_dropout=qf_dropout)
    hf_cfg = transformers.InstructBlipQFormerConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=20, cross_attention_frequency=2, encoder_hidden_size=24)
    hf = _randomize(transformers.InstructBlipQFormerModel(hf_cfg))
    ours = QFormer(cfg).eval()
    ours.load_state_dict(hf.state_dict())  # strict: same key names and shapes
    return ours, hf


def test_qformer_matches_transformers_instructblip():
    ours, hf = _tiny_qformer_pair()
    torch.manual_seed(1)
    query, img = torch.randn(2, 4, 32), torch.randn(2, 5, 24)
    q_ids = torch.randint(1, 50, (2, 6))
    q_valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        want = hf(input_ids=q_ids, query_embeds=query, encoder_hidden_states=img,
                  attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), q_valid.long()], 1))
        got = ours(query, q_ids, q_valid, img)
        q_ids2 = q_ids.clone()
        q_ids2[1, 3:] = 0  # changing padded text must not change the query outputs
        got_pad = ours(query, q_ids2, q_valid, img)
    torch.testing.assert_close(got, want.last_hidden_state[:, :4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_pad, got, atol=1e-6, rtol=0)


def test_qformer_drops_out_where_bert_does(monkeypatch):
    """While training, dropout sits where transformers' Q-Former has it (embeddings, attention probabilities, the
    attention and FFN outputs) at its rate (bert-base-uncased's 0.1, the released value): with every dropout made a
    deterministic rescale by 1 / (1 - p), a dropout missing or extra on either side changes the outputs."""
    def rescale(x, p=0.5, training=True, inplace=False):
        return x / (1 - p) if training and p > 0 else x

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):  # math, dropout by rescale
        w = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        if attn_mask is not None:
            w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
        return rescale(w.softmax(-1), dropout_p) @ v
    monkeypatch.setattr(torch.nn.functional, "dropout", rescale)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    ours, hf = _tiny_qformer_pair(qf_dropout=CONFIGS["full"].qf_dropout)
    assert hf.config.hidden_dropout_prob == hf.config.attention_probs_dropout_prob == 0.1 == CONFIGS["full"].qf_dropout
    torch.manual_seed(1)
    query, img = torch.randn(2, 4, 32), torch.randn(2, 5, 24)
    q_ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        want = hf.train()(input_ids=q_ids, query_embeds=query, encoder_hidden_states=img).last_hidden_state[:, :4]
        got = ours.train()(query, q_ids, torch.ones(2, 6, dtype=torch.bool), img)
        plain = ours.eval()(query, q_ids, torch.ones(2, 6, dtype=torch.bool), img)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the rescales matter: a site more or less would show


def test_full_qformer_keys_match_transformers():
    full = CONFIGS["full"]
    hf_cfg = transformers.InstructBlipQFormerConfig(vocab_size=full.qf_vocab, encoder_hidden_size=full.vit_width)
    with torch.device("meta"):
        hf, ours = transformers.InstructBlipQFormerModel(hf_cfg), QFormer(full)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(hf)
    assert sum(p.numel() for p in ours.parameters()) == 185_660_160


def test_compressor_asks_each_question_once_for_all_its_frames():
    """rows: frames that share a question get the tokens they get with a copy of the question each (the first
    layer's self-attention and text FFN run once per question), through layers with and without cross-attention."""
    cfg = replace(CONFIGS["nano"], qf_layers=3)
    torch.manual_seed(0)
    comp = FrameCompressor(cfg).eval()
    patches = torch.randn(7, (cfg.img_size // cfg.patch) ** 2, cfg.vit_width)
    q_ids = torch.randint(1, cfg.qf_vocab, (3, 6))
    q_valid = torch.ones(3, 6, dtype=torch.bool)
    q_valid[1, 4:] = False
    rows = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    with torch.no_grad():
        shared = comp(patches, q_ids, q_valid, rows)
        copies = comp(patches, q_ids[rows], q_valid[rows])
    torch.testing.assert_close(shared, copies, atol=1e-6, rtol=1e-6)
    assert (shared[0] - shared[2]).abs().max() > 1e-3  # another question, another token


def test_compressor_gives_one_token_per_frame_that_depends_on_the_question():
    cfg = CONFIGS["nano"]
    torch.manual_seed(0)
    comp = FrameCompressor(cfg).eval()
    patches = torch.randn(3, (cfg.img_size // cfg.patch) ** 2, cfg.vit_width)
    q_valid = torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        a = comp(patches, torch.tensor([[2, 10, 11, 12, 3]] * 3), q_valid)
        b = comp(patches, torch.tensor([[2, 20, 21, 22, 3]] * 3), q_valid)
    assert a.shape == (3, cfg.n_embd)
    assert (a - b).abs().max() > 1e-3
    assert (a[0] - a[1]).abs().max() > 1e-3  # and on the frame
