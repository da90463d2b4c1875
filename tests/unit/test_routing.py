"""Cache-aware routing: a conversation goes back where its prefix is, unless that instance is clearly busier."""

from api.routing import PREFIXES_KEPT, Balancer, prefixes
from workflows.serve import InstanceStatus

A = InstanceStatus("a", "m", "ready", "single", endpoint="http://a")
B = InstanceStatus("b", "m", "ready", "single", endpoint="http://b")
SYSTEM = {"role": "system", "content": "You are terse."}


def chat(*contents: str) -> dict:
    roles = ["user", "assistant"]
    return {"messages": [SYSTEM] + [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}


def test_prefixes_are_chained_per_message_and_name_the_tools_too() -> None:
    one, two = prefixes(chat("hi")), prefixes(chat("hi", "hello", "more"))
    assert len(one) == 1 and len(two) == 3 and two[:1] == one  # a longer conversation extends the shorter's chain
    assert prefixes(chat("bye")) != one  # the system prompt they share is no prefix of its own
    assert prefixes({**chat("hi"), "tools": [{"type": "function"}]}) != one
    long, short = prefixes({"prompt": "x" * 600}), prefixes({"prompt": "x" * 300})
    assert len(long) == 3 and short[0] == long[0] and len(short) == 2


def test_a_conversation_goes_back_to_the_instance_that_has_its_prefix() -> None:
    balancer = Balancer(slack=4)
    first = balancer.pick([A, B], prefixes(chat("hi")))
    other = balancer.pick([A, B], prefixes(chat("something else")))  # the least loaded: the other one
    assert first != other
    balancer.release(str(other.endpoint))  # now `first` is busier by one
    assert balancer.pick([A, B], prefixes(chat("hi", "hello", "more"))) == first
    assert balancer.pick([A, B], prefixes(chat("something else", "ok", "and"))) == other


def test_a_clearly_busier_instance_loses_its_conversations_to_the_least_loaded() -> None:
    balancer = Balancer(slack=4)
    home = balancer.pick([A, B], prefixes(chat("hi")))
    away = B if home == A else A
    for _ in range(3):
        balancer.pick([home], prefixes(chat("long stream")))
    assert balancer.pick([A, B], prefixes(chat("hi", "a", "b"))) == home  # 4 more in flight there: still home
    assert balancer.pick([A, B], prefixes(chat("hi", "a", "b", "c", "d"))) == away  # 5 more: clearly busier
    never = Balancer(slack=-1)  # no affinity: always the least loaded
    never.pick([A, B], prefixes(chat("hi")))
    assert never.pick([A, B], prefixes(chat("hi", "a", "b"))) != never.pick([A, B], prefixes(chat("hi", "a", "b")))


def test_a_client_key_keeps_a_conversation_together_whatever_its_messages() -> None:
    balancer = Balancer(slack=4)
    home = balancer.pick([A, B], prefixes(chat("hi")), key="session-1")
    balancer.pick([A, B], prefixes(chat("unrelated")))
    balancer.release(str(home.endpoint))
    assert balancer.pick([A, B], prefixes(chat("rewritten history")), key="session-1") == home


def test_memory_is_bounded() -> None:
    balancer = Balancer(slack=4)
    for i in range(PREFIXES_KEPT + 10):
        balancer.pick([A], [f"p{i}"])
    assert len(balancer.seen[str(A.endpoint)]) == PREFIXES_KEPT and "p0" not in balancer.seen[str(A.endpoint)]
    assert balancer.counts[str(A.endpoint)] == PREFIXES_KEPT + 10


def test_an_instance_whose_batch_is_full_is_clearly_busier() -> None:
    balancer = Balancer(slack=4)
    home = balancer.pick([A, B], prefixes(chat("hi")))
    balancer.learn(str(home.endpoint), 2)  # its runner decodes 2 at once, as its first answer said
    assert balancer.pick([A, B], prefixes(chat("hi", "a", "b"))) == home  # 1 in flight of 2: room
    assert balancer.pick([A, B], prefixes(chat("hi", "a", "b", "c", "d"))) != home  # 2 of 2: it would wait
