#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*.

The seeds are real inputs: the YAML examples of docs/ and deploy/, the cluster files of the
tests, Istio CreateCertificate requests with CSRs made by openssl, HTTP/2 frames as an HBONE
client sends them, a TLS 1.3 ClientHello; plus edge cases. They are committed (with what the
fuzzer found and `cargo fuzz cmin` kept); run this again only to add seeds, then minimize
(docs/fuzzing.md). Needs python3 and openssl.
"""

import pathlib
import re
import ssl
import struct
import subprocess
import tempfile

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    directory = FUZZ / "corpus" / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"seed-{name}").write_bytes(data)


def yaml_blocks(path):
    text = (ROOT / path).read_text()
    return re.findall(r"```yaml\n(.*?)```", text, re.S)


def raw_strings(path):
    text = (ROOT / path).read_text()
    return re.findall(r'r#"(.*?)"#', text, re.S)


# ---- policy_yaml ----------------------------------------------------------------------------

def policy_seeds():
    for i, block in enumerate(yaml_blocks("docs/policy.md")):
        write("policy_yaml", f"docs-{i}", block)
    for path in sorted((ROOT / "deploy/examples/tutorial").glob("*.yaml")):
        if "kind: PeerAuthentication" in path.read_text() or "kind: AuthorizationPolicy" in path.read_text():
            write("policy_yaml", f"tutorial-{path.stem}", path.read_text())

    def doc(kind, namespace, name, spec, api="security.istio.io/v1"):
        spec = "".join(f"  {line}\n" for line in spec.splitlines())
        return (f"apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\n"
                f"  namespace: {namespace}\nspec:\n{spec}")

    pa = lambda ns, name, spec, **kw: doc("PeerAuthentication", ns, name, spec, **kw)
    ap = lambda ns, name, spec, **kw: doc("AuthorizationPolicy", ns, name, spec, **kw)
    cases = {
        "mesh-strict": pa("istio-system", "default", "mtls:\n  mode: STRICT"),
        "port-level": pa("demo", "web", "selector:\n  matchLabels: {app: web}\nmtls:\n  mode: STRICT\n"
                         "portLevelMtls:\n  8080:\n    mode: PERMISSIVE\n  \"9000\":\n    mode: DISABLE"),
        "unset": pa("demo", "default", "mtls:\n  mode: UNSET", api="security.istio.io/v1beta1"),
        "empty-spec": pa("demo", "empty", "{}"),
        "bad-mode": pa("demo", "bad", "mtls:\n  mode: STRICTT"),
        "allow-principals": ap("demo", "allow", "selector:\n  matchLabels: {app: httpbin}\naction: ALLOW\n"
                               "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/demo/sa/*\", \"*/sa/sleep\"]\n"
                               "  to:\n  - operation:\n      ports: [\"8080\", \"80\"]"),
        "deny-not": ap("istio-system", "deny", "action: DENY\nrules:\n- from:\n  - source:\n"
                       "      notPrincipals: [\"*\"]\n      notNamespaces: [team-*]\n  to:\n"
                       "  - operation:\n      notPorts: [\"22\"]"),
        "ip-blocks": ap("demo", "office", "rules:\n- from:\n  - source:\n      ipBlocks: [192.0.2.0/24, \"fd00::/8\", 10.0.0.1]\n"
                        "      notIpBlocks: [192.0.2.66, \"::1/128\"]\n      remoteIpBlocks: [203.0.113.0/24]"),
        "service-accounts": ap("demo", "sa", "rules:\n- from:\n  - source:\n      serviceAccounts: [demo/sleep]\n"
                               "      namespaces: [\"*\"]"),
        "allow-nothing": ap("demo", "allow-nothing", "{}"),
        "deny-all-rules": ap("demo", "deny-all", "action: DENY\nrules:\n- {}"),
        "l7-refused": ap("demo", "http", "rules:\n- to:\n  - operation:\n      methods: [GET]\n      paths: [/admin]\n"
                         "  when:\n  - key: request.headers[x]\n    values: [y]"),
        "audit": ap("demo", "audit", "action: AUDIT\nrules:\n- {}"),
        "custom": ap("demo", "custom", "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- {}"),
        "target-ref": ap("demo", "ref", "targetRef:\n  kind: Gateway\n  name: gw\nrules:\n- {}"),
        "multi": "---\n".join([pa("istio-system", "a", "mtls: {mode: PERMISSIVE}"),
                               pa("istio-system", "b", "mtls: {mode: STRICT}"),
                               ap("demo", "c", "rules:\n- from:\n  - source:\n      principals: [x]")]),
        "unknown-kind": doc("RequestAuthentication", "demo", "jwt", "jwtRules: []"),
        "not-istio": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {}\n",
        "empty": "",
        "only-separators": "---\n---\n",
        "anchors": "a: &x [1, 2]\nb: *x\n",
        "flow": '{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: f, namespace: demo}, spec: {mtls: {mode: STRICT}}}',
    }
    for name, text in cases.items():
        write("policy_yaml", name, text)


# ---- cluster_file ---------------------------------------------------------------------------

def cluster_seeds():
    for i, block in enumerate(yaml_blocks("docs/cluster-file.md")):
        write("cluster_file", f"docs-{i}", block)
    for path in ["mesh-agent/src/workload.rs", "mesh-agent/src/state.rs"]:
        for i, text in enumerate(raw_strings(path)):
            if "nodes:" in text:
                write("cluster_file", f"{pathlib.Path(path).stem}-{i}", text)
    ca_tests = (ROOT / "mesh-agent/src/ca/tests.rs").read_text()
    match = re.search(r'pub\(crate\) const CLUSTER: &str = "(.*?)";', ca_tests, re.S)
    if match:
        write("cluster_file", "ca-tests", match.group(1))
    base = """trustDomain: example.org
identity:
  ca:
    address: https://10.255.0.253:15012
    roots: ca/ca-roots.pem
    clusterId: Kubernetes
hbone: {idleTimeout: 60s, maxConcurrentStreams: 100}
sameNode: {mode: mutualTls}
limits: {connectionsPerWorkload: 100, handshakesPerWorkload: 4}
policy: {path: policies/, rootNamespace: istio-system}
nodes:
  - name: node-a
    addresses: [10.255.0.1, "fd00:ff::1"]
    workloadCgroup: /sys/fs/cgroup/mesh/node-a/pods
    excludedPorts: [22, 15000]
    workloads:
      - name: client
        namespace: demo
        labels: {app: client, version: v1}
        ips: [10.1.0.2, "fd00:1::2"]
        netns: /var/run/netns/client
        cgroup: /sys/fs/cgroup/mesh/node-a/pods/client
  - name: node-b
    workloadCgroup: /sys/fs/cgroup/mesh/node-b/pods
    workloads:
      - name: server
        namespace: demo
        serviceAccount: server
        labels: {app: server}
        ips: ["::ffff:10.2.0.2"]
        netns: /var/run/netns/server
        cgroup: /sys/fs/cgroup/mesh/node-b/pods/server
services:
  - name: server
    namespace: demo
    addresses: [10.96.0.10, "fd00:96::10"]
    ports: [{port: 80, targetPort: 8080}, {port: 443}]
    selector: {app: server}
  - name: by-ip
    addresses: [10.96.0.11]
    ports: [{port: 9000}]
    endpointIps: [10.1.0.2]
"""
    write("cluster_file", "full", base)
    write("cluster_file", "token", base.replace("    clusterId: Kubernetes\n",
                                                 "    token: /var/run/secrets/mesh/ca-token\n    serverName: istiod.istio-system.svc\n"))
    write("cluster_file", "dup-ip", base.replace('"::ffff:10.2.0.2"', "10.1.0.2"))
    write("cluster_file", "service-on-workload-ip", base.replace("10.96.0.11", "10.1.0.2"))
    write("cluster_file", "no-identity", "nodes: []\n")
    write("cluster_file", "empty", "")


# ---- connect_authority ----------------------------------------------------------------------

def authority_seeds():
    connect, get, custom = b"\x00", b"\x02", b"\x03"
    cases = {
        "v4": connect + b"127.0.0.2:8080",
        "v6": connect + b"[fd00:1::2]:15008",
        "v4-mapped": connect + b"[::ffff:10.1.0.2]:80",
        "v6-embedded-v4": connect + b"[64:ff9b::192.0.2.1]:443",
        "v6-full": connect + b"[2001:0db8:0000:0000:0000:ff00:0042:8329]:65535",
        "zone": connect + b"[fe80::1%25eth0]:80",
        "zone-number": connect + b"[fe80::1%2]:80",
        "name": connect + b"httpbin.demo.svc.cluster.local:8000",
        "userinfo": connect + b"user@10.0.0.1:80",
        "no-port": connect + b"10.0.0.1",
        "empty-port": connect + b"10.0.0.1:",
        "port-zero": connect + b"10.0.0.1:0",
        "port-big": connect + b"10.0.0.1:65536",
        "port-zeros": connect + b"10.0.0.1:0080",
        "leading-zero": connect + b"10.01.0.1:80",
        "v6-no-brackets": connect + b"fd00::2:80",
        "get": get + b"127.0.0.2:8080",
        "lowercase": custom + b"connect 127.0.0.2:8080",
        "post": custom + b"POST 127.0.0.2:8080",
    }
    for name, data in cases.items():
        write("connect_authority", name, data)


# ---- ca_request -----------------------------------------------------------------------------

def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, wire, payload):
    key = varint(number << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def string_value(text):
    return field(3, 2, text.encode())  # google.protobuf.Value.string_value


def pb_struct(fields):
    entries = b""
    for key, value in fields.items():
        entries += field(1, 2, field(1, 2, key.encode()) + field(2, 2, value))
    return entries


def request(csr=None, validity=None, metadata=None):
    out = b""
    if csr is not None:
        out += field(1, 2, csr.encode())
    if validity is not None:
        out += field(3, 0, varint(validity))
    if metadata is not None:
        out += field(4, 2, pb_struct(metadata))
    return out


def openssl_csr(key_args, sans):
    with tempfile.TemporaryDirectory() as tmp:
        key = pathlib.Path(tmp) / "key.pem"
        subprocess.run(["openssl", "genpkey", *key_args, "-out", key], check=True, capture_output=True)
        args = ["openssl", "req", "-new", "-key", key, "-subj", "/O=mesh"]
        if sans:
            args += ["-addext", "subjectAltName=" + ",".join(sans)]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def ca_seeds():
    p256 = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    p384 = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]
    rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]
    sleep = "spiffe://cluster.local/ns/demo/sa/sleep"
    httpbin = "spiffe://cluster.local/ns/demo/sa/httpbin"
    good = openssl_csr(p256, [f"URI:{sleep}"])
    node_a, node_b, node_z, header = b"\x00", b"\x01", b"\x03", 0x04
    impersonated = {"ImpersonatedIdentity": string_value(sleep)}
    cases = {
        "good": node_a + request(good, 3600),
        "good-impersonated": node_a + request(good, 0, impersonated),
        "wrong-node": node_b + request(good),
        "unknown-node": node_z + request(good, -1),
        "httpbin": node_b + request(openssl_csr(p256, [f"URI:{httpbin}"]), 86400),
        "impersonate-other": node_a + request(good, None, {"ImpersonatedIdentity": string_value(httpbin)}),
        "impersonated-number": node_a + request(good, None, {"ImpersonatedIdentity": field(2, 1, struct.pack("<d", 1.0))}),
        "p384": node_a + request(openssl_csr(p384, [f"URI:{sleep}"])),
        "rsa": node_a + request(openssl_csr(rsa, [f"URI:{sleep}"])),
        "two-sans": node_a + request(openssl_csr(p256, [f"URI:{sleep}", f"URI:{httpbin}"])),
        "dns-san": node_a + request(openssl_csr(p256, ["DNS:sleep.demo"])),
        "no-san": node_a + request(openssl_csr(p256, [])),
        "foreign-domain": node_a + request(openssl_csr(p256, ["URI:spiffe://example.org/ns/demo/sa/sleep"])),
        "not-spiffe": node_a + request(openssl_csr(p256, ["URI:https://example.org/"])),
        "truncated-pem": node_a + request(good[: len(good) // 2]),
        "empty": node_a,
    }
    hdr = sleep.encode()
    cases["header"] = bytes([header]) + bytes([len(hdr)]) + hdr + request(good)
    cases["header-differs"] = bytes([header]) + bytes([len(hdr)]) + hdr + request(
        good, None, {"ImpersonatedIdentity": string_value(httpbin)})
    for name, data in cases.items():
        write("ca_request", name, data)


# ---- hbone_front ----------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def settings(*pairs):
    return frame(0x4, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def hpack_literal(index, value, indexing=False):
    """A literal header field with an indexed name (RFC 7541 §6.2), not Huffman-coded."""
    value = value.encode()
    assert index < 15 and len(value) < 127
    prefix = 0x40 | index if indexing else index
    return bytes([prefix, len(value)]) + value


def connect_block(authority, method="CONNECT", indexing=False):
    return hpack_literal(2, method, indexing) + hpack_literal(1, authority, indexing)


END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20


def headers(stream, block, flags=END_HEADERS):
    return frame(0x1, flags, stream, block)


def data(stream, payload, flags=0):
    return frame(0x0, flags, stream, payload)


def client_hello():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="httpbin.demo")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def hbone_seeds():
    raw, tls, tls_preface = b"\x00", b"\x01", b"\x03"
    hello = client_hello()
    served = "127.0.0.2:8080"
    start = settings((0x2, 0), (0x4, 1 << 20))
    cases = {
        "raw-client-hello": raw + hello,
        "raw-client-hello-truncated": raw + hello[: len(hello) // 2],
        "raw-http1": raw + b"CONNECT 127.0.0.2:8080 HTTP/1.1\r\nHost: 127.0.0.2:8080\r\n\r\n",
        "raw-h2c": raw + PREFACE + settings(),
        "raw-record-garbage": raw + b"\x16\x03\x01\x00\x05hello",
        "raw-alert": raw + b"\x15\x03\x03\x00\x02\x02\x28",
        "raw-empty": raw,
        "connect": tls_preface + start + headers(1, connect_block(served)) + data(1, b"hello", END_STREAM),
        "connect-denied-port": tls_preface + start + headers(1, connect_block("127.0.0.2:8081")),
        "connect-not-served": tls_preface + start + headers(1, connect_block("127.0.0.3:8080")),
        "connect-refused-port": tls_preface + start + headers(1, connect_block("127.0.0.2:9")),
        "connect-v4-mapped": tls_preface + start + headers(1, connect_block("[::ffff:127.0.0.2]:8080")),
        "connect-name": tls_preface + start + headers(1, connect_block("httpbin.demo:8080")),
        "get": tls_preface + start + headers(
            1, hpack_literal(2, "GET") + hpack_literal(6, "https") + hpack_literal(4, "/") + hpack_literal(1, served),
            END_HEADERS | END_STREAM),
        "indexed-twice": tls_preface + start + headers(1, connect_block(served, indexing=True))
        + headers(3, b"\xbf\xbe") + data(3, b"x") + frame(0x3, 0, 1, struct.pack(">I", 8)),
        "continuation": tls_preface + start + headers(1, hpack_literal(2, "CONNECT"), 0)
        + frame(0x9, END_HEADERS, 1, hpack_literal(1, served)),
        "padded-priority": tls_preface + start + headers(
            1, b"\x03" + struct.pack(">I", 0) + b"\x10" + connect_block(served) + b"\x00\x00\x00",
            END_HEADERS | PADDED | PRIORITY),
        "table-size": tls_preface + settings((0x1, 0)) + headers(1, b"\x20" + connect_block(served)),
        "ping-window-goaway": tls_preface + start + frame(0x6, 0, 0, b"12345678")
        + frame(0x8, 0, 0, struct.pack(">I", 65535)) + frame(0x7, 0, 0, struct.pack(">II", 0, 0)),
        "many-streams": tls_preface + start + b"".join(
            headers(s, connect_block(served)) for s in range(1, 40, 2)),
        "data-closed-stream": tls_preface + start + data(5, b"late", END_STREAM),
        "no-settings": tls_preface + headers(1, connect_block(served)),
        "preface-in-payload": tls + PREFACE + start + headers(1, connect_block(served)),
        "not-h2": tls + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    for name, payload in cases.items():
        write("hbone_front", name, payload)


if __name__ == "__main__":
    policy_seeds()
    cluster_seeds()
    authority_seeds()
    ca_seeds()
    hbone_seeds()
    for target in sorted((FUZZ / "corpus").iterdir()):
        files = list(target.iterdir())
        size = sum(f.stat().st_size for f in files)
        print(f"{target.name}: {len(files)} files, {size} bytes")
