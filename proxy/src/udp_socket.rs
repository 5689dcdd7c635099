//! A connected UDP session socket that the runtime watches for reading only.
//!
//! tokio's `UdpSocket` registers every socket for reading *and* writing,
//! edge-triggered. A UDP socket's send buffer empties as soon as the datagram
//! leaves (on a veth, within the send call itself), and each time it does the
//! kernel reports the socket writable again: one epoll event per datagram sent,
//! which nobody waits for but which ends the runtime's next `epoll_wait` at
//! once. `tests/perf/dns.sh` counted 2.3 `epoll_wait` calls per DNS query, one
//! more than the wake-ups. A session socket's sends are never expected to
//! block, so it is registered for reading only; the rare send that finds the
//! buffer full waits in short sleeps ([`SEND_RETRY`]) instead of on
//! writability, and gives up after [`SEND_PATIENCE`] (a datagram, like any
//! other UDP loss). `tests/tests/udp_session_socket.rs` fills a send buffer
//! behind a slow qdisc for both cases.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long a send waits between attempts while the socket's buffer is full.
const SEND_RETRY: Duration = Duration::from_millis(1);
/// How long a send keeps trying before it reports `WouldBlock`.
const SEND_PATIENCE: Duration = Duration::from_millis(200);

/// A non-blocking, connected UDP socket registered with the runtime for
/// readability only (see the module's comment).
#[derive(Debug)]
pub struct UdpSessionSocket {
    inner: AsyncFd<std::net::UdpSocket>,
}

impl UdpSessionSocket {
    /// Registers `socket` (it must be non-blocking) with the current runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // SAFETY: the `std::net::UdpSocket` owns its descriptor, which stays
        // open and the same until the `AsyncFd` (holding the socket) drops;
        // nothing here hands out `&mut` to the socket or replaces it.
        let inner = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(UdpSessionSocket { inner })
    }

    pub fn get_ref(&self) -> &std::net::UdpSocket {
        self.inner.get_ref()
    }

    /// Waits until the socket is readable, then runs `read` (which must not
    /// block). `read` also says whether it emptied the socket: if so the
    /// readiness is cleared, as a read that would block clears it, and the next
    /// call waits for a new datagram instead of learning with one more system
    /// call that there is none (a datagram that arrives meanwhile is a new
    /// event, which clearing does not lose). A `WouldBlock` from `read` clears
    /// the readiness and waits again. Cancel-safe: nothing is read before
    /// `read` runs, and it does not await.
    pub async fn read_with<T>(
        &self,
        mut read: impl FnMut(&std::net::UdpSocket) -> io::Result<(T, bool)>,
    ) -> io::Result<T> {
        loop {
            let mut ready = self.inner.readable().await?;
            match read(self.get_ref()) {
                Ok((value, drained)) => {
                    if drained {
                        ready.clear_ready();
                    }
                    return Ok(value);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives the next datagram from the connected peer.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(|s| s.recv(buf).map(|n| (n, false))).await
    }

    /// Sends a datagram to the connected peer.
    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let mut waited = Duration::ZERO;
        loop {
            match self.get_ref().send(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && waited < SEND_PATIENCE => {
                    tokio::time::sleep(SEND_RETRY).await;
                    waited += SEND_RETRY;
                }
                r => return r,
            }
        }
    }
}

impl AsFd for UdpSessionSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.get_ref().as_fd()
    }
}

impl AsRawFd for UdpSessionSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.get_ref().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UdpSessionSocket, UdpSessionSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        (
            UdpSessionSocket::new(a).unwrap(),
            UdpSessionSocket::new(b).unwrap(),
        )
    }

    #[tokio::test]
    async fn datagrams_go_both_ways_and_a_read_waits_for_one() {
        let (a, b) = pair();
        a.send(b"query").await.unwrap();
        let mut buf = [0u8; 16];
        let n = b.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"query");
        // Nothing more is there: the read waits until the answer comes.
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.recv(&mut buf)).await;
        assert!(waiting.is_err(), "a read returned with no datagram sent");
        b.send(b"answer").await.unwrap();
        let n = a.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"answer");
    }
}
