"""E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE-L and CIDEr over multi-reference groups.

Everything runs offline in pure Python (sacrebleu and nltk code only; no NLTK data
is needed). Inputs are ``hypotheses[i]`` (one generated text per meaning
representation) and ``references[i]`` (the list of all human references for that
MR; groups may have different sizes).

Scales follow the tables of the E2E and LoRA papers: BLEU, METEOR and ROUGE-L are
percentages (0-100), NIST and CIDEr are raw values.

Tokenization
    * "13a" (BLEU, NIST), as mteval-v13a.pl used by the official e2e-metrics
      scorer, which is case-insensitive by default: lowercase the text, then apply
      sacrebleu's ``13a`` tokenizer (punctuation split off, except periods and
      commas inside numbers; hyphens split off) and split on whitespace.
    * "PTB" (METEOR, ROUGE-L, CIDEr), as coco-caption's PTBTokenizer: lowercase,
      split off periods that are not inside a number, tokenize with NLTK's
      ``TreebankWordTokenizer`` (splits punctuation and clitics such as "'s",
      "n't"), then drop punctuation tokens (`` '' ' ` " . , ? ! : ; - -- ...
      and brackets).

BLEU (0-100)
    Corpus BLEU-4 from ``sacrebleu`` (``tokenize="13a"``, ``lowercase=True``,
    ``smooth_method="none"``): modified n-gram precisions for n = 1..4, hypothesis
    n-gram counts clipped by their maximum count in any reference of the group,
    summed over the corpus, geometric mean, times the brevity penalty
    ``exp(1 - r/c)`` when c < r, with c the total hypothesis length and r the sum
    of the reference lengths closest to each hypothesis length (ties: shorter).

NIST (raw)
    mteval-v13a NIST with n = 1..5 on 13a tokens. Information weights come from
    all references of the corpus: ``info(w1..wn) = log2(count(w1..wn-1) /
    count(w1..wn))``, where the count of the empty prefix is the total number of
    reference words. Hypothesis n-gram counts are clipped by their maximum count
    in any reference of the group; the score is ``sum_n (sum of info of the
    clipped matches / number of hypothesis n-grams)`` times the length penalty
    ``exp(-beta * log(min(Lsys/Lref, 1))^2)`` with ``beta = -log(0.5)/log(1.5)^2``,
    Lsys the total hypothesis length and Lref the sum over segments of the mean
    reference length. With one reference per segment this equals NLTK's
    ``corpus_nist``, which handles several references differently (best single
    reference per segment) and is therefore not used.

METEOR (0-100)
    Classic METEOR (Lavie & Agarwal 2007) with NLTK's default parameters
    alpha = 0.9, beta = 3, gamma = 0.5, on PTB tokens. Alignment, as in NLTK:
    exact stage, then Porter-stem stage on the words still unaligned; in each
    stage the hypothesis words are visited from last to first and each is aligned
    to the last still-unaligned reference word that is equal (with repeated
    words this can give more chunks than the best alignment). With m aligned
    words, P = m / len(hyp), R = m / len(ref),
    ``Fmean = P R / (alpha P + (1 - alpha) R)``, ch the number of chunks
    (maximal runs adjacent in both sentences, in hypothesis order), score =
    ``Fmean * (1 - gamma * (ch / m) ** beta)`` (0 when m = 0). A segment takes the
    maximum over its references; the corpus score is the mean over segments.
    WordNet synonym matching is omitted (WordNet data cannot be downloaded at run
    time). This is not METEOR 1.5, which the e2e-metrics scorer runs (with
    synonyms, paraphrases, other parameters, function-word weighting and
    corpus-level aggregation), so values are not comparable with published E2E
    METEOR numbers, and come out far higher (a held-out human reference scores
    about 78 against the other references of dev.csv; published E2E system
    scores with METEOR 1.5 are around 45-47).

ROUGE-L (0-100)
    coco-caption's ROUGE-L, as reported by e2e-metrics, on PTB tokens: for each
    hypothesis, with LCS the longest common subsequence length against each
    reference, P = max over references of LCS / len(hyp) and R = max over
    references of LCS / len(ref); ``F = (1 + b^2) P R / (R + b^2 P)`` with
    b = 1.2 (0 if P or R is 0); the corpus score is the mean of F.

CIDEr (raw)
    coco-caption's CIDEr-D, as reported by e2e-metrics, on PTB tokens: n-grams
    for n = 1..4; the document frequency df(g) of an n-gram is the number of
    reference groups in the evaluated corpus where any reference contains it, and
    its weight in a sentence is ``tf * (log(N) - log(max(df, 1)))`` with N the
    number of groups. For each n, the similarity between hypothesis vector h and
    reference vector r is ``sum_g min(h_g, r_g) r_g / (|h| |r|)`` (the division is
    skipped when a norm is 0) times ``exp(-(lh - lr)^2 / (2 * 6^2))``, where the
    length l is the number of bigrams (coco-caption's convention). A segment's
    score is ``10 *`` the mean over n and over its references; the corpus score
    is the mean over segments. With a single group, log(N) = 0 and CIDEr is 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from nltk.stem.porter import PorterStemmer
from nltk.tokenize import TreebankWordTokenizer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

NIST_MAX_N = 5
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5
ROUGE_BETA = 1.2
CIDER_MAX_N = 4
CIDER_SIGMA = 6.0

PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", '"', ".", "?", "!", ",", ":", ";", "-", "--", "...",
     "(", ")", "[", "]", "{", "}", "-LRB-", "-RRB-", "-LCB-", "-RCB-"]
)

_NON_NUMERIC_PERIOD = re.compile(r"\.(?!\d)|(?<!\d)\.")
_tokenizer_13a = Tokenizer13a()
_treebank = TreebankWordTokenizer()
_stemmer = PorterStemmer()

Tokens = list[str]


def tokenize_13a(text: str) -> Tokens:
    """Lowercased mteval-v13a tokens (used by BLEU and NIST)."""
    return _tokenizer_13a(text.lower()).split()


def tokenize_ptb(text: str) -> Tokens:
    """Lowercased PTB tokens without punctuation (used by METEOR, ROUGE-L and CIDEr)."""
    spaced = _NON_NUMERIC_PERIOD.sub(" . ", text.lower())
    return [tok for tok in _treebank.tokenize(spaced) if tok not in PTB_PUNCTUATION]


def _check_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless there is one non-empty reference group per hypothesis."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise ValueError("cannot score an empty corpus")
    if any(isinstance(group, str) or not group for group in references):
        raise ValueError("each reference group must be a non-empty list of strings")


def _ngrams(tokens: Tokens, n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of one order."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: list[Tokens], n: int) -> Counter[tuple[str, ...]]:
    """For each n-gram, its maximum count in any single reference."""
    merged: Counter[tuple[str, ...]] = Counter()
    for ref in refs:
        merged |= _ngrams(ref, n)
    return merged


# --------------------------------------------------------------------------- BLEU


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0-100), lowercased 13a tokens, multi-reference, no smoothing."""
    _check_inputs(hypotheses, references)
    width = max(len(group) for group in references)
    streams = [[group[k] if k < len(group) else None for group in references] for k in range(width)]
    metric = BLEU(lowercase=True, tokenize="13a", smooth_method="none")
    return metric.corpus_score(list(hypotheses), streams).score


# --------------------------------------------------------------------------- NIST


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST-5 (raw) as mteval-v13a computes it, on lowercased 13a tokens."""
    _check_inputs(hypotheses, references)
    hyps = [tokenize_13a(h) for h in hypotheses]
    refs = [[tokenize_13a(r) for r in group] for group in references]
    info = _nist_information(refs)
    precision_sum = 0.0
    for n in range(1, NIST_MAX_N + 1):
        gained, total = 0.0, 0
        for hyp, group in zip(hyps, refs):
            clip = _max_ref_counts(group, n)
            hyp_counts = _ngrams(hyp, n)
            gained += sum(info[g] * min(c, clip[g]) for g, c in hyp_counts.items() if g in clip)
            total += sum(hyp_counts.values())
        if total:
            precision_sum += gained / total
    sys_len = sum(len(h) for h in hyps)
    ref_len = sum(sum(len(r) for r in group) / len(group) for group in refs)
    return precision_sum * _nist_length_penalty(sys_len, ref_len)


def _nist_information(refs: list[list[Tokens]]) -> dict[tuple[str, ...], float]:
    """NIST information weight of every reference n-gram (n = 1..5)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for group in refs:
        for ref in group:
            counts[()] += len(ref)
            for n in range(1, NIST_MAX_N + 1):
                counts.update(_ngrams(ref, n))
    return {g: math.log2(counts[g[:-1]] / c) for g, c in counts.items() if g}


def _nist_length_penalty(sys_len: int, ref_len: float) -> float:
    """exp(-beta * log(ratio)^2) for a system/reference length ratio below 1, else 1."""
    ratio = sys_len / ref_len if ref_len else 1.0
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


# --------------------------------------------------------------------------- METEOR


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean sentence METEOR (0-100), exact + Porter-stem matching, max over references."""
    _check_inputs(hypotheses, references)
    scores = [
        max(meteor_tokens(tokenize_ptb(h), tokenize_ptb(r)) for r in group)
        for h, group in zip(hypotheses, references)
    ]
    return 100.0 * sum(scores) / len(scores)


def meteor_tokens(hyp: Tokens, ref: Tokens) -> float:
    """Sentence METEOR (0-1) of one tokenized hypothesis against one tokenized reference."""
    alignment = _meteor_align(hyp, ref)
    matches = len(alignment)
    if matches == 0:
        return 0.0
    precision, recall = matches / len(hyp), matches / len(ref)
    fmean = precision * recall / (METEOR_ALPHA * precision + (1 - METEOR_ALPHA) * recall)
    fragmentation = _count_chunks(alignment) / matches
    return fmean * (1.0 - METEOR_GAMMA * fragmentation**METEOR_BETA)


def _meteor_align(hyp: Tokens, ref: Tokens) -> list[tuple[int, int]]:
    """(hyp index, ref index) pairs from the exact stage then the stem stage, sorted."""
    free_hyp, free_ref = list(range(len(hyp))), list(range(len(ref)))
    pairs = _greedy_stage(hyp, ref, free_hyp, free_ref)
    stemmed_hyp, stemmed_ref = [_stem(w) for w in hyp], [_stem(w) for w in ref]
    pairs += _greedy_stage(stemmed_hyp, stemmed_ref, free_hyp, free_ref)
    return sorted(pairs)


def _greedy_stage(
    hyp: Tokens, ref: Tokens, free_hyp: list[int], free_ref: list[int]
) -> list[tuple[int, int]]:
    """Align equal free words, last hypothesis word first, each to the last free equal reference word.

    Aligned indices are removed from ``free_hyp`` and ``free_ref``.
    """
    positions: dict[str, list[int]] = {}
    for j in free_ref:
        positions.setdefault(ref[j], []).append(j)
    pairs = []
    for i in reversed(free_hyp):
        candidates = positions.get(hyp[i])
        if candidates:
            pairs.append((i, candidates.pop()))
    for i, j in pairs:
        free_hyp.remove(i)
        free_ref.remove(j)
    return pairs


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    """Porter stem of a word."""
    return _stemmer.stem(word)


def _count_chunks(alignment: list[tuple[int, int]]) -> int:
    """Number of maximal runs of alignment pairs adjacent in both sentences."""
    return 1 + sum(
        1 for (i0, j0), (i1, j1) in zip(alignment, alignment[1:]) if (i1, j1) != (i0 + 1, j0 + 1)
    )


# --------------------------------------------------------------------------- ROUGE-L


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean coco-caption ROUGE-L F (beta 1.2, 0-100) with max-over-references P and R."""
    _check_inputs(hypotheses, references)
    scores = [
        rouge_l_tokens(tokenize_ptb(h), [tokenize_ptb(r) for r in group])
        for h, group in zip(hypotheses, references)
    ]
    return 100.0 * sum(scores) / len(scores)


def rouge_l_tokens(hyp: Tokens, refs: list[Tokens], beta: float = ROUGE_BETA) -> float:
    """Sentence ROUGE-L F-measure (0-1) of a tokenized hypothesis against tokenized references."""
    lcs = [lcs_length(hyp, ref) for ref in refs]
    precision = max((l / len(hyp) if hyp else 0.0) for l in lcs)
    recall = max((l / len(ref) if ref else 0.0) for l, ref in zip(lcs, refs))
    if precision == 0.0 or recall == 0.0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


# --------------------------------------------------------------------------- CIDEr


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (raw, 10x scale as coco-caption) with document frequencies from the references."""
    _check_inputs(hypotheses, references)
    hyps = [_cider_counts(tokenize_ptb(h)) for h in hypotheses]
    refs = [[_cider_counts(tokenize_ptb(r)) for r in group] for group in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for group in refs:
        doc_freq.update({g for counts in group for g in counts})
    log_n = math.log(len(refs))
    scores = []
    for hyp, group in zip(hyps, refs):
        hyp_vec = _cider_vector(hyp, doc_freq, log_n)
        sims = [_cider_similarity(hyp_vec, _cider_vector(r, doc_freq, log_n)) for r in group]
        scores.append(10.0 * sum(sims) / len(sims))
    return sum(scores) / len(scores)


_CiderVector = tuple[list[dict[tuple[str, ...], float]], list[float], int]


def _cider_counts(tokens: Tokens) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of orders 1..4."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, CIDER_MAX_N + 1):
        counts.update(_ngrams(tokens, n))
    return counts


def _cider_vector(
    counts: Counter[tuple[str, ...]], doc_freq: Counter[tuple[str, ...]], log_n: float
) -> _CiderVector:
    """Per-order tf-idf weights, per-order L2 norms and the length (number of bigrams)."""
    weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_MAX_N)]
    for gram, tf in counts.items():
        weights[len(gram) - 1][gram] = tf * (log_n - math.log(max(doc_freq[gram], 1)))
    norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return weights, norms, length


def _cider_similarity(hyp: _CiderVector, ref: _CiderVector) -> float:
    """Mean over n-gram orders of the clipped, length-penalised cosine similarity."""
    (hyp_w, hyp_norm, hyp_len), (ref_w, ref_norm, ref_len) = hyp, ref
    penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * CIDER_SIGMA**2))
    total = 0.0
    for n in range(CIDER_MAX_N):
        dot = sum(min(w, ref_w[n].get(g, 0.0)) * ref_w[n].get(g, 0.0) for g, w in hyp_w[n].items())
        if hyp_norm[n] and ref_norm[n]:
            dot /= hyp_norm[n] * ref_norm[n]
        total += dot * penalty
    return total / CIDER_MAX_N


# --------------------------------------------------------------------------- all


def compute_nlg_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """All five E2E metrics: keys ``bleu``, ``nist``, ``meteor``, ``rouge_l``, ``cider``."""
    return {
        "bleu": bleu(hypotheses, references),
        "nist": nist(hypotheses, references),
        "meteor": meteor(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "cider": cider(hypotheses, references),
    }
