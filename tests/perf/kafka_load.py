#!/usr/bin/env python3
"""Kafka load for tests/perf/kafka.sh (confluent-kafka, i.e. librdkafka).

    kafka_load.py latency BOOTSTRAP TOPIC SECONDS
        one 1 KB record at a time (acks=1, linger.ms=0), each waited for: prints
        "sent N p50_us p99_us" (produce() to delivery report, per record)
    kafka_load.py throughput BOOTSTRAP TOPIC SECONDS
        1 KB records as fast as librdkafka batches them (acks=1): prints
        "sent N bytes B seconds S"
Any delivery error is printed on stderr and makes the exit status 1.
"""

import sys
import time

from confluent_kafka import Producer

RECORD = b"x" * 1024


def producer(bootstrap, linger_ms):
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "bench",
            "acks": 1,
            "linger.ms": linger_ms,
            "enable.idempotence": False,
            "message.timeout.ms": 10000,
        }
    )


def latency(bootstrap, topic, seconds):
    p = producer(bootstrap, 0)
    errors = []
    # Warm-up: metadata, connection.
    p.produce(topic, RECORD)
    p.flush(10)
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done = []
        t0 = time.perf_counter()
        p.produce(topic, RECORD, on_delivery=lambda err, msg: done.append(err))
        while not done:
            p.poll(1)
        samples.append(time.perf_counter() - t0)
        if done[0] is not None:
            errors.append(done[0])
    samples.sort()
    n = len(samples)
    print(f"sent {n} p50_us {samples[n // 2] * 1e6:.0f} p99_us {samples[int(n * 0.99)] * 1e6:.0f}")
    return errors


def throughput(bootstrap, topic, seconds):
    p = producer(bootstrap, 5)
    errors = []
    sent = 0

    def report(err, msg):
        nonlocal sent
        if err is not None:
            errors.append(err)
        else:
            sent += 1

    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        try:
            p.produce(topic, RECORD, on_delivery=report)
        except BufferError:
            p.poll(0.01)
            continue
        p.poll(0)
    p.flush(30)
    elapsed = time.monotonic() - t0
    print(f"sent {sent} bytes {sent * len(RECORD)} seconds {elapsed:.2f}")
    return errors


def main():
    mode, bootstrap, topic, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    errors = (latency if mode == "latency" else throughput)(bootstrap, topic, seconds)
    for e in errors[:5]:
        print(f"delivery error: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
