//! A request body on its way to the server: data only as the server's window
//! allows (so a fast client is read no faster than the server takes it), then
//! the trailers; resets either way end it.
//!
//! Trailers arrive after policy decided on the headers, so they must not carry
//! what policy checks: a trailer named like a header an HTTP rule names (or its
//! `_` spelling), `host`, and framing or connection-specific fields are dropped
//! (a server merging trailers into headers would otherwise see a value policy
//! never matched). Other trailers pass (gRPC and `te: trailers` users need them).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::SendStream;
use http::{HeaderMap, HeaderName, header};
use hyper::body::{Body, Frame, Incoming};
use tracing::debug;

/// The header names the connection's HTTP rules check (lower-case), carried
/// with the request (as an extension) to the pump that sends its trailers.
#[derive(Debug, Clone, Default)]
pub struct CheckedHeaderNames(pub Arc<[String]>);

/// Fields never forwarded as trailers, whatever policy says.
const NEVER_TRAILERS: &[HeaderName] = &[
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The request trailers the server gets (see the module's comment).
pub(super) fn filter_trailers(mut trailers: HeaderMap, checked: &[String]) -> HeaderMap {
    let dropped: Vec<HeaderName> = trailers
        .keys()
        .filter(|k| {
            let name = k.as_str();
            NEVER_TRAILERS.contains(k)
                || name == "keep-alive"
                || name == "proxy-connection"
                || name.starts_with(':')
                // `-` and `_` spellings are one name either way round (a server
                // may fold one into the other).
                || checked
                    .iter()
                    .any(|c| c.replace('_', "-") == name.replace('_', "-"))
        })
        .cloned()
        .collect();
    for name in dropped {
        debug!(%name, "request trailer dropped: policy checks it in headers");
        trailers.remove(name);
    }
    trailers
}

/// A frame of the request body, as the client side yields it.
type BodyFrame = Option<Result<Frame<Bytes>, hyper::Error>>;

/// Starts sending a request body to the server. A body the client has already
/// sent whole (one DATA frame with END_STREAM, the usual unary gRPC call) is
/// queued on the stream at once, behind its HEADERS: the connection writes both
/// in one go, and no task is spawned for it. That one frame is already in
/// memory (at most weir's SETTINGS_MAX_FRAME_SIZE), so queueing it before the
/// server's window opens buffers nothing more than a pump waiting for the window
/// would. Any other body gets a pump task, which reads it only as the server's
/// window allows.
pub(super) fn start(
    mut body: Incoming,
    mut stream: SendStream<Bytes>,
    checked: CheckedHeaderNames,
) {
    // A no-op waker: a body not all here yet is polled again, with the pump's
    // own waker, by the pump.
    let mut cx = Context::from_waker(Waker::noop());
    let first = match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Pending => None,
        Poll::Ready(frame) => {
            if frame.as_ref().is_none_or(|_| body.is_end_stream()) {
                if let Err(e) = send_last(&mut stream, frame, &checked) {
                    debug!(error = %e, "sending the request body upstream failed");
                }
                return;
            }
            Some(frame)
        }
    };
    tokio::spawn(pump_request(body, stream, checked, first));
}

/// Queues a body's last frame (or its end) without waiting for the server's
/// window (see [`start`]).
fn send_last(
    stream: &mut SendStream<Bytes>,
    frame: BodyFrame,
    checked: &CheckedHeaderNames,
) -> Result<(), h2::Error> {
    match frame {
        None => stream.send_data(Bytes::new(), true),
        Some(Err(e)) => {
            debug!(error = %e, "client request body failed; cancelling the upstream stream");
            stream.send_reset(h2::Reason::CANCEL);
            Ok(())
        }
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => stream.send_data(data, true),
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => stream.send_trailers(filter_trailers(trailers, &checked.0)),
                // Neither data nor trailers: the body ended after it.
                Err(_) => stream.send_data(Bytes::new(), true),
            },
        },
    }
}

/// Streams a request body to the server: data as its window allows, then the
/// trailers. A client that resets (or breaks) its stream cancels the server's;
/// a server that resets its stream ends the pump. `first` is a frame already
/// taken from the body.
async fn pump_request(
    mut body: Incoming,
    mut stream: SendStream<Bytes>,
    checked: CheckedHeaderNames,
    mut first: Option<BodyFrame>,
) {
    loop {
        let frame = match first.take() {
            Some(f) => f,
            None => tokio::select! {
                f = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
                r = poll_fn(|cx| stream.poll_reset(cx)) => {
                    debug!(reason = ?r.ok(), "server reset the stream; request body dropped");
                    return;
                }
            },
        };
        let (result, last) = match frame {
            None => (stream.send_data(Bytes::new(), true), true),
            Some(Err(e)) => {
                debug!(error = %e, "client request body failed; cancelling the upstream stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    (send_data(&mut stream, data, eos).await, eos)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        let trailers = filter_trailers(trailers, &checked.0);
                        (stream.send_trailers(trailers), true)
                    }
                    Err(_) => (Ok(()), false),
                },
            },
        };
        if let Err(e) = result {
            debug!(error = %e, "sending the request body upstream failed");
            return;
        }
        if last {
            return;
        }
    }
}

/// Sends `data` as the server's window opens (never buffering more than it).
async fn send_data(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    eos: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return if eos {
            stream.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
            Some(r) => r?,
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        stream.send_data(chunk, eos && data.is_empty())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_cannot_carry_what_policy_checks() {
        let mut t = HeaderMap::new();
        for (k, v) in [
            ("x-team", "empire"),
            ("x_team", "empire"),
            ("host", "evil.example"),
            ("content-length", "0"),
            ("connection", "close"),
            ("x-checksum", "abc"),
            ("grpc-status-details-bin", "AAAA"),
        ] {
            t.append(k, v.parse().unwrap());
        }
        let out = filter_trailers(t, &["x-team".to_string()]);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-status-details-bin", "x-checksum"]);
        // A checked name written with `_`: its `-` spelling is dropped too.
        let mut t = HeaderMap::new();
        t.append("x-api-key", "k".parse().unwrap());
        t.append("x_api_key", "k".parse().unwrap());
        t.append("x-other", "o".parse().unwrap());
        let out = filter_trailers(t, &["x_api_key".to_string()]);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-other"]);
    }
}
