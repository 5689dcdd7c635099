//! A request body on its way to the server: data only as the server's window
//! allows (so a fast client is read no faster than the server takes it), then
//! the trailers; resets either way end it.

use std::future::poll_fn;

use bytes::Bytes;
use h2::SendStream;
use hyper::body::{Body, Incoming};
use tracing::debug;

/// Streams a request body to the server: data as its window allows, then the
/// trailers. A client that resets (or breaks) its stream cancels the server's;
/// a server that resets its stream ends the pump.
pub(super) async fn pump_request(mut body: Incoming, mut stream: SendStream<Bytes>) {
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
                    Ok(trailers) => (stream.send_trailers(trailers), true),
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
