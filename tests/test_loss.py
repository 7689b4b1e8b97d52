"""Losses against slow loops written from the paper's equations (float64)."""
import math

import torch
import torch.nn.functional as F

from nanod2vlm.loss import L_cons, L_gnd, L_match, L_sft, cons_pairs, fpo_loss, fpo_step_loss, log_p_g, log_pi

torch.manual_seed(0)
D = torch.float64


def batch_evi(N=5, T=9):
    """Random sims, hard interval targets and a ragged frame mask (each row has >= 2 valid frames)."""
    torch.manual_seed(N * 100 + T)
    sim = torch.randn(N, T, dtype=D) * 3
    n_frames = torch.randint(2, T + 1, (N,))
    valid = torch.arange(T)[None] < n_frames[:, None]
    y = torch.zeros(N, T, dtype=D)
    for n in range(N):
        s = int(torch.randint(0, int(n_frames[n]), ()))
        e = int(torch.randint(s, int(n_frames[n]), ()))
        y[n, s:e + 1] = 1
    return sim, y, valid


def test_L_sft_matches_loop():
    logits, labels = torch.randn(2, 6, 11, dtype=D), torch.randint(0, 11, (2, 6))
    labels[0, 3:] = -100  # padding
    terms = [-torch.log_softmax(logits[b, j], -1)[labels[b, j]] for b in range(2) for j in range(6)
             if labels[b, j] != -100]  # logits[b, j] predicts response token j
    assert torch.allclose(L_sft(logits, labels), torch.stack(terms).mean())


def per_response_mean(values, owner):
    """The mean over each response's values, then over the responses that have any: the released code's average."""
    groups = [[v for v, o in zip(values, owner.tolist()) if o == r] for r in sorted(set(owner.tolist()))]
    return sum(sum(g) / len(g) for g in groups) / len(groups)


OWNER = torch.tensor([0, 0, 0, 2, 2])  # the response of each of batch_evi's <evi>: 3 of response 0, none of 1, 2 of 2


def test_L_gnd_eq3_matches_loop():
    sim, y, valid = batch_evi()
    y[0] = torch.rand(y.shape[1], dtype=D)  # a soft target row too
    per_evi = []
    for n in range(sim.shape[0]):
        frames = [t for t in range(sim.shape[1]) if valid[n, t]]
        bce = [-(y[n, t] * math.log(torch.sigmoid(sim[n, t])) + (1 - y[n, t]) * math.log(1 - torch.sigmoid(sim[n, t])))
               for t in frames]
        per_evi.append(float(sum(bce)) / len(frames))
    assert torch.allclose(L_gnd(sim, y, valid, OWNER), torch.tensor(per_response_mean(per_evi, OWNER), dtype=D))


def test_L_match_is_cross_entropy_over_valid_frames():
    sim, _, valid = batch_evi()
    target = torch.tensor([int(torch.randint(0, int(v.sum()), ())) for v in valid])
    per_evi = []
    for n in range(sim.shape[0]):
        frames = [t for t in range(sim.shape[1]) if valid[n, t]]
        z = sum(math.exp(float(sim[n, t])) for t in frames)
        per_evi.append(-math.log(math.exp(float(sim[n, target[n]])) / z))
    assert abs(float(L_match(sim, target, valid, OWNER)) - per_response_mean(per_evi, OWNER)) < 1e-9


def test_L_cons_eq1_matches_loop():
    f1, f2 = torch.randn(4, 7, dtype=D), torch.randn(4, 7, dtype=D)
    owner = torch.tensor([0, 1, 1, 1])  # the response of each pair
    ref = per_response_mean([sum(abs(f1[k, c] - f2[k, c]) for c in range(7)) / 7 for k in range(4)], owner)
    assert torch.allclose(L_cons(f1, f2, owner), ref)


def test_log_p_g_eq6_is_log_of_the_product():
    """Hard targets: the log of the paper's product of sigmoid(sim) inside and 1 - sigmoid(sim) outside (up to the
    released code's + 1e-10); soft targets: the released sum of log(y p + (1 - y)(1 - p) + 1e-10)."""
    sim, y, valid = batch_evi()
    out = log_p_g(sim, y, valid)
    for n in range(sim.shape[0]):
        p = torch.sigmoid(sim[n])
        prod = math.prod(float(p[t] if y[n, t] == 1 else 1 - p[t]) for t in range(sim.shape[1]) if valid[n, t])
        assert abs(float(out[n]) - math.log(prod)) < 1e-4  # the 1e-10 moves the log by ~1e-10 / p per frame
    y_soft = torch.rand_like(y)
    out = log_p_g(sim, y_soft, valid)
    for n in range(sim.shape[0]):
        p = torch.sigmoid(sim[n])
        ref = sum(math.log(float(y_soft[n, t] * p[t] + (1 - y_soft[n, t]) * (1 - p[t])) + 1e-10)
                  for t in range(sim.shape[1]) if valid[n, t])
        assert abs(float(out[n]) - ref) < 1e-9


def test_log_p_g_bounded_for_large_sims():
    """The released + 1e-10 bounds each wrong frame's log-probability at log(1e-10); the gradient stays finite."""
    y = torch.tensor([[1, 1, 0, 0]], dtype=D)
    valid = torch.ones(1, 4, dtype=torch.bool)
    sim = torch.tensor([[50.0, 50.0, -50.0, -50.0]], dtype=D, requires_grad=True)
    right = log_p_g(sim, y, valid).detach()  # every frame on the right side: ~ 4 log(1 + 1e-10)
    assert torch.isfinite(right).all() and abs(float(right)) < 1e-9
    wrong = log_p_g(-sim, y, valid)  # every frame on the wrong side: log(e^-50 + 1e-10) each
    wrong.sum().backward()
    assert abs(float(wrong.detach()) - 4 * math.log(math.exp(-50) + 1e-10)) < 1e-9 and torch.isfinite(sim.grad).all()
    assert torch.isfinite(log_p_g(sim.float().detach(), y.float(), valid)).all()


def test_log_pi_eq7_matches_loop():
    B, L, V = 3, 7, 13
    logits, labels = torch.randn(B, L, V, dtype=D), torch.randint(0, V, (B, L))
    labels[0, 5:] = -100
    labels[1, 4:] = -100
    sim, y, valid = batch_evi(N=5)
    evi_b = torch.tensor([0, 0, 2, 2, 2])  # response 1 has no <evi>
    out = log_pi(logits, labels, sim, y, valid, evi_b)
    for b in range(B):
        ref = sum(float(torch.log_softmax(logits[b, j], -1)[labels[b, j]]) for j in range(L) if labels[b, j] != -100)
        for n in range(5):
            if evi_b[n] == b:
                ref += sum(math.log(float(y[n, t] * torch.sigmoid(sim[n, t]) + (1 - y[n, t]) * (1 - torch.sigmoid(sim[n, t])))
                                    + 1e-10) for t in range(sim.shape[1]) if valid[n, t])
        assert abs(float(out[b]) - ref) < 1e-9


def test_fpo_loss_values():
    a, b = torch.tensor([-3.0, 1.5]), torch.tensor([-7.0, 2.0])
    assert abs(float(fpo_loss(a, a)) - math.log(2)) < 1e-6
    assert abs(float(fpo_loss(a, b, beta=0.5)) - float(-F.logsigmoid(0.5 * (a - b)).mean())) < 1e-6


def fpo_batch():
    """Two pairs (chosen rows 0, 1; rejected rows 2, 3) over two videos of 6 and 4 frames; <evi> in both stages."""
    N, R, V, T = 4, 6, 11, 6
    labels = torch.randint(0, V, (N, R))
    labels[1, 4:] = labels[3, 5:] = -100
    evi_b = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    evi_stage, evi_k = torch.tensor([1, 2, 1, 2, 1, 1, 2]), torch.tensor([0, 0, 0, 0, 0, 0, 0])
    frm_valid = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    return dict(labels=labels, evi_b=evi_b, evi_stage=evi_stage, evi_k=evi_k, frm_valid=frm_valid,
                resp_b=torch.tensor([0, 1, 0, 1]), evi_y=torch.rand(7, T, dtype=D)), torch.randn(N, R, V, dtype=D), \
        torch.randn(7, T, dtype=D), torch.randn(7, 5, dtype=D)


def test_fpo_step_loss_is_sft_on_chosen_plus_eq4_over_whole_responses():
    """The released FPO objective, written as a slow loop: CE + 10 BCE + 10 L1 on the chosen responses, plus
    -log sigmoid(0.1 (log pi(R) - log pi(R_bar))) with log pi over every token and every <evi> of each response."""
    b, logits, sim, f = fpo_batch()
    loss, parts = fpo_step_loss(logits, sim, f, b, beta=0.1, w_gnd=10.0, w_cons=10.0)
    valid = b["frm_valid"][b["resp_b"][b["evi_b"]]]
    ce = [-torch.log_softmax(logits[n, j], -1)[b["labels"][n, j]] for n in (0, 1) for j in range(6) if b["labels"][n, j] >= 0]
    chosen = [k for k in range(7) if b["evi_b"][k] < 2]
    bce = [float(F.binary_cross_entropy_with_logits(sim[k][valid[k]], b["evi_y"][k][valid[k]])) for k in chosen]
    l1 = [float((f[i] - f[j]).abs().mean()) for i, j in ((0, 1), (2, 3))]  # the k-th of stage 1 with the k-th of stage 2
    sft = float(torch.stack(ce).mean()) + 10 * sum(bce) / len(bce) + 10 * sum(l1) / len(l1)
    logp = []
    for n in range(4):
        lp = sum(float(torch.log_softmax(logits[n, j], -1)[b["labels"][n, j]]) for j in range(6) if b["labels"][n, j] >= 0)
        for k in range(7):
            if b["evi_b"][k] == n:
                p, y = torch.sigmoid(sim[k]), b["evi_y"][k]
                lp += sum(math.log(float(y[t] * p[t] + (1 - y[t]) * (1 - p[t])) + 1e-10) for t in range(6) if valid[k, t])
        logp.append(lp)
    pref = sum(-math.log(1 / (1 + math.exp(-0.1 * (logp[i] - logp[i + 2])))) for i in (0, 1)) / 2
    assert abs(float(loss) - (sft + pref)) < 1e-9
    assert abs(parts["fpo"] - pref) < 1e-9


def test_cons_pairs_match_kth_with_kth_of_the_same_response():
    b = dict(evi_b=torch.tensor([0, 0, 0, 0, 1, 1]), evi_k=torch.tensor([0, 1, 1, 0, 0, 0]),
             evi_stage=torch.tensor([1, 1, 2, 2, 1, 2]))
    i1, i2 = cons_pairs(b)
    assert sorted(zip(i1.tolist(), i2.tolist())) == [(0, 3), (1, 2), (4, 5)]
    for stages in ([2, 2], [1, 1], []):  # a batch without one of the stages has no pair (and no crash)
        n = len(stages)
        b = dict(evi_b=torch.zeros(n, dtype=torch.long), evi_k=torch.arange(n), evi_stage=torch.tensor(stages, dtype=torch.long))
        assert [len(x) for x in cons_pairs(b)] == [0, 0]


def test_fpo_step_raises_preference_margin():
    """A learnable toy policy: one SGD step on Eq. (4) with Eq. (7) raises log pi(R) - log pi(R_bar),
    where R_bar differs by one text token and by a shifted <evi> interval."""
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 10, dtype=D, requires_grad=True)
    sim = torch.randn(1, 8, dtype=D, requires_grad=True)
    labels = torch.tensor([[3, 4, 5, 6, -100, -100]])
    labels_bad = labels.clone()
    labels_bad[0, 2] = 8
    y, y_bad = torch.zeros(1, 8, dtype=D), torch.zeros(1, 8, dtype=D)
    y[0, 2:5], y_bad[0, 4:7] = 1, 1
    valid, evi_b = torch.ones(1, 8, dtype=torch.bool), torch.tensor([0])

    def logps():
        return (log_pi(logits, labels, sim, y, valid, evi_b), log_pi(logits, labels_bad, sim, y_bad, valid, evi_b))

    chosen, rejected = logps()
    fpo_loss(chosen, rejected).backward()
    with torch.no_grad():
        for p in (logits, sim):
            p -= 1.0 * p.grad
    after = logps()
    assert float((after[0] - after[1]).detach()) > float((chosen - rejected).detach()) + 0.01


def test_a_batch_without_evi_gives_zero_grounding_and_consistency_losses_in_the_graph():
    """A batch whose responses hold no <evi> (or no stage pair): L_gnd, L_match and L_cons are 0, not NaN (a mean over
    nothing), and backward still runs."""
    sim = torch.zeros(0, 5, requires_grad=True)
    valid = torch.zeros(0, 5, dtype=torch.bool)
    none = torch.zeros(0, dtype=torch.long)
    losses = [L_gnd(sim, torch.zeros(0, 5), valid, none), L_match(sim, none, valid, none), L_cons(sim, sim, none)]
    assert [l.item() for l in losses] == [0.0, 0.0, 0.0]
    sum(losses).backward()
    assert sim.grad.shape == (0, 5)
