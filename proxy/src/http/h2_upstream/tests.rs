//! The pool against real sockets on loopback: what marks a server HTTP/1-only,
//! the checkout deadline, and keys leaving the map.

use std::net::Ipv4Addr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn pool(connect_timeout: Duration) -> Arc<H2Pool> {
    Arc::new(H2Pool {
        slots: Mutex::new(HashMap::new()),
        http1_only: Mutex::new(Http1Marks::new(HTTP1_ONLY_FOR)),
        next_id: AtomicU64::new(0),
        stream_window: 65_535,
        conn_window: 65_535,
        max_header_list: 16_384,
        max_conns: 2,
        connect_timeout,
        idle_timeout: Duration::from_secs(60),
        reset_limit: 2,
    })
}

fn target(client: u8, dst: SocketAddr) -> Target {
    Target {
        key: PoolKey {
            source: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, client))),
            dst,
        },
        source: UpstreamSource::Node,
        dst,
    }
}

/// A server that reads the preface and answers `answer` (then closes).
async fn server_answering(answer: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        }
    });
    addr
}

fn slots(p: &H2Pool) -> usize {
    p.slots.lock().unwrap().len()
}

#[tokio::test]
async fn only_an_http1_answer_marks_and_only_that_clients_key() {
    let p = pool(Duration::from_secs(2));
    let http1 = server_answering(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n").await;
    let r = p.checkout(target(1, http1)).await;
    assert!(matches!(r, Err(Checkout::NotHttp2)), "{:?}", r.err());
    assert!(p.marked(target(1, http1).key));
    // Another client of the same server is not downgraded.
    assert!(!p.marked(target(2, http1).key));

    // A server that says something else, or closes, marks nothing: the
    // request fails as unavailable.
    for answer in [&b"garbage and more"[..], b""] {
        let other = server_answering(answer).await;
        let r = p.checkout(target(1, other)).await;
        assert!(
            matches!(r, Err(Checkout::Failed(UpstreamError::Unavailable(..)))),
            "{:?}",
            r.err()
        );
        assert!(!p.marked(target(1, other).key));
    }
    assert_eq!(slots(&p), 0, "failed checkouts leave no key behind");
}

#[tokio::test]
async fn a_checkout_waits_for_its_key_no_longer_than_its_limit() {
    let p = pool(Duration::from_secs(30));
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let t = target(1, dst);
    // Another checkout is stuck connecting (holds the key's lock).
    let slot = p.slot(t.key);
    let stuck = slot.conns.lock().await;
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        p.checkout_within(t, Duration::from_millis(200)),
    )
    .await
    .expect("the checkout has a deadline");
    assert!(
        matches!(r, Err(Checkout::Failed(UpstreamError::Unavailable(..)))),
        "{:?}",
        r.err()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(stuck);
    p.release_slot(t.key, &slot);
    drop(slot);
    assert_eq!(slots(&p), 0);
}

#[tokio::test]
async fn keys_leave_the_map_with_their_last_connection() {
    let p = pool(Duration::from_secs(2));
    // Refused: the key does not stay.
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let r = p.checkout(target(1, refused)).await;
    assert!(r.is_err());
    assert_eq!(slots(&p), 0);

    // A real HTTP/2 server: the key stays while its connection is open, and
    // goes when the server closes it.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut conn = h2::server::handshake(s).await.unwrap();
        tokio::select! {
            _ = async { while conn.accept().await.is_some() {} } => {}
            _ = stopped => {}
        }
    });
    let lease = p.checkout(target(1, addr)).await.expect("HTTP/2 server");
    assert_eq!(slots(&p), 1);
    drop(lease);
    let _ = stop.send(());
    let deadline = Instant::now() + Duration::from_secs(5);
    while slots(&p) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slots(&p), 0, "the key went with its connection");
}

/// An HTTP/2 server that takes every connection and stream and never answers.
async fn silent_h2_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok(stream)) = conn.accept().await {
                    held.push(stream);
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_clients_cancels_on_the_server_are_budgeted_per_pool_key() {
    let p = pool(Duration::from_secs(2));
    let addr = silent_h2_server().await;
    // Streams the server or weir ended do not count.
    for _ in 0..5 {
        let mut lease = p.checkout(target(1, addr)).await.expect("HTTP/2 server");
        lease.settle();
    }
    // Three cancels by client 1 (its downstream connections alike: they share
    // the key) pass the budget of 2: its next stream is refused before it
    // reaches the server, for the rest of the second.
    for _ in 0..3 {
        drop(p.checkout(target(1, addr)).await.expect("under the budget"));
    }
    let r = p.checkout(target(1, addr)).await;
    assert!(
        matches!(r, Err(Checkout::Failed(UpstreamError::TooManyResets(_, 2)))),
        "{:?}",
        r.err()
    );
    // Another client of the same server is not affected.
    let mut other = p.checkout(target(2, addr)).await.expect("client 2");
    other.settle();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut again = p.checkout(target(1, addr)).await.expect("a second later");
    again.settle();
}

#[test]
fn only_the_servers_goaway_tells_the_client_to_retry() {
    use h2::Reason;
    // The server's GOAWAY above its last-stream-id: REFUSED_STREAM.
    assert_eq!(
        stream_error_reset(true, true, false, Some(Reason::NO_ERROR)),
        Some(Reason::REFUSED_STREAM)
    );
    // weir's own side sent GOAWAY (the server broke the protocol): the server
    // may have processed the request, so no retry hint.
    assert_eq!(
        stream_error_reset(true, false, false, Some(Reason::PROTOCOL_ERROR)),
        None
    );
    // The server's RST_STREAM passes with its reason; a local I/O error fails.
    assert_eq!(
        stream_error_reset(false, true, true, Some(Reason::CANCEL)),
        Some(Reason::CANCEL)
    );
    assert_eq!(stream_error_reset(false, false, false, None), None);
}

#[test]
fn an_empty_post_going_out_as_http1_says_content_length_0() {
    let req = |m: http::Method, cl: Option<&str>| {
        let mut b = Request::builder().method(m).uri("http://svc/x");
        if let Some(cl) = cl {
            b = b.header(header::CONTENT_LENGTH, cl);
        }
        b.body(()).unwrap().into_parts().0
    };
    let mut p = req(http::Method::POST, None);
    empty_body_length(&mut p, true);
    assert_eq!(p.headers[header::CONTENT_LENGTH], "0");
    // A body still to come, a length given, or a GET: unchanged.
    let mut p = req(http::Method::POST, None);
    empty_body_length(&mut p, false);
    assert!(!p.headers.contains_key(header::CONTENT_LENGTH));
    let mut p = req(http::Method::PUT, Some("0"));
    empty_body_length(&mut p, true);
    assert_eq!(p.headers.get_all(header::CONTENT_LENGTH).iter().count(), 1);
    let mut p = req(http::Method::GET, None);
    empty_body_length(&mut p, true);
    assert!(!p.headers.contains_key(header::CONTENT_LENGTH));
}

#[tokio::test]
async fn a_checkout_given_up_during_the_probe_leaves_no_connection_open() {
    // A server that accepts and never says a word: the checkout's deadline
    // passes while weir waits for its first bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (closed_tx, closed_rx) = oneshot::channel::<std::time::Duration>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let accepted = Instant::now();
        let mut buf = [0u8; 1024];
        // The preface arrives; then the socket must close, not linger.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(accepted.elapsed());
    });
    let p = pool(Duration::from_secs(30));
    let r = p
        .checkout_within(target(1, addr), Duration::from_millis(300))
        .await;
    assert!(
        matches!(r, Err(Checkout::Failed(UpstreamError::Unavailable(..)))),
        "{:?}",
        r.err()
    );
    let lived = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the upstream connection closed with its checkout")
        .unwrap();
    assert!(lived < Duration::from_secs(2), "{lived:?}");
    assert_eq!(slots(&p), 0);
}
