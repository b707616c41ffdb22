"""The bundled SentencePiece vocabulary and its reserved tokens.

Layout of the 8192 ids (seqio's convention, so seqio and loam agree on every id):
  0 pad, 1 eos, 2 unk, 3..5 the UL2 mode tokens [NLU] [NLG] [S2S] (user-defined pieces, which
  no text can produce by accident), then 8086 learned pieces with byte fallback, then the 100
  sentinels <extra_id_99> .. <extra_id_0> that seqio appends: sentinel i is id 8191 - i.

Retrain with ``python -m loam.data.vocab --out loam/data/bundled/loam.model``; the sample is a
deterministic slice of every domain's training split.

This module imports only sentencepiece. The seqio vocabulary of loam's tasks, with ids equal to
this module's on every path, is ``loam.data.tasks.vocabulary()`` (it imports seqio and TensorFlow).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
from pathlib import Path

import numpy as np
import sentencepiece as spm

from loam.data import corpora

MODEL_PATH = corpora.BUNDLED_DIR / "loam.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
NUM_SENTINELS = 100
SP_VOCAB_SIZE = 8092
VOCAB_SIZE = SP_VOCAB_SIZE + NUM_SENTINELS
SAMPLE_BYTES_PER_DOMAIN = 1_500_000


def sentinel_id(i: int) -> int:
    """Id of <extra_id_i>, counted down from the top as seqio and T5 do."""
    if not 0 <= i < NUM_SENTINELS:
        raise ValueError(f"sentinel index {i} outside [0, {NUM_SENTINELS})")
    return VOCAB_SIZE - 1 - i


class Vocabulary:
    """Fast encode/decode over the SentencePiece model, id-for-id equal to seqio's vocabulary."""

    def __init__(self, model_path: str | Path = MODEL_PATH):
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise FileNotFoundError(
                f"vocabulary {self.model_path} not found; train it with "
                "`python -m loam.data.vocab --out PATH`")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = self._sp.get_piece_size() + NUM_SENTINELS
        self.mode_ids = {t: self._sp.piece_to_id(t) for t in MODE_TOKENS}

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        base = self._sp.get_piece_size()
        return self._sp.decode([int(i) for i in ids if 0 < int(i) < base and int(i) != EOS_ID])

    def piece(self, i: int) -> str:
        if i >= self._sp.get_piece_size():
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return self._sp.id_to_piece(i)


@functools.cache
def default_vocabulary() -> Vocabulary:
    return Vocabulary()


def _sample(directory) -> list[str]:
    """Deterministic training sample: paragraphs of each domain's training documents in
    hash order, up to SAMPLE_BYTES_PER_DOMAIN per domain."""
    chunks = []
    for name in corpora.DOMAIN_NAMES:
        docs = [(d, t) for d, t in corpora.read_documents(corpora.corpus_path(name, directory))
                if not corpora.is_validation(d)]
        docs.sort(key=lambda dt: hashlib.sha256(dt[0].encode()).digest())
        used = 0
        for _, text in docs:
            for para in text.split("\n\n"):
                para = para[:3000]
                if para.strip():
                    chunks.append(para)
                    used += len(para.encode())
            if used >= SAMPLE_BYTES_PER_DOMAIN:
                break
    return chunks


def train(out: Path, directory=None) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample(directory)), model_writer=model,
        vocab_size=SP_VOCAB_SIZE, model_type="unigram", character_coverage=0.9995,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=4096,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        user_defined_symbols=list(MODE_TOKENS), shuffle_input_sentence=False,
        input_sentence_size=0, num_threads=1, seed_sentencepiece_size=200_000,
        minloglevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def bytes_per_token(directory=None, vocab: Vocabulary | None = None) -> dict[str, float]:
    """UTF-8 bytes per token of each domain's validation split."""
    vocab = vocab or default_vocabulary()
    report = {}
    for name in corpora.DOMAIN_NAMES:
        texts = [t for d, t in corpora.read_documents(corpora.corpus_path(name, directory))
                 if corpora.is_validation(d)]
        n_tok = sum(len(ids) for ids in vocab.encode(texts))
        report[name] = sum(len(t.encode()) for t in texts) / max(n_tok, 1)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the loam SentencePiece vocabulary.")
    p.add_argument("--out", type=Path, default=MODEL_PATH)
    p.add_argument("--data_dir", default=None, help="corpora to sample (default: bundled)")
    args = p.parse_args(argv)
    path = train(args.out, args.data_dir)
    vocab = Vocabulary(path)
    print({k: round(v, 3) for k, v in bytes_per_token(args.data_dir, vocab).items()})
    assert np.all([vocab.mode_ids[t] == 3 + i for i, t in enumerate(MODE_TOKENS)])


if __name__ == "__main__":
    main()
