"""Losses against slow loops written from the paper's equations (float64)."""
import math

import torch
import torch.nn.functional as F

from nanod2vlm.loss import L_cons, L_gnd, L_sft, fpo_loss, log_p_g, log_pi

torch.manual_seed(0)
D = torch.float64


def batch_evi(N=5, T=9):
    """Random sims, hard interval targets and a ragged frame mask (each row has >= 2 valid frames)."""
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
    labels[0, :3] = -100
    terms = [-torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]] for b in range(2) for i in range(5)
             if labels[b, i + 1] != -100]
    assert torch.allclose(L_sft(logits, labels), torch.stack(terms).mean())


def test_L_gnd_eq3_matches_loop():
    sim, y, valid = batch_evi()
    y[0] = torch.rand(y.shape[1], dtype=D)  # a soft target row too
    per_evi = []
    for n in range(sim.shape[0]):
        frames = [t for t in range(sim.shape[1]) if valid[n, t]]
        bce = [-(y[n, t] * math.log(torch.sigmoid(sim[n, t])) + (1 - y[n, t]) * math.log(1 - torch.sigmoid(sim[n, t])))
               for t in frames]
        per_evi.append(float(sum(bce)) / len(frames))
    assert torch.allclose(L_gnd(sim, y, valid), torch.tensor(sum(per_evi) / len(per_evi), dtype=D))


def test_L_cons_eq1_matches_loop():
    f1, f2 = torch.randn(4, 7, dtype=D), torch.randn(4, 7, dtype=D)
    ref = sum(sum(abs(f1[k, c] - f2[k, c]) for c in range(7)) / 7 for k in range(4)) / 4
    assert torch.allclose(L_cons(f1, f2), ref)


def test_log_p_g_eq6_is_log_of_the_product():
    sim, y, valid = batch_evi()
    out = log_p_g(sim, y, valid)
    for n in range(sim.shape[0]):
        p = torch.sigmoid(sim[n])
        prod = math.prod(float(p[t] if y[n, t] == 1 else 1 - p[t]) for t in range(sim.shape[1]) if valid[n, t])
        assert abs(float(out[n]) - math.log(prod)) < 1e-9


def test_log_p_g_finite_for_large_sims():
    y = torch.tensor([[1, 1, 0, 0]], dtype=D)
    valid = torch.ones(1, 4, dtype=torch.bool)
    sim = torch.tensor([[50.0, 50.0, -50.0, -50.0]], dtype=D, requires_grad=True)
    right = log_p_g(sim, y, valid).detach()  # every frame on the right side: log p_g ~ -4 e^-50
    assert torch.isfinite(right).all() and -1e-20 < float(right) < 0
    wrong = log_p_g(-sim, y, valid)  # every frame on the wrong side: log sigmoid(-50) = -50 each
    wrong.sum().backward()
    assert abs(float(wrong.detach()) + 200) < 1e-9 and torch.isfinite(sim.grad).all()
    assert torch.isfinite(log_p_g(sim.float().detach(), y.float(), valid)).all()


def test_log_pi_eq7_matches_loop():
    B, L, V = 3, 7, 13
    logits, labels = torch.randn(B, L, V, dtype=D), torch.randint(0, V, (B, L))
    labels[:, :2] = -100
    labels[1, 4] = -100
    sim, y, valid = batch_evi(N=5)
    evi_b = torch.tensor([0, 0, 2, 2, 2])  # sample 1 has no <evi>
    out = log_pi(logits, labels, sim, y, valid, evi_b, B)
    for b in range(B):
        ref = sum(float(torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]]) for i in range(L - 1)
                  if labels[b, i + 1] != -100)
        for n in range(5):
            if evi_b[n] == b:
                ref += sum(float(y[n, t] * torch.log(torch.sigmoid(sim[n, t]))
                                 + (1 - y[n, t]) * torch.log(1 - torch.sigmoid(sim[n, t])))
                           for t in range(sim.shape[1]) if valid[n, t])
        assert abs(float(out[b]) - ref) < 1e-9


def test_fpo_loss_values():
    a, b = torch.tensor([-3.0, 1.5]), torch.tensor([-7.0, 2.0])
    assert abs(float(fpo_loss(a, a)) - math.log(2)) < 1e-6
    assert abs(float(fpo_loss(a, b, beta=0.5)) - float(-F.logsigmoid(0.5 * (a - b)).mean())) < 1e-6
    assert abs(float(fpo_loss(a, b, ref_chosen=a, ref_rejected=b)) - math.log(2)) < 1e-6  # DPO form


def test_fpo_step_raises_preference_margin():
    """A learnable toy policy: one SGD step on Eq. (4) with Eq. (7) raises log pi(R) - log pi(R_bar),
    where R_bar differs by one text token and by a shifted <evi> interval."""
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 10, dtype=D, requires_grad=True)
    sim = torch.randn(1, 8, dtype=D, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6]])
    labels_bad = labels.clone()
    labels_bad[0, 4] = 8
    y, y_bad = torch.zeros(1, 8, dtype=D), torch.zeros(1, 8, dtype=D)
    y[0, 2:5], y_bad[0, 4:7] = 1, 1
    valid, evi_b = torch.ones(1, 8, dtype=torch.bool), torch.tensor([0])

    def logps():
        return (log_pi(logits, labels, sim, y, valid, evi_b, 1),
                log_pi(logits, labels_bad, sim, y_bad, valid, evi_b, 1))

    chosen, rejected = logps()
    fpo_loss(chosen, rejected).backward()
    with torch.no_grad():
        for p in (logits, sim):
            p -= 1.0 * p.grad
    after = logps()
    assert float((after[0] - after[1]).detach()) > float((chosen - rejected).detach()) + 0.01
