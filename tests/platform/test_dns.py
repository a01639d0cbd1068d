"""The pure ``.internal`` core (taxiway.platform.dns): every name, per org, as a function of the snapshot."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.platform import dns, schema
from taxiway.platform.dns import NOERROR, NXDOMAIN, REFUSED, Asker, Machine, Snapshot


def ip(org: int, machine: int, host: int = 1) -> str:
    return str(ipaddress.IPv6Address((0xFDAA << 112) | (org << 80) | (host << 64) | machine))


WEB = [
    Machine("0000000000000a", "web", "ams", "app", "started", ip(1, 10)),
    Machine("0000000000000b", "web", "ord", "app", "started", ip(1, 11)),
    Machine("0000000000000c", "web", "ams", "worker", "started", ip(1, 12)),
    Machine("0000000000000d", "web", "ams", "app", "stopped", ip(1, 13)),
    Machine("0000000000000e", "web", "syd", "app", "started", None),   # no address yet
]
DB = [Machine("000000000000f1", "db", "ord", "app", "started", ip(1, 20))]
RIVAL = [Machine("000000000000e1", "rival", "ams", "app", "started", ip(2, 5))]
SNAP = Snapshot({"web": "acme", "db": "acme", "rival": "other", "empty": "acme"}, WEB + DB + RIVAL)
ACME_AMS = Asker("acme", "ams", "0000000000000a")


def addrs(answer: dns.Answer) -> list[str]:
    return [r.value for r in answer.records if r.type == "AAAA"]


def txt(answer: dns.Answer) -> list[str]:
    return ["".join(r.value) for r in answer.records if r.type == "TXT"]


def test_app_name_is_every_started_machine_with_an_address():
    a = dns.resolve(SNAP, ACME_AMS, "web.internal", "AAAA")
    assert a.rcode == NOERROR
    assert addrs(a) == [ip(1, 10), ip(1, 11), ip(1, 12)]
    assert all(r.ttl == dns.TTL for r in a.records)


def test_region_vm_process_names():
    assert addrs(dns.resolve(SNAP, ACME_AMS, "ams.web.internal", "AAAA")) == [ip(1, 10), ip(1, 12)]
    assert addrs(dns.resolve(SNAP, ACME_AMS, "ord.web.internal", "AAAA")) == [ip(1, 11)]
    assert dns.resolve(SNAP, ACME_AMS, "fra.web.internal", "AAAA").rcode == NXDOMAIN   # no machine there
    assert dns.resolve(SNAP, ACME_AMS, "syd.web.internal", "AAAA").nodata   # one, without an address
    assert addrs(dns.resolve(SNAP, ACME_AMS, "0000000000000b.vm.web.internal", "AAAA")) == [ip(1, 11)]
    # a stopped machine's name exists (NODATA); a destroyed or unknown one does not
    assert dns.resolve(SNAP, ACME_AMS, "0000000000000d.vm.web.internal", "AAAA").nodata
    assert dns.resolve(SNAP, ACME_AMS, "ffffffffffffff.vm.web.internal", "AAAA").rcode == NXDOMAIN
    assert addrs(dns.resolve(SNAP, ACME_AMS, "worker.process.web.internal", "AAAA")) == [ip(1, 12)]
    assert addrs(dns.resolve(SNAP, ACME_AMS, "app.process.web.internal", "AAAA")) == [ip(1, 10), ip(1, 11)]


def test_nearest_puts_the_askers_region_first():
    ord_asker = Asker("acme", "ord")
    assert addrs(dns.resolve(SNAP, ord_asker, "top1.nearest.of.web.internal", "AAAA")) == [ip(1, 11)]
    assert addrs(dns.resolve(SNAP, ord_asker, "top3.nearest.of.web.internal", "AAAA")) == [ip(1, 11), ip(1, 10), ip(1, 12)]
    assert addrs(dns.resolve(SNAP, ACME_AMS, "top2.nearest.of.web.internal", "AAAA")) == [ip(1, 10), ip(1, 12)]
    assert len(addrs(dns.resolve(SNAP, ACME_AMS, "top99.nearest.of.web.internal", "AAAA"))) == 3
    assert dns.resolve(SNAP, ACME_AMS, "top0.nearest.of.web.internal", "AAAA").rcode == NXDOMAIN
    assert dns.resolve(SNAP, ACME_AMS, "topx.nearest.of.web.internal", "AAAA").rcode == NXDOMAIN


def test_txt_names_as_fly_writes_them():
    assert txt(dns.resolve(SNAP, ACME_AMS, "vms.web.internal", "TXT")) == [
        "0000000000000a ams,0000000000000b ord,0000000000000c ams"]
    assert txt(dns.resolve(SNAP, ACME_AMS, "regions.web.internal", "TXT")) == ["ams,ord"]
    assert txt(dns.resolve(SNAP, ACME_AMS, "_apps.internal", "TXT")) == ["db,empty,web"]
    inst = txt(dns.resolve(SNAP, ACME_AMS, "_instances.internal", "TXT"))
    assert f"instance=000000000000f1,app=db,ip={ip(1, 20)},region=ord" in inst
    assert not any("rival" in t for t in inst)
    assert txt(dns.resolve(SNAP, ACME_AMS, "vms.empty.internal", "TXT")) == [""]


def test_long_txt_is_split_into_character_strings():
    many = [Machine(f"{i:014x}", "big", "ams", "app", "started", ip(1, 100 + i)) for i in range(40)]
    a = dns.resolve(Snapshot({"big": "acme"}, many), ACME_AMS, "vms.big.internal", "TXT")
    (rec,) = a.records
    assert all(len(s.encode()) <= 255 for s in rec.value) and len(rec.value) > 1
    assert "".join(rec.value).split(",")[39] == f"{39:014x} ams"


def test_wrong_type_is_nodata_and_names_are_case_insensitive():
    assert dns.resolve(SNAP, ACME_AMS, "web.internal", "A").nodata
    assert dns.resolve(SNAP, ACME_AMS, "vms.web.internal", "AAAA").nodata
    assert dns.resolve(SNAP, ACME_AMS, "web.internal", "TXT").nodata
    assert addrs(dns.resolve(SNAP, ACME_AMS, "WeB.InTeRnAl.", "AAAA")) == addrs(
        dns.resolve(SNAP, ACME_AMS, "web.internal", "AAAA"))
    assert dns.resolve(SNAP, ACME_AMS, "internal", "SOA").nodata
    assert dns.resolve(SNAP, ACME_AMS, "a.b.c.web.internal", "AAAA").rcode == NXDOMAIN


def test_another_orgs_app_is_nxdomain_like_a_missing_one():
    assert dns.resolve(SNAP, ACME_AMS, "rival.internal", "AAAA").rcode == NXDOMAIN
    assert dns.resolve(SNAP, ACME_AMS, "vms.rival.internal", "TXT").rcode == NXDOMAIN
    assert dns.resolve(SNAP, ACME_AMS, "nope.internal", "AAAA").rcode == NXDOMAIN
    assert dns.resolve(SNAP, Asker("other"), "web.internal", "AAAA").rcode == NXDOMAIN
    assert txt(dns.resolve(SNAP, Asker("other"), "_apps.internal", "TXT")) == ["rival"]
    assert dns.resolve(SNAP, None, "web.internal", "AAAA").rcode == REFUSED


def test_asker_from_source_address():
    assert dns.asker_for(SNAP, ip(1, 11)) == Asker("acme", "ord", "0000000000000b")
    # same /48 (another host, or a machine whose STATUS is not written yet): the org, no region
    assert dns.asker_for(SNAP, ip(1, 999, host=7)) == Asker("acme")
    assert dns.asker_for(SNAP, ip(2, 5)) == Asker("other", "ams", "000000000000e1")
    assert dns.asker_for(SNAP, ip(3, 1)) is None
    # an org network known from the networks bucket, before any machine of it has an address
    assert dns.asker_for(Snapshot(SNAP.apps, SNAP.machines, {3: "third"}), ip(3, 1)) == Asker("third")
    assert dns.asker_for(SNAP, "fdaa::3") is None
    assert dns.asker_for(SNAP, "127.0.0.1") is None
    static = {ipaddress.ip_network("127.0.0.0/8"): "acme", ipaddress.ip_network("127.0.0.3/32"): "other"}
    assert dns.asker_for(SNAP, "127.0.0.2", static) == Asker("acme")
    assert dns.asker_for(SNAP, "127.0.0.3", static) == Asker("other")      # the longest prefix wins
    assert dns.asker_for(SNAP, "::ffff:127.0.0.3", static) == Asker("other")
    assert dns.asker_for(SNAP, "::1", static) is None
    # a machine address never falls to the static table
    assert dns.asker_for(SNAP, ip(2, 5), {ipaddress.ip_network("fdaa::/16"): "acme"}).org == "other"


def test_from_records_reads_the_buckets():
    apps = {"web": {"name": "web", "org": "acme"}, "gone": {"name": "gone", "org": "acme"}}
    machines = {
        "web.0000000000000a": {"id": "0000000000000a", "region": "ams", "desired": "started",
                               "config": {"metadata": {"process_group": "worker"}}},
        "web.0000000000000b": {"id": "0000000000000b", "region": "ams", "desired": "destroyed"},
        "web.0000000000000c": {"id": "0000000000000c", "desired": "started"},
        "nowhere.000000000000ff": {"id": "000000000000ff", "desired": "started"},
    }
    status = {"web.0000000000000a": {"state": "started", "private_ip": ip(1, 1)},
              "web.0000000000000b": {"state": "started", "private_ip": ip(1, 2)},
              "web.0000000000000c": {"state": "starting", "private_ip": ip(1, 3)},
              "web.00000000000099": {"state": "started", "private_ip": ip(1, 9)},   # no MACHINES record
              "web.0000000000000d": {"state": "started", "private_ip": "not an address"}}
    machines["web.0000000000000d"] = {"id": "0000000000000d", "desired": "started"}
    snap = Snapshot.from_records(apps, machines, status, {"net.7": {"org": "acme", "network": 7},
                                                          "org.acme": {"org": "acme", "network": 7}})
    assert snap.networks == {7: "acme"}
    assert dns.asker_for(snap, ip(7, 1234)) == Asker("acme")
    asker = Asker("acme")
    assert addrs(dns.resolve(snap, asker, "web.internal", "AAAA")) == [ip(1, 1)]
    assert addrs(dns.resolve(snap, asker, "worker.process.web.internal", "AAAA")) == [ip(1, 1)]
    assert dns.resolve(snap, asker, "0000000000000b.vm.web.internal", "AAAA").rcode == NXDOMAIN
    assert txt(dns.resolve(snap, asker, "_apps.internal", "TXT")) == ["gone,web"]


# -- properties ----------------------------------------------------------------------------------

ORGS = ["acme", "other", "third"]
APPS = st.dictionaries(st.sampled_from(["web", "db", "api", "cache", "x"]), st.sampled_from(ORGS), min_size=1)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    apps = draw(APPS)
    org_no = {o: i + 1 for i, o in enumerate(ORGS)}
    machines = []
    for n in range(draw(st.integers(0, 12))):
        app = draw(st.sampled_from(sorted(apps)))
        machines.append(Machine(
            f"{n:014x}", app, draw(st.sampled_from(["ams", "ord", "syd"])),
            draw(st.sampled_from(["app", "worker"])),
            draw(st.sampled_from(["started", "stopped", "created", "failed"])),
            ip(org_no[apps[app]], n + 1, host=draw(st.integers(1, 3)))))
    return Snapshot(apps, machines)


NAMES = st.sampled_from(["{a}.internal", "ams.{a}.internal", "vms.{a}.internal", "regions.{a}.internal",
                         "top2.nearest.of.{a}.internal", "app.process.{a}.internal", "_apps.internal",
                         "_instances.internal", "{m}.vm.{a}.internal", "{A}.INTERNAL"])


@settings(max_examples=150, deadline=None)
@given(snapshots(), st.sampled_from(ORGS), st.sampled_from(["web", "db", "api", "cache", "x", "none"]), NAMES,
       st.sampled_from(["AAAA", "TXT", "ANY", "A"]))
def test_an_org_never_sees_another_orgs_addresses_or_names(snap, org, app, pattern, qtype):
    mid = snap.machines[0].id if snap.machines else "00000000000000"
    name = pattern.format(a=app, A=app.upper(), m=mid)
    ans = dns.resolve(snap, Asker(org, "ams"), name, qtype)
    own = {m.private_ip for m in snap.machines if snap.apps[m.app] == org}
    others = {m.private_ip for m in snap.machines if snap.apps[m.app] != org}
    foreign_apps = {a for a, o in snap.apps.items() if o != org}
    for r in ans.records:
        if r.type == "AAAA":
            assert r.value in own
        else:
            text = "".join(r.value)
            assert not any(o in text for o in others)
            if name == "_apps.internal":
                assert not set(text.split(",")) & foreign_apps
    if app in foreign_apps and "{a}" in pattern:
        assert ans.rcode == NXDOMAIN
    # a function of the snapshot: the same question, the same answer
    assert dns.resolve(Snapshot(snap.apps, list(reversed(snap.machines))), Asker(org, "ams"), name, qtype) == ans


@settings(max_examples=80, deadline=None)
@given(snapshots(), st.sampled_from(ORGS))
def test_app_names_answer_exactly_the_started_machines(snap, org):
    for app in snap.org_apps(org):
        got = addrs(dns.resolve(snap, Asker(org), f"{app}.internal", "AAAA"))
        assert sorted(got) == sorted(m.private_ip for m in snap.machines if m.app == app and m.state == "started")
        near = addrs(dns.resolve(snap, Asker(org, "ord"), f"top64.nearest.of.{app}.internal", "AAAA"))
        assert sorted(near) == sorted(got)
        regions = [m.region for ip_ in near for m in snap.machines if m.private_ip == ip_]
        assert regions == sorted(regions, key=lambda r: r != "ord")   # ord first


@settings(max_examples=80, deadline=None)
@given(snapshots())
def test_a_machines_address_names_its_own_org(snap):
    for m in snap.machines:
        assert dns.asker_for(snap, m.private_ip) == Asker(snap.apps[m.app], m.region, m.id)


@settings(max_examples=60, deadline=None)
@given(snapshots(), st.sampled_from(ORGS), st.sampled_from(["web", "db", "none"]), NAMES,
       st.sampled_from(["AAAA", "TXT", "A"]), st.booleans(), st.booleans())
def test_the_servers_wire_replies_carry_the_cores_answer(snap, org, app, pattern, qtype, udp, edns):
    """platform.dnsserver writes replies by hand: dnslib must read back exactly resolve()'s answer."""
    from dnslib import EDNS0, QTYPE, DNSRecord

    from taxiway.platform.dnsserver import DNSConfig, DNSServer

    server = DNSServer(DNSConfig(org_of={ipaddress.ip_network("127.0.0.1/32"): org}))
    server._records[schema.APPS] = {a: {"name": a, "org": o} for a, o in snap.apps.items()}
    for m in snap.machines:
        key = schema.machine_key(m.app, m.id)
        server._records[schema.MACHINES][key] = {"id": m.id, "region": m.region, "process_group": m.process_group,
                                                 "desired": "started"}
        server._records[schema.STATUS][key] = {"state": m.state, "private_ip": m.private_ip}
    mid = snap.machines[0].id if snap.machines else "00000000000000"
    name = pattern.format(a=app, A=app.upper(), m=mid)
    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=4096))
    raw = bytes(query.pack())
    reply = DNSRecord.parse(server.answer(raw, "127.0.0.1", udp))
    want = dns.resolve(server.snapshot, Asker(org), name, qtype)
    assert reply.header.id == query.header.id and reply.header.rcode == want.rcode
    assert str(reply.q.qname) == str(query.q.qname)
    if reply.header.tc:
        assert udp and len(server.answer(raw, "127.0.0.1", False)) > (1232 if edns else 512)
        return
    assert [str(r.rdata) for r in reply.rr if r.rtype == QTYPE.AAAA] == [
        str(ipaddress.IPv6Address(r.value)) for r in want.records if r.type == "AAAA"]
    assert [[s.decode() for s in r.rdata.data] for r in reply.rr if r.rtype == QTYPE.TXT] == [
        list(r.value) for r in want.records if r.type == "TXT"]
    assert all(r.ttl == dns.TTL for r in reply.rr)
    assert bool(reply.auth) == (not want.records and want.rcode in (NOERROR, NXDOMAIN))
