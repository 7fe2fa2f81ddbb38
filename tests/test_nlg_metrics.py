"""Tests for the E2E metrics, each against an independent computation."""

from __future__ import annotations

import math

import pytest
from nltk.translate.meteor_score import meteor_score as nltk_meteor_score
from nltk.translate.nist_score import corpus_nist as nltk_corpus_nist
from rouge_score import rouge_scorer

from rosa.experiments.nlg_metrics import (
    bleu,
    cider,
    compute_nlg_metrics,
    lcs_length,
    meteor,
    meteor_tokens,
    nist,
    rouge_l,
    rouge_l_tokens,
    tokenize_13a,
    tokenize_ptb,
)

HYPS = [
    "the vaults is a cheap pub near the river",
    "alimentum serves english food in the city centre",
]
REFS = [
    ["the vaults is a cheap pub by the river", "a cheap pub near the river is the vaults"],
    ["alimentum serves english food in the centre of the city"],
]


def ngram_counts(words: list[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts


# ----------------------------------------------------------------- tokenization


def test_tokenizers():
    text = 'The Vaults isn\'t "cheap": it costs £20.50. Near Café Brazil!'
    assert tokenize_13a(text) == [
        "the", "vaults", "isn't", '"', "cheap", '"', ":", "it", "costs", "£20.50", ".",
        "near", "café", "brazil", "!",
    ]
    assert tokenize_ptb(text) == [
        "the", "vaults", "is", "n't", "cheap", "it", "costs", "£20.50", "near", "café", "brazil",
    ]


# ----------------------------------------------------------------- BLEU


def test_bleu_exact_match_is_100():
    refs = [["a family friendly pub near the river"], ["a cheap chinese restaurant", "x y z"]]
    assert bleu(["A family friendly pub near the river", "a cheap Chinese restaurant"], refs) == (
        pytest.approx(100.0)
    )


def test_bleu_by_hand_with_unequal_reference_counts():
    hyps = [h.split() for h in HYPS]
    refs = [[r.split() for r in group] for group in REFS]
    log_precision = 0.0
    for n in range(1, 5):
        matched = total = 0
        for hyp, group in zip(hyps, refs):
            hyp_counts = ngram_counts(hyp, n)
            for gram, count in hyp_counts.items():
                max_ref = max(ngram_counts(ref, n).get(gram, 0) for ref in group)
                matched += min(count, max_ref)
            total += sum(hyp_counts.values())
        log_precision += math.log(matched / total) / 4
    hyp_len = sum(len(h) for h in hyps)
    ref_len = 0
    for hyp, group in zip(hyps, refs):
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in group)[1]
    brevity = min(1.0, math.exp(1 - ref_len / hyp_len))
    assert bleu(HYPS, REFS) == pytest.approx(100 * brevity * math.exp(log_precision))


def test_bleu_brevity_penalty_applies():
    # 4 hypothesis words against a 6-word reference, all n-grams matched
    expected = 100 * math.exp(1 - 6 / 4)
    assert bleu(["a b c d"], [["a b c d e f"]]) == pytest.approx(expected)


# ----------------------------------------------------------------- NIST


def test_nist_equals_nltk_with_one_reference():
    hyps = ["the vaults is a cheap pub near the river", "alimentum serves english food"]
    refs = [["the vaults is a cheap pub by the river"], ["alimentum serves cheap english food here"]]
    expected = nltk_corpus_nist([[r.split() for r in g] for g in refs], [h.split() for h in hyps], n=5)
    assert nist(hyps, refs) == pytest.approx(expected)


def test_nist_by_hand_with_several_references():
    hyps = [h.split() for h in HYPS]
    refs = [[r.split() for r in group] for group in REFS]
    all_refs = [r for group in refs for r in group]
    ref_counts: dict[tuple[str, ...], int] = {(): sum(len(r) for r in all_refs)}
    for r in all_refs:
        for n in range(1, 6):
            for gram, c in ngram_counts(r, n).items():
                ref_counts[gram] = ref_counts.get(gram, 0) + c
    score = 0.0
    for n in range(1, 6):
        info_sum = total = 0.0
        for hyp, group in zip(hyps, refs):
            for gram, count in ngram_counts(hyp, n).items():
                clip = max(ngram_counts(r, n).get(gram, 0) for r in group)
                if clip:
                    info = math.log2(ref_counts[gram[:-1]] / ref_counts[gram])
                    info_sum += info * min(count, clip)
            total += max(len(hyp) - n + 1, 0)
        score += info_sum / total
    sys_len = sum(len(h) for h in hyps)
    ref_len = sum(sum(len(r) for r in g) / len(g) for g in refs)
    ratio = min(sys_len / ref_len, 1.0)
    beta = math.log(0.5) / math.log(1.5) ** 2
    assert nist(HYPS, REFS) == pytest.approx(score * math.exp(beta * math.log(ratio) ** 2))


def test_nist_length_penalty_is_half_at_two_thirds_length():
    hyp, ref = "a b c d", "a b c d e f"
    assert nist([hyp], [[ref]]) == pytest.approx(0.5 * _nist_precision_sum(hyp.split(), ref.split()))


def _nist_precision_sum(hyp: list[str], ref: list[str]) -> float:
    total = 0.0
    for n in range(1, 6):
        ref_n, ref_prefix = ngram_counts(ref, n), ngram_counts(ref, n - 1) if n > 1 else None
        gained = 0.0
        for gram, count in ngram_counts(hyp, n).items():
            if gram in ref_n:
                prefix = ref_prefix[gram[:-1]] if ref_prefix else len(ref)
                gained += math.log2(prefix / ref_n[gram]) * min(count, ref_n[gram])
        if len(hyp) >= n:
            total += gained / (len(hyp) - n + 1)
    return total


# ----------------------------------------------------------------- METEOR


class NoSynonyms:
    """A WordNet stand-in without synsets, so NLTK's METEOR uses only exact and stem matches."""

    def synsets(self, word: str) -> list:
        return []


METEOR_CASES = [
    ("the cat sat on the mat", ["the cat sat on the mat"]),
    ("on the mat the cat sat", ["the cat sat on the mat"]),
    ("restaurants serving cheaper foods", ["a restaurant that serves cheap food"]),
    ("the the the pub", ["the pub is near the river", "the the pub"]),
    ("it is a guide to action which ensures that the military always obeys the commands of the party",
     ["it is a guide to action that ensures that the military will forever heed party commands",
      "it is the guiding principle which guarantees the military forces always being under the command of the party"]),
    ("completely unrelated words", ["the vaults is a pub"]),
    ("families love the family friendly riverside pubs near it",
     ["the pub near it is family friendly and families love it by the riverside"]),
]


@pytest.mark.parametrize("hyp, refs", METEOR_CASES)
def test_meteor_equals_nltk_without_synonyms(hyp, refs):
    expected = nltk_meteor_score([r.split() for r in refs], hyp.split(), wordnet=NoSynonyms())
    ours = max(meteor_tokens(hyp.split(), r.split()) for r in refs)
    assert ours == pytest.approx(expected, abs=1e-6)


def test_meteor_corpus_is_mean_of_sentence_scores_in_percent():
    expected = [nltk_meteor_score([r.split() for r in refs], hyp.split(), wordnet=NoSynonyms())
                for hyp, refs in METEOR_CASES]
    hyps, refs = zip(*METEOR_CASES)
    assert meteor(list(hyps), list(refs)) == pytest.approx(100 * sum(expected) / len(expected), abs=1e-6)


def fragmented_fmean(matches: int, hyp_len: int, ref_len: int, chunks: int) -> float:
    p, r = matches / hyp_len, matches / ref_len
    return p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (chunks / matches) ** 3)


def test_meteor_by_hand():
    # all 5 words matched, in 2 chunks: "on the mat" and "a cat"
    assert meteor_tokens("on the mat a cat".split(), "a cat on the mat".split()) == (
        pytest.approx(fragmented_fmean(5, 5, 5, 2))
    )
    # exact: cheap, near, river; stem: restaurants~restaurant; chunks: cheap | restaurants near | river
    hyp, ref = "cheap restaurants near river".split(), "the restaurant near the river is cheap".split()
    assert meteor_tokens(hyp, ref) == pytest.approx(fragmented_fmean(4, 4, 7, 3))


def test_meteor_greedy_alignment_of_repeated_words():
    # Right-to-left greedy alignment (as NLTK) pairs each "the" with the last free "the":
    # on-on, the-the(2nd), mat-mat, the-the(1st), cat-cat gives 5 chunks, not the optimal 2.
    hyp, ref = "on the mat the cat".split(), "the cat on the mat".split()
    assert meteor_tokens(hyp, ref) == pytest.approx(fragmented_fmean(5, 5, 5, 5))


# ----------------------------------------------------------------- ROUGE-L


def test_lcs_by_hand():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_by_hand_uses_max_precision_and_recall_from_different_references():
    hyp = "a b c d".split()
    refs = ["a b x".split(), "a b c d e f g h".split()]
    # LCS 2 and 4: precision max(2/4, 4/4) = 1, recall max(2/3, 4/8) = 2/3
    p, r, b = 1.0, 2 / 3, 1.2
    assert rouge_l_tokens(hyp, refs) == pytest.approx((1 + b * b) * p * r / (r + b * b * p))
    assert rouge_l(["A b, c d."], [["a b x", "a b c d e f g h"]]) == pytest.approx(
        100 * (1 + b * b) * p * r / (r + b * b * p)
    )


@pytest.mark.parametrize(
    "hyp, ref",
    [("the vaults is a cheap pub", "a cheap pub called the vaults"),
     ("alimentum serves food", "alimentum is a restaurant serving english food"),
     ("x y z", "a b c")],
)
def test_rouge_l_f1_equals_rouge_score_with_one_reference(hyp, ref):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure
    assert rouge_l_tokens(hyp.split(), [ref.split()], beta=1.0) == pytest.approx(expected)


# ----------------------------------------------------------------- CIDEr


def test_cider_by_hand_two_images():
    hyps = ["a b c", "d e"]
    refs = [["a b c", "a b d"], ["d e f"]]
    hyp_tok = [h.split() for h in hyps]
    ref_tok = [[r.split() for r in g] for g in refs]
    n_images = 2
    doc_freq: dict[tuple[str, ...], int] = {}
    for group in ref_tok:
        seen = set()
        for r in group:
            for n in range(1, 5):
                seen |= set(ngram_counts(r, n))
        for gram in seen:
            doc_freq[gram] = doc_freq.get(gram, 0) + 1

    def vector(words):
        vec = {}
        for n in range(1, 5):
            for gram, tf in ngram_counts(words, n).items():
                vec[gram] = tf * (math.log(n_images) - math.log(max(doc_freq.get(gram, 0), 1)))
        return vec

    def order_norm(vec, n):
        return math.sqrt(sum(v * v for g, v in vec.items() if len(g) == n))

    total = 0.0
    for hyp, group in zip(hyp_tok, ref_tok):
        h = vector(hyp)
        image_score = 0.0
        for ref in group:
            r = vector(ref)
            bigram_delta = (len(hyp) - 1) - (len(ref) - 1)
            penalty = math.exp(-(bigram_delta**2) / (2 * 36))
            per_order = 0.0
            for n in range(1, 5):
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items() if len(g) == n)
                if order_norm(h, n) and order_norm(r, n):
                    dot /= order_norm(h, n) * order_norm(r, n)
                per_order += dot * penalty
            image_score += per_order / 4
        total += 10 * image_score / len(group)
    expected = total / 2
    # spot-check the hand vectors: "a b" appears in image 1 only -> idf log 2
    assert vector(["a", "b"])[("a", "b")] == pytest.approx(math.log(2))
    assert expected > 0
    assert cider(hyps, refs) == pytest.approx(expected)


def test_cider_identical_beats_unrelated_and_single_image_is_zero():
    refs = [["the vaults is a pub", "the vaults is a pub by the river"],
            ["alimentum serves english food", "alimentum is an english restaurant"],
            ["cotto is a cheap coffee shop", "cotto is a coffee shop"]]
    identical = cider([g[0] for g in refs], refs)
    unrelated = cider(["zebra quantum", "violin tram", "moss glacier"], refs)
    assert identical > 1.0 and unrelated == 0.0
    assert cider(["the vaults is a pub"], [["the vaults is a pub"]]) == 0.0


# ----------------------------------------------------------------- all together


def test_compute_nlg_metrics_keys_and_scales():
    scores = compute_nlg_metrics(HYPS, REFS)
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert 0 < scores["bleu"] < 100 and 0 < scores["meteor"] < 100 and 0 < scores["rouge_l"] < 100
    assert scores["nist"] > 1 and scores["cider"] > 0


@pytest.mark.parametrize(
    "hyps, refs",
    [(["a"], [["a"], ["b"]]), ([], []), (["a"], [[]]), (["a"], ["a"])],
)
def test_invalid_inputs(hyps, refs):
    for metric in (bleu, nist, meteor, rouge_l, cider):
        with pytest.raises(ValueError):
            metric(hyps, refs)
