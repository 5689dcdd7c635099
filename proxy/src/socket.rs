//! Every transparent-socket option weir uses, in one place.
//!
//! A TPROXY/sk_assign-steered connection arrives on a listener bound to the
//! proxy port but addressed to the workload's destination; with IP_TRANSPARENT
//! the accepted socket's `local_addr()` *is* that original destination.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// A TCP listener that accepts connections addressed to any IP (IP_TRANSPARENT).
/// IPv6 listeners are IPv6-only so that an IPv4 listener can sit beside them.
pub fn transparent_tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    TcpListener::from_std(socket.into())
}

/// Whether this process may create transparent sockets (CAP_NET_ADMIN or root).
pub fn transparent_sockets_available() -> bool {
    Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| s.set_ip_transparent_v4(true))
        .is_ok()
}

/// An upstream socket that connects from `local` — the client's address — rather
/// than the node's (IP_TRANSPARENT lets it bind an address that is not local), with
/// SO_MARK set so the datapath recognises the proxy's own traffic and never steers
/// it to the proxy a second time.
pub fn transparent_upstream_socket(
    local: std::net::IpAddr,
    mark: u32,
) -> io::Result<tokio::net::TcpSocket> {
    let socket = Socket::new(
        Domain::for_address(SocketAddr::new(local, 0)),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if local.is_ipv6() {
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_mark(mark)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(local, 0).into())?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}
