"""Phi-3 decoder parity with HF transformers (tiny random weights, fp32, CPU)."""
import pytest
import torch
import transformers

from nanod2vlm.checkpoint import load_phi3
from nanod2vlm.model import CONFIGS, Cache, Config, Phi3, build_mask

HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
          max_position_embeddings=128, rms_norm_eps=1e-5, rope_scaling=None, pad_token_id=0, bos_token_id=1,
          eos_token_id=2, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=False)
CFG = Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_mlp=128, max_pos=128)


@pytest.fixture(scope="module", params=["single", "sharded"])
def pair(request, tmp_path_factory):
    """A random HF Phi-3 saved to disk one way or the other, and ours loaded from it."""
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**HF, attn_implementation="eager")).eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, max_shard_size="40KB" if request.param == "sharded" else "1GB")
    assert (d / "model.safetensors.index.json").exists() == (request.param == "sharded")
    ours = load_phi3(d, CFG).eval()
    return hf, ours


def test_state_dict_keys_equal_hf(pair):
    hf, ours = pair
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())


def test_logits_match_hf(pair):
    hf, ours = pair
    ids = torch.randint(3, 100, (2, 17))
    valid = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(17).expand(2, -1)
    with torch.no_grad():
        out, (h2, h1, h0) = ours(ours.model.embed_tokens(ids), pos, build_mask(valid), keep=(-2, 1, 0))
        logits = ours.lm_head(out)
        ref = hf(ids, output_hidden_states=True)
    assert torch.allclose(logits, ref.logits, atol=1e-4), (logits - ref.logits).abs().max()
    # kept states are numbered as HF's hidden_states: 0 the embeddings, i the output of block i, -2 the one before last
    for h, i in ((h2, -2), (h1, 1), (h0, 0)):
        assert torch.allclose(h, ref.hidden_states[i], atol=1e-5)


@torch.no_grad()
def test_greedy_with_kv_cache_matches_hf_generate(pair):
    """Left-padded batch: prefill once, then one token at a time, exactly as D2VLM generation will."""
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 9))
    attn = torch.ones_like(ids)
    ids[0, :3], attn[0, :3] = 0, 0  # row 0 has 3 pad tokens on the left
    ref = hf.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                      pad_token_id=0, eos_token_id=2)[:, 9:]

    valid = attn.bool()
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = Cache()
    logits = ours.lm_head(ours(ours.model.embed_tokens(ids), pos, build_mask(valid), cache)[0])
    out = []
    for _ in range(20):
        logits[..., 2] = -float("inf")  # what min_new_tokens does to eos in HF
        nxt = logits[:, -1].argmax(-1)  # (B,)
        out.append(nxt)
        pos = pos[:, -1:] + 1
        valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        logits = ours.lm_head(ours(ours.model.embed_tokens(nxt[:, None]), pos, build_mask(valid)[:, :, -1:], cache)[0])
    assert cache.kv[0][0].shape[2] == 9 + 20
    assert torch.equal(torch.stack(out, 1), ref)


def test_frame_tokens_attend_bidirectionally():
    torch.manual_seed(0)
    model = Phi3(CFG).eval()
    x = torch.randn(1, 10, 64)
    pos = torch.arange(10)[None]
    valid = torch.ones(1, 10, dtype=torch.bool)
    frm = torch.zeros(1, 10, dtype=torch.bool)
    frm[0, 2:6] = True
    hidden = lambda x, frm: model(x, pos, build_mask(valid, frm), keep=(-1,))[1][0][0]
    x5, x7 = x.clone(), x.clone()
    x5[0, 5] += 1.0
    x7[0, 7] += 1.0
    with torch.no_grad():
        h, h5, h7 = hidden(x, frm), hidden(x5, frm), hidden(x7, frm)
        c, c5 = hidden(x, None), hidden(x5, None)
    assert not torch.allclose(h5[2], h[2])  # frame 2 sees frame 5
    assert torch.equal(h7[:7], h[:7])  # text after the frames stays causal for everyone before it
    assert torch.equal(c5[:5], c[:5])  # without frm: plain causal
    assert not torch.allclose(c5[5], c[5])


@pytest.mark.parametrize("keep", [(1,), (-1,)])  # (-1,): the last block's states are kept, so it computes all rows
def test_output_at_some_positions_equals_the_full_pass_there(keep):
    """at: the output only at given positions (training's prompt pass reads only its last position), with the same
    kept states and the same keys and values cached for a later pass."""
    torch.manual_seed(0)
    model = Phi3(CFG).eval()
    x = torch.randn(2, 7, 64)
    pos = torch.arange(7).expand(2, 7)
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    mask = build_mask(valid, torch.arange(7).expand(2, 7) < 3)
    at = torch.tensor([[6], [4]])  # each sequence's last real position
    rows = []  # the positions the last block's MLP computes, per pass
    model.model.layers[-1].mlp.gate_up_proj.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    with torch.no_grad():
        cache_at, cache_full = Cache(), Cache()
        out, hs = model(x, pos, mask, cache_full, keep)
        out_at, hs_at = model(x, pos, mask, cache_at, keep, at=at)
    assert rows == [7, 7 if keep == (-1,) else 1]
    assert out_at.shape == (2, 1, 64)
    torch.testing.assert_close(out_at[:, 0], out[[0, 1], [6, 4]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs_at[0], hs[0], rtol=1e-5, atol=1e-5)
    for layer in range(CFG.n_layer):
        for a, b in zip(cache_at.kv[layer], cache_full.kv[layer]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_build_mask_padding_rows_do_not_nan():
    valid = torch.tensor([[True, True, False, False]])
    mask = build_mask(valid, torch.tensor([[True, True, True, False]]))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].sum(-1).min() >= 1
    assert mask[0, 0, 0].tolist() == [True, True, False, False]  # frame 0 sees frame 1, not padding frame 2
    model = Phi3(CFG)
    out, _ = model(torch.randn(1, 4, 64), torch.arange(4)[None], mask)
    assert torch.isfinite(out).all()


def test_full_config_parameter_count_on_meta():
    with torch.device("meta"):
        model = Phi3(CONFIGS["full"])
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 3.82e9) / 3.82e9 < 0.01, n


def test_text_generate_matches_hf_generate(pair):
    """Phi3.generate, the one decode loop (synth.py --llm, the benchmark, D2VLM), gives HF's greedy ids, stopping
    after end_id, also with the released repetition penalty 1.2 over the prompt and the generated ids."""
    hf, ours = pair
    torch.manual_seed(2)
    gen = lambda ids, n, **kw: ours.generate(ours.model.embed_tokens(torch.tensor([ids])), n, **kw)  # noqa: E731
    for n in (1, 20):
        ids = torch.randint(3, 100, (1, 7))
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          pad_token_id=0, eos_token_id=2)[0, 7:].tolist()
        assert gen(ids[0].tolist(), n, end_id=2) == ref
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          pad_token_id=0, eos_token_id=2, repetition_penalty=1.2)[0, 7:].tolist()
        assert gen(ids[0].tolist(), n, end_id=2, penalty=1.2, seen=ids[0].tolist()) == ref
    assert gen([5, 6, 7], 3, end_id=gen([5, 6, 7], 1)[0]) == gen([5, 6, 7], 1)
    plain, penalised = gen([5, 6, 7], 30), gen([5, 6, 7], 30, penalty=3.0, seen=[5, 6, 7])
    assert plain != penalised and len(set(penalised)) > len(set(plain))  # the penalty makes repeats rarer
    sampled = [gen([5, 6, 7], 30, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling: reproducible, and not the greedy path
