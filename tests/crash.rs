//! `kill -9` of a running `miroir run` mid-stream: after a restart on the same state, the
//! tables (internal ones over HTTP, external ones in PostgreSQL) equal the reference
//! evaluation of every event, with no double effect; then SIGTERM stops it cleanly.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use support::*;

/// Every row of `table` over HTTP, page by page (empty while the instance does not answer).
fn http_table(port: u16, t: &TestTopology, table: &str) -> BTreeMap<String, serde_json::Value> {
    let plan = t.topology.table(table).unwrap();
    let client = reqwest::blocking::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/tables/{table}/rows");
    let mut rows = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut query = vec![("limit", "10000".to_string())];
        query.extend(after.map(|a| ("after", a)));
        let page = client.get(&url).query(&query).send();
        let Ok(body) = page.and_then(|p| p.json::<serde_json::Value>()) else {
            return BTreeMap::new();
        };
        for r in body["rows"].as_array().into_iter().flatten() {
            rows.insert(json_key(r, plan), r.clone());
        }
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return rows,
        }
    }
}

#[test]
fn kill_9_mid_stream_then_restart_has_no_double_effect() {
    let run = Run::new("crash");
    // Two operations kept per key of the generator's three: keys forget one now and then,
    // also across the crash, and the reference replays that too.
    let t = with_max_operations(user_directory(&run), 2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let state = dir.path().join("state");
    let (events, _) = generate(11, 400, 9000);
    let third = events.len() / 3;
    publish(&t, &events[..third]);

    let port = free_port();
    let first_log = dir.path().join("first.log");
    let mut child = spawn(&file, &state, port, &first_log);
    // Publish the second third while it runs, and kill it in the middle of that stream.
    let chunks: Vec<_> = events[third..2 * third].chunks(300).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        publish(&t, chunk);
        std::thread::sleep(Duration::from_millis(60));
        if i == chunks.len() / 2 {
            // Make sure the kill lands while it is applying: rows are served already.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while http_table(port, &t, "user_contacts").is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "miroir never served a row"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();

    publish(&t, &events[2 * third..]);
    let port = free_port();
    let second_log = dir.path().join("second.log");
    let mut child = spawn(&file, &state, port, &second_log);
    let expected = expected_tables(&t.topology, &events);
    let mut db = pg();
    let caught_up = try_wait_for_tables(&expected, Duration::from_secs(180), |name| {
        if t.topology.table(name).unwrap().postgres().is_some() {
            pg_table(&mut db, &t.topology, name).unwrap_or_default()
        } else {
            http_table(port, &t, name)
        }
    });
    if let Err(e) = caught_up {
        let _ = child.kill();
        let tail = |p: &std::path::Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        panic!(
            "{e}\n--- killed instance log (tail):\n{}\n--- restarted instance log (tail):\n{}",
            tail(&first_log),
            tail(&second_log)
        );
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "SIGTERM must commit and exit cleanly, got {exit:?}"
    );
}
