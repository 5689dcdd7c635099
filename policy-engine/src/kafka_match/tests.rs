use proptest::prelude::*;

use super::*;

fn spec(
    owner: u32,
    keys: Option<&[i16]>,
    v: Option<i16>,
    c: Option<&str>,
    t: Option<&str>,
) -> KafkaRuleSpec {
    KafkaRuleSpec {
        owner,
        api_keys: keys.map(<[i16]>::to_vec),
        api_version: v,
        client_id: c.map(str::to_string),
        topic: t.map(str::to_string),
    }
}

fn req<'a>(key: i16, v: i16, c: Option<&'a str>, topics: KafkaTopics<'a>) -> KafkaRequest<'a> {
    KafkaRequest {
        api_key: key,
        api_version: v,
        client_id: c,
        topics,
    }
}

#[test]
fn api_key_names_and_numbers() {
    for (text, key) in [
        ("produce", 0),
        ("Produce", 0),
        ("FETCH", 1),
        ("listoffsets", 2),
        ("offsets", 2),
        ("ApiVersions", 18),
        ("api_versions", 18),
        ("saslhandshake", 17),
        ("createtopics", 19),
        ("ConsumerGroupHeartbeat", 68),
        ("0", 0),
        ("92", 92),
        ("1000", 1000),
    ] {
        assert_eq!(parse_api_key(text), Ok(key), "{text}");
    }
    for bad in ["", "produces", "-1", "api versions!", "99999"] {
        assert!(parse_api_key(bad).is_err(), "{bad}");
    }
    assert_eq!(api_key_name(2), Some("listoffsets"));
    assert_eq!(role_keys("Produce"), Ok(PRODUCE_KEYS));
    assert!(role_keys("admin").is_err());
}

#[test]
fn topic_names_follow_kafka() {
    assert!(validate_topic("orders.v1_eu-west").is_ok());
    assert!(validate_topic(&"a".repeat(249)).is_ok());
    assert!(validate_topic(&"a".repeat(250)).is_err());
    assert!(validate_topic("").is_err());
    assert!(validate_topic("a b").is_err());
    assert!(validate_topic("a/b").is_err());
    assert!(validate_topic("é").is_err());
}

#[test]
fn table() {
    let produce = Some(PRODUCE_KEYS);
    let rules = KafkaMatcher::new(vec![
        // 0: produce to `a` by client `app`
        spec(0, produce, None, Some("app"), Some("a")),
        // 1: produce to `b` by anyone
        spec(0, produce, None, None, Some("b")),
        // 2: Fetch v12 only, any topic
        spec(0, Some(&[1]), Some(12), None, None),
        // 3: another entry's rule: metadata on `c`
        spec(1, Some(&[3]), None, None, Some("c")),
    ]);
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ab = names(&["a", "b"]);
    let a = names(&["a"]);
    let b = names(&["b"]);
    let ac = names(&["a", "c"]);
    let x = names(&["x"]);
    let c = names(&["c"]);
    let all = |_: u32| true;
    type Row<'a> = (KafkaRequest<'a>, Result<Vec<u32>, KafkaDenial>);
    let rows: Vec<Row<'_>> = vec![
        (req(0, 9, Some("app"), KafkaTopics::Names(&a)), Ok(vec![0])),
        (
            req(0, 9, Some("other"), KafkaTopics::Names(&a)),
            Err(KafkaDenial::Topic("a".into())),
        ),
        (req(0, 9, None, KafkaTopics::Names(&b)), Ok(vec![1])),
        // Several topics, each allowed by a different rule.
        (
            req(0, 9, Some("app"), KafkaTopics::Names(&ab)),
            Ok(vec![0, 1]),
        ),
        // One of them denied: the whole request is.
        (
            req(0, 9, None, KafkaTopics::Names(&ab)),
            Err(KafkaDenial::Topic("a".into())),
        ),
        (
            req(3, 12, Some("app"), KafkaTopics::Names(&ac)),
            Ok(vec![0, 3]),
        ),
        (
            req(0, 9, Some("app"), KafkaTopics::Names(&x)),
            Err(KafkaDenial::Topic("x".into())),
        ),
        // No topics (ApiVersions): topic constraints do not apply.
        (req(18, 3, None, KafkaTopics::Names(&[])), Ok(vec![1])),
        // All topics: any matching rule allows; the proxy filters the answer.
        (req(3, 12, None, KafkaTopics::All), Ok(vec![1])),
        // Fetch: only v12.
        (req(1, 12, None, KafkaTopics::Names(&x)), Ok(vec![2])),
        (
            req(1, 13, None, KafkaTopics::Names(&x)),
            Err(KafkaDenial::NoRule),
        ),
        (req(1, 12, None, KafkaTopics::Undecodable), Ok(vec![2])),
        // Produce with a body weir cannot decode: every produce rule needs a topic.
        (
            req(0, 2, Some("app"), KafkaTopics::Undecodable),
            Err(KafkaDenial::UnsupportedVersionForTopicRule),
        ),
        (
            req(12, 4, None, KafkaTopics::Names(&[])),
            Err(KafkaDenial::NoRule),
        ),
        (req(3, 1, None, KafkaTopics::Names(&c)), Ok(vec![3])),
        // A topic id nobody resolved: only a rule without topic allows it.
        (
            req(0, 13, Some("app"), KafkaTopics::UnknownTopicId),
            Err(KafkaDenial::UnknownTopicId),
        ),
        (req(1, 12, None, KafkaTopics::UnknownTopicId), Ok(vec![2])),
        // A fetch session opened elsewhere: only a rule without topic allows it.
        (
            req(1, 12, None, KafkaTopics::UnknownFetchSession),
            Ok(vec![2]),
        ),
        (
            req(0, 9, Some("app"), KafkaTopics::UnknownFetchSession),
            Err(KafkaDenial::UnknownFetchSession),
        ),
    ];
    for (i, (r, want)) in rows.iter().enumerate() {
        assert_eq!(&rules.evaluate(r, all), want, "row {i}: {r:?}");
    }
    // Owners filter: without entry 1, topic `c` is not allowed.
    assert_eq!(
        rules.evaluate(&req(3, 1, None, KafkaTopics::Names(&c)), |o| o == 0),
        Err(KafkaDenial::Topic("c".into()))
    );
}

fn arb_rule() -> impl Strategy<Value = KafkaRuleSpec> {
    (
        prop::option::of(prop::collection::vec(0i16..6, 1..3)),
        prop::option::of(0i16..3),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::option::of(prop::sample::select(vec!["t1", "t2", "t3"])),
    )
        .prop_map(|(keys, v, c, t)| {
            let keys = keys.map(|mut k| {
                k.sort_unstable();
                k.dedup();
                k
            });
            KafkaRuleSpec {
                owner: 0,
                api_keys: keys,
                api_version: v,
                client_id: c.map(str::to_string),
                topic: t.map(str::to_string),
            }
        })
}

proptest! {
    /// The matcher agrees with the rule's definition: a request is allowed exactly when
    /// every topic it names is allowed by some rule matching the rest of it, and the
    /// rules it reports are such rules.
    #[test]
    fn matches_the_definition(
        rules in prop::collection::vec(arb_rule(), 0..6),
        key in 0i16..6,
        version in 0i16..3,
        client in prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        topics in prop::collection::vec(prop::sample::select(vec!["t1", "t2", "t3", "t4"]), 0..4),
    ) {
        let topics: Vec<String> = topics.into_iter().map(str::to_string).collect();
        let m = KafkaMatcher::new(rules.clone());
        let r = req(key, version, client, KafkaTopics::Names(&topics));
        let base = |s: &KafkaRuleSpec| {
            s.api_keys.as_ref().is_none_or(|k| k.contains(&key))
                && s.api_version.is_none_or(|v| v == version)
                && s.client_id.as_deref().is_none_or(|c| Some(c) == client)
        };
        let allows_topic = |s: &KafkaRuleSpec, t: &str| base(s) && s.topic.as_deref().is_none_or(|x| x == t);
        let expect = rules.iter().any(base)
            && topics.iter().all(|t| rules.iter().any(|s| allows_topic(s, t)));
        let got = m.evaluate(&r, |_| true);
        prop_assert_eq!(got.is_ok(), expect);
        if let Ok(ids) = got {
            prop_assert!(!ids.is_empty());
            for i in &ids {
                prop_assert!(base(&rules[*i as usize]));
            }
            for t in &topics {
                prop_assert!(ids.iter().any(|i| allows_topic(&rules[*i as usize], t)));
            }
        }
    }
}
