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
    // Port 0 with the client's address: without IP_BIND_ADDRESS_NO_PORT the kernel
    // would pick the port now, from the address alone, and could pick the
    // client's own port (a 4-tuple the steering already sends to the proxy). With
    // it the port is chosen at connect time, unique for the whole 4-tuple.
    set_int_option(&socket, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    socket.bind(&SocketAddr::new(local, 0).into())?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

/// setsockopt with an int value (options socket2 and nix do not wrap).
fn set_int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the fd is a valid socket borrowed from `socket`; the option value
    // points at a live c_int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where an upstream connection leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSource {
    /// The client's own address (transparent, with this SO_MARK): the server sees
    /// the client, and the steering brings its replies back to the proxy.
    Client(std::net::IpAddr, u32),
    /// The node's own address. For a destination on the node itself (its replies
    /// would never leave the node towards the client's address, and the steering
    /// would take the proxy's own connection for a new client one), and where
    /// nothing steers replies back.
    Node,
}

/// Connects to `dst` from `source`.
pub async fn connect_upstream_tcp(
    source: UpstreamSource,
    dst: SocketAddr,
) -> io::Result<tokio::net::TcpStream> {
    match source {
        UpstreamSource::Client(client, mark) => {
            transparent_upstream_socket(client, mark)?
                .connect(dst)
                .await
        }
        UpstreamSource::Node => tokio::net::TcpStream::connect(dst).await,
    }
}

/// Whether `addr`'s IP is one of this node's (network namespace's) own
/// addresses, i.e. routed locally (`127.0.0.53` and AnyIP prefixes included): a
/// plain socket may bind only those. Where `ip_nonlocal_bind` lets any address
/// bind, the routing decides instead: towards a local address the kernel picks
/// the address itself as the source (a UDP connect sends nothing). IPv6
/// link-local addresses are looked up on `addr`'s scope; without one (a
/// connection from a global source to `fe80::1` keeps none), on every
/// interface: the address is the node's if any of them holds it.
pub fn is_local_address(addr: SocketAddr) -> bool {
    if let SocketAddr::V6(a) = addr
        && a.scope_id() == 0
        && a.ip().is_unicast_link_local()
    {
        let Ok(interfaces) = nix::net::if_::if_nameindex() else {
            return false;
        };
        return interfaces.iter().any(|i| {
            let scoped = std::net::SocketAddrV6::new(*a.ip(), a.port(), 0, i.index());
            is_local_address(SocketAddr::V6(scoped))
        });
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip == std::net::Ipv4Addr::BROADCAST {
        return false;
    }
    let at = |port| match addr {
        SocketAddr::V4(a) => SocketAddr::V4(std::net::SocketAddrV4::new(*a.ip(), port)),
        SocketAddr::V6(a) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(*a.ip(), port, 0, a.scope_id()))
        }
    };
    let udp = || Socket::new(Domain::for_address(addr), Type::DGRAM, None);
    if !udp().is_ok_and(|s| s.bind(&at(0).into()).is_ok()) {
        return false;
    }
    if !nonlocal_bind(addr.is_ipv6()) {
        return true;
    }
    udp().is_ok_and(|s| {
        s.connect(&at(9).into()).is_ok()
            && s.local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a.ip() == ip)
    })
}

/// `net.ipv{4,6}.ip_nonlocal_bind` of this network namespace, read once.
fn nonlocal_bind(ipv6: bool) -> bool {
    static FLAGS: std::sync::OnceLock<[bool; 2]> = std::sync::OnceLock::new();
    let read = |family| {
        std::fs::read_to_string(format!("/proc/sys/net/{family}/ip_nonlocal_bind"))
            .is_ok_and(|v| v.trim() != "0")
    };
    FLAGS.get_or_init(|| [read("ipv4"), read("ipv6")])[usize::from(ipv6)]
}

fn set_transparent(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

/// A UDP socket on the proxy port that receives datagrams addressed to any IP
/// (IP_TRANSPARENT) and reports each one's original destination in a control
/// message (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR): see [`recv_with_orig_dst`].
pub fn transparent_udp_listener(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_transparent(&socket, addr.is_ipv6())?;
    let (level, name) = if addr.is_ipv6() {
        (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
    } else {
        (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
    };
    set_int_option(&socket, level, name, 1)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// A UDP socket bound to `local` and connected to `peer`, with IP_TRANSPARENT so
/// `local` may be an address that is not the node's. The proxy uses one towards
/// the client (bound to the original destination, so replies come from the
/// address the client asked) and one towards the server (bound to the client's
/// address, with `mark`, so the server sees the client). SO_REUSEADDR: several
/// clients may talk to the same server address at once.
pub fn udp_session_socket(
    local: SocketAddr,
    peer: SocketAddr,
    mark: Option<u32>,
) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if peer.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_transparent(&socket, peer.is_ipv6())?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    socket.connect(&peer.into())?;
    Ok(socket.into())
}

/// Asks the kernel to say, with each datagram it reassembled from IP fragments,
/// how large the largest fragment was (`IP_RECVFRAGSIZE`, `IPV6_RECVFRAGSIZE`):
/// [`is_reassembly_note`] recognises the note.
pub fn report_reassembly(socket: &impl std::os::fd::AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(socket, libc::SOL_IPV6, libc::IPV6_RECVFRAGSIZE, 1)
    } else {
        set_int_option(socket, libc::SOL_IP, libc::IP_RECVFRAGSIZE, 1)
    }
}

/// Whether a control message (level, type) is the kernel's note that a datagram
/// was reassembled (see [`report_reassembly`]).
fn is_reassembly_note(level: libc::c_int, kind: libc::c_int) -> bool {
    (level, kind) == (libc::SOL_IP, libc::IP_RECVFRAGSIZE)
        || (level, kind) == (libc::SOL_IPV6, libc::IPV6_RECVFRAGSIZE)
}

/// One datagram read by [`recv_two`]: its length, and whether the kernel
/// reassembled it from IP fragments (on a socket that asked to be told:
/// [`report_reassembly`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub len: usize,
    pub reassembled: bool,
}

/// Reads up to two queued datagrams in one `recvmmsg` without waiting
/// (`WouldBlock` when none is queued): the first into `first`, the next, if
/// it is there already, into `second`. Written on libc rather than nix: nix's
/// reusable headers keep the control length the kernel wrote back, so after
/// one datagram without a note the next note would be cut off.
pub fn recv_two(
    socket: &impl std::os::fd::AsRawFd,
    first: &mut [u8],
    second: &mut [u8],
) -> io::Result<[Option<Datagram>; 2]> {
    const CONTROL_WORDS: usize = 8; // 64 bytes: room for a note, and a spare
    let mut control = [[0u64; CONTROL_WORDS]; 2];
    let mut iovs = [
        libc::iovec {
            iov_base: first.as_mut_ptr().cast(),
            iov_len: first.len(),
        },
        libc::iovec {
            iov_base: second.as_mut_ptr().cast(),
            iov_len: second.len(),
        },
    ];
    // SAFETY: an all-zero mmsghdr is a valid empty header (null pointers, zero
    // lengths); the fields that matter are set below.
    let mut msgs: [libc::mmsghdr; 2] = unsafe { std::mem::zeroed() };
    for ((m, iov), ctl) in msgs.iter_mut().zip(iovs.iter_mut()).zip(control.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_control = ctl.as_mut_ptr().cast();
        m.msg_hdr.msg_controllen = std::mem::size_of_val(ctl) as _;
    }
    // SAFETY: `msgs` holds two initialised headers whose iovecs point at the two
    // caller buffers and whose control pointers at `control`, all of which
    // outlive the call; the kernel writes at most the lengths given.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            2,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = usize::try_from(n).unwrap_or(0).min(2);
    let mut out = [None, None];
    for (slot, m) in out.iter_mut().zip(msgs.iter()).take(got) {
        *slot = Some(Datagram {
            len: m.msg_len as usize,
            reassembled: has_reassembly_note(&m.msg_hdr),
        });
    }
    Ok(out)
}

/// Whether the kernel noted a reassembly — or cut the notes short (`MSG_CTRUNC`:
/// one could be among those lost; counted as one, so that an answer is never
/// trusted for want of room).
fn has_reassembly_note(msg: &libc::msghdr) -> bool {
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return true;
    }
    // SAFETY: `msg` was filled by recvmmsg: its control pointer and length
    // describe the control messages the kernel wrote, inside the buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null pointer from CMSG_FIRSTHDR/CMSG_NXTHDR points at a
        // complete header inside the control buffer.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if is_reassembly_note(level, kind) {
            return true;
        }
        // SAFETY: as above; CMSG_NXTHDR returns null past the last header.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    false
}

/// One received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub source: SocketAddr,
    /// Where the client sent it (absent if the datagram was not steered here).
    pub orig_dst: Option<SocketAddr>,
    /// The datagram did not fit in the buffer and was cut.
    pub truncated: bool,
}

/// Receives one datagram from a [`transparent_udp_listener`] socket without
/// blocking (`WouldBlock` when none is queued), with its original destination.
pub fn recv_with_orig_dst(
    socket: &impl std::os::fd::AsRawFd,
    buf: &mut [u8],
) -> io::Result<Received> {
    // sockaddr_storage fits both families; u64s keep the control buffer aligned
    // for cmsghdr.
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut source: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut source).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `msg` refers to a live local buffer of the stated
    // length (name, one iovec over `buf`, control), all outliving the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let source = sockaddr_to_std(&source)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a source"))?;
    let mut orig_dst = None;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // msg_control/msg_controllen and return null at the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg pointers from CMSG_*HDR point at a complete header
        // inside `control`.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        // SAFETY: CMSG_DATA of a valid header points inside `control`.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        let payload = len.saturating_sub((data as usize).saturating_sub(cmsg as usize));
        if level == libc::SOL_IP
            && kind == libc::IP_ORIGDSTADDR
            && payload >= std::mem::size_of::<libc::sockaddr_in>()
        {
            // SAFETY: the kernel wrote a sockaddr_in here (checked length); the read
            // is unaligned-safe.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(data.cast()) };
            orig_dst = Some(SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                u16::from_be(sin.sin_port),
            ));
        } else if level == libc::SOL_IPV6
            && kind == libc::IPV6_ORIGDSTADDR
            && payload >= std::mem::size_of::<libc::sockaddr_in6>()
        {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(data.cast()) };
            // With its scope: a link-local address means nothing without it.
            orig_dst = Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            )));
        }
        // SAFETY: `cmsg` is a valid header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len: n as usize,
        source,
        orig_dst,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which is
            // smaller than sockaddr_storage.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read_unaligned((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read_unaligned((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// Takes a UDP session socket out of the flow's way before it closes: clears
/// IP_TRANSPARENT (nft's `socket transparent` match then passes over it, and
/// TPROXY never picks an unconnected socket) and dissolves its association with
/// the client (`connect` with `AF_UNSPEC`; the eBPF datapath only hands a flow's
/// datagrams to connected sockets). Its bound address and port stay. From now
/// on the flow's datagrams go to the listener; see [`udp_reclaim`] to undo.
pub fn udp_release(socket: &impl std::os::fd::AsFd, ipv6: bool) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    if ipv6 {
        s.set_ip_transparent_v6(false)?;
    } else {
        s.set_ip_transparent_v4(false)?;
    }
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC is the documented way to
    // disconnect a datagram socket; the length covers the struct passed.
    let rc = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&socket.as_fd()),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Undoes [`udp_release`]: the socket is the flow's session again.
pub fn udp_reclaim(socket: &impl std::os::fd::AsFd, peer: SocketAddr) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    if peer.is_ipv6() {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.connect(&peer.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn root() -> bool {
        if transparent_sockets_available() {
            return true;
        }
        eprintln!("*** SKIPPED: transparent sockets need root or CAP_NET_ADMIN");
        false
    }

    /// The port of a transparent upstream socket is left to connect time (port 0
    /// after bind), so it can never be fixed to the client's own port by a bind
    /// that sees only the address.
    #[test]
    fn transparent_upstream_sockets_pick_their_port_at_connect() {
        if !root() {
            return;
        }
        for client in ["192.0.2.7", "2001:db8::7"] {
            let client: IpAddr = client.parse().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let s = transparent_upstream_socket(client, 0x7800).unwrap();
                let local = s.local_addr().unwrap();
                assert_eq!(local.ip(), client);
                assert_eq!(local.port(), 0, "{client}: port chosen at bind");
            });
        }
    }

    /// This machine's link-local addresses that are usable (not tentative:
    /// flags in /proc/net/if_inet6's fifth column).
    fn node_link_local_addresses() -> Vec<std::net::Ipv6Addr> {
        let table = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        table
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
                let ip = std::net::Ipv6Addr::from(u128::from_str_radix(f.first()?, 16).ok()?);
                (ip.is_unicast_link_local() && flags & 0x40 == 0).then_some(ip)
            })
            .collect()
    }

    #[test]
    fn local_addresses_are_told_from_others() {
        let local = |s: &str| is_local_address(s.parse().unwrap());
        assert!(local("127.0.0.1:15001"));
        assert!(local("127.0.0.53:1"));
        assert!(!local("0.0.0.0:15001"));
        assert!(!local("192.0.2.1:15001"));
        assert!(!local("[2001:db8::1]:15001"));
        // A link-local address without its interface: not the node's when no
        // interface holds it, the node's when any does.
        let held_here = node_link_local_addresses();
        if !held_here.contains(&"fe80::1".parse().unwrap()) {
            assert!(!local("[fe80::1]:15001"));
        }
        for held in held_here {
            assert!(local(&format!("[{held}]:15001")), "{held}");
        }
        // Whatever the kernel picks as the source towards a remote address is local.
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        if s.connect("192.0.2.1:9").is_ok() {
            assert!(is_local_address(s.local_addr().unwrap()));
        }
    }
}
