import re
from collections.abc import Callable

import pytest

from shardline.ids import (
    MODEL_ID,
    NODE_ID,
    WORKFLOW_ID,
    InvalidId,
    anchored,
    check_model_id,
    check_node_id,
    download_workflow_id,
    instance_of,
    new_instance_id,
    node_of,
    node_workflow_id,
    parse_workflow_id,
    serve_workflow_id,
)
from shardline.states import Kind


@pytest.mark.parametrize("good", ["org/name", "mlx-community/Llama-3.2-1B-Instruct-4bit", "a.b/c_d-1.5"])
def test_valid_model_ids(good: str) -> None:
    assert check_model_id(good) == good


@pytest.mark.parametrize("bad", ["", "..", "org/..", "a//b", "/a", "a/", "a b", "a/b/c", "-x", "org/.hidden", "a/b..c"])
def test_invalid_model_ids_say_why(bad: str) -> None:
    with pytest.raises(InvalidId, match="invalid model id"):
        check_model_id(bad)


@pytest.mark.parametrize("one_part", ["gpt2", "test-org"])
def test_one_part_model_ids_are_refused(one_part: str) -> None:
    # its directory would be an org's: deleting it would remove every model of that org
    with pytest.raises(InvalidId, match="expected 'org/name'"):
        check_model_id(one_part)


@pytest.mark.parametrize("bad", ["", "a:b", "a/b", " n1", "x" * 65, "-n"])
def test_invalid_node_ids(bad: str) -> None:
    with pytest.raises(InvalidId, match="invalid node id"):
        check_node_id(bad)


def test_workflow_ids_round_trip() -> None:
    workflow_id = download_workflow_id("n1", "org/model")
    assert workflow_id == "download:n1:org/model"
    assert parse_workflow_id(workflow_id) == ("download", ["n1", "org/model"])
    assert parse_workflow_id("serve:abc") == ("serve", ["abc"])
    with pytest.raises(InvalidId):
        parse_workflow_id("download:n1")
    with pytest.raises(InvalidId):
        parse_workflow_id("download:n1:../etc")


def test_node_and_instance_ids_parse_back() -> None:
    assert node_of(node_workflow_id("n1")) == "n1"
    instance_id = new_instance_id("mlx-community/Llama-3.2-1B-Instruct-4bit")
    assert instance_id.startswith("llama-3.2-1b-instruct-4bit-")
    assert instance_of(serve_workflow_id(instance_id)) == instance_id


WRONG_KIND = [(node_of, "serve:n1"), (node_of, "node:"), (instance_of, "node:x"), (instance_of, "serve-x"),
              (instance_of, "download:n1:org/m")]  # fmt: skip


@pytest.mark.parametrize(("parse", "wrong"), WRONG_KIND)
def test_a_workflow_id_of_another_kind_is_refused(parse: Callable[[str], str], wrong: str) -> None:
    with pytest.raises(InvalidId, match="invalid workflow id"):
        parse(wrong)


MODEL_SAMPLES = ["org/name", "a.b/c_d-1.5", "..", "org/..", "a/b..c", "a/b/c", "gpt2", "a/b\n", "x" * 96 + "/y",
                 "x" * 97 + "/y", "-a/b", "a/.b", "a./b."]  # fmt: skip
NODE_SAMPLES = ["n1", "n1\n", "", "a:b", "x" * 64, "x" * 65, "-n", "n_1-2"]


def accepts(check: Callable[[str], str], value: str) -> bool:
    try:
        check(value)
    except InvalidId:
        return False
    return True


@pytest.mark.parametrize("value", MODEL_SAMPLES)
def test_the_documented_model_id_pattern_is_the_check(value: str) -> None:
    """The OpenAPI document declares these patterns (api/schemas.py): a JSON schema's `$` is the string's end."""
    assert bool(re.fullmatch(MODEL_ID, value)) == bool(re.search(anchored(MODEL_ID).replace("$", r"\Z"), value))
    assert bool(re.fullmatch(MODEL_ID, value)) == accepts(check_model_id, value)


@pytest.mark.parametrize("value", NODE_SAMPLES)
def test_the_documented_node_id_pattern_is_the_check(value: str) -> None:
    assert bool(re.fullmatch(NODE_ID, value)) == accepts(check_node_id, value)


@pytest.mark.parametrize(("value", "valid"), [("download:n1:org/m", True), ("download:n1:org", False),
                                              ("delete:n1:a/b", True), ("serve:x", True), ("serve:", False),
                                              ("node:n1", True), ("preview:p", True), ("other:x", False)])  # fmt: skip
def test_the_documented_workflow_id_pattern(value: str, valid: bool) -> None:
    assert bool(re.fullmatch(WORKFLOW_ID, value)) == valid
    parsed = accepts(lambda v: str(parse_workflow_id(v)), value) and value.split(":")[0] in set(Kind)
    assert parsed == valid
