//! The proxy's UDP session sockets are registered with the runtime for reading
//! only (`weir_proxy::udp_socket`), so a send that finds the socket's buffer
//! full cannot wait for writability: it retries in short sleeps for a while,
//! then reports `WouldBlock`. Datagrams queued behind a slow qdisc hold the
//! send buffer, which makes both cases real: a queue that drains (every send
//! gets through, late) and one that does not (the send gives up).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::runtime::Runtime;
use weir_proxy::udp_socket::UdpSessionSocket;
use weir_tests::{lab, require_root};

/// Runs `body` on a thread inside a new namespace whose veth's root qdisc
/// sends at `rate`, with a runtime and a session socket connected through
/// that interface (the smallest send buffer the kernel allows).
fn behind_a_slow_queue<T: Send + 'static>(
    tag: &str,
    rate: &str,
    body: impl FnOnce(&Runtime, UdpSessionSocket) -> T + Send + 'static,
) -> T {
    let ns = lab::Netns::create(&lab::unique_prefix(tag)).expect("create a namespace");
    for argv in [
        &[
            "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ][..],
        &["ip", "link", "set", "v0", "up"],
        &["ip", "link", "set", "v1", "up"],
        &["ip", "addr", "add", "10.9.9.1/24", "dev", "v0"],
        // No ARP wait: datagrams go straight to the qdisc.
        &[
            "ip",
            "neigh",
            "add",
            "10.9.9.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "v0",
        ],
        &[
            "tc", "qdisc", "add", "dev", "v0", "root", "tbf", "rate", rate, "burst", "1600",
            "limit", "1000000",
        ],
    ] {
        ns.run(argv).expect("set up the slow interface");
    }
    let path = ns.path();
    let out = std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).expect("open the namespace");
        setns(&netns, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
        let s = UdpSocket::bind("10.9.9.1:0").expect("bind");
        s.connect(SocketAddr::from(([10, 9, 9, 2], 9)))
            .expect("connect");
        setsockopt(&s, sockopt::SndBuf, &0).expect("smallest send buffer");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let sock = {
            let _in_runtime = rt.enter();
            UdpSessionSocket::new(s).expect("register")
        };
        body(&rt, sock)
    })
    .join();
    drop(ns);
    out.expect("the test thread")
}

const DATAGRAM: [u8; 1000] = [7; 1000];

/// 10 KB/s: a full buffer frees within the send's patience. Every datagram
/// gets through, the later ones after waiting (the queue takes about a second
/// for all of them): a send that failed at the first full buffer would lose
/// some.
#[test]
fn a_send_into_a_full_buffer_waits_until_the_queue_drains() {
    if !require_root("a_send_into_a_full_buffer_waits_until_the_queue_drains") {
        return;
    }
    let (sent, took) = behind_a_slow_queue("w-udpq", "80kbit", |rt, sock| {
        rt.block_on(async {
            let start = Instant::now();
            let mut sent = 0;
            for _ in 0..16 {
                match sock.send(&DATAGRAM).await {
                    Ok(n) => {
                        assert_eq!(n, DATAGRAM.len());
                        sent += 1;
                    }
                    Err(e) => panic!("send {sent} failed: {e}"),
                }
            }
            (sent, start.elapsed())
        })
    });
    assert_eq!(sent, 16);
    assert!(
        took >= Duration::from_millis(500),
        "16 KB through a 10 KB/s queue took {took:?}: the buffer never filled, so nothing was tested"
    );
}

/// 125 B/s: a full buffer does not free for seconds. The send waits a while,
/// then reports `WouldBlock` (the datagram is lost, as UDP may).
#[test]
fn a_send_into_a_buffer_that_stays_full_gives_up() {
    if !require_root("a_send_into_a_buffer_that_stays_full_gives_up") {
        return;
    }
    let outcome = behind_a_slow_queue("w-udpstall", "1kbit", |rt, sock| {
        rt.block_on(async {
            let mut sent = 0;
            loop {
                let start = Instant::now();
                match sock.send(&DATAGRAM).await {
                    Ok(_) if sent < 64 => sent += 1,
                    Ok(_) => return Err(format!("{sent} datagrams fit a minimal buffer")),
                    Err(e) => return Ok((sent, e.kind(), start.elapsed())),
                }
            }
        })
    });
    let (sent, kind, waited) = outcome.expect("the buffer fills");
    assert!(sent >= 1, "the first datagram fits");
    assert_eq!(kind, io::ErrorKind::WouldBlock);
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "gave up after {waited:?}"
    );
}
