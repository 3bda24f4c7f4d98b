//! The command line's Kafka connection settings: the brokers, and librdkafka properties for
//! every client miroir makes (as kcat's `-X`), inline or from a file.

use std::path::PathBuf;

use anyhow::Context;
use miroir_connectors::kafka::{credentials, KafkaConfig};

/// How to reach Kafka.
#[derive(clap::Args, Debug)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "MIROIR_BROKERS")]
    pub brokers: String,
    /// A librdkafka property for every Kafka client, as kcat's `-X`
    /// (`-X security.protocol=sasl_plaintext`); repeatable, applied after --kafka-config.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = property)]
    pub property: Vec<(String, String)>,
    /// A file of librdkafka properties, one `key=value` per line (`#` starts a comment): keeps
    /// secrets such as `sasl.password` out of process lists.
    #[arg(long, env = "MIROIR_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,
}

impl KafkaArgs {
    /// The connection settings: the file's properties, then the inline ones.
    pub fn config(&self) -> anyhow::Result<KafkaConfig> {
        let mut config = KafkaConfig::new(&self.brokers);
        if let Some(path) = &self.kafka_config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --kafka-config {}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let kv = property(line)
                    .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), n + 1))?;
                config.extra.push(kv);
            }
        }
        config.extra.extend(self.property.iter().cloned());
        Ok(config)
    }
}

impl KafkaArgs {
    /// [`KafkaArgs::config`], once the brokers took its login and TLS settings (see
    /// [`credentials::check`]).
    pub fn checked(&self) -> anyhow::Result<KafkaConfig> {
        let config = self.config()?;
        credentials::check(&config)?;
        Ok(config)
    }
}

/// A `key=value` property.
fn property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_come_from_the_file_then_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka.properties");
        std::fs::write(
            &file,
            "# SASL\nsecurity.protocol = sasl_plaintext\n\nsasl.password=s3cr=t\n",
        )
        .unwrap();
        let args = KafkaArgs {
            brokers: "b:9092".into(),
            property: vec![("security.protocol".into(), "sasl_ssl".into())],
            kafka_config: Some(file.clone()),
        };
        let config = args.config().unwrap();
        assert_eq!(
            config.extra,
            [
                (
                    "security.protocol".to_string(),
                    "sasl_plaintext".to_string()
                ),
                ("sasl.password".to_string(), "s3cr=t".to_string()),
                ("security.protocol".to_string(), "sasl_ssl".to_string()),
            ]
        );
        std::fs::write(&file, "no equals sign\n").unwrap();
        let error = args.config().unwrap_err().to_string();
        assert!(
            error.contains("line 1") && error.contains("KEY=VALUE"),
            "{error}"
        );
        assert!(property("=x").is_err());
    }
}
