"""Speculative decoding on one rank's Batch, in this process, drafts by prompt lookup or by a draft model: greedy
output is plain decoding's, token for token, alone and batched; seeded sampling keeps plain sampling's distribution.
(Through runners, on a pipeline: test_batching.py.)"""

import json
import random
from collections import Counter
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm import load

from shardline.engine.batch import Batch
from shardline.engine.drafter import Drafter, DraftModel, DraftRefused, load_draft_model, lookup
from shardline.engine.grammar import grammar_for
from shardline.engine.protocol import Join, Sampling, Step
from shardline.engine.sampling import SeededSampler
from shardline.engine.speculative import judge
from tests.support.model_factory import make_tiny_model

pytestmark = pytest.mark.slow(11)  # seconds in make test: tests/conftest.py starts the longest files first

# Prompts that repeat themselves, as an agent's edit repeats the file it read: lookups find drafts.
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 10, 11, 12, 7, 8], [20, 21, 20, 21, 20], [5, 6, 40, 41, 42, 5, 6]]
Z_P001 = 3.09  # the standard normal's upper 0.001 quantile


def test_lookup_copies_what_followed_the_latest_occurrence_of_the_longest_suffix() -> None:
    assert lookup([1, 2, 3, 9, 9, 1, 2, 3], 2) == [9, 9]
    assert lookup([5, 1, 7, 2, 1, 8, 2, 1], 3) == [8, 2, 1]  # "2 1" last occurred before 8
    assert lookup([4, 1, 2, 5, 1, 2, 6, 3, 1, 2], 1) == [6]  # the latest of several occurrences
    assert lookup([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup([1], 4) == []


@pytest.fixture(scope="module")
def loaded(qwen_dir: Path) -> tuple:
    return load(str(qwen_dir))


def decode(
    loaded: tuple,
    prompts: list[list[int]],
    sampling: list[Sampling],
    draft_max_batch: int = 100,
    drafter: Drafter | None = None,
) -> tuple[list[list[int]], Batch, int]:
    """Each request's tokens, the batch (its tally, its kept prefixes) and how many forward passes it took."""
    model, tokenizer = loaded
    batch = Batch(model, tokenizer, prefill_step=512, draft_max_batch=draft_max_batch, drafter=drafter)
    out = batch.apply(Step(joins=[Join(p, s) for p, s in zip(prompts, sampling, strict=True)]))
    tokens: dict[int, list[int]] = {uid: [] for uid in out.joined}
    order, passes = list(out.joined), 1
    kept = {}
    while True:
        for response in out.responses:
            tokens[response.uid].append(response.token)
        kept.update((k.uid, k) for k in out.kept)
        if batch.idle():
            break
        out = batch.apply(Step())
        passes += 1
    for uid in order:  # what the prefix cache keeps of each is exactly its prompt and output
        assert kept[uid].usable and kept[uid].tokens == prompts[order.index(uid)] + tokens[uid]
    return [tokens[uid] for uid in order], batch, passes


def test_greedy_output_is_plain_decoding_s_batched_and_alone(loaded: tuple) -> None:
    plain = [Sampling(40, 0.0, 1.0, 0)] * len(PROMPTS)
    speculating = [Sampling(40, 0.0, 1.0, 0, draft_tokens=4)] * len(PROMPTS)
    expected, _, plain_passes = decode(loaded, PROMPTS, plain)
    got, batch, passes = decode(loaded, PROMPTS, speculating)
    assert got == expected
    assert batch.tally.accepted > 0 and passes < plain_passes  # it did speculate, and saved forward passes
    print(f"batched: {passes} forward passes for {plain_passes}; {batch.tally}")
    for prompt, alone in zip(PROMPTS, expected, strict=True):
        assert decode(loaded, [prompt], speculating[:1])[0] == [alone]
    mixed = [speculating[0], plain[0], speculating[0], plain[0]]  # beside requests that do not speculate
    assert decode(loaded, PROMPTS, mixed)[0] == expected


@pytest.fixture(scope="module")
def unrelated_dir(workdir: Path) -> Path:
    """Another random model with the same tokenizer: a draft model that rarely guesses right."""
    return make_tiny_model(workdir / "unrelated", model_type="llama", num_layers=2, num_files=1, seed=7)


def test_a_draft_model_leaves_greedy_output_unchanged(loaded: tuple, qwen_dir: Path, unrelated_dir: Path) -> None:
    """Drafts written by a draft model: the served model itself (its greedy drafts are what plain decoding writes:
    nearly all accepted, far fewer forward passes) and an unrelated model (few accepted). Greedy output is plain
    decoding's either way, batched, alone and beside requests that do not speculate; prompts longer than the draft
    model's prefill chunk (8 tokens) included."""
    prompts = [*PROMPTS, [*range(30, 50), 30, 31]]
    plain = [Sampling(40, 0.0, 1.0, 0)] * len(prompts)
    speculating = [Sampling(40, 0.0, 1.0, 0, draft_tokens=4)] * len(prompts)
    expected, _, plain_passes = decode(loaded, prompts, plain)
    tokenizer = loaded[1]
    for source, least in ((qwen_dir, 0.8), (unrelated_dir, 0.0)):
        drafter = DraftModel(load_draft_model(source, tokenizer), None, prefill_step=8)
        got, batch, passes = decode(loaded, prompts, speculating, drafter=drafter)
        print(f"draft {source.name}: {passes} forward passes for {plain_passes}; {batch.tally}")
        assert got == expected
        assert batch.tally.drafted > 0 and batch.tally.accepted >= least * batch.tally.drafted
        assert not drafter.order and drafter.caches is None, "every request's draft state goes with it"
        if least:
            assert passes < plain_passes / 2
        mixed = [speculating[0], plain[0]] * (len(prompts) // 2) + speculating[: len(prompts) % 2]
        assert decode(loaded, prompts, mixed, drafter=drafter)[0] == expected
        assert decode(loaded, prompts[-1:], speculating[:1], drafter=drafter)[0] == expected[-1:]


def test_a_draft_model_s_batched_rows_draft_what_it_would_alone(loaded: tuple, unrelated_dir: Path) -> None:
    """The draft model's rows share one batched cache: whatever each request did since the last step (kept some
    drafts, rejected the rest, moved on; fell 40 tokens behind; joined with a prompt longer than the prefill chunk;
    left), each row's drafts are the model's own greedy tokens after that request's tokens, computed alone."""
    model = load_draft_model(unrelated_dir, loaded[1])
    drafter = DraftModel(model, None, prefill_step=8)

    def alone(tokens: list[int], k: int) -> list[int]:
        out: list[int] = []
        for _ in range(k):
            out.append(mx.argmax(model(mx.array([tokens + out]))[0, -1]).item())
        return out

    rng = random.Random(0)
    sequences = {uid: [rng.randrange(259, 512) for _ in range(n)] for uid, n in ((1, 5), (2, 21), (3, 1))}
    for step in range(8):
        uids = sorted(sequences)
        ks = [[4, 3, 0, 2][i % 4] for i in range(len(uids))]  # a request that does not speculate gets none
        drafts = drafter.propose(uids, [sequences[u] for u in uids], ks)
        for uid, k, written in zip(uids, ks, drafts, strict=True):
            assert written == alone(sequences[uid], k), (step, uid)
        for uid, written in zip(uids, drafts, strict=True):
            sequences[uid] += [*written[: rng.randrange(len(written) + 1)], rng.randrange(259, 512)]
        if step == 2:
            sequences[2] += [rng.randrange(259, 512) for _ in range(40)]
        if step == 3:
            drafter.forget(1)
            del sequences[1]
            sequences[4] = [rng.randrange(259, 512) for _ in range(30)]
    assert sorted(drafter.order) == sorted(u for i, u in enumerate(sorted(sequences)) if [4, 3, 0, 2][i % 4])
    drafter.clear()
    assert not drafter.order and drafter.caches is None


def test_a_draft_model_with_another_vocabulary_is_refused(loaded: tuple, workdir: Path) -> None:
    other = make_tiny_model(workdir / "other-vocabulary", vocab_size=300, num_layers=1, num_files=1)
    with pytest.raises(DraftRefused, match="another vocabulary"):
        load_draft_model(other, loaded[1])


def test_penalties_and_bias_see_each_drafted_position_as_plain_decoding_would(loaded: tuple) -> None:
    """Repetition and presence penalties (which read the tokens so far) and a logit bias, applied at every drafted
    position: greedy output still plain decoding's, alone and batched."""
    shaped = {"repetition_penalty": 1.2, "presence_penalty": 0.3, "logit_bias": ((274, 1.5),)}
    plain = [Sampling(40, 0.0, 1.0, 0, **shaped)] * len(PROMPTS)  # type: ignore[arg-type]
    speculating = [Sampling(40, 0.0, 1.0, 0, draft_tokens=4, **shaped)] * len(PROMPTS)  # type: ignore[arg-type]
    expected, _, _ = decode(loaded, PROMPTS, plain)
    got, batch, _ = decode(loaded, PROMPTS, speculating)
    assert got == expected
    assert batch.tally.drafted > 0
    print(f"with penalties: {batch.tally}")
    assert decode(loaded, PROMPTS[:1], speculating[:1])[0] == expected[:1]


SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8}}},
          "required": ["items"]}  # fmt: skip


def test_a_grammar_masks_each_drafted_position_and_keeps_only_what_was_kept(loaded: tuple) -> None:
    """JSON-schema requests speculate too (llguidance consumes the drafts it allows, then rolls back what the step
    did not keep): greedy output is plain decoding's; seeded outputs, batched, are token by token what the grammar
    allows, and those that ended parse and follow the schema."""
    tokenizer = loaded[1]
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    plain = [Sampling(48, 0.0, 1.0, 0, grammar=grammar)] * len(PROMPTS)
    speculating = [Sampling(48, 0.0, 1.0, 0, grammar=grammar, draft_tokens=4)] * len(PROMPTS)
    expected, _, _ = decode(loaded, PROMPTS, plain)
    got, batch, _ = decode(loaded, PROMPTS, speculating)
    assert got == expected
    assert batch.tally.drafted > 0
    print(f"constrained: {batch.tally}")
    seeded = [Sampling(96, 1.0, 1.0, seed, grammar=grammar, draft_tokens=4) for seed in range(8)]
    outputs, batch, _ = decode(loaded, [PROMPTS[0]] * 8, seeded)
    assert batch.tally.drafted > 0
    finished = 0
    for tokens in outputs:
        text = [t for t in tokens if t not in tokenizer.eos_token_ids]
        assert batch.grammars.processor(grammar).matcher.validate_tokens(text) == len(text)  # each token allowed
        if len(text) < len(tokens):  # it ended: whole JSON, as the schema says
            jsonschema.validate(json.loads(tokenizer.decode(text)), SCHEMA)
            finished += 1
    assert finished >= 2


def test_drafts_wait_until_few_enough_requests_decode_together(loaded: tuple) -> None:
    """With draft_max_batch 2, four requests decode plainly until two of them are done; then the others speculate."""
    model, tokenizer = loaded
    batch = Batch(model, tokenizer, prefill_step=512, draft_max_batch=2)
    lengths = [6, 6, 40, 40]
    joins = [Join(p, Sampling(n, 0.0, 1.0, 0, draft_tokens=4)) for p, n in zip(PROMPTS, lengths, strict=True)]
    out = batch.apply(Step(joins=joins))
    tokens: dict[int, list[int]] = {uid: [] for uid in out.joined}
    while True:
        for response in out.responses:
            tokens[response.uid].append(response.token)
        if batch.idle():
            break
        decoding = len(batch)
        drafted = batch.tally.drafted
        out = batch.apply(Step())
        if decoding > 2:
            assert batch.tally.drafted == drafted, "speculated while more than 2 requests decoded"
    assert batch.tally.accepted > 0
    plain, _, _ = decode(loaded, PROMPTS, [Sampling(n, 0.0, 1.0, 0) for n in lengths])
    assert list(tokens.values()) == plain


@pytest.mark.parametrize("drafts", ["prompt_lookup", "draft_model"])
def test_seeded_sampling_keeps_its_distribution(loaded: tuple, drafts: str, qwen_dir: Path) -> None:
    """200 samples each way (independent seeds) of the first 6 tokens, at a temperature (0.05) where this random
    model's text repeats itself often but not always, over its top 4 tokens: at each position the tokens' counts
    agree (chi-square, p > 0.001), and many drafts were accepted, many rejected. Drafts by prompt lookup, or by a
    draft model (the served model itself, greedy: its drafts are the likeliest tokens, not the sampled ones)."""
    runs, length = 200, 6
    prompt = PROMPTS[0]
    model = load_draft_model(qwen_dir, loaded[1]) if drafts == "draft_model" else None

    def samples(first_seed: int, draft_tokens: int) -> tuple[list[list[int]], int, int]:
        out, drafted, accepted = [], 0, 0
        for start in range(first_seed, first_seed + runs, 100):
            sampling = [Sampling(length, 0.05, 1.0, seed, top_k=4, draft_tokens=draft_tokens)
                        for seed in range(start, start + 100)]  # fmt: skip
            drafter = DraftModel(model, None, prefill_step=512) if model is not None else None
            tokens, batch, _ = decode(loaded, [prompt] * 100, sampling, drafter=drafter)
            out += tokens
            drafted, accepted = drafted + batch.tally.drafted, accepted + batch.tally.accepted
        return out, drafted, accepted

    plain, _, _ = samples(0, 0)
    speculated, drafted, accepted = samples(10_000, 4)
    print(f"drafted {drafted}, accepted {accepted}")
    assert 0.1 < accepted / drafted < 0.9
    for position in range(length):
        a = Counter(s[position] for s in plain)
        b = Counter(s[position] for s in speculated)
        statistic, bound = chi_square(a, b)
        print(f"position {position}: plain {dict(a)} speculative {dict(b)} chi2 {statistic:.2f} < {bound:.2f}")
        assert statistic < bound, (position, a, b)


def test_the_acceptance_rule_samples_what_plain_sampling_would() -> None:
    """On a 5-token vocabulary with fixed distributions, 4000 seeds: the first token out of a step with two drafts
    follows the request's distribution exactly (goodness of fit), whether its draft was likely or not; and after
    the first draft is accepted, so does the second token."""
    logits = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 1.5, 1.5, -0.5, 0.2], [0.3, 0.1, 0.0, 0.9, 0.4]])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for drafts in ([0, 2], [3, 1]):  # the likeliest token first, then an unlikely one
        firsts, seconds = Counter(), Counter()
        for seed in range(4000):
            sampler = SeededSampler(Sampling(8, 0.8, 0.95, seed, top_k=4))
            accepted, (following, _) = judge(sampler, logprobs, drafts)
            out = [*drafts[:accepted], following]
            firsts[out[0]] += 1
            if accepted >= 1:
                seconds[out[1]] += 1
        reference = SeededSampler(Sampling(8, 0.8, 0.95, 0, top_k=4))
        for counts, position in ((firsts, 0), (seconds, 1)):
            expected = reference.distribution(logprobs[position : position + 1])[0].tolist()
            statistic, bound = goodness_of_fit(counts, expected)
            print(f"drafts {drafts}, position {position}: {dict(counts)} vs {expected}: {statistic:.2f} < {bound:.2f}")
            assert statistic < bound, (drafts, position, counts, expected)


def goodness_of_fit(counts: Counter, probabilities: list[float]) -> tuple[float, float]:
    n = sum(counts.values())
    assert all(counts[t] == 0 for t, p in enumerate(probabilities) if p == 0)  # top-p / top-k cut it: never drawn
    cells = [(counts[t], n * p) for t, p in enumerate(probabilities) if p > 0]
    return sum((c - e) ** 2 / e for c, e in cells), bound_p001(len(cells) - 1)


def bound_p001(df: int) -> float:
    """What a chi-square statistic with `df` degrees of freedom exceeds with probability 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + Z_P001 * (2 / (9 * df)) ** 0.5) ** 3


def chi_square(a: Counter, b: Counter) -> tuple[float, float]:
    """Two samples' homogeneity statistic, tokens seen fewer than 10 times together pooled as one, and the value
    its degrees of freedom exceed with probability 0.001 (Wilson-Hilferty)."""
    pooled_a, pooled_b = Counter(), Counter()
    for key in a.keys() | b.keys():
        pool = key if a[key] + b[key] >= 10 else -1
        pooled_a[pool] += a[key]
        pooled_b[pool] += b[key]
    na, nb = sum(a.values()), sum(b.values())
    total = 0.0
    for key in pooled_a.keys() | pooled_b.keys():
        both = pooled_a[key] + pooled_b[key]
        for count, n in ((pooled_a[key], na), (pooled_b[key], nb)):
            expected = both * n / (na + nb)
            total += (count - expected) ** 2 / expected
    return total, bound_p001(max(len(pooled_a.keys() | pooled_b.keys()) - 1, 1))
