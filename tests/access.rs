//! Queries over HTTP with bearer tokens, across two `miroir run` processes verifying them:
//! without a valid token a query is refused (401), a table with `readers` needs one of its
//! roles (403 otherwise), and a query forwarded to the key's owner carries the caller's token,
//! which the owner checks too; a row filter serves each caller the rows it admits; no token
//! or secret reaches the logs.

mod support;

use std::collections::BTreeSet;

use miroir::commands::Principal;
use support::cluster::*;
use support::*;

/// `user_contacts` (any authenticated caller), a copy that only `support` may read, and one
/// whose rows each user sees their own of (`support` all).
fn topology(run: &str) -> TestTopology {
    let mut t = with_internal_table_only(user_directory(run));
    t.text.push_str(
        r#"
[tables.contacts_for_support]
query = "SELECT id, email FROM users WHERE email IS NOT NULL"
store = "internal"
readers = ["support"]

[tables.own_contact]
query = "SELECT id, email FROM users WHERE email IS NOT NULL"
store = "internal"
row_filter = "id = principal.id OR has_role('support')"
"#,
    );
    t.topology = miroir::miroir_engine::topology::Topology::parse("access.toml", &t.text)
        .expect("the test topology plans");
    t
}

/// The status of `path` on `port`, asked with `token` if any.
fn status(client: &reqwest::blocking::Client, port: u16, path: &str, token: Option<&str>) -> u16 {
    let mut request = client.get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().map_or(0, |r| r.status().as_u16())
}

#[test]
fn queries_need_a_token_and_a_reader_role_also_when_forwarded() {
    let run = Run::new("access");
    let t = topology(&run);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (events, _) = generate(31, 40, 400);
    publish(&t, &events);
    let instances: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|name| start_verifying(dir.path(), &file, name))
        .collect();
    let client = reqwest::blocking::Client::new();
    let user = token_for(&Principal {
        id: "ada".into(),
        roles: vec![],
    });
    let support = token_for(&Principal {
        id: "bob".into(),
        roles: vec!["support".into()],
    });

    // Every key of both tables, asked of both instances: half of them are forwarded to the
    // other instance, with the caller's token.
    let expected = expected_tables(&t.topology, &events);
    let keys: BTreeSet<String> = expected["user_contacts"].keys().cloned().collect();
    assert!(!keys.is_empty());
    let all: Vec<&Instance> = instances.iter().collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let row = |table: &str, key: &str| format!("/v1/tables/{table}/rows/{key}");
    let answers = |port: u16, table: &str, token: Option<&str>| -> BTreeSet<u16> {
        keys.iter()
            .map(|k| status(&client, port, &row(table, k), token))
            .collect()
    };
    loop {
        let served = all
            .iter()
            .all(|i| answers(i.port, "contacts_for_support", Some(&support)) == [200].into());
        if served {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never served: {}",
            instances[0].log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let garbage = "x.y.z";
    for i in &all {
        assert_eq!(answers(i.port, "user_contacts", Some(&user)), [200].into());
        assert_eq!(answers(i.port, "user_contacts", None), [401].into());
        assert_eq!(
            answers(i.port, "user_contacts", Some(garbage)),
            [401].into()
        );
        assert_eq!(
            answers(i.port, "contacts_for_support", Some(&user)),
            [403].into()
        );
        // Scans gather every instance's rows with the caller's token.
        let scan = "/v1/tables/contacts_for_support/rows?limit=1000";
        assert_eq!(status(&client, i.port, scan, Some(&support)), 200);
        assert_eq!(status(&client, i.port, scan, Some(&user)), 403);
        assert_eq!(status(&client, i.port, "/v1/topology", None), 401);
        assert_eq!(status(&client, i.port, "/v1/topology", Some(&user)), 200);
        // Health, readiness and metrics stay open.
        assert_eq!(status(&client, i.port, "/health", None), 200);
        assert_eq!(status(&client, i.port, "/metrics", None), 200);
    }
    // A row filter: a user is served their own row only, from either instance (forwarded or
    // not), and a scan gathers only theirs; support is served every row.
    let me = keys.iter().nth(keys.len() / 2).unwrap().clone();
    let own = token_for(&Principal {
        id: me.clone(),
        roles: vec![],
    });
    for i in &all {
        for key in &keys {
            let expected = if *key == me { 200 } else { 404 };
            let asked = status(&client, i.port, &row("own_contact", key), Some(&own));
            assert_eq!(asked, expected, "{key} asked by {me}");
            assert_eq!(
                status(&client, i.port, &row("own_contact", key), Some(&support)),
                200
            );
        }
        assert_eq!(status(&client, i.port, &row("own_contact", &me), None), 401);
        let scanned = |token: &str| -> Vec<String> {
            let page: serde_json::Value = client
                .get(format!(
                    "http://127.0.0.1:{}/v1/tables/own_contact/rows?limit=3",
                    i.port
                ))
                .bearer_auth(token)
                .send()
                .unwrap()
                .json()
                .unwrap();
            let rows = page["rows"].as_array().cloned().unwrap_or_default();
            rows.iter()
                .map(|r| r["id"].as_str().unwrap_or("").to_string())
                .collect()
        };
        // Read past the rows it may not see, even with a small limit.
        assert_eq!(scanned(&own), vec![me.clone()]);
        assert_eq!(scanned(&support).len(), 3);
    }

    // A query that says it was forwarded by another instance is not believed for it: without
    // the caller's token, the owner refuses it too.
    let key = keys.iter().next().unwrap();
    for i in &all {
        let forwarded = client
            .get(format!(
                "http://127.0.0.1:{}{}",
                i.port,
                row("user_contacts", key)
            ))
            .header("x-miroir-forwarded-by", "someone")
            .send()
            .map_or(0, |r| r.status().as_u16());
        assert_eq!(forwarded, 401);
    }
    // Refusals are logged with their reasons, never with a token or the secret.
    for i in &instances {
        let log = std::fs::read_to_string(&i.log).unwrap();
        assert!(log.contains("query refused"), "{}", i.log_tail());
        for secret in [user.as_str(), support.as_str(), TEST_SECRET] {
            assert!(!log.contains(secret), "a secret in {}", i.log.display());
        }
    }
}

#[test]
fn probes_and_metrics_can_have_an_address_of_their_own() {
    let run = Run::new("admin");
    let t = topology(&run);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    publish(&t, &generate(32, 5, 20).0);
    let (port, admin) = (free_port(), free_port());
    let admin_addr = format!("127.0.0.1:{admin}");
    let mut child = spawn_with_env(
        &file,
        &dir.path().join("state"),
        port,
        &dir.path().join("instance.log"),
        (&["--admin-listen", &admin_addr], &[]),
    );
    let client = reqwest::blocking::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while status(&client, admin, "/health", None) != 200 {
        assert!(std::time::Instant::now() < deadline, "never healthy");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(status(&client, admin, "/metrics", None), 200);
    assert_eq!(status(&client, admin, "/v1/topology", None), 404);
    assert_eq!(status(&client, port, "/health", None), 404);
    assert_eq!(status(&client, port, "/metrics", None), 404);
    assert_eq!(status(&client, port, "/v1/topology", None), 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn an_embedded_engine_asks_other_instances_with_its_callers_token() {
    let run = Run::new("access-embedded");
    let t = topology(&run);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (events, _) = generate(33, 40, 400);
    publish(&t, &events);
    let other = start_verifying(dir.path(), &file, "a");
    let engine = miroir::Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(dir.path().join("state-embedded"))
        .workers(2)
        .epoch_interval(std::time::Duration::from_millis(50))
        .auth(test_auth())
        .start()
        .unwrap();
    let token = token_for(&Principal {
        id: "bob".into(),
        roles: vec!["support".into()],
    });
    let expected = expected_tables(&t.topology, &events);
    let want = &expected["contacts_for_support"];
    // Every row, through the caller's token, wherever its partition is.
    wait_until(
        "every row through get_as",
        std::time::Duration::from_secs(120),
        || {
            want.iter().all(|(key, row)| {
                matches!(engine.get_as("contacts_for_support", key, &token),
                         Ok(Some(answer)) if answer.row == *row)
            })
        },
    );
    // Without a token, the rows of the other instance's partitions are refused by it, once
    // it owns some; the caller's token still reads every row.
    let refused = || {
        want.keys()
            .filter(|key| {
                matches!(
                    engine.get("contacts_for_support", key),
                    Err(miroir::QueryError::Refused(_))
                )
            })
            .count()
    };
    wait_until(
        "both own partitions: the other refuses queries without a token, this one answers",
        std::time::Duration::from_secs(120),
        || (1..want.len()).contains(&refused()),
    );
    assert!(other.log_tail().contains("query refused"));
    wait_until(
        "every row through get_as, the partitions shared",
        std::time::Duration::from_secs(120),
        || {
            want.iter().all(|(key, row)| {
                matches!(engine.get_as("contacts_for_support", key, &token),
                         Ok(Some(answer)) if answer.row == *row)
            })
        },
    );
    engine.shutdown();
}
