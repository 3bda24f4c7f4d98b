//! Declared checks under `miroir run`: a master whose `update_email` asks an HTTP service
//! before applying. The service's 4xx is a rejection with its message; its 503 and its
//! silence past the timeout are technical failures, retried, then parked; once it recovers,
//! `miroir dlq replay` applies the parked commands in order and skips those whose user moved
//! on; `miroir_command_dead_letters_pending` and `miroir dlq list` follow what is pending.

mod support;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Json;
use miroir::commands::Principal;
use serde_json::json;
use support::cluster::*;
use support::*;

/// How the fake service answers.
const UP: u8 = 0;
const DOWN: u8 = 1;
const SLOW: u8 = 2;

/// The fake service: its mode and how many checks it got.
#[derive(Default)]
struct Service {
    mode: AtomicU8,
    asked: AtomicUsize,
}

/// Serves `service` on a port of 127.0.0.1 from a thread of its own; returns the port.
fn serve(service: Arc<Service>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/check",
                axum::routing::post(move |Json(body): Json<serde_json::Value>| {
                    let service = service.clone();
                    async move { answer(&service, &body).await }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    port
}

async fn answer(service: &Service, body: &serde_json::Value) -> (StatusCode, String) {
    service.asked.fetch_add(1, Ordering::SeqCst);
    assert_eq!(body["command"], "UpdateUserEmail", "{body}");
    if body["payload"]["email"] == "taken@x.org" {
        let said =
            json!({"code": "email_taken", "field": "email", "message": "used by another system"});
        return (StatusCode::CONFLICT, said.to_string());
    }
    match service.mode.load(Ordering::SeqCst) {
        DOWN => (StatusCode::SERVICE_UNAVAILABLE, "maintenance".into()),
        SLOW => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            (StatusCode::OK, String::new())
        }
        _ => (StatusCode::OK, String::new()),
    }
}

fn miroir(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args(args)
        .env("MIROIR_BROKERS", brokers())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_failing_check_parks_commands_and_a_replay_applies_them_in_order() {
    let run = Run::new("cmd-check");
    let service = Arc::new(Service::default());
    let port = serve(service.clone());
    let m = user_referential(&run);
    let retry = "retry = { attempts = 5, backoff = \"100ms\", max_backoff = \"2s\" }";
    assert!(m.text.contains(retry), "the master's retry line moved");
    let text = m.text.replace(
        retry,
        &format!(
            "retry = {{ attempts = 2, backoff = \"50ms\", max_backoff = \"50ms\" }}\n\
             check = {{ url = \"http://127.0.0.1:{port}/check\", timeout = \"500ms\" }}"
        ),
    );
    seed_users(&m.user_topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("master.toml");
    std::fs::write(&file, &text).unwrap();
    let master = start_verifying(dir.path(), &file, "master");
    let http = reqwest::blocking::Client::new();
    let pending = || {
        counter(
            &metrics(&http, master.port),
            "miroir_command_dead_letters_pending",
            "command=\"update_email\"",
        )
    };
    wait_until("the master is up", Duration::from_secs(60), || {
        get(&http, master.port, "/ready").0 == 200
    });

    let token = token_for(&Principal {
        id: "alice".into(),
        roles: vec!["user-admin".into()],
    });
    let file = file.to_str().unwrap();
    let send = |id: &str, email: &str| {
        let json = json!({"id": id, "email": email}).to_string();
        let (code, stdout, stderr) = miroir(&[
            "command",
            "send",
            file,
            "update_email",
            "--json",
            &json,
            "--token",
            &token,
        ]);
        let reply: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|_| panic!("no reply ({code:?}): {stderr}"));
        reply
    };

    // The service's business answer.
    let reply = send("u-0", "taken@x.org");
    assert_eq!(
        (
            &reply["outcome"],
            &reply["code"],
            &reply["field"],
            &reply["message"]
        ),
        (
            &json!("rejected"),
            &json!("email_taken"),
            &json!("email"),
            &json!("used by another system")
        ),
        "{reply}"
    );
    // Down, then too slow: retried, then parked.
    service.mode.store(DOWN, Ordering::SeqCst);
    let asked = service.asked.load(Ordering::SeqCst);
    let reply = send("u-0", "first@x.org");
    assert_eq!(reply["outcome"], "deferred", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("503"),
        "{reply}"
    );
    assert_eq!(
        service.asked.load(Ordering::SeqCst) - asked,
        2,
        "two attempts"
    );
    assert_eq!(send("u-1", "second@x.org")["outcome"], "deferred");
    service.mode.store(SLOW, Ordering::SeqCst);
    let reply = send("u-0", "third@x.org");
    assert_eq!(reply["outcome"], "deferred", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("no answer in time"),
        "{reply}"
    );
    wait_until(
        "three pending dead letters",
        Duration::from_secs(30),
        || pending() == 3,
    );
    let (code, _, stderr) = miroir(&["dlq", "list", &m.command_topic]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("3 parked command(s)"), "{stderr}");

    // Recovered: u-1 changes meanwhile, so its parked command is stale.
    service.mode.store(UP, Ordering::SeqCst);
    assert_eq!(send("u-1", "fresh@x.org")["outcome"], "accepted");
    let operator = token_for(&Principal {
        id: "ops".into(),
        roles: vec!["miroir-operator".into()],
    });
    let replay_all = || {
        let (code, stdout, stderr) = miroir(&[
            "dlq",
            "replay",
            &m.command_topic,
            "--all",
            "--token",
            &operator,
        ]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        stdout
    };
    let stdout = replay_all();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("applied") && lines[0].contains("key=u-0"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("skipped") && lines[1].contains("key=u-1"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("skipped") && lines[2].contains("key=u-0"),
        "parked at the version the first replay moved on: {stdout}"
    );
    wait_until("nothing pending", Duration::from_secs(30), || {
        pending() == 0
    });
    let (_, _, stderr) = miroir(&["dlq", "list", &m.command_topic]);
    assert!(
        stderr.contains("0 parked command(s)") && stderr.contains("3 more resolved"),
        "{stderr}"
    );
    let stdout = replay_all();
    assert!(stdout.contains("replayed 0 of 0"), "{stdout}");

    let row = |id: &str| {
        let (_, answer) = http_get_as(&http, master.port, &row_path("users_by_id", id), &token);
        answer["row"]["email"].clone()
    };
    wait_until(
        "the replayed change is read",
        Duration::from_secs(30),
        || row("u-0") == "first@x.org",
    );
    assert_eq!(row("u-1"), "fresh@x.org");
}

/// [`get`] with a bearer token.
fn http_get_as(
    http: &reqwest::blocking::Client,
    port: u16,
    path: &str,
    token: &str,
) -> (u16, serde_json::Value) {
    match http
        .get(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(token)
        .send()
    {
        Ok(r) => (r.status().as_u16(), r.json().unwrap_or_default()),
        Err(_) => (0, serde_json::Value::Null),
    }
}
