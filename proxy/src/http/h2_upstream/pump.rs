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

use std::sync::Arc;

use bytes::Bytes;
use h2::SendStream;
use http::{HeaderMap, HeaderName, header};
use hyper::body::{Body, Incoming};
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

/// Streams a request body to the server: data as its window allows, then the
/// trailers. A client that resets (or breaks) its stream cancels the server's;
/// a server that resets its stream ends the pump.
pub(super) async fn pump_request(
    mut body: Incoming,
    mut stream: SendStream<Bytes>,
    checked: CheckedHeaderNames,
) {
    loop {
        let frame = tokio::select! {
            f = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
            r = poll_fn(|cx| stream.poll_reset(cx)) => {
                debug!(reason = ?r.ok(), "server reset the stream; request body dropped");
                return;
            }
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
