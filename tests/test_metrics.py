"""Scorers on small cases computed by hand."""
import pytest

from nanod2vlm.metrics import dense_caption_scores, grounding_recall, iou, match, multi_span_f1, parse_spans


def test_iou_cases():
    assert iou([2, 8], [2, 8]) == 1.0
    assert iou([0, 2], [5, 9]) == 0.0  # disjoint
    assert iou([0, 2], [2, 4]) == 0.0  # touching
    assert iou([0, 10], [5, 20]) == pytest.approx(5 / 20)  # inter [5, 10], union [0, 20]
    assert iou([4, 6], [0, 10]) == pytest.approx(2 / 10)  # nested
    assert iou([8, 2], [2, 8]) == 1.0  # reversed span is sorted first
    assert iou([3, 3], [3, 3]) == 1.0 and iou([3, 3], [4, 4]) == 0.0 and iou([3, 3], [0, 5]) == 0.0


def test_grounding_recall_denominators():
    gts = [[0, 10], [0, 10], [0, 10], [0, 10]]
    preds = [[0, 10], [5, 15], None, [20, 30]]  # IoU 1, 5/15, unparsable, 0
    r = grounding_recall(preds, gts)
    assert r["n"] == 4 and r["unparsable"] == 1
    assert r["R1@0.3/all"] == pytest.approx(100 * 2 / 4) and r["R1@0.3/parsable"] == pytest.approx(100 * 2 / 3)
    assert r["R1@0.5/all"] == pytest.approx(25) and r["R1@0.7/parsable"] == pytest.approx(100 / 3)
    assert r["mIoU/all"] == pytest.approx(100 * (1 + 1 / 3) / 4)
    assert r["mIoU/parsable"] == pytest.approx(100 * (1 + 1 / 3) / 3)
    empty = grounding_recall([None], [[0, 1]])
    assert empty["R1@0.5/all"] == 0 and empty["R1@0.5/parsable"] == 0 and empty["unparsable"] == 1
    with pytest.raises(ValueError):
        grounding_recall([[0, 1]], [])


def test_multi_span_perfect_disjoint_empty():
    gt = [[0, 10], [20, 30]]
    assert multi_span_f1([gt], [gt])["F1"] == pytest.approx(100)
    assert multi_span_f1([[[40, 50]]], [gt])["F1"] == 0
    empty = multi_span_f1([[]], [gt])
    assert empty["F1"] == 0 and empty["P"] == 0 and empty["R"] == 0


def test_multi_span_duplicate_prediction_matches_once():
    gt = [[0, 10], [20, 30]]
    pred = [[0, 10], [0, 10]]  # the duplicate must not take the second ground truth
    assert match(pred, gt, 0.1) == [(0, 0)]
    r = multi_span_f1([pred], [gt])
    assert r["P"] == pytest.approx(50) and r["R"] == pytest.approx(50) and r["F1"] == pytest.approx(50)


def test_multi_span_thresholds_and_sample_average():
    # sample 1: one pred with IoU 0.4 to its gt -> hit at 0.1 and 0.3 only: F1 = (1 + 1 + 0 + 0) / 4
    # sample 2: perfect -> 1.   Average over samples: (0.5 + 1) / 2
    r = multi_span_f1([[[0, 4]], [[5, 6]]], [[[0, 10]], [[5, 6]]])
    assert r["F1"] == pytest.approx(75) and r["F1@0.3"] == pytest.approx(100) and r["F1@0.5"] == pytest.approx(50)
    # greedy by IoU: (pred 1, gt 0) IoU 1 first; pred 0 then takes gt 1 (IoU 4/12), not the used gt 0 (0.9)
    assert match([[0, 9], [0, 10]], [[0, 10], [5, 12]], 0.1) == [(1, 0), (0, 1)]


def test_dense_caption_scores():
    gt = [([0, 10], "a red square appears"), ([20, 30], "a blue circle spins")]
    same = dense_caption_scores([gt], [gt])
    assert same["F1"] == pytest.approx(100) and same["Sim_unigram"] == pytest.approx(100)
    pred = [([0, 10], "a green square appears"), ([50, 60], "a blue circle spins")]
    r = dense_caption_scores([pred], [gt])
    assert r["F1"] == pytest.approx(50)  # one of two matched at every threshold: P = R = 1/2
    assert r["Sim_unigram"] == pytest.approx(100 * 3 / 4)  # only the matched pair counts: 3 of 4 words shared
    assert dense_caption_scores([[]], [gt])["Sim_unigram"] == 0


def test_parse_spans():
    text = "<evi> <evi> </evi> A red square appears in 6.3s - 12.1s. A blue circle spins at 21s-24.4s and 30 - 31.5s."
    assert parse_spans(text) == [[6.3, 12.1], [21.0, 24.4], [30.0, 31.5]]
    assert parse_spans("The answer is 3 squares.") == []
