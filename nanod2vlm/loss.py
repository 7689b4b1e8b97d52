"""Losses of D²VLM: supervised fine-tuning (Eq. 1-3) and factorized preference optimization (Eq. 4-7).

Pure functions of what D2VLM.forward returns for a batch of data.collate: logits (N, R, vocab) where logits[n, j]
predicts response token j (labels (N, R), -100 on padding), `sim` (K, T) the <evi>-frame similarity logits, `y`
(K, T) frame targets in [0, 1], `valid` (K, T) the real frames of each <evi>'s video. Reductions run in at least
float32 (bf16 log-probs summed over hundreds of tokens and frames would lose the preference margin).
"""
import torch
import torch.nn.functional as F


def _f32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays fp64


# -----------------------------------------------------------------------------
# SFT: L = L_sft + L_gnd + L_cons, Eq. (2)

def L_sft(logits, labels):
    """Next-token cross-entropy over the response tokens (<evi>, </evi> and the final <|end|> included)."""
    return F.cross_entropy(_f32(logits).flatten(0, 1), labels.flatten(), ignore_index=-100)


def per_sample(x, owner):
    """The mean of x (one value per <evi> or pair) over each response's own (owner: the response of each), then over
    the responses that have any: how the released code averages L_gnd and L_cons over a batch. No values: a zero
    in the graph."""
    if not len(x):
        return x.sum()
    _, row = owner.unique(return_inverse=True)  # the responses that have any, numbered 0, 1, ...
    return (x.new_zeros(int(row.max()) + 1).index_add(0, row, x) / torch.bincount(row).to(x.dtype)).mean()


def L_gnd(sim, y, valid, owner):
    """Grounding loss: BCE(y, sim) averaged over the valid frames of each <evi>, then over the <evi> of each response,
    then over responses (per_sample; owner: the response of each <evi>). The paper uses hard 1/0 targets; the released
    code a soft alpha^-d target (that comes in through y from the data)."""
    bce = F.binary_cross_entropy_with_logits(_f32(sim), _f32(y), reduction="none")
    per_evi = torch.where(valid, bce, 0).sum(1) / valid.sum(1).clamp(min=1)  # Eq. (3)
    return per_sample(per_evi, owner)


def L_match(sim, target, valid, owner):
    """Frame-level grounding as earlier grounding tokens do it (E.T. Chat's <vid>; the Tab. 6 ablation): a softmax
    over the valid frames, cross-entropy on the one target frame of each <evi>, averaged as L_gnd is."""
    logits = _f32(sim).masked_fill(~valid, float("-inf"))
    return per_sample(F.cross_entropy(logits, target, reduction="none"), owner)


def L_cons(f1, f2, owner):
    """Consistency between the k-th <evi> head output of stage 1 and of stage 2, f1/f2 (K, C): mean absolute
    difference over channels, then over the pairs of each response (owner), then over responses (per_sample)."""
    return per_sample((_f32(f1) - _f32(f2)).abs().mean(1), owner)  # Eq. (1); no pairs: 0


def cons_pairs(b):
    """Index pairs (stage-1 <evi> k, stage-2 <evi> k) of the same response, for Eq. (1) (none if a stage is empty)."""
    i1, i2 = (b["evi_stage"] == 1).nonzero()[:, 0], (b["evi_stage"] == 2).nonzero()[:, 0]
    same = (b["evi_b"][i2, None] == b["evi_b"][None, i1]) & (b["evi_k"][i2, None] == b["evi_k"][None, i1])
    r2, r1 = same.nonzero(as_tuple=True)
    return i1[r1], i2[r2]


def evi_valid(b):
    """The real frames of each <evi>'s video (K, T)."""
    return b["frm_valid"][b["resp_b"][b["evi_b"]]]


def sft_loss(logits, sim, f_evi, b, w_gnd=10.0, w_cons=10.0, rows=None, match=False):
    """Eq. (2) with the released weights (CE + 10 BCE + 10 L1) over the first `rows` responses (default: all) ->
    (loss, parts). match: frame-level <evi> grounded by L_match instead of Eq. (3). As released: L_sft over the
    batch's tokens (Hugging Face's mean), L_gnd and L_cons per response, then over responses."""
    labels = b["labels"][:rows]
    keep = b["evi_b"] < len(labels)  # the <evi> of those responses
    valid = evi_valid(b)[keep]
    l_sft = L_sft(logits[:rows], labels)
    grounding, target = (L_match, b["evi_span"][:, 0]) if match else (L_gnd, b["evi_y"])  # Eq. (3) or its ablation
    l_gnd = grounding(sim[keep], target[keep], valid, b["evi_b"][keep])
    i1, i2 = cons_pairs(b)
    pair = keep[i1]  # a pair's two <evi> share a response: the pairs of those responses
    l_cons = L_cons(f_evi[i1[pair]], f_evi[i2[pair]], b["evi_b"][i1[pair]])
    loss = l_sft + w_gnd * l_gnd + w_cons * l_cons  # Eq. (2)
    return loss, dict(sft=l_sft.item(), gnd=l_gnd.item(), cons=l_cons.item())


# -----------------------------------------------------------------------------
# FPO: preference over both the text tokens and the <evi> grounding, Eq. (4)-(7)

def log_p_g(sim, y, valid):
    """log of the interval-level grounding probability of each <evi> in the released form:
    sum_t log(y sigmoid(sim) + (1 - y)(1 - sigmoid(sim)) + 1e-10). With hard y it is the log of the paper's product of
    sigmoid(sim) inside the interval and 1 - sigmoid(sim) outside; soft y mixes the two probabilities. -> (K,)"""
    p = torch.sigmoid(_f32(sim))
    y = _f32(y)
    logp = torch.log(y * p + (1 - y) * (1 - p) + 1e-10)  # Eq. (6)
    return torch.where(valid, logp, 0).sum(-1)


def log_pi(logits, labels, sim, y, valid, evi_b):
    """log pi(R) per response -> (N,): summed (not averaged) log-probs of every response token plus log p_g of each
    of its <evi>, both stages."""
    tok = -F.cross_entropy(_f32(logits).transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (N, R)
    log_p_text = tok.sum(1)  # Eq. (5)
    lp_g = log_p_g(sim, y, valid)
    return log_p_text + lp_g.new_zeros(len(labels)).index_add(0, evi_b, lp_g)  # Eq. (7) = Eq. (5) + sum of Eq. (6)


def fpo_loss(logp_chosen, logp_rejected, beta=0.1):
    """-log sigmoid(beta * (log pi(R) - log pi(R_bar))), averaged over pairs. The paper's Eq. (4) has no beta
    (beta = 1); the released code uses beta = 0.1. Neither has a reference model."""
    return -F.logsigmoid(beta * (logp_chosen - logp_rejected)).mean()  # Eq. (4)


def fpo_step_loss(logits, sim, f_evi, b, beta=0.1, w_gnd=10.0, w_cons=10.0):
    """The released FPO objective: Eq. (2)'s SFT terms on the chosen responses (the first half of the batch) plus
    Eq. (4) over the whole chosen and rejected responses -> (loss, parts)."""
    n = len(b["labels"]) // 2
    logp = log_pi(logits, b["labels"], sim, b["evi_y"], evi_valid(b), b["evi_b"])
    pref = fpo_loss(logp[:n], logp[n:], beta)
    sft, parts = sft_loss(logits, sim, f_evi, b, w_gnd, w_cons, rows=n)
    return sft + pref, dict(parts, fpo=pref.item(), margin=(logp[:n] - logp[n:]).mean().item())
