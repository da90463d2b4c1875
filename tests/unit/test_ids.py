from collections.abc import Callable

import pytest

from shardline.ids import (
    InvalidId,
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
