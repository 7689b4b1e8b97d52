"""Losses of D²VLM: supervised fine-tuning (Eq. 1-3) and factorized preference optimization (Eq. 4-7).

Pure functions on tensors the model produces for a batch (see the batch format in nanod2vlm/data.py):
`sim` (N, T) are <evi>-frame similarity logits, `y` (N, T) frame targets in [0, 1], `valid` (N, T) the real
frames of each <evi>'s video. Reductions run in at least float32 (bf16 log-probs summed over hundreds of
tokens and frames would lose the preference margin).
"""
import torch
import torch.nn.functional as F


def _f32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays fp64


# -----------------------------------------------------------------------------
# SFT: L = L_sft + L_gnd + L_cons, Eq. (2) (train.py weights the last two)

def L_sft(logits, labels):
    """Next-token cross-entropy over the supervised response tokens (labels are -100 elsewhere)."""
    return F.cross_entropy(_f32(logits[:, :-1]).flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def L_gnd(sim, y, valid):
    """Grounding loss: BCE(y, sim) averaged over the valid frames of each <evi>, then over all <evi> tokens
    of both stages. The paper uses hard 1/0 targets; the official code a soft alpha^-d target (that comes
    in through y from the data) with loss weight 10 (a train.py flag)."""
    if sim.shape[0] == 0:
        return sim.sum()  # no <evi> in the batch: a zero that keeps the graph
    bce = F.binary_cross_entropy_with_logits(_f32(sim), _f32(y), reduction="none")
    per_evi = torch.where(valid, bce, 0).sum(1) / valid.sum(1).clamp(min=1)  # Eq. (3)
    return per_evi.mean()


def L_cons(f1, f2):
    """Consistency between the k-th <evi> head output of stage 1 and of stage 2, f1/f2 (K, C): mean absolute
    difference over k and channels (official weight 10, a train.py flag)."""
    return (_f32(f1) - _f32(f2)).abs().mean()  # Eq. (1)


# -----------------------------------------------------------------------------
# FPO: preference over both the text tokens and the <evi> grounding, Eq. (4)-(7)

def log_p_g(sim, y, valid):
    """log of the interval-level grounding probability of each <evi>: a product over frames of sigmoid(sim)
    inside the interval and 1 - sigmoid(sim) outside, in log space (finite for any sim). Soft y interpolates
    the two factors the way BCE does. -> (N,)"""
    sim, y = _f32(sim), _f32(y)
    logp = y * F.logsigmoid(sim) + (1 - y) * F.logsigmoid(-sim)  # Eq. (6), 1 - sigmoid(s) = sigmoid(-s)
    return torch.where(valid, logp, 0).sum(-1)


def log_pi(logits, labels, sim, y, valid, evi_b, B):
    """log pi(R) per sample -> (B,): summed (not averaged) log-probs of the supervised tokens plus log p_g of
    each of the sample's <evi>. To score only a perturbed event (as the official code does), pass labels that
    are -100 outside that event and only that event's <evi> rows of sim/y/valid/evi_b."""
    tok = -F.cross_entropy(_f32(logits[:, :-1]).transpose(1, 2), labels[:, 1:], ignore_index=-100,
                           reduction="none")  # (B, L-1), 0 where ignored
    lp_g = log_p_g(sim, y, valid)
    return tok.sum(1) + lp_g.new_zeros(B).index_add(0, evi_b, lp_g)  # Eq. (7) = Eq. (5) + sum of Eq. (6)


def fpo_loss(logp_chosen, logp_rejected, beta=0.1, ref_chosen=None, ref_rejected=None):
    """-log sigmoid(beta * (log pi(R) - log pi(R_bar))), averaged over pairs.

    The paper's Eq. (4) has no beta (beta = 1) and no reference model; the official code uses beta = 0.1
    (our default: summed log-probs over many tokens and frames saturate the sigmoid at beta = 1), also
    without a reference model. Passing ref_* log-probs of a frozen copy gives the DPO form."""
    delta = logp_chosen - logp_rejected
    if ref_chosen is not None:
        delta = delta - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * delta).mean()  # Eq. (4)
