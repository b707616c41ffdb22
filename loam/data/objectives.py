"""Pretraining objectives as pure numpy functions of (token chunk, seed).

Every objective turns one raw token chunk (a document or a piece of one, EOS included where the
document ends) into an Example for a decoder-only model:

  ``tokens``     int32 [m]  what the model predicts; for prefix objectives ``inputs ++ targets``
  ``loss_mask``  bool  [m]  which positions of ``tokens`` are predicted
  ``prefix_len`` int        leading tokens in the bidirectional prefix (0 for causal LM)

Special ids (EOS, the sentinels, UL2's mode tokens) come from the run's tokenizer: build an
objective with ``get_objective(name, tokenizer)``; without one, the bundled vocabulary's ids.

Randomness comes only from the ``seed`` the caller passes (the mixture stream derives it from the
example's place in the stream), so an example is reproducible anywhere. Output lengths are
deterministic functions of the chunk length (and, for UL2, of the seed through the denoiser it
picks), which lets the stream pack rows before materialising any example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from loam.data.corpora import CorpusError
from loam.data.vocab import EOS_ID, MODE_TOKENS, NUM_SENTINELS, Tokenizer, sentinel_id

# The bundled vocabulary reserves ids 3, 4, 5 for the mode tokens (checked when it is trained).
MODE_IDS = {t: 3 + i for i, t in enumerate(MODE_TOKENS)}
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------------------------- seeds


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64's finaliser); vectorised, wraps silently."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derive_seeds(*keys) -> np.ndarray:
    """Hash a tuple of non-negative integer keys (scalars or broadcastable arrays) into uint64
    seeds. Used for (seed, domain, epoch, chunk index) -> the chunk's corruption seed."""
    h = np.zeros((), dtype=np.uint64)
    for k in keys:
        k = np.asarray(k)
        if k.dtype.kind == "i" and np.any(k < 0):
            raise ValueError(f"seed keys must be non-negative, got {k}")
        h = _splitmix64(h ^ (k.astype(np.uint64) & _MASK64))
    return h


def _uniform(seeds) -> np.ndarray:
    """One U[0,1) draw per seed, vectorised (so the stream can predict UL2's denoiser choice)."""
    h = _splitmix64(_splitmix64(np.asarray(seeds, dtype=np.uint64)) ^ np.uint64(0x5DEECE66D))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _rng(seed) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=int(seed)))


# ----------------------------------------------------------------------------- special ids


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids an objective writes itself: EOS, <extra_id_0> (sentinel i is ``sentinel0 - i``)
    and the mode tokens a tokenizer has. `BUNDLED`: the bundled vocabulary's."""
    eos_id: int
    sentinel0: int
    mode_ids: tuple[tuple[str, int], ...]
    tokenizer: str = "bundled"

    @classmethod
    def of(cls, tokenizer: Tokenizer | None) -> SpecialIds:
        if tokenizer is None:
            return BUNDLED
        return cls(int(tokenizer.eos_id), int(tokenizer.sentinel_id(0)),
                   tuple(sorted((t, int(i)) for t, i in tokenizer.mode_ids.items())),
                   tokenizer.spec)


BUNDLED = SpecialIds(EOS_ID, sentinel_id(0), tuple(sorted(MODE_IDS.items())))


# ----------------------------------------------------------------------------- examples


def _example(tokens, loss_mask, prefix_len: int) -> dict:
    return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(loss_mask, bool),
            "prefix_len": int(prefix_len)}


def example_features(example: dict) -> dict:
    """1-D model features of one example (the per-segment view of a packed row).

    ``prefix`` marks positions 0..prefix_len inclusive: the decoder input at position prefix_len
    is the last prefix token (inputs are shifted right), as seqio's PrefixLM
    ``decoder_causal_attention`` does.
    """
    tokens = np.asarray(example["tokens"], np.int32)
    m = tokens.shape[0]
    inputs = np.zeros(m, np.int32)
    inputs[1:] = tokens[:-1]
    prefix = np.zeros(m, np.int32)
    if example["prefix_len"] > 0:
        prefix[: example["prefix_len"] + 1] = 1
    return {"inputs": inputs, "targets": tokens,
            "loss_weights": np.asarray(example["loss_mask"], np.float32),
            "positions": np.arange(m, dtype=np.int32), "prefix": prefix}


# ----------------------------------------------------------------------------- objectives


class Objective:
    """Base: subclasses define ``apply`` and ``output_len`` (or ``output_lens``).
    ``special``: the tokenizer ids it writes (`SpecialIds`)."""

    name = "objective"
    special: SpecialIds = BUNDLED

    def output_len(self, n: int) -> int:
        raise NotImplementedError

    def output_lens(self, lengths: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Output length of every (chunk length, seed) pair, without building the examples."""
        lengths = np.asarray(lengths, np.int64)
        table = np.array([self.output_len(n) for n in range(int(lengths.max(initial=0)) + 1)])
        return table[lengths]

    def max_input_len(self, seq_len: int) -> int:
        """Longest chunk whose every possible output fits in seq_len (outputs grow with n)."""
        lo, hi = 0, seq_len
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._worst_output_len(mid) <= seq_len:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            raise ValueError(f"{self.name}: seq_len {seq_len} is too short for any example; "
                             "use a longer seq_len")
        return lo

    def _worst_output_len(self, n: int) -> float:
        return self.output_len(n)

    def apply(self, tokens: np.ndarray, seed: int) -> dict:
        raise NotImplementedError

    def _tokenizer_repr(self) -> str:
        spec = self.special.tokenizer
        return "" if spec == "bundled" else f"tokenizer={spec!r}"

    def __repr__(self):
        return f"{type(self).__name__}({self._tokenizer_repr()})"


class CausalLM(Objective):
    """Next-token prediction on every position."""

    name = "causal"

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.special = SpecialIds.of(tokenizer)

    def output_len(self, n):
        return n

    def output_lens(self, lengths, seeds):
        return np.asarray(lengths, np.int64)

    def apply(self, tokens, seed=0):
        tokens = np.asarray(tokens, np.int32)
        return _example(tokens, np.ones(tokens.shape[0], bool), 0)


def _prefix_lm(tokens: np.ndarray, rng: np.random.Generator, lead: Sequence[int] = ()) -> dict:
    """Split at a uniform point in [1, n-1]: the left part is a bidirectional prefix."""
    n = tokens.shape[0]
    split = int(rng.integers(1, n)) if n >= 2 else 0
    out = np.concatenate([np.asarray(lead, np.int32), tokens]).astype(np.int32)
    prefix_len = len(lead) + split
    mask = np.arange(out.shape[0]) >= prefix_len
    return _example(out, mask, prefix_len if prefix_len > 0 else 0)


class PrefixLM(Objective):
    """Prefix LM: a random split point; loss only after it (seqio's prefix_lm objective)."""

    name = "prefix_lm"

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.special = SpecialIds.of(tokenizer)

    def output_len(self, n):
        return n

    def output_lens(self, lengths, seeds):
        return np.asarray(lengths, np.int64)

    def apply(self, tokens, seed):
        return _prefix_lm(np.asarray(tokens, np.int32), _rng(seed))


def span_counts(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of n tokens, as T5's random_spans_noise_mask."""
    if n < 2:
        return 0, 0
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_spans = min(num_spans, num_noise, n - num_noise)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng) -> np.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty parts."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(n: int, noise_density: float, mean_span: float, rng) -> np.ndarray:
    """T5's noise mask: alternating non-noise/noise spans, starting with non-noise."""
    num_noise, num_spans = span_counts(n, noise_density, mean_span)
    if num_spans == 0:
        return np.zeros(n, bool)
    noise = _random_segmentation(num_noise, num_spans, rng)
    keep = _random_segmentation(n - num_noise, num_spans, rng)
    lengths = np.stack([keep, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), lengths)


def _span_corrupt(tokens, noise_density, mean_span, rng, lead: Sequence[int] = (),
                  special: SpecialIds = BUNDLED) -> dict:
    """inputs = [lead] text with each noise span replaced by its sentinel;
    targets = sentinel_i span_i ... EOS. Loss only on targets."""
    tokens = np.asarray(tokens, np.int32)
    noise = random_spans_noise_mask(tokens.shape[0], noise_density, mean_span, rng)
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    span_index = np.cumsum(starts) - 1
    sentinels = (special.sentinel0 - span_index).astype(np.int32)  # sentinel i = top - i
    # inputs: keep non-noise tokens; each span's first token becomes its sentinel.
    inp = np.where(starts, sentinels, tokens)[~noise | starts]
    # targets: each span's sentinel followed by the span's tokens, then EOS.
    tgt = np.insert(tokens[noise], np.flatnonzero(starts[noise]), sentinels[starts])
    lead_ids = np.asarray(lead, np.int32)
    out = np.concatenate([lead_ids, inp, tgt, [special.eos_id]]).astype(np.int32)
    prefix_len = lead_ids.shape[0] + inp.shape[0]
    return _example(out, np.arange(out.shape[0]) >= prefix_len, prefix_len)


def _span_output_len(n: int, noise_density: float, mean_span: float) -> int:
    _, spans = span_counts(n, noise_density, mean_span)
    return n + 2 * spans + 1


class SpanCorruption(Objective):
    """T5 span corruption cast for a decoder-only model (inputs as a bidirectional prefix)."""

    name = "span_corruption"

    def __init__(self, noise_density: float = 0.15, mean_span: float = 3.0,
                 tokenizer: Tokenizer | None = None):
        if not 0 < noise_density < 1 or mean_span < 1:
            raise ValueError(f"span corruption needs 0 < noise_density < 1 and mean_span >= 1, "
                             f"got {noise_density}, {mean_span}")
        self.noise_density, self.mean_span = noise_density, mean_span
        self.special = SpecialIds.of(tokenizer)

    def output_len(self, n):
        return _span_output_len(n, self.noise_density, self.mean_span)

    def _worst_output_len(self, n):
        spans = span_counts(n, self.noise_density, self.mean_span)[1]
        return self.output_len(n) if spans <= NUM_SENTINELS else np.inf

    def apply(self, tokens, seed):
        return _span_corrupt(tokens, self.noise_density, self.mean_span, _rng(seed),
                             special=self.special)

    def __repr__(self):
        extra = self._tokenizer_repr()
        return (f"SpanCorruption(noise_density={self.noise_density}, mean_span={self.mean_span}"
                f"{', ' + extra if extra else ''})")


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: mode 'R'/'X' (span corruption) or 'S' (prefix LM)."""
    mode: str
    mean_span: float = 0.0
    noise_density: float = 0.0

    @property
    def name(self) -> str:
        if self.mode == "S":
            return "S"
        return f"{self.mode}(span={self.mean_span:g},density={self.noise_density:g})"


# UL2's seven denoisers (Tay et al., 2022): R at 15% with spans 3 and 8; X at 50% with spans 3
# and 8 and span 64 at 15% and 50%; S as prefix LM.
UL2_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R", 3, 0.15), Denoiser("R", 8, 0.15),
    Denoiser("X", 3, 0.5), Denoiser("X", 8, 0.5), Denoiser("X", 64, 0.15), Denoiser("X", 64, 0.5),
    Denoiser("S"),
)
UL2_MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


class UL2(Objective):
    """Mixture of denoisers; each example starts with its mode token inside the prefix.

    ``weights`` is either one weight per denoiser or a dict over modes {"R", "X", "S"} (split
    evenly among that mode's denoisers). Default: all seven denoisers equally likely. The mode
    tokens are the tokenizer's (``mode_ids`` overrides them); a tokenizer without the mode
    tokens of the denoisers that have weight is refused.
    """

    name = "ul2"

    def __init__(self, weights=None, denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                 mode_ids: dict | None = None, tokenizer: Tokenizer | None = None):
        self.denoisers = tuple(denoisers)
        for d in self.denoisers:
            if d.mode not in UL2_MODE_TOKENS:
                raise ValueError(f"unknown UL2 mode {d.mode!r}; use one of R, X, S")
            if d.mode != "S" and not (0 < d.noise_density < 1 and d.mean_span >= 1):
                raise ValueError(f"denoiser {d} needs 0 < noise_density < 1 and mean_span >= 1")
        if weights is None:
            w = np.ones(len(self.denoisers))
        elif isinstance(weights, dict):
            unknown = set(weights) - set(UL2_MODE_TOKENS)
            if unknown:
                raise ValueError(f"UL2 weights name unknown modes {sorted(unknown)}; "
                                 "use keys among 'R', 'X', 'S'")
            counts = {m: sum(d.mode == m for d in self.denoisers) for m in UL2_MODE_TOKENS}
            w = np.array([weights.get(d.mode, 0.0) / counts[d.mode] for d in self.denoisers])
        else:
            w = np.asarray(weights, np.float64)
            if w.shape != (len(self.denoisers),):
                raise ValueError(f"UL2 needs one weight per denoiser ({len(self.denoisers)}), "
                                 f"got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"UL2 denoiser weights must be finite, non-negative and not all "
                             f"zero, got {w}")
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0
        self.special = SpecialIds.of(tokenizer)
        if mode_ids is None:
            mode_ids = dict(self.special.mode_ids)
        needed = sorted({d.mode for d, w in zip(self.denoisers, self.weights) if w > 0},
                        key="RXS".index)
        missing = [UL2_MODE_TOKENS[m] for m in needed if UL2_MODE_TOKENS[m] not in mode_ids]
        if missing:
            raise CorpusError(
                f"the UL2 objective needs the mode token(s) {' '.join(missing)} as single ids, "
                f"which tokenizer {self.special.tokenizer} lacks; use a tokenizer that has "
                "them (`python -m loam.data.vocab --config FILE --out PATH` trains one; a "
                "tokenizers file needs them as added tokens) or another objective "
                "(span_corruption, prefix_lm, causal)")
        self.mode_token_ids = {m: int(mode_ids[t]) for m, t in UL2_MODE_TOKENS.items()
                               if t in mode_ids}

    def denoiser_index(self, seeds) -> np.ndarray:
        """Which denoiser each seed selects (vectorised, a pure function of the seed)."""
        return np.minimum(np.searchsorted(self._cum, _uniform(seeds), side="right"),
                          len(self.denoisers) - 1)

    def _len_for(self, n: int, d: Denoiser) -> int:
        if d.mode == "S":
            return n + 1
        return 1 + _span_output_len(n, d.noise_density, d.mean_span)

    def output_lens(self, lengths, seeds):
        lengths = np.asarray(lengths, np.int64)
        idx = self.denoiser_index(seeds)
        out = np.empty(lengths.shape, np.int64)
        for k, d in enumerate(self.denoisers):
            sel = idx == k
            if np.any(sel):
                out[sel] = [self._len_for(int(n), d) for n in lengths[sel]] if d.mode != "S" \
                    else lengths[sel] + 1
        return out

    def output_len(self, n):
        raise ValueError("UL2's output length depends on the denoiser; use output_lens(n, seeds)")

    def _worst_output_len(self, n):
        worst = 0
        for d, w in zip(self.denoisers, self.weights):
            if w == 0:
                continue
            if d.mode != "S" and span_counts(n, d.noise_density, d.mean_span)[1] > NUM_SENTINELS:
                return np.inf
            worst = max(worst, self._len_for(n, d))
        return worst

    def apply(self, tokens, seed):
        d = self.denoisers[int(self.denoiser_index(seed))]
        rng = _rng(seed)
        lead = (self.mode_token_ids[d.mode],)
        tokens = np.asarray(tokens, np.int32)
        if d.mode == "S":
            return _prefix_lm(tokens, rng, lead)
        return _span_corrupt(tokens, d.noise_density, d.mean_span, rng, lead, self.special)

    def __repr__(self):
        extra = self._tokenizer_repr()
        return f"UL2(weights={np.round(self.weights, 4).tolist()}{', ' + extra if extra else ''})"


OBJECTIVES = {"causal": CausalLM, "prefix_lm": PrefixLM, "span_corruption": SpanCorruption,
              "ul2": UL2}


def get_objective(name: str | Objective, tokenizer: Tokenizer | None = None,
                  **kwargs) -> Objective:
    """The objective `name` (a key of OBJECTIVES) writing `tokenizer`'s special ids (default:
    the bundled vocabulary's); keyword arguments go to its constructor. An Objective is given
    back as it is, if its special ids are the tokenizer's."""
    if isinstance(name, Objective):
        if tokenizer is not None and name.special != SpecialIds.of(tokenizer):
            raise ValueError(f"objective {name!r} was built for tokenizer "
                             f"{name.special.tokenizer}, not {tokenizer.spec}; build it with "
                             "get_objective(name, tokenizer)")
        return name
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    return OBJECTIVES[name](**kwargs)
