//! Encrypted and authenticated connections, against the local broker's SASL_SSL listener and
//! PostgreSQL's TLS (both set up by `scripts/services`): the demo flow (a master, an app
//! instance, a command sent from the CLI) over SASL_SSL with each mechanism; a wrong password
//! stops the instance with a clear error; external tables written over TLS, verified against
//! the local CA, by a role that may connect over TLS only, and by a writer role holding only
//! its documented grants; the HTTP API over TLS, queries forwarded over it; no password in
//! any log.

mod support;

use std::time::{Duration, Instant};

use miroir::commands::Principal;
use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::KafkaConfig;
use support::cluster::*;
use support::*;

/// The SASL_SSL listener of `scripts/services`, and its user.
const SASL_USER: &str = "miroir";
const SASL_PASSWORD: &str = "miroir-secret";

fn sasl_brokers() -> String {
    std::env::var("MIROIR_SASL_BROKERS")
        .expect("MIROIR_SASL_BROKERS is not set: run the tests with scripts/test")
}

/// The CA of the local servers' certificates.
fn local_ca() -> String {
    std::env::var("MIROIR_LOCAL_CA")
        .expect("MIROIR_LOCAL_CA is not set: run the tests with scripts/test")
}

/// librdkafka properties of a SASL_SSL client with `mechanism`, password apart.
fn sasl(mechanism: &str) -> Vec<(String, String)> {
    [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", mechanism),
        ("sasl.username", SASL_USER),
        ("ssl.ca.location", &local_ca()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `-X key=value` arguments for `properties`.
fn x_args(properties: &[(String, String)]) -> Vec<String> {
    properties
        .iter()
        .flat_map(|(k, v)| ["-X".to_string(), format!("{k}={v}")])
        .collect()
}

/// Waits until `child` exits (at most `limit`): its status, or `None` if it still runs.
fn exited(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn the_demo_flow_runs_over_sasl_ssl_with_each_mechanism() {
    let run = Run::new("sasl");
    let dir = tempfile::tempdir().unwrap();
    let m = user_referential(&run);
    let app = with_internal_table_only(user_directory(&run));
    // The entity topic and the departments', written over SASL_SSL with PLAIN.
    let plain = KafkaConfig {
        brokers: sasl_brokers(),
        extra: [
            sasl("PLAIN"),
            vec![("sasl.password".into(), SASL_PASSWORD.into())],
        ]
        .concat(),
    };
    create_topic(&plain, &m.user_topic, 4).unwrap();
    create_topic(&plain, &app.department_topic, 4).unwrap();
    let publisher = Publisher::new(&plain).unwrap();
    for i in 0..6 {
        let event = serde_json::json!({
            "id": format!("u-{i}"), "email": format!("user{i}@example.org"), "name": format!("User {i}"),
            "department_id": "d-1", "active": true, "version": 1, "event_type": "UserCreated",
        });
        let key = format!("u-{i}");
        publisher
            .send(
                &m.user_topic,
                key.as_bytes(),
                Some(event.to_string().as_bytes()),
            )
            .unwrap();
    }
    publisher.flush().unwrap();

    // The master: every property on the command line, SCRAM-SHA-512.
    let master_file = dir.path().join("master.toml");
    std::fs::write(&master_file, &m.text).unwrap();
    let master_x = x_args(
        &[
            sasl("SCRAM-SHA-512"),
            vec![("sasl.password".into(), SASL_PASSWORD.into())],
        ]
        .concat(),
    );
    let brokers = sasl_brokers();
    let mut master_args: Vec<&str> = vec!["--brokers", &brokers];
    master_args.extend(master_x.iter().map(String::as_str));
    let master_port = free_port();
    let master_log = dir.path().join("master.log");
    // Killed when dropped, also when the test fails.
    let master = Instance {
        child: spawn_with_env(
            &master_file,
            &dir.path().join("master-state"),
            master_port,
            &master_log,
            (&master_args, &[("MIROIR_AUTH_HS256_SECRET", TEST_SECRET)]),
        ),
        port: master_port,
        log: master_log.clone(),
    };

    // The app: the connection in the topology's [kafka] section, SCRAM-SHA-256, the password
    // in a --kafka-config file.
    let section: String = sasl("SCRAM-SHA-256")
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
        .collect();
    let app_text = app.text.replacen(
        "\n[sources.",
        &format!("\n[kafka]\n{section}\n[sources."),
        1,
    );
    let app_file = dir.path().join("app.toml");
    std::fs::write(&app_file, &app_text).unwrap();
    let secrets = dir.path().join("kafka.properties");
    std::fs::write(&secrets, format!("sasl.password={SASL_PASSWORD}\n")).unwrap();
    let app_port = free_port();
    let app_log = dir.path().join("app.log");
    let app_instance = Instance {
        child: spawn_with(
            &app_file,
            &dir.path().join("app-state"),
            app_port,
            &app_log,
            &[
                "--brokers",
                &brokers,
                "--kafka-config",
                secrets.to_str().unwrap(),
            ],
        ),
        port: app_port,
        log: app_log.clone(),
    };

    // The master verifies bearer tokens, of queries too.
    let token = token_for(&Principal {
        id: "alice".into(),
        roles: vec!["user-admin".into()],
    });
    let client = reqwest::blocking::Client::new();
    let row = |port: u16, table: &str| -> serde_json::Value {
        client
            .get(format!(
                "http://127.0.0.1:{port}/v1/tables/{table}/rows/u-1"
            ))
            .bearer_auth(&token)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_default()
    };
    let email = |port: u16, table: &str| {
        row(port, table)["row"]["email"]
            .as_str()
            .map(str::to_string)
    };
    wait_until("the app serves u-1", Duration::from_secs(90), || {
        email(app_port, "user_contacts").as_deref() == Some("user1@example.org")
    });
    wait_until("the master serves u-1", Duration::from_secs(90), || {
        email(master_port, "users_by_id").is_some()
    });

    // A command from the CLI, over SASL_SSL with PLAIN.
    let mut send = std::process::Command::new(env!("CARGO_BIN_EXE_miroir"));
    send.args([
        "command",
        "send",
        master_file.to_str().unwrap(),
        "update_email",
    ])
    .args(["--json", r#"{"id":"u-1","email":"Ada@Example.org"}"#])
    .args(["--timeout", "30s", "--brokers", &brokers])
    .args(x_args(
        &[
            sasl("PLAIN"),
            vec![("sasl.password".into(), SASL_PASSWORD.into())],
        ]
        .concat(),
    ))
    .env("MIROIR_TOKEN", &token);
    let sent = send.output().unwrap();
    let stdout = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success() && stdout.contains("accepted"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    wait_until(
        "the app sees the new email",
        Duration::from_secs(60),
        || email(app_port, "user_contacts").as_deref() == Some("ada@example.org"),
    );
    assert_eq!(
        row(master_port, "users_by_id")["row"]["changed_by"],
        "alice"
    );

    drop((master, app_instance));
    for log in [&master_log, &app_log] {
        let text = std::fs::read_to_string(log).unwrap();
        for secret in [SASL_PASSWORD, token.as_str(), TEST_SECRET] {
            assert!(!text.contains(secret), "a secret in {}", log.display());
        }
    }
}

#[test]
fn a_wrong_kafka_password_stops_the_instance_with_a_clear_error() {
    let run = Run::new("sasl-wrong");
    let dir = tempfile::tempdir().unwrap();
    let wrong = "not-the-password";
    let properties = [
        sasl("SCRAM-SHA-256"),
        vec![("sasl.password".into(), wrong.into())],
    ]
    .concat();
    let text = refused_start(&run, dir.path(), &properties, "authentication failed");
    assert!(!text.contains(wrong), "the password in the log");

    // The CLI too.
    let brokers = sasl_brokers();
    let x = x_args(&properties);
    let mut send = std::process::Command::new(env!("CARGO_BIN_EXE_miroir"));
    let m = user_referential(&run);
    let master_file = dir.path().join("master.toml");
    std::fs::write(&master_file, &m.text).unwrap();
    send.args([
        "command",
        "send",
        master_file.to_str().unwrap(),
        "update_email",
    ])
    .args([
        "--json",
        r#"{"id":"u-1","email":"a@example.org"}"#,
        "--brokers",
        &brokers,
    ])
    .args(&x)
    .env("MIROIR_TOKEN", "t");
    let sent = send.output().unwrap();
    let stderr = String::from_utf8_lossy(&sent.stderr);
    assert!(!sent.status.success(), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("authentication failed"),
        "{stderr}"
    );
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_stops_the_instance_with_a_clear_error() {
    let run = Run::new("sasl-ca");
    let dir = tempfile::tempdir().unwrap();
    // A CA that signed nothing the broker shows.
    let other_ca = dir.path().join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=another CA", "-keyout"])
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut properties = sasl("SCRAM-SHA-256");
    properties.retain(|(k, _)| k != "ssl.ca.location");
    properties.push(("ssl.ca.location".into(), other_ca.to_str().unwrap().into()));
    properties.push(("sasl.password".into(), SASL_PASSWORD.into()));
    refused_start(&run, dir.path(), &properties, "certificate verify failed");
}

/// Starts an app instance of `run` in `dir` with librdkafka `properties` that the broker
/// refuses, and asserts it stops by itself, its last line saying `cannot connect` and `why`;
/// returns its log.
fn refused_start(
    run: &str,
    dir: &std::path::Path,
    properties: &[(String, String)],
    why: &str,
) -> String {
    let app = with_internal_table_only(user_directory(run));
    let file = dir.join("app.toml");
    std::fs::write(&file, &app.text).unwrap();
    let brokers = sasl_brokers();
    let x = x_args(properties);
    let mut args: Vec<&str> = vec!["--brokers", &brokers];
    args.extend(x.iter().map(String::as_str));
    let log = dir.join("instance.log");
    let mut instance = Instance {
        child: spawn_with(&file, &dir.join("state"), free_port(), &log, &args),
        port: 0,
        log: log.clone(),
    };
    // Not a hang: the instance stops by itself (the bound only catches one that never does).
    let status = exited(&mut instance.child, Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("still running, refused ({why}):\n{text}"));
    assert!(!status.success());
    // The last line, what the process stopped with, says why.
    let last = text.lines().last().unwrap_or_default().to_lowercase();
    assert!(
        last.contains("cannot connect") && last.contains(why),
        "no clear error:\n{text}"
    );
    text
}

/// `database_url()` with `user:password` and `query` in place of its own.
fn url_as(user: &str, password: &str, database: &str, query: &str) -> String {
    let mut config: postgres::Config = database_url().parse().unwrap();
    config.user(user).password(password).dbname(database);
    let host = match &config.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("not a TCP host: {other:?}"),
    };
    let port = config.get_ports()[0];
    format!("postgres://{user}:{password}@{host}:{port}/{database}?{query}")
}

/// An engine writing `t`'s external tables to `url`; the error when it cannot start.
fn start_writing(
    t: &TestTopology,
    state: &std::path::Path,
    url: &str,
) -> Result<miroir::Engine, miroir::EngineError> {
    miroir::Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(state)
        .workers(2)
        .epoch_interval(Duration::from_millis(50))
        .database_url(url)
        .start()
}

/// A connection as `url` says (`sslmode=verify-full` with the local CA, or plain).
fn connect(url: &str) -> postgres::Client {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    if !query.contains("verify-full") {
        return postgres::Client::connect(base, postgres::NoTls).unwrap();
    }
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(local_ca()).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = miroir_connectors::tls::crypto_provider();
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config: postgres::Config = base.parse().unwrap();
    config.ssl_mode(postgres::config::SslMode::Require);
    config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .unwrap()
}

/// Asserts that `t`'s external tables, read as `url`'s role, equal the reference's.
fn written_like_the_reference(t: &TestTopology, events: &[Event], url: &str) {
    let mut db = connect(url);
    let expected = only_external(expected_tables(&t.topology, events), &t.topology);
    wait_for_tables(
        &expected,
        Duration::from_secs(120),
        external_tables(&mut db, &t.topology),
    );
}

#[test]
fn external_tables_are_written_over_tls_checked_against_the_ca() {
    let run = Run::new("pg-tls");
    let t = user_directory(&run);
    let (events, _) = generate(41, 60, 600);
    publish(&t, &events);
    let state = tempfile::tempdir().unwrap();
    let verified = url_as(
        "miroir_tls",
        "miroir",
        "miroir",
        &format!("sslmode=verify-full&sslrootcert={}", local_ca()),
    );
    let engine = start_writing(&t, &state.path().join("ok"), &verified).unwrap();
    written_like_the_reference(&t, &events, &verified);
    engine.shutdown();

    // The role may not connect without TLS, and a server whose certificate the roots do not
    // vouch for is refused: either stops the instance, saying why.
    for (query, why) in [
        ("sslmode=disable", "no encryption"),
        ("sslmode=verify-full&sslrootcert=system", "certificate"),
    ] {
        let url = url_as("miroir_tls", "miroir", "miroir", query);
        let engine = start_writing(&t, &state.path().join(query), &url).unwrap();
        wait_until(
            &format!("{query} stops the instance"),
            Duration::from_secs(60),
            || engine.failure().is_some(),
        );
        let failure = engine.failure().unwrap_or_default();
        assert!(failure.to_lowercase().contains(why), "{query}: {failure}");
        assert!(!failure.contains(":miroir@"), "a password in: {failure}");
        engine.shutdown();
    }
}

#[test]
fn the_writer_needs_no_more_than_its_documented_grants() {
    let run = Run::new("pg-writer");
    let t = user_directory(&run);
    // The readers' role exists (the writer may not create roles).
    pg().batch_execute(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_reader') THEN
             CREATE ROLE app_reader;
           END IF;
         END $$",
    )
    .unwrap();
    let (events, _) = generate(43, 60, 600);
    publish(&t, &events);
    let state = tempfile::tempdir().unwrap();
    let url = url_as(
        "miroir_writer",
        "miroir-writer",
        "least_privilege",
        "sslmode=prefer",
    );
    let engine = start_writing(&t, state.path(), &url).unwrap();
    written_like_the_reference(&t, &events, &url);
    engine.shutdown();
    let mut db = connect(&url);
    let rights: (bool, bool, bool) = {
        let row = db
            .query_one(
                "SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(rights, (false, false, false));
    db.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", t.schema))
        .unwrap();
}

#[test]
fn the_http_api_is_served_over_tls_and_queries_are_forwarded_over_it() {
    let run = Run::new("https");
    let t = with_internal_table_only(user_directory(&run));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (events, _) = generate(47, 40, 400);
    publish(&t, &events);
    let tls_dir = std::path::Path::new(&local_ca())
        .parent()
        .unwrap()
        .to_path_buf();
    let (cert, key) = (tls_dir.join("server.pem"), tls_dir.join("server.key"));
    let ca = local_ca();
    let tls_args = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        &ca,
    ];
    let instances: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|name| {
            let port = free_port();
            let log = dir.path().join(format!("instance-{name}.log"));
            let state = dir.path().join(format!("state-{name}"));
            Instance {
                child: spawn_with(&file, &state, port, &log, &tls_args),
                port,
                log,
            }
        })
        .collect();
    let pem = std::fs::read(&ca).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let expected = expected_tables(&t.topology, &events);
    let keys: Vec<&String> = expected["user_contacts"].keys().collect();
    assert!(!keys.is_empty());
    // Every key from both instances: half of them forwarded to the other, over TLS.
    for i in &instances {
        wait_until(
            &format!("every key served over TLS by :{}", i.port),
            Duration::from_secs(120),
            || {
                keys.iter().all(|k| {
                    let url = format!(
                        "https://127.0.0.1:{}/v1/tables/user_contacts/rows/{k}",
                        i.port
                    );
                    client.get(url).send().is_ok_and(|r| r.status() == 200)
                })
            },
        );
        // Plain HTTP gets no answer.
        let plain = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{}/health", i.port))
            .send();
        assert!(plain.is_err() || !plain.unwrap().status().is_success());
    }
    let forwarded: u64 = instances
        .iter()
        .map(|i| {
            let text = client
                .get(format!("https://127.0.0.1:{}/metrics", i.port))
                .send()
                .unwrap()
                .text()
                .unwrap();
            counter(&text, "miroir_query_forwards_total", "outcome=\"answered\"")
        })
        .sum();
    assert!(forwarded > 0, "no query was forwarded");
}
