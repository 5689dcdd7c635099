#!/usr/bin/env python3
"""Real Kafka clients for weir's e2e tests (tests/tests/kafka_e2e.rs).

Every outcome is one JSON object per line on stdout, so the Rust test asserts exact
results (delivered or the error's name per message, records consumed, topics listed);
diagnostics go to stderr.

    produce    confluent-kafka (librdkafka) or kafka-python producer
    consume    confluent-kafka or kafka-python consumer (assign or subscribe)
    offsets    low/high watermarks of partition 0
    metadata   Metadata for some topics or for all, through confluent-kafka
    raw        hand-framed requests on one socket, written at once (pipelining,
               frames whose length lies)
"""

import argparse
import json
import socket
import struct
import sys
import time


def out(**kw):
    print(json.dumps(kw), flush=True)


def conf_dict(pairs):
    d = {}
    for p in pairs or []:
        k, _, v = p.partition("=")
        d[k] = v
    return d


# --- confluent-kafka ---------------------------------------------------------------


def confluent_produce(a):
    from confluent_kafka import Producer

    conf = {
        "bootstrap.servers": a.bootstrap,
        "client.id": a.client_id,
        "linger.ms": 0,
        "message.timeout.ms": int(a.timeout * 1000),
    }
    conf.update(conf_dict(a.conf))
    p = Producer(conf)

    def report(i, topic):
        def cb(err, msg):
            if err is not None:
                out(op="produce", i=i, topic=topic, ok=False, error=err.name())
            else:
                out(op="produce", i=i, topic=topic, ok=True, offset=msg.offset())

        return cb

    for i in range(a.count):
        for t in a.topic:
            p.produce(t, value=f"weir-{t}-{i}".encode(), on_delivery=report(i, t))
            p.poll(0)
    left = p.flush(a.timeout + 5)
    out(op="done", left=left)


def confluent_consume(a):
    from confluent_kafka import Consumer, KafkaException, TopicPartition, OFFSET_BEGINNING

    conf = {
        "bootstrap.servers": a.bootstrap,
        "client.id": a.client_id,
        "group.id": a.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    if a.until_eof:
        conf["enable.partition.eof"] = True
    conf.update(conf_dict(a.conf))
    c = Consumer(conf)
    if a.assign:
        c.assign([TopicPartition(t, 0, OFFSET_BEGINNING) for t in a.topic])
    else:
        c.subscribe(a.topic)
    n = 0
    deadline = time.monotonic() + a.timeout
    try:
        while time.monotonic() < deadline and n < a.max:
            try:
                m = c.poll(0.2)
            except KafkaException as e:
                out(op="error", error=e.args[0].name())
                break
            if m is None:
                continue
            if m.error():
                if a.until_eof and m.error().name() == "_PARTITION_EOF":
                    break
                out(op="error", error=m.error().name())
                if a.stop_on_error:
                    break
                continue
            n += 1
            out(op="record", topic=m.topic(), offset=m.offset(), value=m.value().decode())
    finally:
        c.close()
    out(op="done", count=n)


def confluent_offsets(a):
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": a.bootstrap, "group.id": "weir-offsets"})
    for t in a.topic:
        lo, hi = c.get_watermark_offsets(TopicPartition(t, 0), timeout=a.timeout)
        out(op="offsets", topic=t, low=lo, high=hi)
    c.close()


def confluent_metadata(a):
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    conf = {"bootstrap.servers": a.bootstrap, "client.id": a.client_id}
    conf.update(conf_dict(a.conf))
    # A connection that dropped under the request ("Local: Broker transport
    # failure", seen once in CI; weir's log showed only relays that ended cleanly,
    # none it closed) is retried with a new client, as an application would, and the
    # retry is reported (stderr and an `op: retry` line). Policy outcomes are
    # per-topic errors, never this.
    for attempt in range(3):
        admin = AdminClient(conf)
        try:
            md = admin.list_topics(topic=a.topic[0] if a.topic else None, timeout=a.timeout)
            break
        except KafkaException as e:
            if e.args[0].code() != KafkaError._TRANSPORT or attempt == 2:
                raise
            print(f"metadata attempt {attempt + 1}: {e}; retrying with a new client", file=sys.stderr)
            out(op="retry", error=str(e))
    for name, t in sorted(md.topics.items()):
        out(op="topic", topic=name, error=t.error.name() if t.error else None)
    out(op="done", count=len(md.topics))


# --- kafka-python --------------------------------------------------------------------


def kp_error(e):
    """kafka-python's error as librdkafka names it (TopicAuthorizationFailedError ->
    TOPIC_AUTHORIZATION_FAILED); other exceptions by their class name."""
    from kafka import errors

    if isinstance(e, errors.BrokerResponseError):
        return e.message
    return type(e).__name__


def kp_produce(a):
    from kafka import KafkaProducer

    conf = {"bootstrap_servers": a.bootstrap, "client_id": a.client_id, "linger_ms": 0}
    for k, v in conf_dict(a.conf).items():
        conf[k] = int(v) if v.lstrip("-").isdigit() else v
    p = KafkaProducer(**conf)
    futures = []
    for i in range(a.count):
        for t in a.topic:
            futures.append((i, t, p.send(t, value=f"weir-{t}-{i}".encode())))
    for i, t, f in futures:
        try:
            md = f.get(timeout=a.timeout)
            out(op="produce", i=i, topic=t, ok=True, offset=md.offset)
        except Exception as e:  # the test wants the error's name, whatever it is
            out(op="produce", i=i, topic=t, ok=False, error=kp_error(e))
    p.close(timeout=5)
    out(op="done", left=0)


def kp_consume(a):
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(
        bootstrap_servers=a.bootstrap,
        client_id=a.client_id,
        group_id=a.group if not a.assign else None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    if a.assign:
        tps = [TopicPartition(t, 0) for t in a.topic]
        c.assign(tps)
        c.seek_to_beginning(*tps)
    else:
        c.subscribe(a.topic)
    n = 0
    deadline = time.monotonic() + a.timeout
    try:
        while time.monotonic() < deadline and n < a.max:
            try:
                batch = c.poll(timeout_ms=200)
            except Exception as e:
                out(op="error", error=kp_error(e))
                break
            for _tp, recs in batch.items():
                for m in recs:
                    if n >= a.max:
                        break
                    n += 1
                    out(op="record", topic=m.topic, offset=m.offset, value=m.value.decode())
    finally:
        c.close()
    out(op="done", count=n)


# --- raw frames ----------------------------------------------------------------------


def kstr(s):
    if s is None:
        return struct.pack(">h", -1)
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def request(api_key, version, corr, client_id, body):
    """A frame with request header v1 (non-flexible versions)."""
    payload = struct.pack(">hhi", api_key, version, corr) + kstr(client_id) + body
    return struct.pack(">i", len(payload)) + payload


def metadata(version, corr, client_id, topics):
    """Metadata v0 or v1; `None` asks for every topic (v0: an empty list)."""
    if topics is None:
        body = struct.pack(">i", 0 if version == 0 else -1)
    else:
        body = struct.pack(">i", len(topics)) + b"".join(kstr(t) for t in topics)
    return request(3, version, corr, client_id, body)


def api_versions_v0(corr, client_id):
    return request(18, 0, corr, client_id, b"")


class Reader:
    def __init__(self, b):
        self.b, self.o = b, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.b, self.o)
        self.o += struct.calcsize(fmt)
        return v[0]

    def string(self):
        n = self.take(">h")
        if n < 0:
            return None
        s = self.b[self.o : self.o + n].decode()
        self.o += n
        return s


def parse_metadata(version, r):
    for _ in range(r.take(">i")):  # brokers: id, host, port (v1: rack)
        r.take(">i"), r.string(), r.take(">i")
        if version >= 1:
            r.string()
    if version >= 1:
        r.take(">i")  # controller
    topics = []
    for _ in range(r.take(">i")):
        err, name = r.take(">h"), r.string()
        if version >= 1:
            r.take(">b")  # is_internal
        for _ in range(r.take(">i")):
            r.take(">h"), r.take(">i"), r.take(">i")
            for _ in range(r.take(">i")):
                r.take(">i")
            for _ in range(r.take(">i")):
                r.take(">i")
        topics.append({"topic": name, "error": err})
    return topics


def read_frames(sock, want, timeout):
    """Up to `want` response frames; stops early when the peer closes."""
    sock.settimeout(timeout)
    buf, frames, closed = b"", [], False
    while len(frames) < want:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
        while len(buf) >= 4:
            (n,) = struct.unpack_from(">i", buf)
            if len(buf) < 4 + n:
                break
            frames.append(buf[4 : 4 + n])
            buf = buf[4 + n :]
    if not closed and len(frames) >= want:
        # Whether the proxy closes after these (a lie closes the connection).
        sock.settimeout(0.5)
        try:
            closed = sock.recv(1) == b""
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
    return frames, closed


def raw(a):
    """`pipeline`: ApiVersions, then a Metadata request for each `--topic`
    (`[vN:]a,b,...`, version 0 or 1, default 1; `*` for every topic), all written in
    one send; prints each response's correlation id and topic
    errors in arrival order.  `lie-*`: one good ApiVersions and its answer, then a
    frame whose length prefix does not tell the truth; prints what came back and
    whether the connection closed."""
    host, port = a.bootstrap.rsplit(":", 1)
    host = host.strip("[]")
    sock = socket.create_connection((host, int(port)), timeout=5)
    cid = a.client_id
    frames = [api_versions_v0(1, cid)]
    kinds = {1: ("apiversions", 0)}
    if a.mode == "pipeline":
        for i, spec in enumerate(a.topic):
            corr = i + 2
            version = 1
            if spec.startswith("v") and ":" in spec:
                v, spec = spec.split(":", 1)
                version = int(v[1:])
            topics = None if spec == "*" else spec.split(",")
            frames.append(metadata(version, corr, cid, topics))
            kinds[corr] = ("metadata", version)
    elif a.mode == "lie-negative":
        frames.append(struct.pack(">i", -5) + b"\0" * 16)
    elif a.mode == "lie-huge":
        # Claims 200 MiB: more than --kafka-max-frame.
        frames.append(struct.pack(">i", 200 * 1024 * 1024) + b"\0" * 64)
    elif a.mode == "lie-short":
        # The length ends inside the client id the header announces.
        payload = struct.pack(">hhih", 3, 1, 2, 40) + b"weir"
        frames.append(struct.pack(">i", len(payload)) + payload)
    elif a.mode == "lie-long":
        # The length covers four bytes more than the Metadata body.
        f = metadata(1, 2, cid, a.topic[0].split(",") if a.topic else [])
        payload = f[4:] + b"\0\0\0\0"
        frames.append(struct.pack(">i", len(payload)) + payload)
    if a.mode.startswith("lie"):
        # The honest request answered first, then the lie on the same connection.
        sock.sendall(frames[0])
        got, closed = read_frames(sock, 1, a.timeout)
        if not closed:
            sock.sendall(frames[1])
            more, closed = read_frames(sock, 1, a.timeout)
            got += more
    else:
        sock.sendall(b"".join(frames))
        got, closed = read_frames(sock, len(frames), a.timeout)
    for f in got:
        r = Reader(f)
        corr = r.take(">i")
        kind, version = kinds.get(corr, ("?", 0))
        rec = {"op": "response", "correlation_id": corr, "kind": kind}
        if kind == "apiversions":
            rec["error"] = r.take(">h")
        elif kind == "metadata":
            rec["topics"] = parse_metadata(version, r)
        out(**rec)
    out(op="done", responses=len(got), closed=closed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("op", choices=["produce", "consume", "offsets", "metadata", "raw"])
    ap.add_argument("--lib", choices=["confluent", "kafka-python"], default="confluent")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", action="append", default=[])
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--client-id", default="weir-test")
    ap.add_argument("--group", default="weir-group")
    ap.add_argument("--assign", action="store_true")
    ap.add_argument("--max", type=int, default=1000)
    ap.add_argument("--stop-on-error", action="store_true")
    # Read to the end of the partition and stop (what the broker stored: tansu's
    # high watermark undercounts a batch of several records).
    ap.add_argument("--until-eof", action="store_true")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--mode", default="pipeline")
    ap.add_argument("--conf", action="append", help="client config key=value")
    a = ap.parse_args()
    fns = {
        ("produce", "confluent"): confluent_produce,
        ("produce", "kafka-python"): kp_produce,
        ("consume", "confluent"): confluent_consume,
        ("consume", "kafka-python"): kp_consume,
        ("offsets", "confluent"): confluent_offsets,
        ("metadata", "confluent"): confluent_metadata,
        ("raw", "confluent"): raw,
        ("raw", "kafka-python"): raw,
    }
    fn = fns.get((a.op, a.lib))
    if fn is None:
        sys.exit(f"{a.op} has no {a.lib} variant")
    fn(a)


if __name__ == "__main__":
    main()
