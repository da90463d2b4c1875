"""The batch every rank runs: mlx_lm's BatchGenerator, and this rank's layers of the prefix cache.

Every finished request's KV state is kept; rank 0 says which to drop (all of them at once
when its prefix cache is off).

Every rank applies the same Steps (protocol.py) in the same order, so every rank's generator
inserts, prefills, decodes and finishes the same requests at the same forward pass, and every
rank keeps the KV state of a finished request under the same entry id (the request's id).
"""

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine import overlap, speculative
from shardline.engine.drafter import Drafter, PromptLookup
from shardline.engine.grammar import GrammarProcessor, Grammars
from shardline.engine.pipeline import trimmable
from shardline.engine.protocol import Join, Step
from shardline.engine.sampling import processors_for, sampler_for
from shardline.types import DRAFT_MAX_BATCH

PREFILL_BATCH = 8  # prompts prefilled together
UNBOUNDED = 1 << 30
Response = GenerationBatch.Response


@dataclass(frozen=True)
class Kept:
    """A request's KV state, now a prefix-cache entry under the request's id."""

    uid: int
    tokens: list[int]
    nbytes: int
    usable: bool = True  # its caches hold exactly its tokens; rank 0 drops (on every rank) what is not


@dataclass
class Output:
    joined: list[int] = field(default_factory=list)  # request ids of the step's joins, in order
    responses: list[Response] = field(default_factory=list)  # a token per decoding request (more: speculation)
    kept: list[Kept] = field(default_factory=list)


def covers(caches: list[Any], tokens: list[int]) -> bool:
    """Every cache that counts its tokens has seen exactly `tokens` (recurrent state does not count them)."""
    return all(c.offset == len(tokens) for c in caches if isinstance(getattr(c, "offset", None), int))


class Batch:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerWrapper,
        *,
        prefill_step: int,
        draft_max_batch: int = DRAFT_MAX_BATCH,
        drafter: Drafter | None = None,
        overlap: bool = True,
    ) -> None:
        self.options = {
            "stop_tokens": [[t] for t in sorted(tokenizer.eos_token_ids)],
            # rank 0 admits at most its max_batch; the generator's own limits must never bind, or ranks
            # whose nodes set other limits would batch differently
            "completion_batch_size": UNBOUNDED,
            "prefill_batch_size": PREFILL_BATCH,
            "prefill_step_size": prefill_step,
        }
        self.model = model
        self.grammars = Grammars(tokenizer)
        self.grammar_of: dict[int, GrammarProcessor] = {}  # each constrained request's, while it runs
        self.drafts_of: dict[int, int] = {}  # each speculating request's draft length, while it runs
        self.tally = speculative.Tally()
        self.overlapped = 0  # forward passes run so
        self.finished: list[int] = []
        self.overlap = overlap  # a pipeline prefills and decodes in micro-batches (overlap.py) where it can
        self.generator = self._generator()
        self.store: dict[int, list[Any]] = {}
        self.sizes: dict[int, int] = {}
        self.report: Callable[[dict], None] | None = None  # told the store's size each time it changes
        self.speculates = trimmable(model)  # dropping rejected drafts needs caches cut back per row
        self.draft_max_batch = draft_max_batch
        self.drafter = drafter or PromptLookup()

    def reset(self) -> None:
        """A fresh generator after a failed step (its state is unknown); the prefix cache is intact."""
        uids = self.generator._uid_count
        self.generator.close()
        self.generator = self._generator()
        # its uids go on from the old one's: the prefix cache keys entries by uid, and a new uid 0 would name an
        # entry already stored (a KeyError in every later step that reused it, found by schemathesis)
        self.generator._uid_count = uids
        self.drafter.clear()

    def _generator(self) -> BatchGenerator:
        generator = BatchGenerator(self.model, **self.options)
        if self.overlap:
            prompts = generator._prompt_batch  # kept for the generator's life, extended and filtered in place
            prompts.prompt = lambda tokens: overlap.prompt(prompts, tokens)  # type: ignore[method-assign]
        return generator

    def __len__(self) -> int:
        return len(self.generator._generation_batch) + len(self.generator._prompt_batch)

    @property
    def store_bytes(self) -> int:
        return sum(self.sizes.values())

    def apply(self, step: Step) -> Output:
        """One forward pass, after `step`'s changes."""
        return next(self.run(step, 1))

    def run(self, step: Step, steps: int) -> Iterator[Output]:
        """`steps` forward passes, the first after `step`'s changes: an Output each. Every rank runs them alike;
        on a pipeline, passes of a batch that is all decoding are overlapped (overlap.py)."""
        left = steps
        out = self._change(step)
        while left > 0:
            if left > 1 and not out.joined and self.overlapping():
                gen = self.generator
                with mx.stream(gen._stream):
                    passes = overlap.run(gen._generation_batch, left)
                self.overlapped += len(passes)
                for n, responses in enumerate(passes):
                    out = out if n == 0 else self._change(Step())
                    out.responses = responses
                    yield self._ended(out)
                return
            speculated = self._speculate() if self._may_speculate() and not out.joined else None
            out.responses = speculated if speculated is not None else self.generator.next()[1]
            left -= 1
            yield self._ended(out)
            if left:
                out = self._change(Step())

    def _change(self, step: Step) -> Output:
        out = Output()
        for uid in [*self.finished, *step.leaves]:
            self.grammar_of.pop(uid, None)
            self.drafts_of.pop(uid, None)
        self.finished = []
        for entry in step.drops:
            self.store.pop(entry, None)
            self.sizes.pop(entry, None)
        for uid in step.leaves:
            self.drafter.forget(uid)
        if step.leaves:
            left = self.generator.remove(step.leaves, return_prompt_caches=True)
            for uid, (caches, tokens) in left.items():
                out.kept += self._keep(uid, caches, tokens)
        out.joined = [self._insert(join) for join in step.joins]
        if step.drops:
            self._report()
        return out

    def _ended(self, out: Output) -> Output:
        for r in out.responses:
            if r.finish_reason is not None:
                out.kept += self._keep(r.uid, r.prompt_cache, r.all_tokens)
                self.finished.append(r.uid)  # its grammar's verdict is read before the next step
                self.drafter.forget(r.uid)
        if out.kept:
            self._report()
        return out

    def _report(self) -> None:
        if self.report is not None:
            self.report({"event": "stats", "cache_bytes": self.store_bytes})

    def overlapping(self) -> bool:
        """Whether a run of passes without joins would be overlapped now: not while it may speculate."""
        return self.overlap and not self._may_speculate() and self._overlappable()

    def _may_speculate(self) -> bool:
        """A request asks for drafts and few enough decode (speculation keeps priority over micro-batches then)."""
        return bool(self.drafts_of) and len(self.generator._generation_batch) <= self.draft_max_batch

    def _overlappable(self) -> bool:
        gen = self.generator
        pending = len(gen._prompt_batch) or gen._unprocessed_sequences
        return not pending and overlap.usable(gen._generation_batch)

    def _speculate(self) -> list[Response] | None:
        """A speculative step when the batch is all decoding and can take one (speculative.py); else None."""
        gen = self.generator
        if len(gen._prompt_batch) or gen._unprocessed_sequences or not speculative.usable(gen._generation_batch):
            return None
        gb = gen._generation_batch
        with mx.stream(gen._stream):
            return speculative.step(gb, [self.drafts_of.get(uid, 0) for uid in gb.uids], self.drafter, self.tally)

    def idle(self) -> bool:
        return len(self) == 0 and not self.generator._unprocessed_sequences

    def _insert(self, join: Join) -> int:
        caches = None
        if join.entry is not None:
            stored = self.store[join.entry]  # rank 0 only names entries every rank still has
            caches = copy.deepcopy(stored)
            extra = max((c.offset for c in caches if isinstance(getattr(c, "offset", None), int)), default=0)
            if extra > join.reuse:  # only a trimmable model's entries are ever longer than what is reused
                trim_prompt_cache(caches, extra - join.reuse)
        output = join.tokens[len(join.tokens) - join.sampling.resumed :] if join.sampling.resumed else []
        processors = processors_for(join.sampling, self.grammars, output)
        (uid,) = self.generator.insert(
            [join.tokens[join.reuse :]],
            max_tokens=[join.sampling.max_tokens],
            caches=[caches] if caches is not None else None,
            all_tokens=[join.tokens[: join.reuse]],
            samplers=[sampler_for(join.sampling)],
            logits_processors=[processors],
        )
        self.grammar_of.update((uid, p) for p in processors if isinstance(p, GrammarProcessor))
        if join.sampling.draft_tokens and self.speculates:
            self.drafts_of[uid] = join.sampling.draft_tokens
        return uid

    def grammar_error(self, uid: int) -> str | None:
        """Why the request's grammar could not be followed (its output then ended), or None."""
        found = self.grammar_of.get(uid)
        return None if found is None else found.error

    def _keep(self, uid: int, caches: list[Any] | None, tokens: list[int] | None) -> list[Kept]:
        # Every rank keeps the same entries whatever its layers' caches are (a rank of recurrent layers cannot
        # count tokens); rank 0's index decides which stay.
        if not caches or not tokens:
            return []
        mx.eval([c.state for c in caches])
        self.store[uid] = caches
        self.sizes[uid] = sum(c.nbytes for c in caches)
        return [Kept(uid, list(tokens), self.sizes[uid], covers(caches, tokens))]

    def close(self) -> None:
        self.drafter.clear()
        self.store.clear()
        self.sizes.clear()
        self.generator.close()
