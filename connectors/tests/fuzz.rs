//! Fuzzing of the command headers: a command record with any headers (known names with
//! values of every shape, unknown names, bytes that are not UTF-8), any key and any payload
//! is read, decided or answered, never a panic.
//!
//! `MIROIR_FUZZ_CASES` inputs (default 2,000); docs/reliability.md gives the long run:
//!
//! ```sh
//! MIROIR_FUZZ_CASES=1000000 cargo test -p miroir-connectors --test fuzz -- --nocapture
//! ```

use miroir_connectors::commands::wire::{answer_until, header, CommandHeaders};
use miroir_engine::auth::{AuthConfig, Authenticator, KeySource};
use miroir_engine::topology::Topology;
use miroir_engine::value::Value;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::Timestamp;

fn cases() -> u32 {
    std::env::var("MIROIR_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

const NAMES: &[&str] = &[
    header::COMMAND_ID,
    header::CORRELATION_ID,
    header::REPLY_TO,
    header::DEADLINE,
    header::PRINCIPAL,
    header::ROLES,
    header::TOKEN,
    header::COMMAND_TYPE,
    header::SCHEMA_VERSION,
    header::PARKED_VERSION,
    header::ANSWER_UNTIL,
    "miroir-unknown",
    "",
];

/// A header value: the shapes each header is read as, and the ones it should not be.
fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    let text = prop_oneof![
        prop::sample::select(vec![
            "UpdateUserEmail",
            "user-admin",
            "user-admin,,x",
            "alice",
            "",
            "1",
            "0",
            "-1",
            "2",
            "9223372036854775807",
            "-9223372036854775808",
            "99999999999999999999",
            "1e3",
            " 5",
            "NaN",
            "\u{0}",
            "é",
            ",",
            "miroir.reply.x",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        any::<i64>().prop_map(|i| i.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    proptest::option::weighted(0.9, text)
}

/// A payload: JSON objects of the command's fields with values of every type, or bytes.
fn payload() -> impl Strategy<Value = Option<Vec<u8>>> {
    let scalar = prop::sample::select(vec![
        "null",
        "\"u-1\"",
        "\"a@b.co\"",
        "\" x@y.z \"",
        "\"\"",
        "1",
        "1e400",
        "true",
        "[]",
        "{}",
        "\"\\u0000\"",
        "\"\\ud800\"",
    ]);
    let object = proptest::collection::vec(
        (prop::sample::select(vec!["id", "email", "other"]), scalar),
        0..4,
    )
    .prop_map(|fields| {
        let fields: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", fields.join(",")).into_bytes()
    });
    let command = prop::sample::select(vec!["\"a@b.co\"", "\" X@Y.Z \"", "\"bad\"", "null", "1"])
        .prop_map(|email| format!("{{\"id\":\"u-1\",\"email\":{email}}}").into_bytes());
    proptest::option::weighted(
        0.95,
        prop_oneof![4 => command, 2 => object, 1 => proptest::collection::vec(any::<u8>(), 0..32)],
    )
}

fn message() -> impl Strategy<Value = OwnedMessage> {
    (
        proptest::collection::vec((prop::sample::select(NAMES.to_vec()), value()), 0..8),
        proptest::option::of(prop_oneof![
            Just(b"u-1".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..6)
        ]),
        payload(),
    )
        .prop_map(|(mut headers, key, payload)| {
            // Most records carry a well-formed command first: the odd headers then reach past
            // the first checks (a header read once takes its first value).
            if headers.len() % 4 != 0 {
                let good = [
                    (header::COMMAND_TYPE, "UpdateUserEmail"),
                    (header::PRINCIPAL, "alice"),
                    (header::ROLES, "user-admin"),
                ];
                let good = good.iter().map(|(n, v)| (*n, Some(v.as_bytes().to_vec())));
                headers.splice(0..0, good);
            }
            let mut owned = OwnedHeaders::new();
            for (name, value) in &headers {
                owned = owned.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            OwnedMessage::new(
                payload,
                key,
                "user.cmd.update-email".into(),
                Timestamp::CreateTime(1_700_000_000_000),
                0,
                0,
                Some(owned),
            )
        })
}

#[test]
fn command_headers_never_panic() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/user-referential.toml"
    );
    let topology = Topology::load(std::path::Path::new(path)).unwrap();
    let spec = &topology.commands[0];
    let entity = &topology.sources[spec.entity];
    let current: Vec<Value> = entity
        .columns
        .iter()
        .map(|c| match c.name.as_str() {
            "id" => Value::Text("u-1".into()),
            "version" => Value::Int(i64::MAX),
            "active" => Value::Bool(true),
            _ => Value::Null,
        })
        .collect();
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    // Tokens are verified (any token header is garbage here), and a claimed principal is
    // believed, so that commands reach the decision.
    let auth = Authenticator::new(AuthConfig {
        keys: Some(KeySource::Secret(b"fuzz".to_vec())),
        trust_principal_headers: true,
        ..AuthConfig::default()
    })
    .unwrap();
    let started = std::time::Instant::now();
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    TestRunner::new(config)
        .run(&message(), |m| {
            let _ = answer_until(&m);
            let headers = CommandHeaders::read(&m);
            let _ = headers.deadline_ms();
            let _ = headers.to_owned_headers();
            let key = rdkafka::Message::key(&m).and_then(|k| std::str::from_utf8(k).ok());
            let envelope = headers.envelope(key, rdkafka::Message::payload(&m));
            match spec.read(&envelope, &auth) {
                Ok(command) => {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = headers.entity_event(i64::MAX, &command, i64::MAX);
                    for row in [None, Some(current.as_slice())] {
                        let _ = spec.decide(entity, &command.request(), row, i64::MAX);
                        let _ = spec.decide(entity, &command.request(), row, i64::MIN);
                    }
                }
                Err(reply) => {
                    serde_json::to_vec(&reply).unwrap();
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "fuzz command headers: {} inputs ({} read as commands), no panic, {:.1?}",
        cases(),
        accepted.into_inner(),
        started.elapsed()
    );
}
