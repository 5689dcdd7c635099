//! Planned restart: a new weir takes over a running one's listening sockets.
//!
//! The running weir listens on `<api-socket>.takeover` (a `SOCK_SEQPACKET` unix
//! socket, mode 0600; a peer must be root or weir's own user). A new weir that
//! has prepared everything (policy compiled, datapath loaded) connects and says
//! [`Msg::Hello`]. The old one stops changing anything (API closed, control
//! thread quiet), and answers with its listeners' file descriptors
//! (`SCM_RIGHTS`, [`Msg::Sockets`]). They are the same kernel sockets: whatever
//! waits in their queues is there for whichever process reads first, so nothing
//! is lost while both hold them. The new weir starts serving and says
//! [`Msg::Serving`]; only then does the old stop reading, release the socket
//! paths ([`Msg::Released`]), let its open connections and UDP sessions finish
//! (`--drain-timeout`), stop its control thread and say [`Msg::Drained`] before
//! it exits, leaving all steering in place for the new weir.
//!
//! If the new weir goes away before [`Msg::Serving`], the old one resumes as if
//! nothing had happened. Everything here blocks: it runs on threads of its own
//! (or `spawn_blocking`), never on the proxy's runtime threads.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

/// Bumped when a message changes incompatibly; a weir refuses another version.
pub const VERSION: u32 = 1;

/// The largest message (a description of a few sockets).
const MAX_MSG: usize = 16 * 1024;
/// At most this many descriptors in one message.
const MAX_FDS: usize = 16;

/// `<api-socket>.takeover`.
pub fn socket_path(api_socket: &Path) -> PathBuf {
    let mut p = api_socket.as_os_str().to_owned();
    p.push(".takeover");
    PathBuf::from(p)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// What one handed-over descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketDesc {
    pub proto: Proto,
    /// 4 or 6.
    pub family: u8,
    pub port: u16,
}

/// The messages, in the order they are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// new → old, before the new weir touches anything: who are you?
    Query,
    /// old → new: the answer to [`Msg::Query`] (nothing else happens).
    Info {
        version: u32,
        proxy_port: u16,
        pid: u32,
    },
    /// new → old: I am ready; give me your listeners.
    Hello {
        version: u32,
        proxy_port: u16,
        pid: u32,
    },
    /// old → new: no (the old one keeps serving).
    Refused { reason: String },
    /// old → new: the listeners, one descriptor each, in this order.
    Sockets {
        version: u32,
        pid: u32,
        sockets: Vec<SocketDesc>,
    },
    /// new → old: I serve them now.
    Serving,
    /// old → new: I stopped reading them and released the API and takeover
    /// socket paths; bind yours.
    Released,
    /// old → new: my connections and sessions are done (or the drain timed out
    /// with these left); I have stopped my control thread and exit now.
    Drained {
        connections_left: usize,
        udp_sessions_left: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no weir to take over answers at {0}")]
    NoPeer(PathBuf),
    #[error("the running weir refused the takeover: {0}")]
    Refused(String),
    #[error("takeover protocol: {0}")]
    Protocol(String),
    #[error("takeover socket {path}: {source}")]
    Socket { path: PathBuf, source: nix::Error },
    #[error("takeover connection: {0}")]
    Io(#[from] nix::Error),
}

/// A connected takeover socket (either side).
pub struct Conn(OwnedFd);

impl Conn {
    /// Sends `msg`, with `fds` attached.
    pub fn send(&self, msg: &Msg, fds: &[RawFd]) -> Result<(), TakeoverError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| TakeoverError::Protocol(e.to_string()))?;
        let iov = [IoSlice::new(&bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        socket::sendmsg::<()>(
            self.0.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Receives one message and the descriptors that came with it, waiting at
    /// most `timeout` (`None`: as long as it takes). The end of the connection
    /// is a protocol error.
    pub fn recv(&self, timeout: Option<Duration>) -> Result<(Msg, Vec<OwnedFd>), TakeoverError> {
        let tv = nix::sys::time::TimeVal::new(timeout.map_or(0, |t| t.as_secs().max(1) as _), 0);
        socket::setsockopt(&self.0, sockopt::ReceiveTimeout, &tv)?;
        let mut buf = vec![0u8; MAX_MSG];
        let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let r = socket::recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for c in r.cmsgs()? {
                if let ControlMessageOwned::ScmRights(got) = c {
                    for fd in got {
                        // SAFETY: the kernel has just installed `fd` in this
                        // process for this message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            let truncated = r
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (r.bytes, fds, truncated)
        };
        if len == 0 {
            return Err(TakeoverError::Protocol(
                "the other weir closed the connection".into(),
            ));
        }
        if truncated {
            return Err(TakeoverError::Protocol("message too large".into()));
        }
        let msg = serde_json::from_slice(&buf[..len])
            .map_err(|e| TakeoverError::Protocol(format!("unreadable message: {e}")))?;
        Ok((msg, fds))
    }
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Connects to a running weir's takeover socket; `Ok(None)` when none answers.
pub fn connect(path: &Path) -> Result<Option<Conn>, TakeoverError> {
    let sock_err = |source| TakeoverError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let fd = seqpacket().map_err(sock_err)?;
    let addr = UnixAddr::new(path).map_err(sock_err)?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(Some(Conn(fd))),
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => Ok(None),
        Err(e) => Err(sock_err(e)),
    }
}

/// The takeover socket a running weir listens on.
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (mode 0600), replacing a stale socket nobody answers on.
    pub fn bind(path: &Path) -> Result<Listener, TakeoverError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let sock_err = |source| TakeoverError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(TakeoverError::Protocol(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )));
            }
            if connect(path)?.is_some() {
                return Err(TakeoverError::Protocol(format!(
                    "another weir already listens at {}",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| sock_err(errno_of(&e)))?;
        }
        let fd = seqpacket().map_err(sock_err)?;
        let addr = UnixAddr::new(path).map_err(sock_err)?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(sock_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| sock_err(errno_of(&e)))?;
        socket::listen(&fd, Backlog::new(4).map_err(sock_err)?).map_err(sock_err)?;
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The next connection from a permitted peer (root or this process's user);
    /// others are closed at once.
    pub fn accept(&self) -> Result<Conn, TakeoverError> {
        loop {
            let raw = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let cred = socket::getsockopt(&conn, sockopt::PeerCredentials)?;
            let me = nix::unistd::geteuid().as_raw();
            if cred.uid() == 0 || cred.uid() == me {
                return Ok(Conn(conn));
            }
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "takeover request from another user; refused"
            );
        }
    }

    /// Removes the path (the listener stays open until dropped).
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn errno_of(e: &std::io::Error) -> nix::Error {
    e.raw_os_error()
        .map_or(nix::Error::EIO, nix::Error::from_raw)
}

/// The new weir's side: what it received.
pub struct Taken {
    pub conn: Conn,
    pub old_pid: u32,
    pub tcp: Vec<std::net::TcpListener>,
    pub udp: Vec<std::net::UdpSocket>,
}

/// Asks the weir at `conn` for its listeners and checks they are what this weir
/// would have bound on `proxy_port`.
pub fn request(conn: Conn, proxy_port: u16) -> Result<Taken, TakeoverError> {
    conn.send(
        &Msg::Hello {
            version: VERSION,
            proxy_port,
            pid: std::process::id(),
        },
        &[],
    )?;
    // The old weir first lets its control thread finish what it is doing.
    let (msg, fds) = conn.recv(Some(Duration::from_secs(60)))?;
    let (old_pid, sockets) = match msg {
        Msg::Sockets {
            version: VERSION,
            pid,
            sockets,
        } => (pid, sockets),
        Msg::Refused { reason } => return Err(TakeoverError::Refused(reason)),
        other => {
            return Err(TakeoverError::Protocol(format!(
                "expected the sockets, got {other:?}"
            )));
        }
    };
    if sockets.len() != fds.len() {
        return Err(TakeoverError::Protocol(format!(
            "{} sockets described, {} received",
            sockets.len(),
            fds.len()
        )));
    }
    let mut taken = Taken {
        conn,
        old_pid,
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    for (desc, fd) in sockets.into_iter().zip(fds) {
        check_socket(&desc, &fd, proxy_port)?;
        match desc.proto {
            Proto::Tcp => taken.tcp.push(std::net::TcpListener::from(fd)),
            Proto::Udp => taken.udp.push(std::net::UdpSocket::from(fd)),
        }
    }
    if !taken
        .tcp
        .iter()
        .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv4()))
        || !taken
            .udp
            .iter()
            .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv4()))
    {
        return Err(TakeoverError::Protocol(
            "the running weir handed over no IPv4 TCP and UDP listeners".into(),
        ));
    }
    Ok(taken)
}

/// The descriptor is what its description says, on `proxy_port` (a description
/// is not trusted blindly: the wrong socket would be served silently).
fn check_socket(desc: &SocketDesc, fd: &OwnedFd, proxy_port: u16) -> Result<(), TakeoverError> {
    let ty = socket::getsockopt(fd, sockopt::SockType)?;
    let listening = socket::getsockopt(fd, sockopt::AcceptConn)?;
    let addr: socket::SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    let (family, port) = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
        (Some(a), _) => (4, a.port()),
        (_, Some(a)) => (6, a.port()),
        _ => (0, 0),
    };
    let ok_type = match desc.proto {
        Proto::Tcp => ty == SockType::Stream && listening,
        Proto::Udp => ty == SockType::Datagram,
    };
    if !ok_type || family != desc.family || port != desc.port {
        return Err(TakeoverError::Protocol(format!(
            "a handed-over descriptor is not the {:?}/IPv{} listener on port {} it claims to be",
            desc.proto, desc.family, desc.port
        )));
    }
    if port != proxy_port {
        return Err(TakeoverError::Refused(format!(
            "the running weir listens on proxy port {port}, this one on {proxy_port}"
        )));
    }
    Ok(())
}

/// Asks the weir at `conn` who it is, and checks this weir can take it over:
/// `Ok(pid)`, or `Err(TakeoverError::Refused)` with the reason.
pub fn query(conn: &Conn, proxy_port: u16) -> Result<u32, TakeoverError> {
    conn.send(&Msg::Query, &[])?;
    match conn.recv(Some(Duration::from_secs(10)))?.0 {
        Msg::Info {
            version,
            proxy_port: theirs,
            pid,
        } => {
            let hello = Msg::Hello {
                version,
                proxy_port: theirs,
                pid,
            };
            check_hello(&hello, proxy_port).map_err(TakeoverError::Refused)
        }
        other => Err(TakeoverError::Protocol(format!(
            "expected info, got {other:?}"
        ))),
    }
}

/// The old weir's answer to a [`Msg::Hello`]: `Err(reason)` refuses.
pub fn check_hello(msg: &Msg, my_port: u16) -> Result<u32, String> {
    match msg {
        Msg::Hello {
            version,
            proxy_port,
            pid,
        } => {
            if *version != VERSION {
                Err(format!(
                    "takeover protocol version {version} asked, this weir speaks {VERSION}"
                ))
            } else if *proxy_port != my_port {
                Err(format!(
                    "the running weir serves proxy port {my_port}, the new one {proxy_port}: \
                     a takeover keeps the port (stop the running weir to change it)"
                ))
            } else {
                Ok(*pid)
            }
        }
        other => Err(format!("expected hello, got {other:?}")),
    }
}

/// Describes a listener for [`Msg::Sockets`].
pub fn describe(proto: Proto, addr: std::net::SocketAddr) -> SocketDesc {
    SocketDesc {
        proto,
        family: if addr.is_ipv4() { 4 } else { 6 },
        port: addr.port(),
    }
}

/// What the old weir's takeover thread asks of its run loop.
pub enum OldEvent {
    /// A new weir wants the listeners: stop the API and the control thread's
    /// changes, then answer.
    /// `Err` carries why this weir cannot hand over (the new one is refused).
    Quiesce(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// The takeover did not complete: serve the API and apply changes again.
    Resume,
    /// The new weir serves: stop reading the listeners, answer on `stopped`,
    /// drain, stop the control thread, and send the counts left on `drained`.
    HandedOver {
        stopped: tokio::sync::oneshot::Sender<()>,
        drained: std::sync::mpsc::Sender<(usize, usize)>,
    },
}

/// The old weir's takeover thread: answers takeover requests, one at a time,
/// until one completes. `sockets` are duplicates of the listeners (the same
/// kernel sockets), kept open here until handed over.
pub fn serve_old(
    listener: Listener,
    sockets: Vec<(SocketDesc, OwnedFd)>,
    proxy_port: u16,
    events: tokio::sync::mpsc::Sender<OldEvent>,
) {
    use tracing::warn;
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "takeover socket failed; no takeover possible");
                return;
            }
        };
        match hand_over(&conn, &sockets, proxy_port, &events) {
            Ok(Some(drained_rx)) => {
                // The new weir serves: the paths are its own now.
                listener.unlink();
                drop(listener);
                drop(sockets);
                if let Err(e) = conn.send(&Msg::Released, &[]) {
                    warn!(error = %e, "could not tell the new weir the sockets are released");
                }
                if let Ok((connections_left, udp_sessions_left)) = drained_rx.recv() {
                    let _ = conn.send(
                        &Msg::Drained {
                            connections_left,
                            udp_sessions_left,
                        },
                        &[],
                    );
                }
                return;
            }
            // Refused (logged) or a probe: nothing changed.
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "takeover did not complete; still serving");
                if events.blocking_send(OldEvent::Resume).is_err() {
                    return;
                }
            }
        }
    }
}

/// One takeover request. `Ok(None)`: refused before anything changed;
/// `Err`: failed after the old weir quiesced (it must resume).
fn hand_over(
    conn: &Conn,
    sockets: &[(SocketDesc, OwnedFd)],
    proxy_port: u16,
    events: &tokio::sync::mpsc::Sender<OldEvent>,
) -> Result<Option<std::sync::mpsc::Receiver<(usize, usize)>>, TakeoverError> {
    use tracing::info;
    let hello = match conn.recv(Some(Duration::from_secs(10))) {
        Ok((Msg::Query, _)) => {
            conn.send(
                &Msg::Info {
                    version: VERSION,
                    proxy_port,
                    pid: std::process::id(),
                },
                &[],
            )?;
            return Ok(None);
        }
        Ok((m, _)) => m,
        // A probe (connect and close) or a stuck peer: nothing changed.
        Err(_) => return Ok(None),
    };
    let new_pid = match check_hello(&hello, proxy_port) {
        Ok(pid) => pid,
        Err(reason) => {
            tracing::warn!(%reason, "takeover refused");
            conn.send(&Msg::Refused { reason }, &[])?;
            return Ok(None);
        }
    };
    info!(new_pid, "a new weir takes over; handing over the listeners");
    let (tx, rx) = tokio::sync::oneshot::channel();
    events
        .blocking_send(OldEvent::Quiesce(tx))
        .map_err(|_| TakeoverError::Protocol("the run loop is gone".into()))?;
    let quiesced = rx
        .blocking_recv()
        .map_err(|_| TakeoverError::Protocol("the run loop is gone".into()))?;
    if let Err(reason) = quiesced {
        tracing::warn!(%reason, "takeover refused");
        conn.send(&Msg::Refused { reason }, &[])?;
        return Ok(None);
    }
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    conn.send(
        &Msg::Sockets {
            version: VERSION,
            pid: std::process::id(),
            sockets: sockets.iter().map(|(d, _)| *d).collect(),
        },
        &fds,
    )?;
    // The new weir attaches and applies its steering before it serves.
    match conn.recv(Some(Duration::from_secs(120)))?.0 {
        Msg::Serving => {}
        other => {
            return Err(TakeoverError::Protocol(format!(
                "expected serving, got {other:?}"
            )));
        }
    }
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let (drained_tx, drained_rx) = std::sync::mpsc::channel();
    events
        .blocking_send(OldEvent::HandedOver {
            stopped: stopped_tx,
            drained: drained_tx,
        })
        .map_err(|_| TakeoverError::Protocol("the run loop is gone".into()))?;
    let _ = stopped_rx.blocking_recv();
    Ok(Some(drained_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_messages_cross_a_socket_pair() {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (a, b) = (Conn(a), Conn(b));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let u = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
        let sockets = vec![
            describe(Proto::Tcp, l.local_addr().unwrap()),
            describe(Proto::Udp, u.local_addr().unwrap()),
        ];
        let msg = Msg::Sockets {
            version: VERSION,
            pid: 1,
            sockets: sockets.clone(),
        };
        a.send(&msg, &[l.as_raw_fd(), u.as_raw_fd()]).unwrap();
        let (got, fds) = b.recv(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 2);
        check_socket(&sockets[0], &fds[0], port).unwrap();
        check_socket(&sockets[1], &fds[1], port).unwrap();
        // A description that lies, or another port, is refused.
        assert!(check_socket(&sockets[1], &fds[0], port).is_err());
        assert!(matches!(
            check_socket(&sockets[0], &fds[0], port.wrapping_add(1)),
            Err(TakeoverError::Refused(_))
        ));
        // The received listener is the same socket: a connection made to the
        // original is accepted through the copy.
        let taken = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(taken.accept().is_ok());
        // The end of the connection is an error, not a hang.
        drop(a);
        assert!(b.recv(Some(Duration::from_secs(1))).is_err());
    }

    /// The old weir's side, driven by hand: a new weir that goes away after
    /// taking the sockets makes the old one resume; one that serves gets
    /// `Released`, then `Drained` with the counts the run loop reports.
    #[test]
    fn the_old_side_resumes_after_an_abandoned_takeover_and_releases_after_one_that_serves() {
        let dir = std::env::temp_dir().join(format!("weir-takeover-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weir.sock.takeover");
        let listener = Listener::bind(&path).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let u = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
        let sockets = vec![
            (
                describe(Proto::Tcp, l.local_addr().unwrap()),
                OwnedFd::from(l.try_clone().unwrap()),
            ),
            (
                describe(Proto::Udp, u.local_addr().unwrap()),
                OwnedFd::from(u.try_clone().unwrap()),
            ),
        ];
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let old = std::thread::spawn(move || serve_old(listener, sockets, port, tx));
        // The run loop's part.
        let run_loop = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    // The first takeover is refused (say the FQDN cache could
                    // not be written): the new weir gets the reason.
                    OldEvent::Quiesce(done) if seen.is_empty() => {
                        seen.push("refused");
                        let _ = done.send(Err("the disk is full".into()));
                    }
                    OldEvent::Quiesce(done) => {
                        seen.push("quiesce");
                        let _ = done.send(Ok(()));
                    }
                    OldEvent::Resume => seen.push("resume"),
                    OldEvent::HandedOver { stopped, drained } => {
                        seen.push("handed over");
                        let _ = stopped.send(());
                        let _ = drained.send((1, 2));
                    }
                }
            }
            seen
        });
        // A query changes nothing.
        let c = connect(&path).unwrap().unwrap();
        assert_eq!(query(&c, port).unwrap(), std::process::id());
        assert!(matches!(
            query(&connect(&path).unwrap().unwrap(), port + 1),
            Err(TakeoverError::Refused(_))
        ));
        // Refused by the run loop: no sockets, the reason.
        match request(connect(&path).unwrap().unwrap(), port) {
            Err(TakeoverError::Refused(reason)) => assert_eq!(reason, "the disk is full"),
            Err(e) => panic!("refused with another error: {e}"),
            Ok(_) => panic!("the sockets were handed over although the run loop refused"),
        }
        // Takes the sockets, then goes away.
        let c = connect(&path).unwrap().unwrap();
        let taken = request(c, port).unwrap();
        assert_eq!((taken.tcp.len(), taken.udp.len()), (1, 1));
        drop(taken);
        // Takes them and serves.
        let taken = request(connect(&path).unwrap().unwrap(), port).unwrap();
        taken.conn.send(&Msg::Serving, &[]).unwrap();
        let t = Some(Duration::from_secs(5));
        assert_eq!(taken.conn.recv(t).unwrap().0, Msg::Released);
        assert_eq!(
            taken.conn.recv(t).unwrap().0,
            Msg::Drained {
                connections_left: 1,
                udp_sessions_left: 2
            }
        );
        old.join().unwrap();
        assert!(!path.exists(), "the takeover socket's path is released");
        assert_eq!(
            run_loop.join().unwrap(),
            ["refused", "quiesce", "resume", "quiesce", "handed over"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hello_is_checked_for_version_and_port() {
        let hello = |version, proxy_port| Msg::Hello {
            version,
            proxy_port,
            pid: 7,
        };
        assert_eq!(check_hello(&hello(VERSION, 15001), 15001), Ok(7));
        assert!(check_hello(&hello(VERSION, 15002), 15001).is_err());
        assert!(check_hello(&hello(VERSION + 1, 15001), 15001).is_err());
        assert!(check_hello(&Msg::Serving, 15001).is_err());
    }

    #[test]
    fn the_takeover_socket_sits_beside_the_api_socket() {
        assert_eq!(
            socket_path(Path::new("/run/weir/weir.sock")),
            PathBuf::from("/run/weir/weir.sock.takeover")
        );
    }
}
