//! The CLI's commands that do not run a topology: `validate`, `explain`, and `plan` (which reads
//! PostgreSQL), and the Kafka properties every command takes. `reset` is tested in `reset.rs`.

use std::process::Command;

fn miroir(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

const TOPOLOGY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/topologies/user-directory.toml"
);

#[test]
fn validate_accepts_every_shipped_topology() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/topologies")).unwrap() {
        let path = entry.unwrap().path();
        let (ok, stdout, stderr) = miroir(&["validate", path.to_str().unwrap()]);
        assert!(ok, "{}: {stderr}", path.display());
        assert!(stdout.contains(": ok"), "{stdout}");
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

#[test]
fn validate_warns_of_operations_that_own_no_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshots.toml");
    let text = std::fs::read_to_string(TOPOLOGY).unwrap();
    let owns = text.find(", owns = {").expect("the users declare owns");
    let end = owns + text[owns..].find(" }").unwrap() + 2;
    std::fs::write(&path, format!("{}{}", &text[..owns], &text[end..])).unwrap();
    let (ok, stdout, stderr) = miroir(&["validate", path.to_str().unwrap()]);
    assert!(ok, "a warning is no error: {stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
    let file = path.to_str().unwrap();
    assert!(
        stderr.contains(&format!("warning: {file}:15:8: late.per without late.owns")),
        "{stderr}"
    );
    assert!(stderr.contains("hint: declare which columns"), "{stderr}");
}

#[test]
fn validate_reports_every_error_with_position_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(TOPOLOGY)
        .unwrap()
        .replace("lower(trim(email))", "lower(trim(emial))")
        .replace(
            "late = { order_by = \"version\" }",
            "late = { order_by = \"version\", action = \"ignore\" }",
        );
    std::fs::write(&bad, text).unwrap();
    let (ok, _, stderr) = miroir(&["validate", bad.to_str().unwrap()]);
    assert!(!ok);
    let file = bad.to_str().unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(file)).collect();
    assert_eq!(
        lines.len(),
        1,
        "the broken source stops table planning: {stderr}"
    );
    assert!(
        lines[0].contains("unknown late.action `ignore`"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: drop (default) or keep"), "{stderr}");

    let only_sql = std::fs::read_to_string(TOPOLOGY)
        .unwrap()
        .replace("lower(trim(email))", "lower(trim(emial))");
    std::fs::write(&bad, only_sql).unwrap();
    let (ok, _, stderr) = miroir(&["validate", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains(&format!("{file}:25:32:")), "{stderr}");
    assert!(stderr.contains("unknown column `emial`"), "{stderr}");
}

#[test]
fn explain_prints_the_operator_graph() {
    let (ok, stdout, _) = miroir(&["explain", TOPOLOGY]);
    assert!(ok);
    for op in [
        "Source users",
        "Filter",
        "Map",
        "Join Left",
        "Join Inner",
        "Reduce",
        "exchange",
        "sink internal",
        "across instances: each row with the partition of `id` in topic user",
        "across instances: each row with the partition of `id` in topic user-directory.user_directory.r1.",
        "repartition user_directory.r1 -> topic user-directory.user_directory.r1.",
        "Filter the row of its current join value",
    ] {
        assert!(stdout.contains(op), "missing {op} in:\n{stdout}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let (ok, _, stderr) = miroir(&["validate", "/nonexistent/topology.toml"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read the topology file"), "{stderr}");
}

#[test]
fn plan_says_what_a_start_does_in_postgres() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        panic!("DATABASE_URL is not set: run the tests with scripts/test");
    };
    let out = Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args(["plan", TOPOLOGY])
        .env("DATABASE_URL", url)
        .env_remove("MIROIR_BROKERS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("kafka topics of the instances (not checked: no --brokers):")
            && stdout.contains("user-directory.miroir-instances")
            && stdout.contains(".miroir-changelog (the state of source `users`"),
        "the internal topics: {stdout}"
    );
    for table in ["app.user_directory", "app.users_per_department"] {
        assert!(
            stdout.lines().any(|l| l.contains(table)
                && (l.starts_with("create") || l.starts_with("rebuild"))),
            "a start creates or rebuilds {table}: {stdout}"
        );
    }

    let out = Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args([
            "plan",
            TOPOLOGY,
            "--database-url",
            "postgres://miroir:miroir@127.0.0.1:1/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error"));
}

#[test]
fn kafka_properties_reach_the_clients_and_a_wrong_one_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kafka.properties");
    std::fs::write(&file, "# tuning\nbogus.property = 1\n").unwrap();
    let file = file.to_str().unwrap();
    let publish = ["publish", "--topic", "t", "-", "--brokers", "127.0.0.1:1"];
    // From the file, and from -X: librdkafka refuses the property, named.
    for more in [&["--kafka-config", file][..], &["-X", "other.bogus=2"][..]] {
        let args: Vec<&str> = publish.iter().chain(more).copied().collect();
        let (ok, _, stderr) = miroir(&args);
        assert!(!ok);
        assert!(stderr.contains("bogus"), "{stderr}");
    }
    let (ok, _, stderr) = miroir(&["dlq", "list", "t", "--brokers", "b", "-X", "novalue"]);
    assert!(!ok);
    assert!(stderr.contains("KEY=VALUE"), "{stderr}");
}
