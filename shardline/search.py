"""The search attributes every shardline workflow carries (all Keyword)."""

from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)

KIND = SearchAttributeKey.for_keyword("ShardlineKind")
NODE = SearchAttributeKey.for_keyword("ShardlineNode")
MODEL = SearchAttributeKey.for_keyword("ShardlineModel")
STATE = SearchAttributeKey.for_keyword("ShardlineState")

ALL = (KIND, NODE, MODEL, STATE)


def attributes(kind: str, state: str, node: str | None = None, model: str | None = None) -> TypedSearchAttributes:
    pairs = [SearchAttributePair(KIND, str(kind)), SearchAttributePair(STATE, str(state))]
    if node:
        pairs.append(SearchAttributePair(NODE, node))
    if model:
        pairs.append(SearchAttributePair(MODEL, model))
    return TypedSearchAttributes(pairs)
