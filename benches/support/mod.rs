//! Helpers shared by the benchmark harnesses.
#![allow(dead_code)] // each harness uses a different part

/// The environment variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A name for this run (seconds since the Unix epoch), to keep its topics and tables apart.
pub fn run_id() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

/// `topologies/user-directory.toml`'s text up to its external tables (which follow the internal
/// one in the file): the app with its internal table alone.
pub fn internal_tables_only(text: &str) -> &str {
    let end = text
        .find("\n# Left join with the departments")
        .expect("the external tables' comment in user-directory.toml");
    &text[..end]
}

/// `topologies/user-directory.toml` without its history (the stream source and its tables):
/// the figures measured before it stay comparable.
pub fn without_history(text: &str) -> &str {
    let end = text
        .find("\n# Every User event again")
        .expect("the history's comment in user-directory.toml");
    &text[..end]
}

/// `text` with its `<!-- name:begin -->` ... `<!-- name:end -->` section replaced by
/// `section` (appended when missing).
pub fn replace_section(text: &str, name: &str, section: &str) -> String {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->\n"),
    );
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) => format!("{}{}{}", &text[..b], section, &text[e + end.len()..]),
        _ => format!("{text}\n{section}"),
    }
}
