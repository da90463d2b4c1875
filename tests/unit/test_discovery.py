"""The pure parts of LAN discovery: the TXT record both ways, the choice among clusters found, the route address,
and what `up --lan` hands its pieces. No mDNS here: tests/integration/test_lan.py browses, inside namespaces."""

import pytest

from shardline.discovery import (
    Advert,
    DiscoveryError,
    choose_cluster,
    cluster_name,
    from_txt,
    lan_settings,
    node_host,
    prefer_reachable,
    route_address,
    service_info,
)
from shardline.settings import Settings
from shardline.supervisor import piece_env
from shardline.temporal import devserver_command


def advert(cluster: str = "desk", host: str = "10.0.0.1") -> Advert:
    return Advert(cluster, "default", (host,), 7233, 8000, 8233)


def raw(ad: Advert) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in ad.txt().items()}


def test_txt_round_trip() -> None:
    ad = Advert("desk", "team", ("10.0.0.1", "192.168.1.5"), 7300, 8100, 8300)
    assert from_txt(raw(ad), ad.hosts) == ad
    assert ad.temporal_address == "10.0.0.1:7300"


@pytest.mark.parametrize(
    "change",
    [{b"v": b"2"}, {b"temporal_port": b"x"}, {b"api_port": None}],
    ids=["other version", "bad port", "empty value"],
)
def test_txt_this_version_cannot_read(change: dict[bytes, bytes | None]) -> None:
    assert from_txt({**raw(advert()), **change}, ["10.0.0.1"]) is None


def test_txt_missing_field_or_no_address() -> None:
    txt = raw(advert())
    del txt[b"namespace"]
    assert from_txt(txt, ["10.0.0.1"]) is None
    assert from_txt(raw(advert()), []) is None


def test_choose_the_only_one_or_none() -> None:
    assert choose_cluster([advert()], None) == advert()
    assert choose_cluster([], None) is None
    assert choose_cluster([], "desk") is None  # nothing at all: the caller falls back to 127.0.0.1


def test_several_clusters_are_named() -> None:
    found = [advert("b", "10.0.0.2"), advert("a")]
    with pytest.raises(DiscoveryError, match=r"a \(10.0.0.1:7233\), b \(10.0.0.2:7233\).*SHARDLINE_CLUSTER"):
        choose_cluster(found, None)
    assert choose_cluster(found, "b") == found[0]
    with pytest.raises(DiscoveryError, match=r"no cluster named 'c'.*found a \(10.0.0.1:7233\), b"):
        choose_cluster(found, "c")


def test_hosts_on_our_network_first() -> None:
    hosts = ["192.168.1.5", "10.9.0.1", "10.0.0.1"]
    assert prefer_reachable(hosts, ["10.0.0.7/24"]) == ("10.0.0.1", "192.168.1.5", "10.9.0.1")
    assert prefer_reachable(hosts, []) == tuple(hosts)


def test_route_address_on_loopback() -> None:
    assert route_address("127.0.0.1") == "127.0.0.1"
    assert route_address("localhost") in {"127.0.0.1", "::1"}
    assert node_host("127.0.0.1:7233") == "127.0.0.1" and node_host("[::1]:7233") == "::1"


def test_no_route_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(host: str) -> str:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr("shardline.discovery.route_address", unreachable)
    assert node_host("10.0.0.1:7233") == "127.0.0.1"  # said in a warning; the node still starts


def test_lan_settings_fill_what_is_unset() -> None:
    settings = lan_settings(Settings(lan_host="10.0.0.1", ui_port=9233))
    assert settings.lan and settings.bind_host == "10.0.0.1" and settings.target == "10.0.0.1:7233"
    assert (settings.api_host, settings.node_host) == ("10.0.0.1", "10.0.0.1")
    assert settings.temporal_ui == "http://10.0.0.1:9233"


def test_lan_settings_keep_what_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLINE_API_HOST", "127.0.0.1")  # the API kept on loopback, behind a proxy say
    monkeypatch.setenv("SHARDLINE_NODE_HOST", "10.0.0.9")
    mine = lan_settings(Settings(lan_host="10.0.0.1"))
    assert (mine.api_host, mine.node_host) == ("127.0.0.1", "10.0.0.9")


@pytest.mark.parametrize("name", ["my.desk", "x" * 64])
def test_a_cluster_name_is_one_label(name: str) -> None:
    with pytest.raises(DiscoveryError, match="1 to 63 bytes with no dot"):
        cluster_name(Settings(cluster=name))
    assert service_info(advert("Anna's desk")).server == "Anna-s-desk-shardline.local."


def test_lan_is_for_the_embedded_server() -> None:
    with pytest.raises(DiscoveryError, match="unset SHARDLINE_TEMPORAL_ADDRESS"):
        lan_settings(Settings(temporal_address="temporal.example:7233"))


def test_every_interface() -> None:
    settings = Settings(lan=True)
    assert settings.bind_host == "0.0.0.0" and settings.target == "127.0.0.1:7233"
    assert "0.0.0.0" in devserver_command(settings)
    assert Settings().bind_host == "127.0.0.1" and "0.0.0.0" not in devserver_command(Settings())


def test_pieces_of_up() -> None:
    settings = lan_settings(Settings(lan_host="10.0.0.1"))
    node, api = piece_env("node", settings), piece_env("api", settings)
    assert node["SHARDLINE_DISCOVER_S"] == "0", "up's own node never browses"
    assert node["SHARDLINE_NODE_HOST"] == "10.0.0.1" and api["SHARDLINE_API_HOST"] == "10.0.0.1"
    assert api["SHARDLINE_TEMPORAL_UI_URL"] == "http://10.0.0.1:8233" and api["SHARDLINE_LAN"] == "true"
    assert "SHARDLINE_API_HOST" not in piece_env("api", Settings()), "without --lan the API stays on 127.0.0.1"
