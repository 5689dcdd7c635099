//! weir's own DNS answers, checked by a real client: a tiny UDP responder (std
//! only, one thread) answers `dig` with `refused`/`servfail`/`formerr`, and dig
//! must print the status without complaining about the answer (ID, question or
//! OPT mismatches show up as warnings or a "mismatch" line). Skipped with a
//! message when dig is not installed; a failure with `CI=true`.

use std::net::UdpSocket;
use std::process::Command;
use std::thread;

use weir_parsers::dns::{DenyRcode, formerr, inspect_query, refused, servfail};

#[derive(Clone, Copy)]
enum Mode {
    Refused,
    NxDomain,
    ServFail,
}

fn dig_available() -> bool {
    match Command::new("dig").arg("-v").output() {
        Ok(_) => true,
        Err(_) => {
            eprintln!("SKIPPED: dig not installed (apt install bind9-dnsutils)");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "dig is required when CI=true"
            );
            false
        }
    }
}

/// Answer one query with `mode`, then exit.
fn responder(mode: Mode) -> (u16, thread::JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = sock.local_addr().expect("addr").port();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let (n, peer) = sock.recv_from(&mut buf).expect("recv");
        let q = &buf[..n];
        let resp = match inspect_query(q) {
            Ok(_) => match mode {
                Mode::Refused => refused(q, DenyRcode::Refused),
                Mode::NxDomain => refused(q, DenyRcode::NxDomain),
                Mode::ServFail => servfail(q),
            },
            Err(rej) => rej.response(q).or_else(|| formerr(q)),
        }
        .expect("a response");
        sock.send_to(&resp, peer).expect("send");
    });
    (port, handle)
}

fn dig(mode: Mode, args: &[&str]) -> String {
    let (port, handle) = responder(mode);
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .expect("run dig");
    handle.join().expect("responder");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("WARNING") && !text.contains("mismatch") && !text.contains("malformed"),
        "dig complained:\n{text}"
    );
    text
}

#[test]
fn dig_accepts_weirs_answers() {
    if !dig_available() {
        return;
    }
    let t = dig(Mode::Refused, &["WwW.ExAmPlE.CoM", "A"]);
    assert!(t.contains("status: REFUSED"), "{t}");
    assert!(t.contains("WwW.ExAmPlE.CoM."), "question case kept:\n{t}");
    assert!(t.contains("EDNS: version: 0"), "OPT echoed:\n{t}");

    let t = dig(
        Mode::NxDomain,
        &["+dnssec", "+cookie", "example.org", "AAAA"],
    );
    assert!(t.contains("status: NXDOMAIN"), "{t}");
    assert!(t.contains("flags: do;"), "DO echoed:\n{t}");

    let t = dig(
        Mode::ServFail,
        &["+noedns", "+norecurse", "example.net", "MX"],
    );
    assert!(t.contains("status: SERVFAIL"), "{t}");
    assert!(
        !t.contains("OPT PSEUDOSECTION"),
        "no OPT without one in the query:\n{t}"
    );
}
