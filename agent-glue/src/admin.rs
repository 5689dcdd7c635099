//! The admin HTTP listener (`--admin-addr`): `/metrics` (Prometheus text
//! format), `/healthz` (alive) and `/readyz` (enforcing). It runs on a thread and runtime of its own so a
//! scrape never takes time from the data plane's workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the admin thread: {0}")]
    Thread(std::io::Error),
}

/// What `/readyz` waits for; the run loop sets each part as it comes up.
#[derive(Debug, Default)]
pub struct Readiness {
    /// A compiled policy is installed in the proxy.
    pub policy: AtomicBool,
    /// The steering (eBPF datapath or nft rules) enforces it.
    pub steering: AtomicBool,
    /// The proxy's listeners accept (false again once another weir took them).
    pub listeners: AtomicBool,
}

impl Readiness {
    /// The parts not up yet (empty: ready).
    pub fn missing(&self) -> Vec<&'static str> {
        [
            (&self.policy, "policy not loaded"),
            (&self.steering, "steering not installed"),
            (&self.listeners, "listeners not serving"),
        ]
        .into_iter()
        .filter(|(b, _)| !b.load(Ordering::Relaxed))
        .map(|(_, why)| why)
        .collect()
    }

    pub fn set(part: &AtomicBool, up: bool) {
        part.store(up, Ordering::Relaxed);
    }
}

/// Binds `addr` now (so a bad or taken address fails `weir run` at start) and
/// serves on a thread of its own. A weir taking over from another
/// (`wait_for_port`) gets the address once the old one lets it go: no
/// SO_REUSEPORT, which would let two weirs answer scrapes in turn.
pub fn spawn(
    addr: SocketAddr,
    bus: Arc<weir_proxy::FlowBus>,
    ready: Arc<Readiness>,
    wait_for_port: bool,
) -> Result<(), AdminError> {
    let first = match bind(addr) {
        Ok(l) => Some(l),
        Err(e) if wait_for_port && e.kind() == std::io::ErrorKind::AddrInUse => None,
        Err(source) => return Err(AdminError::Bind { addr, source }),
    };
    std::thread::Builder::new()
        .name("weir-admin".into())
        .spawn(move || {
            let listener = match first {
                Some(l) => l,
                None => loop {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    match bind(addr) {
                        Ok(l) => break l,
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
                        Err(e) => {
                            tracing::error!(%addr, error = %e, "admin listener: cannot bind; no /metrics");
                            return;
                        }
                    }
                },
            };
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener: no runtime; no /metrics");
                    return;
                }
            };
            rt.block_on(serve(listener, bus, ready));
        })
        .map_err(AdminError::Thread)?;
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

async fn serve(
    listener: std::net::TcpListener,
    bus: Arc<weir_proxy::FlowBus>,
    ready: Arc<Readiness>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener failed; no /metrics");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let bus = bus.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let bus = bus.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(answer(&req, &bus, &ready)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    bus: &weir_proxy::FlowBus,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            bus.metrics().encode(),
        ),
        // The process answers: alive.
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        // Enforcing: policy loaded, steering installed, listeners up.
        "/readyz" => match ready.missing() {
            m if m.is_empty() => text(StatusCode::OK, "text/plain", "ready\n".into()),
            m => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", m.join(", ")),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found (try /metrics, /healthz or /readyz)\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_part_is_up() {
        let r = Readiness::default();
        assert_eq!(
            r.missing(),
            [
                "policy not loaded",
                "steering not installed",
                "listeners not serving"
            ]
        );
        Readiness::set(&r.policy, true);
        Readiness::set(&r.steering, true);
        assert_eq!(r.missing(), ["listeners not serving"]);
        Readiness::set(&r.listeners, true);
        assert!(r.missing().is_empty());
    }
}
