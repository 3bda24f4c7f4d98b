//! The state directory's disk fills up (a small tmpfs, mounted by the test: it needs root):
//! the instance stops with a clear failure naming the lack of space instead of going on
//! without its state, and a start after space is freed loses nothing: its tables equal the
//! reference evaluator over every event.

mod support;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use support::*;

/// A tmpfs of `megabytes` at `dir`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, megabytes: usize) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the disk is full.
fn fill(path: &std::path::Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}

#[test]
fn a_full_disk_stops_the_instance_clearly_and_a_restart_loses_nothing() {
    let mount = tempfile::tempdir().unwrap();
    // A restart writes the big rows of the second batch again (log, then tables): up to 260 MB
    // at the peak, which must fit once the filler is gone.
    let _tmpfs = Tmpfs::mount(mount.path(), 512);
    let state = mount.path().join("state");
    let run = Run::new("disk");
    let app = user_directory(&run);
    let (mut events, _) = generate(47, 200, 2000);
    let first = events.clone();
    // After the disk is full, more than RocksDB set aside for its log (it reserves about 70 MB
    // when it opens it): 1,500 new users with 64 KB names.
    let name = "n".repeat(64 << 10);
    events.extend((0..1500).map(|i| Event {
        source: 0,
        key: format!("big-{i}"),
        payload: Some(format!(
            "{{\"id\":\"big-{i}\",\"name\":\"{name}\",\"version\":1,\"event_type\":\"created\",\"active\":true,\"email\":\"b{i}@example.org\"}}"
        )),
    }));
    let second = &events[first.len()..];
    publish(&app, &first);
    let mut db = pg();
    let engine = start_engine(&app.text, &state);
    wait_for_tables(
        &expected_tables(&app.topology, &first),
        Duration::from_secs(90),
        |name| table_rows(&engine, &mut db, name),
    );

    let filler = mount.path().join("filler");
    fill(&filler);
    publish(&app, second);
    wait_until("the instance stops", Duration::from_secs(120), || {
        engine.failure().is_some()
    });
    let failure = engine.failure().unwrap();
    assert!(failure.contains("No space left on device"), "{failure}");
    engine.shutdown();

    std::fs::remove_file(&filler).unwrap();
    let engine = start_engine(&app.text, &state);
    let restarted = try_wait_for_tables(
        &expected_tables(&app.topology, &events),
        Duration::from_secs(90),
        |name| table_rows(&engine, &mut db, name),
    );
    assert_eq!(engine.failure(), None);
    restarted.unwrap();
    engine.shutdown();
}
