//! `weir policy explain` without `--policy`: the running weir decides
//! (`Policy.Explain`), against the policy and endpoints it enforces, and the
//! answer prints exactly as the offline one does.

use std::process::ExitCode;

use super::{ExplainArgs, Output, Proto, Query};
use crate::api::client::{connect_channel, status_error};
use crate::api::pb;

/// The protocol as the API names it.
pub fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
        Proto::Icmp => "ICMP",
    }
}

pub fn parse_proto(s: &str) -> Option<Proto> {
    match s.to_ascii_uppercase().as_str() {
        "" | "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "ICMP" => Some(Proto::Icmp),
        _ => None,
    }
}

pub fn request(q: &Query) -> pb::ExplainRequest {
    pb::ExplainRequest {
        from: q.from.clone(),
        to: q.to.clone(),
        port: q.port.clone(),
        protocol: proto_name(q.proto).into(),
        http: q.http.clone().unwrap_or_default(),
        host: q.host.clone().unwrap_or_default(),
        headers: q.headers.clone(),
        dns: q.dns.clone().unwrap_or_default(),
        kafka: q.kafka.clone().unwrap_or_default(),
    }
}

/// The question a request asks; `Err` names the field that does not parse.
pub fn query(r: pb::ExplainRequest) -> Result<Query, String> {
    let proto = parse_proto(&r.protocol)
        .ok_or_else(|| format!("protocol `{}` is not TCP, UDP or ICMP", r.protocol))?;
    let given = |s: String| Some(s).filter(|s| !s.is_empty());
    if r.from.is_empty() || r.to.is_empty() || r.port.is_empty() {
        return Err("from, to and port are required".into());
    }
    Ok(Query {
        from: r.from,
        to: r.to,
        port: r.port,
        proto,
        http: given(r.http),
        host: given(r.host),
        headers: r.headers,
        dns: given(r.dns),
        kafka: given(r.kafka),
    })
}

pub fn main(args: &ExplainArgs) -> ExitCode {
    let cluster = &args.cluster;
    if !cluster.cluster_cidr.is_empty()
        || !cluster.remote_node_cidr.is_empty()
        || !cluster.kube_apiserver.is_empty()
    {
        eprintln!(
            "weir policy explain: the cluster's ranges are the running weir's own; give them only with --policy"
        );
        return ExitCode::from(2);
    }
    let asked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let channel = connect_channel(&args.api_socket).await?;
                pb::policy_client::PolicyClient::new(channel)
                    .explain(request(&args.query()))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(status_error)
            })
        });
    let answer = match asked {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weir policy explain: {e:#}");
            return ExitCode::from(2);
        }
    };
    match args.output {
        Output::Text => print!("{}", answer.text),
        Output::Json => println!("{}", answer.json),
    }
    if answer.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_goes_over_the_api_unchanged() {
        let q = Query {
            from: "tiefighter".into(),
            to: "deathstar".into(),
            port: "80".into(),
            proto: Proto::Tcp,
            http: Some("POST /v1/request-landing".into()),
            host: None,
            headers: vec!["X-Has-Force: true".into()],
            dns: None,
            kafka: Some("produce:9:app:orders".into()),
        };
        let back = query(request(&q)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{q:?}"));
        let udp = pb::ExplainRequest {
            protocol: "udp".into(),
            ..request(&q)
        };
        assert_eq!(query(udp).unwrap().proto, Proto::Udp);
        for bad in [
            pb::ExplainRequest {
                protocol: "SCTP".into(),
                ..request(&q)
            },
            pb::ExplainRequest {
                from: String::new(),
                ..request(&q)
            },
        ] {
            assert!(query(bad).is_err());
        }
    }
}
