//! Asking the broker about topic ids no relayed Metadata response has named (a client
//! may learn an id on a connection weir did not see, or before weir started): a
//! Metadata v12 request by id on weir's own connection to the same broker, opened like
//! the client's upstream connection, bounded by `--upstream-connect-timeout` in all.
//! Whatever the answer, the caller then decides; an id still unknown is denied by
//! topic rules.

use std::collections::HashSet;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_parsers::kafka::{
    FrameSplitter, METADATA_BY_ID_VERSION, RequestFacts, TopicRef, Topics,
    metadata_request_for_ids, metadata_topic_ids,
};

use weir_policy::kafka_match::{KafkaDenial, KafkaRequest, KafkaTopics};

use crate::context::ConnContext;

/// The correlation id of weir's own Metadata request.
const CORRELATION_ID: i32 = 0x7765_6972; // "weir"

/// Ids one client connection may have weir ask about; beyond, unknown ids are
/// denied without asking (a client inventing ids cannot make weir open connection
/// after connection).
pub(super) const MAX_ASKED_PER_CONNECTION: usize = 64;

/// The ids `facts` names that resolve to no name in this broker's scope and were
/// not asked about on this connection yet (at most what the budget has left) —
/// none unless a name could change the decision: the connection is allowed at
/// L3/L4 and the rules that match the API key, version and client id all need a
/// topic. weir sends nothing to a broker for a request policy refuses anyway.
pub(super) fn ids_to_ask(
    ctx: &ConnContext,
    facts: &RequestFacts,
    asked: &HashSet<[u8; 16]>,
) -> Vec<[u8; 16]> {
    let Ok(body) = &facts.body else {
        return Vec::new();
    };
    if !body.topics.has_ids() || !a_name_decides(ctx, facts) {
        return Vec::new();
    }
    let Topics::Listed(list) = &body.topics else {
        return Vec::new();
    };
    let scope = super::broker_scope(ctx);
    let mut out: Vec<[u8; 16]> = Vec::new();
    for t in list {
        if let TopicRef::Id(id) = t
            && !asked.contains(id)
            && !out.contains(id)
            && ctx.shared.kafka_topic_ids.resolve(scope, id).is_none()
        {
            if asked.len() + out.len() >= MAX_ASKED_PER_CONNECTION {
                break;
            }
            out.push(*id);
        }
    }
    out
}

fn a_name_decides(ctx: &ConnContext, facts: &RequestFacts) -> bool {
    let d = ctx.decide();
    let cv = &d.verdict;
    if !cv.l4_allowed() || !cv.needs_kafka() {
        return false;
    }
    let h = &facts.header;
    let req = KafkaRequest {
        api_key: h.api_key,
        api_version: h.api_version,
        client_id: h.client_id.as_deref(),
        topics: KafkaTopics::UnknownTopicId,
    };
    matches!(
        cv.kafka_verdict(&d.policy, &req).1,
        Some(KafkaDenial::UnknownTopicId)
    )
}

/// Asks the broker for the names of `ids` and teaches the proxy's id map what it
/// answers. Errors say why nothing was learned.
pub(super) async fn learn_from_broker(
    ctx: &ConnContext,
    ids: &[[u8; 16]],
) -> Result<usize, String> {
    let request = metadata_request_for_ids(ids, CORRELATION_ID).map_err(|e| e.to_string())?;
    let timeout = ctx.shared.config.upstream_connect_timeout;
    let exchange = async {
        let mut s = crate::socket::connect_upstream_tcp(ctx.upstream_source, ctx.orig_dst)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        s.write_all(&request)
            .await
            .map_err(|e| format!("writing: {e}"))?;
        let mut frames = FrameSplitter::new(ctx.shared.config.kafka_max_frame);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading: {e}"))?;
            if n == 0 {
                return Err("the broker closed the connection".to_string());
            }
            frames.push(&buf[..n]);
            if let Some(frame) = frames.next_frame().map_err(|e| e.to_string())? {
                let payload = frame.payload();
                if payload.first_chunk::<4>().map(|c| i32::from_be_bytes(*c))
                    != Some(CORRELATION_ID)
                {
                    return Err("the broker answered another correlation id".to_string());
                }
                return metadata_topic_ids(&payload, METADATA_BY_ID_VERSION)
                    .map_err(|e| e.to_string());
            }
        }
    };
    let pairs = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    // Only what was asked: a broker cannot slip other ids in through this answer.
    let pairs: Vec<_> = pairs
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .collect();
    let n = pairs.len();
    ctx.shared
        .kafka_topic_ids
        .learn(super::broker_scope(ctx), pairs);
    Ok(n)
}
