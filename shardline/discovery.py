"""Finding the cluster on the LAN: `shardline up --lan` advertises it by DNS-SD over mDNS (python-zeroconf), and a
`shardline node` with no SHARDLINE_TEMPORAL_ADDRESS browses for it. Only IPv4, as the dev server binds one."""

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil
import structlog
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncZeroconf

from shardline.settings import Settings

log = structlog.get_logger(__name__)
SERVICE = "_shardline._tcp.local."
EVERY_INTERFACE = "0.0.0.0"
TXT_VERSION = "1"
RESOLVE_MS = 2000
OUTSIDE = "192.0.2.1"  # TEST-NET-1: a destination only for route look-ups (no packet is ever sent to it)


class DiscoveryError(RuntimeError):
    """The cluster to join cannot be chosen; the message says what to set."""


@dataclass(frozen=True)
class Advert:
    """One cluster as `up --lan` advertises it: where its Temporal frontend, namespace, API and UI are."""

    cluster: str
    namespace: str
    hosts: tuple[str, ...]
    temporal_port: int
    api_port: int
    ui_port: int

    @property
    def temporal_address(self) -> str:
        return f"{self.hosts[0]}:{self.temporal_port}"

    def txt(self) -> dict[str, str]:
        return {"v": TXT_VERSION, "cluster": self.cluster, "namespace": self.namespace,
                "temporal_port": str(self.temporal_port), "api_port": str(self.api_port),
                "ui_port": str(self.ui_port)}  # fmt: skip


def from_txt(properties: dict[bytes, bytes | None], hosts: Iterable[str]) -> Advert | None:
    """The advert a TXT record describes; None for one this version cannot read (another version, a stray)."""
    txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in properties.items()}
    hosts = tuple(hosts)
    if txt.get("v") != TXT_VERSION or not hosts:
        return None
    try:
        ports = [int(txt[key]) for key in ("temporal_port", "api_port", "ui_port")]
        return Advert(txt["cluster"], txt["namespace"], hosts, *ports)
    except (KeyError, ValueError):
        return None


def choose_cluster(found: list[Advert], wanted: str | None) -> Advert | None:
    """The one cluster to join: the one named `wanted`, or the only one found; None when nothing was found."""
    if wanted is not None:
        named = [a for a in found if a.cluster == wanted]
        if named:
            return named[0]
        if found:
            raise DiscoveryError(f"no cluster named {wanted!r} (SHARDLINE_CLUSTER) on this network; found "
                                 f"{describe(found)}")  # fmt: skip
        return None
    if len(found) > 1:
        raise DiscoveryError(f"several clusters on this network: {describe(found)}; set SHARDLINE_CLUSTER to one")
    return found[0] if found else None


def describe(found: list[Advert]) -> str:
    return ", ".join(f"{a.cluster} ({a.temporal_address})" for a in sorted(found, key=lambda a: a.cluster))


def prefer_reachable(hosts: Iterable[str], networks: Iterable[str]) -> tuple[str, ...]:
    """`hosts` with those on one of our own networks ("10.0.0.2/24") first: the route to them is direct."""
    nets = [ipaddress.ip_interface(n).network for n in networks]
    return tuple(sorted(hosts, key=lambda h: not any(ipaddress.ip_address(h) in net for net in nets)))


def route_address(host: str) -> str:
    """This machine's address on the route to `host`: what a peer there sees us as. A UDP connect() only looks the
    route up; no packet is sent."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(sockaddr)
        return str(sock.getsockname()[0])


def local_networks() -> list[str]:
    """Our IPv4 addresses with their prefix ("10.0.0.2/24") on interfaces that are up, loopback and link-local
    left out."""
    stats = psutil.net_if_stats()
    found = []
    for name, addrs in psutil.net_if_addrs().items():
        if name not in stats or not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and addr.netmask:
                iface = ipaddress.ip_interface(f"{addr.address}/{addr.netmask}")
                if not (iface.ip.is_loopback or iface.ip.is_link_local):
                    found.append(str(iface))
    return found


def lan_addresses(lan_host: str) -> list[str]:
    """The addresses `up --lan` serves and advertises on: SHARDLINE_LAN_HOST alone, or every LAN address, the one of
    the default route first."""
    if lan_host != EVERY_INTERFACE:
        return [lan_host]
    addresses = [n.split("/")[0] for n in local_networks()]
    try:
        primary = route_address(OUTSIDE)
    except OSError:  # no default route (a LAN with no way out)
        return addresses
    return sorted(addresses, key=lambda a: a != primary)


def lan_settings(settings: Settings) -> Settings:
    """`up --lan`: the API on the LAN address(es), runners on the main one, the UI linked there; what is set wins."""
    if not settings.embedded:
        raise DiscoveryError("--lan serves and advertises the embedded Temporal server: unset "
                             "SHARDLINE_TEMPORAL_ADDRESS, or give the nodes that address")  # fmt: skip
    addresses = lan_addresses(settings.lan_host)
    if not addresses:
        raise DiscoveryError("no LAN address (no interface up but loopback): join a network or set SHARDLINE_LAN_HOST")
    chosen = settings.model_fields_set
    update: dict[str, object] = {"lan": True}
    if "api_host" not in chosen:
        update["api_host"] = settings.lan_host
    if "node_host" not in chosen:
        update["node_host"] = addresses[0]
    if "temporal_ui_url" not in chosen:
        update["temporal_ui_url"] = f"http://{addresses[0]}:{settings.ui_port}"
    return settings.model_copy(update=update)


def advert(settings: Settings) -> Advert:
    hosts = tuple(lan_addresses(settings.lan_host))
    return Advert(cluster_name(settings), settings.namespace, hosts, settings.temporal_port, settings.api_port,
                  settings.ui_port)  # fmt: skip


def cluster_name(settings: Settings) -> str:
    """SHARDLINE_CLUSTER, or the host name: one DNS label (no dots, at most 63 bytes), as a service instance is."""
    name = settings.cluster or socket.gethostname().split(".")[0]
    if not name or "." in name or len(name.encode()) > 63:
        raise DiscoveryError(f"SHARDLINE_CLUSTER={name!r}: a cluster name is 1 to 63 bytes with no dot")
    return name


def interfaces(lan_host: str) -> InterfaceChoice | list[str]:
    return InterfaceChoice.All if lan_host == EVERY_INTERFACE else [lan_host]


def service_info(ad: Advert) -> ServiceInfo:
    return ServiceInfo(
        SERVICE,
        f"{ad.cluster}.{SERVICE}",
        parsed_addresses=list(ad.hosts),
        port=ad.temporal_port,
        properties=ad.txt(),
        server=f"{re.sub(r'[^A-Za-z0-9-]', '-', ad.cluster)}-shardline.local.",  # a host name: letters, digits, -
    )


class Advertiser:
    """The cluster's DNS-SD record on the LAN for as long as `up --lan` runs; a goodbye when it stops."""

    def __init__(self, settings: Settings) -> None:
        self.advert = advert(settings)
        self._info = service_info(self.advert)
        self._zc = AsyncZeroconf(interfaces=interfaces(settings.lan_host), ip_version=IPVersion.V4Only)

    async def start(self) -> None:
        try:
            await (await self._zc.async_register_service(self._info))
        except NonUniqueNameException:
            raise DiscoveryError(f"a cluster named {self.advert.cluster!r} is already advertised on this network: "
                                 "set SHARDLINE_CLUSTER to another name") from None  # fmt: skip
        log.info("discovery.advertised", service=self._info.name, hosts=list(self.advert.hosts),
                 txt=self.advert.txt())  # fmt: skip

    async def stop(self) -> None:
        await self._zc.async_close()  # unregisters: peers forget the cluster at once


def browse(seconds: float) -> list[Advert]:
    """Every cluster advertised on the LAN within `seconds`, each resolved to its addresses and TXT record."""
    names: set[str] = set()
    lock = threading.Lock()

    def seen(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            with lock:
                names.add(name)

    zc = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zc, SERVICE, handlers=[seen])
        time.sleep(seconds)  # the browser's thread collects names meanwhile
        browser.cancel()
        found = []
        for name in sorted(names):
            info = zc.get_service_info(SERVICE, name, timeout=RESOLVE_MS)
            ad = info and from_txt(info.properties, prefer_reachable(info.parsed_addresses(), local_networks()))
            if ad:
                found.append(ad)
        return found
    finally:
        zc.close()


def joined_settings(settings: Settings) -> Settings:
    """A node's settings with the cluster found on the LAN (when SHARDLINE_TEMPORAL_ADDRESS is unset) and its
    runners' host found from the route to Temporal (when SHARDLINE_NODE_HOST is unset)."""
    if settings.temporal_address is None and settings.discover_s > 0:
        found = choose_cluster(browse(settings.discover_s), settings.cluster)
        if found is None:
            log.warning("discovery.none_found", seconds=settings.discover_s, using=settings.target,
                        hint="`shardline up --lan` on the first machine, or SHARDLINE_TEMPORAL_ADDRESS")  # fmt: skip
        else:
            update = {"temporal_address": found.temporal_address}
            if "namespace" not in settings.model_fields_set:
                update["namespace"] = found.namespace
            settings = settings.model_copy(update=update)
            log.info("discovery.joined", cluster=found.cluster, temporal=found.temporal_address,
                     namespace=settings.namespace)  # fmt: skip
    if settings.node_host is None:
        settings = settings.model_copy(update={"node_host": node_host(settings.target)})
    return settings


def node_host(target: str) -> str:
    """Our address on the route to Temporal at `target` (host:port); 127.0.0.1 when there is no route yet (its
    name does not resolve, the network is down), as before SHARDLINE_NODE_HOST was optional."""
    host = target.rsplit(":", 1)[0].strip("[]")
    try:
        return route_address(host)
    except OSError as err:
        log.warning("node.host_unknown", temporal=target, error=str(err), using="127.0.0.1",
                    hint="set SHARDLINE_NODE_HOST to the address other machines reach this one at")  # fmt: skip
        return "127.0.0.1"
