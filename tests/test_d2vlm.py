"""The <evi> mechanism (Sec. 3.2, App. A, as released) against slow loops written from its description, and the full model's size."""
import math
from dataclasses import replace

import pytest
import torch

from nanod2vlm.data import collate
from nanod2vlm.model import (CONFIGS, D2VLM, add_lora, build_mask, cast_frozen, mark_trainable, rope_cos_sin, span_of,
                             take)

CFG = replace(CONFIGS["nano"], vocab_size=40, n_embd=32, n_layer=3, n_head=2, n_mlp=64, img_size=16, patch=8,
              vit_width=16, vit_layers=1, vit_heads=2, vit_mlp=32, qf_width=16, qf_layers=2, qf_heads=2, qf_mlp=32,
              qf_queries=2, qf_vocab=30, image_id=3, evi_id=4, evi_end_id=5, end_id=6)


def slow_span(p, threshold=0.6):
    """Appendix A, literally: salient frames, their contiguous groups, the group with the best mean; on an exact tie
    of means the released span runs from the first tied group to the last."""
    salient = [t for t in range(len(p)) if p[t] >= threshold * max(p)]
    groups = []
    for t in salient:
        if groups and groups[-1][-1] == t - 1:
            groups[-1].append(t)
        else:
            groups.append([t])
    means = [sum(p[t] for t in g) / len(g) for g in groups]
    tied = [g for g, m in zip(groups, means) if m == max(means)]
    return tied[0][0], tied[-1][-1]


def test_span_of_matches_slow_rule():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        p = torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g) ** 3
        assert span_of(p, 0.6) == slow_span(p.tolist(), 0.6)
    assert span_of(torch.tensor([0.1, 0.9, 0.8, 0.1, 0.95, 0.1])) == (4, 4)  # best mean wins, not the longest run
    assert span_of(torch.tensor([0.1, 0.5, 0.1, 1.0, 0.1])) == (3, 3)
    assert span_of(torch.tensor([0.1, 1.0, 0.1, 0.1, 1.0, 0.2])) == (1, 4)  # an exact tie: first group to last


def sample(T, resp, spans, src=(), seed=0):
    """One sample as data.VideoDataset gives it: prompt <s> frames \n [question <evi>...] ?, one response whose
    <evi> (id 4; </evi> 5, <|end|> 6) refer to `spans` (stage 1 then stage 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([7] + [3] * T + [8] + [4] * len(src) + [9])
    resp = torch.tensor(resp)
    evi_pos = (resp == 4).nonzero().flatten()
    end = (resp == 5).nonzero().item()
    stage = (evi_pos > end).long() + 1
    k = torch.tensor([int((stage[:i] == stage[i]).sum()) for i in range(len(stage))])
    return dict(ids=ids, frames=torch.randn(T, 3, 16, 16, generator=g), times=torch.arange(T) * 1.0,
                q_ids=torch.tensor([2, 11 + seed, 3]), src_pos=torch.arange(len(src)) + T + 2,
                src_span=torch.tensor(src, dtype=torch.long).view(-1, 2), meta={},
                responses=[dict(resp=resp, evi_pos=evi_pos, evi_stage=stage, evi_k=k,
                                evi_span=torch.tensor(spans).view(-1, 2), evi_y=torch.rand(len(spans), T, generator=g))])


SAMPLES = [sample(5, [4, 4, 5, 9, 4, 10, 4, 6], [[1, 3], [0, 0], [1, 3], [0, 0]], src=[[2, 4]], seed=0),
           sample(3, [4, 5, 9, 4, 6], [[1, 2], [1, 2]], seed=1),
           sample(4, [4, 4, 4, 5, 4, 9, 4, 10, 4, 6], [[0, 1], [2, 2], [3, 3]] * 2, src=[[0, 0], [1, 3]], seed=2)]


def capture(model):
    """Spy on the LLM's calls: the input embeddings x of each call."""
    seen, forward = [], model.llm.forward

    def spy(x, *a, **k):
        seen.append(x.detach().clone())
        return forward(x, *a, **k)
    model.llm.forward = spy
    return seen


def slow_pass(model, x, frm, layers):
    """A separate full pass over one whole sequence x (1, L, C), block by block -> the states of `layers` and logits."""
    llm, L = model.llm, x.shape[1]
    cos, sin = rope_cos_sin(torch.arange(L)[None], CFG.n_embd // CFG.n_head, CFG.rope_theta, x.dtype)
    hs, h = [x], x
    for block in llm.model.layers:
        h = block(h, cos, sin, build_mask(torch.ones(1, L, dtype=torch.bool), frm))
        hs.append(h)
    return [hs[i][0] for i in layers], llm.lm_head(llm.model.norm(h))[0]


@pytest.mark.parametrize("capture_layer", [0, 1])  # 0: the compressor outputs F_V (E.T. Chat's choice)
def test_teacher_forced_pass_equals_one_slow_full_pass(capture_layer):
    """Each response <evi> input = its embedding + the mean of block `capture_layer`'s frame states over its interval
    from a slow prompt pass; each question-side <evi> = embedding + the mean of F_V over its src interval; the prompt
    pass + cached response pass gives the logits and sims of one slow pass over prompt + response."""
    torch.manual_seed(0)
    model = D2VLM(replace(CFG, capture_layer=capture_layer)).eval()
    b = collate(SAMPLES, 0)
    seen = capture(model)
    with torch.no_grad():
        logits, sim, f_evi = model(b)
        F_V = model.frame_tokens(b["frames"], b["frm_valid"], b["q_ids"], b["q_valid"])
    E = model.llm.model.embed_tokens.weight
    x_prompt, x_resp = seen
    n_evi = 0
    for i, s in enumerate(SAMPLES):
        T, P, r = len(s["times"]), len(s["ids"]), s["responses"][0]
        prompt = x_prompt[i, :P]
        for m, (a, e) in enumerate(s["src_span"].tolist()):
            torch.testing.assert_close(prompt[T + 2 + m], E[4] + F_V[i, a:e + 1].mean(0))
        frm = (s["ids"] == 3)[None]
        with torch.no_grad():
            (cap,), _ = slow_pass(model, prompt[None], frm, [capture_layer])
            for k, (a, e) in enumerate(r["evi_span"].tolist()):
                pooled = cap[1:1 + T][a:e + 1].mean(0)
                torch.testing.assert_close(x_resp[i, r["evi_pos"][k]], E[4] + pooled, atol=1e-5, rtol=1e-5)
            R = len(r["resp"])
            whole = torch.cat([prompt, x_resp[i, :R]])[None]
            frm = torch.cat([frm, torch.zeros(1, R, dtype=torch.bool)], 1)
            (h,), full = slow_pass(model, whole, frm, [CFG.evi_layer])
        torch.testing.assert_close(logits[i, :R], full[P - 1:P + R - 1], atol=1e-5, rtol=1e-5)
        for k, j in enumerate(r["evi_pos"].tolist()):
            want = model.frm_head(h[1:1 + T]) @ model.evi_head(h[P + j - 1]) / math.sqrt(CFG.n_embd)
            torch.testing.assert_close(sim[n_evi, :T], want, atol=1e-5, rtol=1e-5)
            n_evi += 1


def test_a_padded_batch_gives_what_each_sample_gives_alone():
    torch.manual_seed(0)
    model = D2VLM(CFG).eval()
    with torch.no_grad():
        logits, sim, f_evi = model(collate(SAMPLES, 0))
        n = 0
        for i, s in enumerate(SAMPLES):
            l1, s1, f1 = model(collate([s], 0))
            T, R, K = len(s["times"]), len(s["responses"][0]["resp"]), len(s1)
            torch.testing.assert_close(logits[i, :R], l1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sim[n:n + K, :T], s1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(f_evi[n:n + K], f1, atol=1e-5, rtol=1e-5)
            n += K


class Script(torch.nn.Module):
    """An lm_head that emits a fixed token sequence whatever it sees."""

    def __init__(self, tokens, head):
        super().__init__()
        self.tokens, self.vocab, self.weight = iter(tokens), head.weight.shape[0], head.weight

    def forward(self, x):
        logits = torch.full((*x.shape[:-1], self.vocab), -1e4)
        logits[..., next(self.tokens)] = 0
        return logits


@pytest.mark.parametrize("unit", ["event", "frame"])  # frame: the Tab. 6 ablation, one boundary frame per <evi>
def test_generate_grounds_each_evi_and_feeds_the_teacher_forced_inputs(unit):
    """Each generated <evi> takes the inference rule's span of its sims; the inputs generation feeds equal the
    teacher-forced pass's on the same ids and spans (capture and src included)."""
    torch.manual_seed(0)
    model = D2VLM(replace(CFG, evi_unit=unit)).eval()
    tokens = [4, 4, 5, 9, 4, 10, 4, 6]
    head = model.llm.lm_head
    model.llm.lm_head = Script(tokens, head)
    s = SAMPLES[0]
    seen = capture(model)
    out, evis = model.generate(s["frames"], s["times"] * 2, s["q_ids"].tolist(), s["ids"].tolist(), max_new_tokens=10,
                               src=[[2, 4]])
    assert out == tokens
    assert [e["stage"] for e in evis] == [1, 1, 2, 2]
    for e in evis:
        p = torch.sigmoid(torch.tensor(e["sim"])).tolist()
        a, z = slow_span(p) if unit == "event" else (p.index(max(p)),) * 2
        assert e["span"] == (a, z) and e["seconds"] == (2.0 * a, 2.0 * z)
    fed = torch.cat(seen, 1)[0]  # the prompt, then one input per generated token but the last
    model.llm.lm_head = head
    spans = [list(e["span"]) for e in evis]
    tf = sample(5, tokens, spans, src=[[2, 4]], seed=0)
    seen.clear()
    with torch.no_grad():
        model(collate([tf], 0))
    torch.testing.assert_close(fed, torch.cat([seen[0][0], seen[1][0, :-1]]), atol=1e-5, rtol=1e-5)
    model.llm.lm_head = Script([4, 4], head)  # an <evi> as the last allowed token still grounds
    out, evis = model.generate(s["frames"], s["times"], s["q_ids"].tolist(), s["ids"].tolist(), max_new_tokens=2,
                               src=[[2, 4]])
    assert out == [4, 4] and len(evis) == 2


def test_take_adds_repeated_rows_in_a_fixed_order():
    """take (each frame's copy of its question's Q-Former rows, each <evi>'s copy of its video's frame states, FPO's
    shared prompt cache): the values of x[rows], and a backward that adds a row's copies in index order, bit for bit
    as a loop does. Indexing's backward adds them in parallel, in an order that varies, so a run did not repeat."""
    torch.manual_seed(0)
    rows = torch.repeat_interleave(torch.arange(16), torch.randint(10, 60, (16,)))  # frame -> its sample, sorted
    x = torch.randn(16, 8, 128, requires_grad=True)
    g = torch.randn(len(rows), 8, 128)
    out = take(x, rows)
    out.backward(g)
    want = torch.zeros_like(x)
    for i, r in enumerate(rows.tolist()):
        want[r] += g[i]
    assert torch.equal(out, x[rows])
    assert torch.equal(x.grad, want)


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
    explained = torch._dynamo.explain(D2VLM(CFG))(collate(SAMPLES, 0))
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
    b = collate(SAMPLES, 0)
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
                                   max_new_tokens=4, temperature=1.0)
    assert got.item() == pytest.approx(want, rel=2e-2)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.grad is None or p.grad.dtype == torch.float32, name
    assert len(out) >= 1 and all(len(e["sim"]) == 6 for e in evis)
