//! Plain TCP forwarding for flows that policy allows without L7 rules.

use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::listener::ConnContext;

pub async fn splice(ctx: &ConnContext, mut client: TcpStream) {
    let timeout = ctx.shared.config.upstream_connect_timeout;
    // From the client's own address when steering brings the replies back.
    let connecting = crate::socket::connect_upstream_tcp(ctx.upstream_source, ctx.orig_dst);
    let upstream = tokio::time::timeout(timeout, connecting).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(error = %e, "upstream connect failed; closing client");
            return;
        }
        Err(_) => {
            info!(?timeout, "upstream connect timed out; closing client");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => debug!(
            bytes_up = up,
            bytes_down = down,
            "spliced connection closed"
        ),
        Err(e) => debug!(error = %e, "spliced connection ended with an error"),
    }
}
