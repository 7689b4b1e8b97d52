"""Shared by the end-to-end tests: a tiny model on the command line and a tiny rendered world."""
import pytest
import torch

from nanod2vlm.world import ensure_world

TINY = ["--n_embd=32", "--n_layer=1", "--n_head=2", "--n_mlp=64", "--vit_width=16", "--vit_layers=1", "--vit_heads=2",
        "--vit_mlp=32", "--qf_width=16", "--qf_layers=1", "--qf_heads=2", "--qf_mlp=32", "--qf_queries=2",
        "--img_size=16", "--batch_size=2", "--eval_json=none", "--seed=0"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A folder with the tiny world rendered in world/, run in one thread (2 threads on a shared 2-core machine
    run ~3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("e2e")
    ensure_world(str(d / "world"), n_train=4, n_test=2, durations=(10, 14), progress=False)
    yield d
    torch.set_num_threads(threads)


def force(model, tok, ids):
    """Make the model say `ids` (then <|end|>) whatever it sees: only the logits are forced, so <evi> grounding still
    runs on the real hidden states."""
    ids, vocab = iter(ids), model.llm.lm_head.weight.shape[0]

    def forced(x):
        logits = torch.full((*x.shape[:-1], vocab), -1e4)
        logits[..., next(ids, tok.end_id)] = 0
        return logits
    model.llm.lm_head.forward = forced
