#!/usr/bin/env python3
"""Sends hand-made IPv4/IPv6 packets through a raw socket (the kernel adds no
header of its own), for tests that need what ordinary clients never send:
spoofed source addresses, fragments, ICMP errors.

  rawpkt.py syn SRC DST DPORT [--sport N] [--payload TEXT] [--tfo]
  rawpkt.py udp-frags SRC DST DPORT --payload TEXT [--frag-size N] [--id N] [--skip-first]
  rawpkt.py icmp-unreach SRC DST --quote 'QSRC|QSPORT|QDST|QDPORT' (a UDP packet DST sent)
"""
import argparse
import ipaddress
import socket
import struct


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src, dst, proto, length):
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def l4_with_checksum(src, dst, proto, header: bytearray, payload: bytes, at: int) -> bytes:
    seg = bytes(header) + payload
    c = checksum(pseudo(src, dst, proto, len(seg)) + seg)
    header[at : at + 2] = struct.pack("!H", c)
    return bytes(header) + payload


def tcp_syn(src, dst, sport, dport, payload: bytes, tfo=False) -> bytes:
    # With `tfo`: a TCP Fast Open option with no cookie (a server that needs none
    # takes the payload at once).
    options = struct.pack("!BBBB", 34, 2, 1, 1) if tfo else b""
    doff = (20 + len(options)) // 4
    hdr = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, doff << 4, 0x02, 64240, 0, 0) + options)
    return l4_with_checksum(src, dst, 6, hdr, payload, 16)


def udp(src, dst, sport, dport, payload: bytes) -> bytes:
    hdr = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0))
    return l4_with_checksum(src, dst, 17, hdr, payload, 6)


def ipv4(src, dst, proto, body: bytes, ident=0x4242, frag_off=0, more=False) -> bytes:
    flags = (0x2000 if more else 0) | (frag_off // 8)
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, flags, 64, proto, 0, src.packed, dst.packed)
    )
    hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
    return bytes(hdr) + body


def ipv6(src, dst, nexthdr, body: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nexthdr, 64, src.packed, dst.packed) + body


def ip_packet(src, dst, proto, body: bytes) -> bytes:
    if src.version == 4:
        return ipv4(src, dst, proto, body)
    return ipv6(src, dst, proto, body)


def fragments(src, dst, proto, datagram: bytes, size: int, ident: int):
    """The datagram (L4 header + payload) cut into fragments of `size` bytes."""
    size -= size % 8
    out = []
    for off in range(0, len(datagram), size):
        chunk = datagram[off : off + size]
        more = off + size < len(datagram)
        if src.version == 4:
            out.append(ipv4(src, dst, proto, chunk, ident=ident, frag_off=off, more=more))
        else:
            fh = struct.pack("!BxHI", proto, off | (1 if more else 0), ident)
            out.append(ipv6(src, dst, 44, fh + chunk))
    return out


def send(dst, packet: bytes):
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(packet, (str(dst), 0))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["syn", "udp-frags", "icmp-unreach"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("dport", nargs="?", type=int, default=0)
    p.add_argument("--sport", type=int, default=40000)
    p.add_argument("--payload", default="")
    p.add_argument("--frag-size", type=int, default=24)
    p.add_argument("--id", type=int, default=0x4242)
    p.add_argument("--skip-first", action="store_true")
    p.add_argument("--quote")
    p.add_argument("--tfo", action="store_true")
    a = p.parse_args()
    src, dst = ipaddress.ip_address(a.src), ipaddress.ip_address(a.dst)
    payload = a.payload.encode()
    if a.kind == "syn":
        send(dst, ip_packet(src, dst, 6, tcp_syn(src, dst, a.sport, a.dport, payload, a.tfo)))
    elif a.kind == "udp-frags":
        frags = fragments(src, dst, 17, udp(src, dst, a.sport, a.dport, payload), a.frag_size, a.id)
        for f in frags[1:] if a.skip_first else frags:
            send(dst, f)
    else:
        qs, qsp, qd, qdp = a.quote.split("|")
        qs, qd = ipaddress.ip_address(qs), ipaddress.ip_address(qd)
        quoted = ip_packet(qs, qd, 17, udp(qs, qd, int(qsp), int(qdp), b"x"))[: (28 if src.version == 4 else 48)]
        if src.version == 4:
            icmp = bytearray(struct.pack("!BBHI", 3, 3, 0, 0)) + quoted
            icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
            send(dst, ipv4(src, dst, 1, bytes(icmp)))
        else:
            icmp = bytearray(struct.pack("!BBHI", 1, 4, 0, 0)) + quoted
            icmp[2:4] = struct.pack("!H", checksum(pseudo(src, dst, 58, len(icmp)) + bytes(icmp)))
            send(dst, ipv6(src, dst, 58, bytes(icmp)))


if __name__ == "__main__":
    main()
