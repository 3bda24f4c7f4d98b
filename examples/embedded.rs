//! Embeds miroir in an application instance: start an engine on the user-directory topology,
//! wait until it has caught up, read a few rows by key, and shut down. The topology's external
//! tables go to the PostgreSQL database in `DATABASE_URL`.
//!
//! ```sh
//! eval "$(scripts/services up)"     # exports MIROIR_BROKERS and DATABASE_URL
//! cargo run --example embedded -- u-1 u-2
//! ```

use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers = std::env::var("MIROIR_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let state = std::env::temp_dir().join("miroir-embedded-example");
    let engine = miroir::Engine::builder()
        .topology_file("topologies/user-directory.toml")
        .brokers(brokers)
        .state_dir(&state)
        .workers(2)
        .start()?;
    if !engine.wait_ready(Duration::from_secs(30)) {
        eprintln!("not caught up after 30 s; answers may be stale");
    }
    for key in std::env::args().skip(1) {
        match engine.get("user_contacts", &key)? {
            Some(answer) => println!("{key}: {} (partition {:?})", answer.row, answer.partition),
            None => println!("{key}: no such user"),
        }
    }
    println!("first rows: {:?}", engine.scan("user_contacts", "", 3)?);
    engine.shutdown();
    Ok(())
}
