"""WordPiece ids equal transformers' BertTokenizer on tricky strings; the nano vocab builder keeps corpus words."""
import transformers

from nanod2vlm.tokenizer import SPECIALS, WordPiece

VOCAB = SPECIALS + ["the", "cafe", "naive", "resume", "ecole", "un", "##aff", "##able", "run", "##ning", "##s",
                    "where", "'", "s", ",", "!", "?", ".", "$", "-", "(", ")", "1", "##00", "##0", "5", "a", "b",
                    "c", "hello", "world", "tab", "new", "line", "中", "文", "x", "##x", "##y", "##b"]
TRICKY = [
    "Hello, World! Where's the café?",
    "unaffable RUNNING runs unable",          # ## continuations, longest piece first
    "naïve Résumé ÉCOLE",                     # accents stripped after lowercasing
    "$100.5 a-b (c)",                         # ASCII punctuation splits, digits into ## pieces
    "x" * 101 + " xy " + "x" * 100,           # > 100 chars -> [UNK]; exactly 100 -> pieces
    "xyzzy qqq the",                          # no piece matches -> the whole word is [UNK]
    "tab\tnew\nline \u00a0 a\u200bb c\x00",   # whitespace kinds; zero-width space and NUL are dropped: a ##b
    "中文the",                                # CJK characters are words of their own
    "",
]


def _pair(tmp_path, tokens):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return WordPiece(str(path)), transformers.BertTokenizer(str(path), do_lower_case=True)


def test_ids_match_bert_tokenizer(tmp_path):
    ours, ref = _pair(tmp_path, VOCAB)
    for text in TRICKY:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.unk_id in ours.encode(TRICKY[5]) and ours.unk_id not in ours.encode(TRICKY[1])


def test_long_question_keeps_its_end_like_left_truncation(tmp_path):
    ours, ref = _pair(tmp_path, VOCAB)
    ref.truncation_side = "left"
    text = "hello world the cafe runs " * 3
    assert ours.encode(text, max_len=8) == ref(text, truncation=True, max_length=8)["input_ids"]
    assert len(ours.encode(text, max_len=8)) == 8


def test_nano_vocab_round_trips_corpus_words(tmp_path):
    corpus = ["<image>\nWhen does the man open the fridge?", "Locate all instances of: person sits down."]
    tok = WordPiece.build(corpus, str(tmp_path / "vocab.txt"))
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == SPECIALS and (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 2, 3)
    for word in ["when", "fridge", "instances", "image", "<", "?"]:
        assert tok.encode(word) == [tok.cls_id, lines.index(word), tok.sep_id]
    assert tok.unk_id not in tok.encode("Doors open.")  # unseen words of known letters use character pieces
    ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    assert tok.encode(corpus[0] + " Doors open.") == ref.encode(corpus[0] + " Doors open.")
