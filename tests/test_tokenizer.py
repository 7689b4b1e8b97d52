"""Tokenizer: special tokens are single ids, text round-trips exactly, Phi-3 id layout, the nano model is deterministic."""
import json

import sentencepiece as spm

from nanod2vlm.tokenizer import PHI3_ADDED, Tokenizer

WORLD = ["The red square appears in <evi> and the blue circle moves left in <evi>.",
         "<evi> <evi> </evi> The green triangle appears in <evi> and disappears in <evi>.",
         "Where does the red square appear? Locate all instances of the blue circle moving.",
         "The video shows a yellow star sliding right, then a purple disc spinning."] * 10
TEXTS = ["</evi> The red square appears in <evi>.",
         "<evi> <evi> </evi> The green triangle appears in <evi> and <evi>.",
         "  leading and  double spaces, trailing \n newline and tab\t",
         "unseen characters: é, 日本, 😀 and digits 12.5s",
         "<|user|>\n<image>\nWhere?<|end|>\n<|assistant|>\n"]


def check_round_trip(tok):
    for t in TEXTS + [tok.chat("<image>\nWhere is the red square?") + "<evi> </evi> In <evi>.<|end|>"]:
        assert tok.decode(tok.encode(t)) == t
    ids = tok.encode(TEXTS[0])  # no dummy-prefix space: any split of the ids decodes to the same text (streaming)
    assert all(tok.decode(ids[:k]) + tok.decode(ids[k:]) == TEXTS[0] for k in range(len(ids) + 1))
    ids = tok.encode("</evi> The red square appears in <evi>.")
    assert ids[0] == tok.evi_end_id and ids.count(tok.evi_id) == 1 and ids[-2] == tok.evi_id
    ids = tok.encode("<image><evi></evi><|end|>")
    assert ids == [tok.image_id, tok.evi_id, tok.evi_end_id, tok.end_id]
    assert len({tok.evi_id, tok.evi_end_id, tok.image_id, tok.end_id, tok.pad_id}) == 5
    assert max(i for t in TEXTS for i in tok.encode(t)) < tok.vocab_size


def test_nano_tokenizer(tmp_path):
    tok = Tokenizer.nano(WORLD, tmp_path / "tok.model", vocab_size=400)
    check_round_trip(tok)
    assert tok.vocab_size <= 400 and tok.pad_id == tok.special["<|endoftext|>"]
    # the model file is rewritten only when the texts give another model: the same texts, the same bytes
    mtime = (tmp_path / "tok.model").stat().st_mtime_ns
    assert Tokenizer.nano(WORLD, tmp_path / "tok.model", vocab_size=400).encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert (tmp_path / "tok.model").stat().st_mtime_ns == mtime
    Tokenizer.nano(WORLD + ["a new sentence"], tmp_path / "tok.model", vocab_size=400)
    assert (tmp_path / "tok.model").stat().st_mtime_ns != mtime


def train_llama_like(path, vocab_size=300):
    """A Llama-style sentencepiece model (BPE, byte fallback, dummy prefix, <unk> <s> </s> = 0 1 2), small vocab."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([w.replace("<evi>", "").replace("</evi>", "") for w in WORLD]),
        model_prefix=str(path.with_suffix("")), vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    return path


def test_phi3_style_tokenizer(tmp_path):
    model = train_llama_like(tmp_path / "tokenizer.model")
    base = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    tok = Tokenizer.phi3(model)
    check_round_trip(tok)
    # Phi-3's added tokens at base + 0..10 (32000..32010 for the real 32000-piece model), then D²VLM's
    assert tok.special["<|endoftext|>"] == base and tok.special["<|assistant|>"] == base + 1
    assert tok.special["<|system|>"] == base + 6 and tok.end_id == base + 7 and tok.special["<|user|>"] == base + 10
    assert [tok.evi_id, tok.evi_end_id, tok.special["<vid>"], tok.image_id] == [base + i for i in (11, 12, 13, 14)]
    assert tok.pad_id == base and tok.vocab_size == base + 15
    # unused embedding rows past the vocabulary (Phi-3 has 32064 rows) decode to nothing, not to an error
    ids = tok.encode("<evi> red")
    assert tok.decode(ids[:1] + [tok.vocab_size, tok.vocab_size + 40] + ids[1:]) == "<evi> red"
    # a checkpoint directory: its added_tokens.json is read, the new tokens go after its last id
    (tmp_path / "added_tokens.json").write_text(json.dumps({**{s: base + i for i, s in enumerate(PHI3_ADDED)},
                                                            "<|extra|>": base + 11}))
    tok = Tokenizer.phi3(tmp_path)
    assert tok.encode("<|extra|>") == [base + 11] and tok.evi_id == base + 12 and tok.image_id == base + 15
    check_round_trip(tok)
    # ... and tokenizer_config.json's added_tokens_decoder (its base pieces such as <unk> 0 stay sentencepiece's)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "0": {"content": "<unk>"}, str(base + 12): {"content": "<|cfg|>"}}}))
    tok = Tokenizer.phi3(tmp_path)
    assert "<unk>" not in tok.special and tok.encode("<|cfg|>") == [base + 12] and tok.evi_id == base + 13
