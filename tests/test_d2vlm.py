"""The <evi> mechanism (SPEC §2) against slow loops written from its description, and the full model's size."""
import math
from dataclasses import replace

import pytest
import torch

from nanod2vlm.model import CONFIGS, D2VLM, add_lora, cast_frozen, mark_trainable, span_of

CFG = replace(CONFIGS["nano"], vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_mlp=64, img_size=16, patch=8,
              vit_width=16, vit_layers=1, vit_heads=2, vit_mlp=32, qf_width=16, qf_layers=2, qf_heads=2, qf_mlp=32,
              qf_queries=2, qf_vocab=30, image_id=3, evi_id=4, evi_end_id=5, end_id=6)


def slow_span(p, threshold=0.6):
    """Appendix A, literally: salient frames, their contiguous groups, the group with the best mean."""
    salient = [t for t in range(len(p)) if p[t] >= threshold * max(p)]
    groups = []
    for t in salient:
        if groups and groups[-1][-1] == t - 1:
            groups[-1].append(t)
        else:
            groups.append([t])
    best = max(groups, key=lambda g: sum(p[t] for t in g) / len(g))  # first of equal means wins
    return best[0], best[-1]


def test_span_of_matches_slow_rule():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        p = torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g) ** 3
        assert span_of(p, 0.6) == slow_span(p.tolist(), 0.6)
    assert span_of(torch.tensor([0.1, 0.9, 0.8, 0.1, 0.95, 0.1])) == (4, 4)  # best mean wins, not the longest run
    assert span_of(torch.tensor([0.1, 0.5, 0.1, 1.0, 0.1])) == (3, 3)


def batch():
    """Two samples: 5 and 3 frames, ids with image placeholders, <evi> tokens in both stages."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[7, 3, 3, 3, 3, 3, 8, 4, 5, 9, 4, 6],
                        [7, 3, 3, 3, 8, 4, 4, 5, 4, 9, 4, 6]])
    frames = torch.randn(2, 5, 3, 16, 16, generator=g)
    frm_valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    evi_b, evi_pos = torch.tensor([0, 0, 1, 1, 1, 1]), torch.tensor([7, 10, 5, 6, 8, 10])
    return dict(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool), frames=frames, frm_valid=frm_valid,
                q_ids=torch.tensor([[2, 11, 12, 3], [2, 13, 3, 0]]),
                q_valid=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
                evi_b=evi_b, evi_pos=evi_pos, evi_span=torch.tensor([[1, 3], [1, 3], [0, 0], [1, 2], [0, 0], [1, 2]]))


def test_teacher_forced_pooling_and_sim_match_slow_loops():
    torch.manual_seed(0)
    model = D2VLM(CFG).eval()
    b = batch()
    seen = {}
    llm_forward = model.llm.forward

    def spy(x, pos, mask, cache=None, hidden_layer=-1):
        seen["x"] = x.detach().clone()
        logits, h = llm_forward(x, pos, mask, cache, hidden_layer)
        seen["h"] = h.detach().clone()
        return logits, h
    model.llm.forward = spy
    with torch.no_grad():
        logits, sim, f_evi = model(b)
        F_V = model.frame_tokens(b["frames"], b["frm_valid"], b["q_ids"], b["q_valid"])
    emb = model.llm.model.embed_tokens.weight
    for n, (bb, pos) in enumerate(zip(b["evi_b"].tolist(), b["evi_pos"].tolist())):
        s, e = b["evi_span"][n].tolist()
        pooled = sum(F_V[bb, t] for t in range(s, e + 1)) / (e - s + 1)
        torch.testing.assert_close(seen["x"][bb, pos], emb[4] + pooled, atol=1e-5, rtol=1e-5)
        frames_at = [i for i, tok in enumerate(b["ids"][bb].tolist()) if tok == 3]
        for t, i in enumerate(frames_at):
            want = model.evi_head(seen["h"][bb, pos - 1]) @ model.frm_head(seen["h"][bb, i]) / math.sqrt(CFG.n_embd)
            torch.testing.assert_close(sim[n, t], want, atol=1e-5, rtol=1e-5)
    for bb in range(2):  # frame tokens replace the placeholders, also in the sample with padding frames
        frames_at = [i for i, tok in enumerate(b["ids"][bb].tolist()) if tok == 3]
        for t, i in enumerate(frames_at):
            torch.testing.assert_close(seen["x"][bb, i], F_V[bb, t])
        assert len(frames_at) == int(b["frm_valid"][bb].sum())
    assert F_V[1, 3:].abs().max() == 0  # padding frames: zeros


@pytest.mark.parametrize("unit", ["event", "frame"])  # frame: the Tab. 6 ablation, one boundary frame per <evi>
def test_generate_grounds_each_evi_with_the_inference_rule(unit):
    torch.manual_seed(0)
    model = D2VLM(replace(CFG, evi_unit=unit)).eval()
    with torch.no_grad():  # make the model emit <evi> <evi> </evi> <evi> <|end|> whatever it sees
        model.llm.lm_head.weight.zero_()
    script = iter([4, 4, 5, 4, 6])
    real = model.llm.forward

    def forced(*a, **k):
        logits, h = real(*a, **k)
        logits = torch.full_like(logits, -1e4)
        logits[..., next(script)] = 0
        return logits, h
    model.llm.forward = forced
    frames, times = torch.randn(6, 3, 16, 16), torch.arange(6.0) * 2
    out, evis = model.generate(frames, times, [2, 11, 3], [7, 3, 3, 3, 3, 3, 3, 8], max_new_tokens=10)
    assert out == [4, 4, 5, 4, 6]
    assert [e["stage"] for e in evis] == [1, 1, 2]
    for e in evis:
        p = torch.sigmoid(torch.tensor(e["sim"])).tolist()
        s, t = slow_span(p) if unit == "event" else (p.index(max(p)),) * 2
        assert e["span"] == (s, t) and e["seconds"] == (2.0 * s, 2.0 * t)


def test_full_model_size_on_meta_device():
    with torch.device("meta"):
        m = D2VLM(CONFIGS["full"])
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    assert abs(n(m.llm) - 3.821e9) / 3.821e9 < 0.01
    assert abs(n(m.visual) - 1.0e9) / 1.0e9 < 0.02
    assert n(m.evi_head) == n(m.frm_head) == 2 * 3072 + 3072 * 1536 + 1536 + 1536 * 3072 + 3072


def test_forward_traces_with_one_graph_break():
    """torch.compile sees the whole teacher-forced pass as two graphs: the only data-dependent step is finding the
    real frames of a padded batch (frame_tokens' nonzero); frame placement and frm_head gathers have fixed shapes."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(D2VLM(CFG))(batch())
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)


def test_frozen_weights_in_bf16_under_autocast():
    """train.py on a GPU: Phi-3's frozen parameters bf16 (cast_frozen), trained ones fp32, bf16 autocast. Checked with the CPU's
    autocast: the same outputs as fp32 to bf16 precision, gradients in fp32 on exactly the trained parameters, and
    generation runs."""
    torch.manual_seed(0)
    cfg = replace(CFG, lora_r=4, lora_alpha=8.0)
    model = D2VLM(cfg)
    add_lora(model.llm, cfg)
    mark_trainable(model)
    b = batch()
    score = lambda logits, sim, f_evi: logits.float().logsumexp(-1).mean() + sim.float().square().mean()
    want = score(*model(b)).item()
    cast_frozen(model.llm, torch.bfloat16)
    assert model.llm.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.llm.model.layers[0].self_attn.qkv_proj.lora_A.dtype == torch.float32
    assert model.visual.pos_embed.dtype == torch.float32  # the ViT's residual stream stays fp32
    with torch.autocast("cpu", torch.bfloat16):
        got = score(*model(b))
        got.backward()
        out, evis = model.generate(torch.randn(6, 3, 16, 16), torch.arange(6.0), [2, 11, 3], [7, 3, 3, 3, 3, 3, 3, 8],
                                   max_new_tokens=4)
    assert got.item() == pytest.approx(want, rel=2e-2)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.grad is None or p.grad.dtype == torch.float32, name
    assert len(out) >= 1 and all(len(e["sim"]) == 6 for e in evis)
