"""Tokenizer: a sentencepiece model plus added special tokens (Phi-3's chat tokens and D²VLM's <evi>, </evi>).

Text is first split on the special-token strings (each becomes its one id); the pieces between are encoded by
sentencepiece *without* its dummy-prefix space, so every piece is encoded exactly as written and
decode(encode(text)) == text, also right after a special token (`</evi> The red square ...`).
Note: HF's Phi-3 tokenizer adds a "▁" at the start of text (and after special tokens); we do not.
"""
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import sentencepiece as spm

from nanod2vlm.files import InputError, write_atomic

# Phi-3-mini-4k-instruct's added tokens, at base_size + i (base 32000 -> <|endoftext|> 32000 ... <|user|> 32010)
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
D2VLM_ADDED = ["<evi>", "</evi>", "<vid>", "<image>"]  # new tokens, at the next free ids
NANO_SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] + D2VLM_ADDED
# A serialized protobuf field that, appended to a ModelProto, merges normalizer_spec.add_dummy_prefix = false
# (field 3 of ModelProto, length 2: field 3 of NormalizerSpec, varint 0): no extra dependency on protobuf.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
SYSTEM = "You are a helpful AI assistant."


class Tokenizer:
    def __init__(self, model_proto, special):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto + NO_DUMMY_PREFIX)
        self.special = dict(special)  # token string -> id
        self.special_str = {i: s for s, i in self.special.items()}
        self.split_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)) + ")")
        self.evi_id, self.evi_end_id, self.image_id = special["<evi>"], special["</evi>"], special["<image>"]
        self.end_id = special["<|end|>"]
        self.pad_id = special["<|endoftext|>"]  # Phi-3 pads with <|endoftext|>
        self.vocab_size = max(self.sp.get_piece_size(), max(special.values()) + 1)

    @classmethod
    def phi3(cls, path):
        """Phi-3's tokenizer.model (or a directory holding it, plus added_tokens.json / tokenizer_config.json if
        present), then D²VLM's new tokens. Added ids are relative to the base size (32000 for Phi-3)."""
        path = Path(path)
        model = path / "tokenizer.model" if path.is_dir() else path
        if not model.is_file():
            raise InputError(f"{model}: no sentencepiece tokenizer.model here")
        proto = model.read_bytes()
        base = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
        special = {s: base + i for i, s in enumerate(PHI3_ADDED)}
        # a folder's added_tokens.json and tokenizer_config.json, where there (a file's path has none)
        read = lambda name: json.loads((path / name).read_text()) if (path / name).is_file() else {}
        special.update(read("added_tokens.json"))
        added = read("tokenizer_config.json").get("added_tokens_decoder", {})
        special.update({t["content"]: int(i) for i, t in added.items() if int(i) >= base})
        for s in D2VLM_ADDED:
            special.setdefault(s, max(special.values()) + 1)
        return cls(proto, special)

    @classmethod
    def nano(cls, texts, path, vocab_size=512):
        """Train a small byte-fallback BPE sentencepiece model on `texts`, with the special tokens as single pieces.
        It is tiny, so every run trains it again (one thread: the same texts give the same bytes); it is written to
        `path` unless that file already holds it."""
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for t in texts for line in t.split("\n") if line), model_writer=out,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, user_defined_symbols=NANO_SPECIAL, unk_id=0,
            bos_id=-1, eos_id=-1, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, hard_vocab_limit=False, num_threads=1, minloglevel=2)
        proto = out.getvalue()
        if not (os.path.isfile(path) and Path(path).read_bytes() == proto):
            write_atomic(path, proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        return cls(proto, {s: sp.piece_to_id(s) for s in NANO_SPECIAL})  # the special tokens are pieces of it

    def encode(self, text, special=None):
        """Text -> ids. special: the special-token strings that become their ids (default: all); any other one stays
        the text it is (encoded in two parts: sentencepiece would match a special piece of the nano model whole)."""
        ids = []
        for part in self.split_re.split(text):
            if part in self.special and (special is None or part in special):
                ids.append(self.special[part])
            elif part in self.special:
                ids += self.sp.encode(part[0]) + self.sp.encode(part[1:])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids):
        """Ids -> text. Ids that name no piece (the unused embedding rows past the vocabulary, e.g. Phi-3's
        32064 rows for ~32015 tokens, which a poorly trained model can still emit) decode to nothing."""
        out, run = [], []  # run: the sentencepiece ids since the last special token
        for i in map(int, ids):
            if i in self.special_str:
                out += [self.sp.decode(run), self.special_str[i]]
                run = []
            elif 0 <= i < self.sp.get_piece_size():
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def prompt(self, question, special=(), frames=1):
        """The generation prompt's ids for a question about a video of `frames` frames ("<image>\\n" + question, as
        released, with one <image> per frame): the question is text but for the special tokens in `special` (its
        <evi>, one per src interval), so that <evi>, <image> or <|end|> typed by a user stay characters, not a
        reference, a frame or an end. Training and answering both build their prompts here."""
        head, tail = self.chat("\0").split("\0")
        return self.encode(head) + [self.image_id] * frames + self.encode("\n" + question, special) + self.encode(tail)

    @staticmethod
    def chat(question):
        """Phi-3's chat template (the released prompt), up to the answer: the generation prompt."""
        return f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{question}<|end|>\n<|assistant|>\n"


# ---------------------------------------------------------------------------------------------------------
# WordPiece: the uncased BERT tokenizer that feeds the question to the Q-Former

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# what BERT splits off as a word of its own besides Unicode punctuation: every non-alphanumeric ASCII character
# (e.g. "$" and "^") and the CJK ideographs
SPLIT_RANGES = ((33, 47), (58, 64), (91, 96), (123, 126), (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def basic_tokenize(text):
    """Clean, lowercase, strip accents, split on whitespace, punctuation and CJK characters (BERT's BasicTokenizer)."""
    out = []
    for c in unicodedata.normalize("NFD", text.lower()):
        cat = unicodedata.category(c)
        if c in " \t\n\r" or cat == "Zs":
            out.append(" ")
        elif not (ord(c) in (0, 0xFFFD) or cat[0] == "C" or cat == "Mn"):  # drop control chars and accents
            out.append(f" {c} " if cat[0] == "P" or any(a <= ord(c) <= b for a, b in SPLIT_RANGES) else c)
    return "".join(out).split()


class WordPiece:
    """Greedy longest-match-first WordPiece over a BERT `vocab.txt` (one token per line, id = line number)."""

    def __init__(self, vocab_file):
        if not os.path.isfile(vocab_file):
            raise InputError(f"{vocab_file}: no WordPiece vocab.txt (bert-base-uncased's, or WordPiece.build)")
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (self.vocab[t] for t in SPECIALS[:4])

    def encode(self, text, max_len=256):
        """[CLS] pieces [SEP]; a longer question keeps its end (E.T. Chat truncates on the left)."""
        ids = [i for word in basic_tokenize(text) for i in self._word(word)]
        return [self.cls_id] + ids[max(0, len(ids) - (max_len - 2)):] + [self.sep_id]

    def _word(self, word):
        if len(word) > 100:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest piece first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:
                return [self.unk_id]  # no piece matches: the whole word is unknown
            start = end
        return ids

    @classmethod
    def build(cls, texts, vocab_file):
        """A tiny vocab for the nano model: the specials, every corpus word, and every character alone and as
        a ## piece (so unseen words of known letters still tokenize). Writes vocab_file, returns the tokenizer."""
        words = sorted({w for t in texts for w in basic_tokenize(t)})
        chars = sorted({c for w in words for c in w})
        tokens = dict.fromkeys(SPECIALS + words + chars + ["##" + c for c in chars])  # ordered, no duplicates
        write_atomic(vocab_file, "".join(t + "\n" for t in tokens))
        return cls(vocab_file)
