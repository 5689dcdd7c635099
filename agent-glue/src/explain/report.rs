//! What `weir policy explain` says about one decision, as text or JSON.

use std::fmt::Write as _;

use serde::Serialize;
use weir_policy::kafka_match::KafkaDenial;
use weir_policy::model::{DnsSelector, HttpRule, KafkaRule};
use weir_policy::{CompiledPolicy, ConnectionVerdict, PeerInfo, Policy, RuleRef, Verdict};

#[derive(Debug, Serialize)]
pub struct Report {
    /// `ALLOWED` or `DENIED`.
    pub verdict: &'static str,
    /// `L3/L4` or `HTTP`: where the decision was taken.
    pub layer: &'static str,
    /// One line: the deciding rules, or why nothing matched.
    pub reason: String,
    /// The rules that decided (allowing rules, or the deny rule).
    pub rules: Vec<RuleJson>,
    /// When denied: the direction whose policy had no matching rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_in: Option<String>,
    /// Allowed at L3/L4 with no request given: the HTTP rules each request must
    /// match (one of each direction's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_rules: Vec<HttpRuleJson>,
    /// Allowed at L3/L4 with no query given: the DNS rules each query must
    /// match (one of each direction's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_rules: Vec<HttpRuleJson>,
    /// Allowed at L3/L4 with no request given: the Kafka rules each request must
    /// be allowed by.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kafka_rules: Vec<HttpRuleJson>,
    /// The Kafka request decided (`--kafka`), as given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_request: Option<String>,
    /// The DNS query name decided (`--dns`), as policy compares it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_query: Option<String>,
    /// What `headerMatches` mismatch actions would do to the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub header_actions: Vec<String>,
    /// The request was malformed: the proxy answers 400 before policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_before_policy: Option<String>,
    pub source: PeerJson,
    pub destination: PeerJson,
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Serialize)]
pub struct RuleJson {
    pub policy: String,
    pub rule: String,
}

#[derive(Debug, Serialize)]
pub struct HttpRuleJson {
    pub direction: String,
    pub policy: String,
    pub rule: String,
    /// The rule's conditions as written (`method GET`, `path /v1/.*`, ...).
    pub matches: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PeerJson {
    pub ip: String,
    pub identity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn rule_json(r: &RuleRef) -> RuleJson {
    RuleJson {
        policy: r.policy.to_string(),
        rule: r.rule.to_string(),
    }
}

/// The L7 rules each request must match, per direction, with their conditions as
/// `describe` words them.
fn l7_rules_json<D: std::fmt::Display>(
    rules: Vec<(D, RuleRef)>,
    describe: impl Fn(&RuleRef) -> Vec<String>,
) -> Vec<HttpRuleJson> {
    rules
        .into_iter()
        .map(|(dir, r)| HttpRuleJson {
            direction: dir.to_string(),
            matches: describe(&r),
            policy: r.policy.to_string(),
            rule: r.rule.to_string(),
        })
        .collect()
}

fn peer_json(p: &PeerInfo, policy: &CompiledPolicy) -> PeerJson {
    PeerJson {
        ip: p.ip.to_string(),
        identity: p.identity,
        endpoint: p
            .endpoint
            .and_then(|i| policy.endpoints().get(i))
            .map(|e| e.endpoint.name.clone()),
    }
}

impl Report {
    pub fn new(
        cv: &ConnectionVerdict,
        verdict: &Verdict,
        compiled: &CompiledPolicy,
        policies: &[Policy],
        request_given: bool,
    ) -> Report {
        let http_rules = if cv.l4_allowed() && cv.needs_l7() && !request_given {
            l7_rules_json(cv.http_rules(compiled), |r| {
                find_http_rule(policies, r)
                    .map(describe_http_rule)
                    .unwrap_or_default()
            })
        } else {
            Vec::new()
        };
        Report {
            verdict: if verdict.allowed { "ALLOWED" } else { "DENIED" },
            layer: if verdict.l7 { "HTTP" } else { "L3/L4" },
            reason: verdict.reason(),
            rules: verdict.rules.iter().map(rule_json).collect(),
            denied_in: verdict.denied_in.map(|d| d.to_string()),
            http_rules,
            dns_rules: Vec::new(),
            kafka_rules: Vec::new(),
            kafka_request: None,
            dns_query: None,
            header_actions: Vec::new(),
            rejected_before_policy: None,
            source: peer_json(&cv.src, compiled),
            destination: peer_json(&cv.dst, compiled),
            protocol: cv.protocol.to_string(),
            port: cv.port,
        }
    }

    /// The DNS side of the report: with `query`, the verdict was taken on that
    /// query (`layer` DNS when the DNS rules decided); without one, the DNS
    /// rules each query must match are listed.
    pub fn with_dns(
        mut self,
        cv: &ConnectionVerdict,
        verdict: &Verdict,
        compiled: &CompiledPolicy,
        policies: &[Policy],
        query: Option<&str>,
    ) -> Report {
        if verdict.l7 {
            self.layer = "DNS";
            self.reason = verdict.reason_for("DNS");
        }
        match query {
            Some(q) => self.dns_query = Some(weir_policy::dns_match::normalize_name(q)),
            None if cv.l4_allowed() && cv.needs_dns() => {
                self.dns_rules = l7_rules_json(cv.dns_rules(compiled), |r| {
                    find_dns_rule(policies, r)
                        .map(|s| vec![s.to_string()])
                        .unwrap_or_default()
                });
            }
            None => {}
        }
        self
    }

    /// The Kafka side of the report: with `request`, the verdict was taken on it
    /// (`layer` Kafka when Kafka rules decided, and why they denied); without one,
    /// the Kafka rules each request must be allowed by are listed.
    pub fn with_kafka(
        mut self,
        cv: &ConnectionVerdict,
        (verdict, denial): (&Verdict, Option<&KafkaDenial>),
        compiled: &CompiledPolicy,
        policies: &[Policy],
        request: Option<&str>,
    ) -> Report {
        if verdict.l7 && request.is_some() {
            self.layer = "Kafka";
            self.reason = verdict.reason_for("Kafka");
            if let Some(why) = denial {
                self.reason = format!("{}: {why}", self.reason);
            }
        }
        match request {
            Some(r) => self.kafka_request = Some(r.to_string()),
            None if cv.l4_allowed() && cv.needs_kafka() => {
                self.kafka_rules = l7_rules_json(cv.kafka_rules(compiled), |r| {
                    find_kafka_rule(policies, r)
                        .map(describe_kafka_rule)
                        .unwrap_or_default()
                });
            }
            None => {}
        }
        self
    }

    /// A request the proxy refuses (400) before policy sees it.
    pub fn rejected(mut self, why: String) -> Report {
        self.verdict = "DENIED";
        self.layer = "HTTP";
        self.reason = format!("the proxy answers 400 before policy: {why}");
        self.rules.clear();
        self.denied_in = None;
        self.rejected_before_policy = Some(why);
        self
    }

    pub fn allowed(&self) -> bool {
        self.verdict == "ALLOWED"
    }

    /// "L3/L4 allowed; HTTP rules apply ...", then one line per rule.
    fn l7_rules_text(
        &self,
        out: &mut String,
        kind: &str,
        unit: &str,
        flag: &str,
        rules: &[HttpRuleJson],
    ) {
        let mut first = "L3/L4 allowed".to_string();
        if !self.rules.is_empty() {
            let _ = write!(first, " by {}", self.reason);
        }
        let _ = writeln!(
            out,
            "{first}; {kind} rules apply (each {unit} must match one of them; decide one with {flag}):"
        );
        for h in rules {
            let _ = write!(out, "  {}: {} {}", h.direction, h.policy, h.rule);
            if !h.matches.is_empty() {
                let _ = write!(out, ": {}", h.matches.join(", "));
            }
            out.push('\n');
        }
    }

    pub fn text(&self) -> String {
        let mut out = format!("{}\n", self.verdict);
        if !self.dns_rules.is_empty() {
            self.l7_rules_text(&mut out, "DNS", "query", "--dns", &self.dns_rules);
        } else if !self.kafka_rules.is_empty() {
            self.l7_rules_text(&mut out, "Kafka", "request", "--kafka", &self.kafka_rules);
        } else if self.http_rules.is_empty() {
            let _ = writeln!(out, "{}", self.reason);
        } else {
            self.l7_rules_text(&mut out, "HTTP", "request", "--http", &self.http_rules);
        }
        for a in &self.header_actions {
            let _ = writeln!(out, "{a}");
        }
        if self.verdict == "DENIED" && self.layer == "L3/L4" {
            out.push_str("(denied at L3/L4: the peer may not reach this port at all)\n");
        }
        out
    }
}

/// The rule a reference such as `specs[1].ingress[0].toPorts[2].rules.http[3]`
/// names, in the loaded policies.
pub fn find_http_rule<'p>(policies: &'p [Policy], r: &RuleRef) -> Option<&'p HttpRule> {
    let policy = policies
        .iter()
        .find(|p| p.qualified_name() == r.policy.as_ref())?;
    let (rule_label, rest) = r.rule.split_once('.')?;
    let rule = policy.rules.iter().find(|x| x.label == rule_label)?;
    let mut parts = rest.split('.');
    let (field, pi) = indexed(parts.next()?)?;
    let peers = match field {
        "ingress" => rule.ingress.as_ref()?,
        "egress" => rule.egress.as_ref()?,
        _ => return None,
    };
    let (_, ti) = indexed(parts.next()?).filter(|(f, _)| *f == "toPorts")?;
    (parts.next()? == "rules").then_some(())?;
    let (_, hi) = indexed(parts.next()?).filter(|(f, _)| *f == "http")?;
    peers.get(pi)?.to_ports.get(ti)?.http.as_ref()?.get(hi)
}

/// The DNS rule a reference such as `spec.egress[0].toPorts[0].rules.dns[1]`
/// names, in the loaded policies.
pub fn find_dns_rule<'p>(policies: &'p [Policy], r: &RuleRef) -> Option<&'p DnsSelector> {
    let policy = policies
        .iter()
        .find(|p| p.qualified_name() == r.policy.as_ref())?;
    let (rule_label, rest) = r.rule.split_once('.')?;
    let rule = policy.rules.iter().find(|x| x.label == rule_label)?;
    let mut parts = rest.split('.');
    let (field, pi) = indexed(parts.next()?)?;
    let peers = match field {
        "egress" => rule.egress.as_ref()?,
        _ => return None,
    };
    let (_, ti) = indexed(parts.next()?).filter(|(f, _)| *f == "toPorts")?;
    (parts.next()? == "rules").then_some(())?;
    let (_, di) = indexed(parts.next()?).filter(|(f, _)| *f == "dns")?;
    let d = peers.get(pi)?.to_ports.get(ti)?.dns.as_ref()?.get(di)?;
    Some(&d.value)
}

/// The Kafka rule a reference such as `spec.ingress[0].toPorts[0].rules.kafka[1]`
/// names, in the loaded policies.
pub fn find_kafka_rule<'p>(policies: &'p [Policy], r: &RuleRef) -> Option<&'p KafkaRule> {
    let policy = policies
        .iter()
        .find(|p| p.qualified_name() == r.policy.as_ref())?;
    let (rule_label, rest) = r.rule.split_once('.')?;
    let rule = policy.rules.iter().find(|x| x.label == rule_label)?;
    let mut parts = rest.split('.');
    let (field, pi) = indexed(parts.next()?)?;
    let peers = match field {
        "ingress" => rule.ingress.as_ref()?,
        "egress" => rule.egress.as_ref()?,
        _ => return None,
    };
    let (_, ti) = indexed(parts.next()?).filter(|(f, _)| *f == "toPorts")?;
    (parts.next()? == "rules").then_some(())?;
    let (_, ki) = indexed(parts.next()?).filter(|(f, _)| *f == "kafka")?;
    peers.get(pi)?.to_ports.get(ti)?.kafka.as_ref()?.get(ki)
}

/// A Kafka rule's conditions (API keys by name).
pub fn describe_kafka_rule(k: &KafkaRule) -> Vec<String> {
    use weir_policy::kafka_match::api_key_name;
    let mut out = Vec::new();
    if let Some(keys) = &k.api_keys {
        let names: Vec<String> = keys
            .iter()
            .map(|k| api_key_name(*k).map_or_else(|| k.to_string(), str::to_string))
            .collect();
        out.push(format!("apiKey {}", names.join("|")));
    }
    if let Some(v) = k.api_version {
        out.push(format!("apiVersion {v}"));
    }
    if let Some(c) = &k.client_id {
        out.push(format!("clientID {c}"));
    }
    if let Some(t) = &k.topic {
        out.push(format!("topic {t}"));
    }
    if out.is_empty() {
        out.push("any request".into());
    }
    out
}

/// `name[3]` → (`name`, 3).
fn indexed(part: &str) -> Option<(&str, usize)> {
    let (name, idx) = part.strip_suffix(']')?.split_once('[')?;
    Some((name, idx.parse().ok()?))
}

/// An HTTP rule's conditions, as the policy wrote them.
pub fn describe_http_rule(h: &HttpRule) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(m) = &h.method {
        out.push(format!("method {}", m.value));
    }
    if let Some(p) = &h.path {
        out.push(format!("path {}", p.value));
    }
    if let Some(host) = &h.host {
        out.push(format!("host {}", host.value));
    }
    for hd in &h.headers {
        let hd = &hd.value;
        let cond = match &hd.value {
            Some(v) => format!("header {}: {v}", hd.name),
            None => format!("header {} present", hd.name),
        };
        match hd.mismatch {
            None => out.push(cond),
            Some(action) => out.push(format!("{cond} (else {action})")),
        }
    }
    if out.is_empty() {
        out.push("any request".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SW: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: empire}
specs:
- endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: '80'}]
    - ports: [{port: '8080'}]
      rules:
        http:
        - {method: GET}
        - {method: POST, path: /v1/.*, headers: ['X-Has-Force']}
";

    #[test]
    fn finds_and_describes_the_rule_a_reference_names() {
        let policies = weir_policy::parse_policies(SW, "p.yaml").unwrap();
        let r = RuleRef {
            policy: "empire/rule1".into(),
            rule: "specs[0].ingress[0].toPorts[1].rules.http[1]".into(),
        };
        let h = find_http_rule(&policies, &r).unwrap();
        assert_eq!(
            describe_http_rule(h),
            ["method POST", "path /v1/.*", "header x-has-force present"]
        );
        for wrong in [
            "specs[0].ingress[0].toPorts[0].rules.http[0]",
            "specs[1].ingress[0].toPorts[1].rules.http[0]",
            "specs[0].egress[0].toPorts[1].rules.http[0]",
            "specs[0].ingress[0].toPorts[1].rules.http[9]",
            "specs[0].ingress[0]",
        ] {
            let r = RuleRef {
                policy: "empire/rule1".into(),
                rule: wrong.into(),
            };
            assert!(find_http_rule(&policies, &r).is_none(), "{wrong}");
        }
    }
}
