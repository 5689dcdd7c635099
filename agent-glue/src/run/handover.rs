//! `weir run`'s side of a planned restart (see [`crate::takeover`] for the
//! protocol): finding and taking over a running weir, and being taken over.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use weir_proxy::Shared;

use super::Running;
use crate::api;
use crate::cli::RunArgs;
use crate::control::ControlMsg;
use crate::registry::{LoadedDigest, SourceFiles};
use crate::takeover;

/// Whether this start takes over a running weir: with `--takeover` one must
/// answer; without, one is taken over when it answers.
pub(super) async fn decide_takeover(args: &RunArgs, path: &Path) -> anyhow::Result<bool> {
    // Before this weir touches anything (the datapath's configuration is
    // shared): can the running weir be taken over at all?
    let (p, port) = (path.to_path_buf(), args.proxy_port);
    let found = tokio::task::spawn_blocking(move || {
        takeover::connect(&p)?
            .map(|conn| takeover::query(&conn, port))
            .transpose()
    })
    .await
    .context("the takeover task failed")?;
    let live = match found.with_context(|| {
        format!(
            "a weir runs with --api-socket {} and cannot be taken over (it keeps serving)",
            args.api_socket.display()
        )
    })? {
        Some(pid) => {
            info!(pid, "found a running weir");
            true
        }
        None => false,
    };
    match (args.takeover, live) {
        (true, false) => bail!(
            "--takeover: no running weir answers at {} (is one running with --api-socket {}? \
             start without --takeover for a fresh start)",
            path.display(),
            args.api_socket.display()
        ),
        (_, true) => {
            info!(socket = %path.display(), "a running weir answers: taking over its listening sockets");
            Ok(true)
        }
        (false, false) => {
            info!("no running weir to take over: fresh start");
            Ok(false)
        }
    }
}

/// Asks the running weir for its listeners (blocking, so off the runtime's threads).
pub(super) async fn take_over(path: &Path, proxy_port: u16) -> anyhow::Result<TakenListeners> {
    let path = path.to_path_buf();
    let taken = tokio::task::spawn_blocking(move || {
        let conn = takeover::connect(&path)?
            .ok_or_else(|| takeover::TakeoverError::NoPeer(path.clone()))?;
        takeover::request(conn, proxy_port)
    })
    .await
    .context("the takeover task failed")?
    .context("taking over the running weir's sockets")?;
    let mut out = TakenListeners {
        conn: taken.conn,
        old_pid: taken.old_pid,
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    for l in taken.tcp {
        l.set_nonblocking(true)?;
        out.tcp.push(tokio::net::TcpListener::from_std(l)?);
    }
    for u in taken.udp {
        u.set_nonblocking(true)?;
        out.udp.push(tokio::net::UdpSocket::from_std(u)?);
    }
    info!(
        old_pid = out.old_pid,
        tcp = out.tcp.len(),
        udp = out.udp.len(),
        "received the running weir's listening sockets"
    );
    Ok(out)
}

pub(super) struct TakenListeners {
    pub(super) conn: takeover::Conn,
    pub(super) old_pid: u32,
    pub(super) tcp: Vec<tokio::net::TcpListener>,
    pub(super) udp: Vec<tokio::net::UdpSocket>,
}

/// This weir serves the taken-over listeners: tells the old weir, waits until it
/// has released the socket paths, binds the API, and hands the old weir's final
/// "drained" to the control thread ([`ControlMsg::PeerDrained`]).
pub(super) async fn finish_takeover(
    args: &RunArgs,
    conn: takeover::Conn,
    old_pid: u32,
    control: &std::sync::mpsc::Sender<ControlMsg>,
) -> Option<tokio::net::UnixListener> {
    let released = tokio::task::spawn_blocking(move || {
        conn.send(&takeover::Msg::Serving, &[])?;
        match conn.recv(Some(std::time::Duration::from_secs(30)))?.0 {
            takeover::Msg::Released => Ok(conn),
            other => Err(takeover::TakeoverError::Protocol(format!(
                "expected released, got {other:?}"
            ))),
        }
    })
    .await;
    match released {
        Ok(Ok(conn)) => {
            info!(old_pid, "took over: serving; the old weir drains and exits");
            let control = control.clone();
            let waiter = std::thread::Builder::new()
                .name("weir-takeover".into())
                .spawn(move || match conn.recv(None) {
                    Ok((takeover::Msg::Drained { connections_left, udp_sessions_left }, _)) => {
                        info!(old_pid, connections_left, udp_sessions_left, "the old weir has drained");
                        let _ = control.send(ControlMsg::PeerDrained { pid: old_pid });
                    }
                    other => warn!(old_pid, result = ?other.map(|(m, _)| m), "the old weir ended without saying it drained"),
                });
            if let Err(e) = waiter {
                warn!(error = %e, "cannot wait for the old weir to drain");
            }
        }
        Ok(Err(e)) => {
            warn!(error = %e, "the old weir did not confirm the handover; serving anyway")
        }
        Err(e) => warn!(error = %e, "the handover task failed; serving anyway"),
    }
    // Serving matters more than the API: without it, say so and go on.
    match api::server::bind(&args.api_socket) {
        Ok(l) => Some(l),
        Err(e) => {
            error!(error = %e, "cannot serve the API after the takeover");
            None
        }
    }
}

/// Copies of the listeners' descriptors (the same sockets) for a later takeover.
pub(super) fn duplicate_listeners(
    tcp: &[tokio::net::TcpListener],
    udp: &[tokio::net::UdpSocket],
) -> anyhow::Result<Vec<(takeover::SocketDesc, OwnedFd)>> {
    let mut out = Vec::new();
    for l in tcp {
        let d = takeover::describe(takeover::Proto::Tcp, l.local_addr()?);
        out.push((d, l.as_fd().try_clone_to_owned()?));
    }
    for u in udp {
        let d = takeover::describe(takeover::Proto::Udp, u.local_addr()?);
        out.push((d, u.as_fd().try_clone_to_owned()?));
    }
    Ok(out)
}

/// Listens for a successor on the takeover socket, on a thread of its own.
pub(super) fn start_takeover_listener(
    path: &Path,
    dups: Vec<(takeover::SocketDesc, OwnedFd)>,
    args: &RunArgs,
    events: tokio::sync::mpsc::Sender<takeover::OldEvent>,
) -> Option<std::thread::JoinHandle<()>> {
    let listener = match takeover::Listener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "no takeover socket: a new weir cannot take over without losing traffic");
            return None;
        }
    };
    let port = args.proxy_port;
    match std::thread::Builder::new()
        .name("weir-takeover".into())
        .spawn(move || takeover::serve_old(listener, dups, port, events))
    {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "cannot start the takeover thread");
            None
        }
    }
}

/// How often the drain looks at the policy's files for a change.
const SOURCES_CHECK: std::time::Duration = std::time::Duration::from_millis(300);
/// A look that takes longer (a hung network file system) counts as a change:
/// the policy cannot be known to be current.
const SOURCES_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until the open connections and UDP sessions are done, or `timeout`;
/// returns how many were left.
///
/// What is left runs under the policy this weir had at the handover (it takes
/// no reloads any more). When the policy's sources no longer hold what that
/// policy was compiled from (a file edited, before or after the handover;
/// `weir policy apply` or `weir endpoint` on the new weir, which write the
/// state dir), that policy is stale, and this weir stops deciding
/// ([`Shared::supersede`]): DNS queries and UDP datagrams that still reach its
/// sessions are dropped, and the clients' retries reach the new weir once the
/// sessions have closed; a Kafka request closes its connection. What was decided before goes on (a request in
/// progress, an outstanding query's answer). Without that, a DNS session that
/// always has a query outstanding kept forwarding the flow's new queries under
/// the old policy until the timeout.
pub(super) async fn drain(
    shared: &Shared,
    timeout: std::time::Duration,
    (sources, loaded): (SourceFiles, LoadedDigest),
) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + timeout;
    let sources = std::sync::Arc::new(sources);
    let stale = || {
        let (sources, loaded) = (sources.clone(), loaded.clone());
        async move {
            let read = tokio::task::spawn_blocking(move || loaded.stale(sources.digest()));
            !matches!(
                tokio::time::timeout(SOURCES_READ_LIMIT, read).await,
                Ok(Ok(false))
            )
        }
    };
    // SIGTERM or SIGINT cut the drain short.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return (shared.client_connections(), shared.udp_sessions()),
    };
    info!(
        connections = shared.client_connections(),
        udp_sessions = shared.udp_sessions(),
        ?timeout,
        "handed over; draining"
    );
    let mut next_check = Some(tokio::time::Instant::now());
    loop {
        let left = (shared.client_connections(), shared.udp_sessions());
        if left == (0, 0) {
            return left;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                connections = left.0,
                udp_sessions = left.1,
                "drain timeout; closing what is left"
            );
            return left;
        }
        if next_check.is_some_and(|t| tokio::time::Instant::now() >= t) {
            next_check = Some(tokio::time::Instant::now() + SOURCES_CHECK);
            if stale().await {
                shared.supersede();
                next_check = None;
                warn!(
                    connections = left.0,
                    udp_sessions = left.1,
                    "the policy's sources changed since this weir read them: it decides nothing more (DNS queries and UDP datagrams still reaching it are dropped, Kafka requests close their connection; their clients retry through the new weir)"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = term.recv() => return left,
            _ = int.recv() => return left,
        }
    }
}

/// Removes the ready file unless a successor has written its own pid there.
pub(super) fn remove_if_ours(ready: &Path) {
    crate::state::remove_ready_if_ours(ready);
}

/// One step of being taken over (see `takeover`); `Some` once handed over.
pub(super) async fn on_takeover_event(
    ev: takeover::OldEvent,
    control: &std::sync::mpsc::Sender<ControlMsg>,
    running: &mut Running,
    args: &RunArgs,
) -> Option<std::sync::mpsc::Sender<(usize, usize)>> {
    match ev {
        takeover::OldEvent::Quiesce(done) => {
            // No change may reach this weir that the new one would not see:
            // the API goes (its path too, for the new weir to bind), and the
            // control thread finishes what it has and then changes nothing.
            if let Some(api) = running.api.take() {
                api.abort();
            }
            let _ = std::fs::remove_file(&args.api_socket);
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A control thread that is gone changes nothing any more either.
            let handed = if control.send(ControlMsg::HandOver(tx)).is_ok() {
                rx.await.unwrap_or(Ok(()))
            } else {
                Ok(())
            };
            match handed {
                Ok(()) => running.quiesced = true,
                // Refused: the control thread is back to applying changes.
                Err(_) => serve_api_again(running, args),
            }
            let _ = done.send(handed);
            None
        }
        takeover::OldEvent::Resume => {
            if running.quiesced {
                running.quiesced = false;
                let _ = control.send(ControlMsg::Resume);
                serve_api_again(running, args);
                info!("takeover abandoned; serving as before");
            }
            None
        }
        takeover::OldEvent::HandedOver { stopped, drained } => {
            // The new weir reads the same sockets already: stop reading here.
            // Accepting and receiving are cancel-safe, and connections and
            // sessions already accepted are tasks of their own that go on.
            let s = &running.serving;
            s.tcp.abort();
            s.udp.abort();
            if let Some(e) = &s.events {
                e.abort();
            }
            running.shared.start_draining();
            let _ = stopped.send(());
            info!("a new weir serves the listeners now");
            Some(drained)
        }
    }
}

/// Binds the API socket again after an abandoned or refused takeover.
fn serve_api_again(running: &mut Running, args: &RunArgs) {
    match api::server::bind(&args.api_socket) {
        Ok(l) => {
            running.api = Some(tokio::spawn(api::server::serve(
                l,
                running.api_tx.clone(),
                running.shared.flows.bus().clone(),
                api::access::Allowed::new(&args.api_allow_uid),
            )))
        }
        Err(e) => error!(error = %e, "cannot serve the API again"),
    }
}
