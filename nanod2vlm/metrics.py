"""Evaluation scorers written from their definitions (SPEC §7), not copied from any benchmark's code.

Spans are [start, end] in seconds. Every score is a percentage. Multi-span scores match predicted to
ground-truth spans one-to-one, greedily by decreasing IoU (optimal matching can find more pairs in rare
tie-heavy cases; greedy is what we report), and average over IoU thresholds first, then over samples.
"""
import re
from collections import Counter

SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*s?\s*(?:-|–|to)\s*(\d+(?:\.\d+)?)\s*s(?:econds)?\b")
WORD = re.compile(r"[a-z0-9]+")


def parse_spans(text):
    """Every "6.3s - 12.1s" span of a rendered answer, in order, as [start, end] floats."""
    return [[float(a), float(b)] for a, b in SPAN.findall(text)]


def iou(a, b):
    """Temporal IoU of two spans (each sorted first, so a reversed span still scores). Zero-length spans:
    two identical instants have IoU 1, any other pair involving an instant has IoU 0."""
    (s1, e1), (s2, e2) = sorted(a), sorted(b)
    inter, union = max(0.0, min(e1, e2) - max(s1, s2)), max(e1, e2) - min(s1, s2)  # union exact when inter > 0
    return inter / union if union > 0 else 1.0


def grounding_recall(preds, gts, thresholds=(0.3, 0.5, 0.7)):
    """Moment retrieval (Charades-STA): R@1 at each IoU threshold (IoU >= th) and mIoU. preds[i] is the first
    predicted span or None when the answer had none. Reported with two denominators: "all" (an unparsable
    answer counts as a miss with IoU 0, the honest number) and "parsable" (unparsable answers left out)."""
    if len(preds) != len(gts):
        raise ValueError(f"grounding_recall: {len(preds)} predictions for {len(gts)} ground truths")
    ious = [iou(p, g) for p, g in zip(preds, gts) if p is not None]
    res = {"n": len(preds), "unparsable": len(preds) - len(ious)}
    for name, d in (("all", len(preds)), ("parsable", len(ious))):
        for th in thresholds:
            res[f"R1@{th}/{name}"] = 100 * sum(x >= th for x in ious) / max(d, 1)
        res[f"mIoU/{name}"] = 100 * sum(ious) / max(d, 1)
    return res


def match(pred, gt, th):
    """Greedy one-to-one matching: (pred index, gt index) pairs by decreasing IoU, each span used at most
    once, IoU >= th."""
    pairs = sorted(((iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)), key=lambda x: -x[0])
    out = []
    for x, i, j in pairs:  # stable sort: ties keep (pred, gt) index order
        if x >= th and all(i != a and j != b for a, b in out):
            out.append((i, j))
    return out


def multi_span_f1(pred_spans, gt_spans, thresholds=(0.1, 0.3, 0.5, 0.7)):
    """Action localization / dense captioning spans: per sample and threshold, precision = matched/predicted,
    recall = matched/ground truth, F1 (0 when nothing matches, also for an empty prediction); each averaged
    over thresholds, then over samples. With one predicted and one ground-truth span, F1 = recall = hit
    (the single-span TVG/EPM F1)."""
    if len(pred_spans) != len(gt_spans):
        raise ValueError(f"multi_span_f1: {len(pred_spans)} predictions for {len(gt_spans)} ground truths")
    rows = []  # (sample, threshold) -> (P, R, F1)
    for p, g in zip(pred_spans, gt_spans):
        tps = [len(match(p, g, th)) for th in thresholds]
        rows.append([(tp / max(len(p), 1), tp / max(len(g), 1)) for tp in tps])
    rows = [[(P, R, 2 * P * R / (P + R) if P + R else 0.0) for P, R in r] for r in rows]
    n, res = max(len(rows), 1), {}
    for m, name in enumerate(("P", "R", "F1")):
        res[name] = 100 * sum(sum(x[m] for x in r) / len(thresholds) for r in rows) / n
    for t, th in enumerate(thresholds):
        res[f"F1@{th}"] = 100 * sum(r[t][2] for r in rows) / n
    return res


def word_f1(a, b):
    """Unigram F1 between two captions (lower-cased alphanumeric words, multiset overlap)."""
    wa, wb = WORD.findall(a.lower()), WORD.findall(b.lower())
    common = sum((Counter(wa) & Counter(wb)).values())
    return 2 * common / (len(wa) + len(wb)) if common else 0.0


def dense_caption_scores(preds, gts, thresholds=(0.1, 0.3, 0.5, 0.7)):
    """Dense captioning over a set of samples; preds[i], gts[i] are lists of (span, caption). Span scores as
    multi_span_f1, plus "Sim_unigram": per threshold, the mean unigram F1 (word_f1) of the captions of the
    matched pairs (0 when nothing matches), averaged over thresholds, then samples. This is a cheap offline
    stand-in for E.T. Bench's sentence-embedding "Sim" and is not comparable to the paper's number."""
    spans = lambda xs: [[s for s, _ in x] for x in xs]  # noqa: E731
    res = multi_span_f1(spans(preds), spans(gts), thresholds)
    sims = []
    for p, g in zip(preds, gts):
        per_th = [[word_f1(p[i][1], g[j][1]) for i, j in match([s for s, _ in p], [s for s, _ in g], th)]
                  for th in thresholds]
        sims.append(sum(sum(m) / len(m) if m else 0.0 for m in per_th) / len(thresholds))
    res["Sim_unigram"] = 100 * sum(sims) / max(len(sims), 1)
    return res
