"""A format the model cannot follow fails its request, never a 200 with output outside it: refused before it starts
when its vocabulary cannot start it, and ended (on every rank alike) with the reason when it cannot go on."""

import llguidance
import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from shardline.engine.grammar import Grammars, grammar_for

A, B, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    """A vocabulary of two letters: no `{`, so no JSON object."""
    tokenizer = Tokenizer(models.BPE({"a": A, "b": B, "<eos>": EOS}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return Grammars(TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")))


def test_a_format_the_vocabulary_cannot_start_is_refused_before_it_starts(grammars: Grammars) -> None:
    with pytest.raises(ValueError, match="cannot produce output in that format"):
        grammars.check(grammar_for({"type": "json_object"}))
    grammars.check(llguidance.grammar_from("regex", "a+"))  # one it can


def test_a_format_it_cannot_go_on_with_ends_the_output_and_says_why(grammars: Grammars) -> None:
    processor = grammars.processor(llguidance.grammar_from("regex", "a+"))
    logits = mx.zeros((3,))
    first = processor(mx.array([7]), logits)
    assert first.tolist()[A] == 0 and first.tolist()[B] == -mx.inf and processor.error is None
    # a token outside the grammar (which a mask never lets through, but a matcher can still fail on its own)
    after = processor(mx.array([7, B]), logits)
    assert after.tolist() == [-mx.inf, -mx.inf, 0] and processor.error  # only the end: the request ends here
