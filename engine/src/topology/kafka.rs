//! The topology's `[kafka]` section: librdkafka properties for every Kafka client of the
//! topology's instances, below those of the command line (`--kafka-config`, then `-X`).
//!
//! ```toml
//! [kafka]
//! security.protocol = "SASL_SSL"
//! sasl.mechanism = "SCRAM-SHA-512"
//! ssl.ca.location = "/etc/ssl/kafka-ca.pem"
//! ```
//!
//! Dotted keys are TOML tables, read back as the dotted property. Secrets are refused: a
//! topology file is kept in version control and served by `/v1/topology`.

use toml::Spanned;

use super::Reporter;

/// Whether librdkafka property `key` holds a secret (a password, a client secret, a private
/// key): never shown, and never taken from a topology file.
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key == "ssl.key.pem"
}

/// The properties of the `[kafka]` section, in file order; problems are reported to `r`.
pub(super) fn properties(
    r: &mut Reporter<'_>,
    section: &Spanned<toml::Table>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    flatten(r, section.span().start, "", section.get_ref(), &mut out);
    out
}

/// Adds the properties under `table` (its keys prefixed with `prefix`) to `out`.
fn flatten(
    r: &mut Reporter<'_>,
    at: usize,
    prefix: &str,
    table: &toml::Table,
    out: &mut Vec<(String, String)>,
) {
    for (key, value) in table {
        let key = format!("{prefix}{key}");
        let text = match value {
            toml::Value::Table(inner) => {
                flatten(r, at, &format!("{key}."), inner, out);
                continue;
            }
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Array(_) | toml::Value::Datetime(_) => {
                r.at(
                    at,
                    format!("[kafka] {key}: a librdkafka property is a string, number or boolean"),
                    Some("write a list as one comma-separated string".into()),
                );
                continue;
            }
        };
        if is_secret_property(&key) {
            r.at(
                at,
                format!("[kafka] {key}: secrets do not belong in a topology file (it is kept in version control and served by /v1/topology)"),
                Some("pass it with --kafka-config FILE or -X".into()),
            );
            continue;
        }
        out.push((key, text));
    }
}

#[cfg(test)]
mod tests {
    use crate::topology::Topology;

    const TABLES: &str = r#"
[sources.users]
topic = "user"
key = "id"
columns = { id = "text" }

[tables.ids]
query = "SELECT id FROM users"
"#;

    #[test]
    fn dotted_keys_are_librdkafka_properties() {
        let text = format!(
            "name = \"t\"\n[kafka]\nsecurity.protocol = \"SASL_SSL\"\n\"sasl.mechanism\" = \"PLAIN\"\nsocket.keepalive.enable = true\nmessage.max.bytes = 2000000\n{TABLES}"
        );
        let topology = Topology::parse("t.toml", &text).unwrap();
        let properties: Vec<(&str, &str)> = topology
            .kafka
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            properties,
            [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "PLAIN"),
                ("socket.keepalive.enable", "true"),
                ("message.max.bytes", "2000000"),
            ]
        );
    }

    #[test]
    fn secrets_and_lists_are_refused() {
        let text = format!(
            "name = \"t\"\n[kafka]\nsasl.password = \"hunter2\"\nbootstrap.servers = [\"a\", \"b\"]\n{TABLES}"
        );
        let error = Topology::parse("t.toml", &text).unwrap_err().to_string();
        assert!(
            error.contains("sasl.password: secrets do not belong"),
            "{error}"
        );
        assert!(
            error.contains("bootstrap.servers: a librdkafka property"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");
    }
}
