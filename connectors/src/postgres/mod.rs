//! PostgreSQL external tables (tokio-postgres).
//!
//! - [`schema`]: the objects miroir keeps in the app's database (tables, indexes, grants, the
//!   `miroir` bookkeeping schema), what a start will create, rebuild or keep, and the
//!   shadow-table swap.
//! - [`sink`]: [`sink::PostgresSink`], the engine's [`miroir_engine::sink::ExternalSink`]:
//!   one transaction per batch (binary `COPY` into staging tables, then one merge per table),
//!   with the instance's sequence and offsets.
//! - [`ownership`]: which instance writes which partition's rows, and when a rebuilt table is
//!   complete.
//! - [`rejects`]: rows PostgreSQL cannot hold, set aside in `miroir.rejects` instead of
//!   stopping the sink.
//! - [`cell`]: engine values in PostgreSQL's binary format.
//! - `tls`: TLS of the connections, with libpq's `sslmode` and `sslrootcert`.

pub mod cell;
mod ownership;
mod rejects;
pub mod schema;
pub mod sink;
mod tls;

use miroir_engine::error::ErrorClass;

/// Errors of the PostgreSQL connector.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The database failed or refused a statement.
    #[error("postgres: {}", described(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The configuration is wrong; retrying will not help.
    #[error("postgres: {0}")]
    Config(String),
    /// The engine's commit of the changes failed: they are not applied.
    #[error("{0}")]
    NotDurable(#[from] miroir_engine::sink::SinkError),
}

impl PostgresError {
    /// What to do next, from the SQLSTATE of the database's error (see [`sqlstate_class`]);
    /// a value PostgreSQL cannot hold ([`cell::Unwritable`]) is definite, another error without
    /// a SQLSTATE (the connection broke) transient, a configuration error fatal.
    pub fn class(&self) -> ErrorClass {
        match self {
            PostgresError::Db(e) => match e.code() {
                Some(state) => sqlstate_class(state.code()),
                // A value refused before it was sent: the row is at fault.
                None if unwritable(e) => ErrorClass::Definite,
                // The server's certificate is not vouched for: retrying does not change it.
                None if certificate_refused(e) => ErrorClass::Fatal,
                None => ErrorClass::Transient,
            },
            PostgresError::Config(_) => ErrorClass::Fatal,
            PostgresError::NotDurable(e) => e.class(),
        }
    }
}

/// `e` with its cause: the server's severity, SQLSTATE and message, or what failed below the
/// client (tokio-postgres says only "db error" or "error performing TLS handshake").
fn described(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Whether `e` is a value that [`cell::check`] refused.
fn unwritable(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<cell::Unwritable>())
}

/// Whether `e` is a TLS handshake that refused the server's certificate.
fn certificate_refused(e: &tokio_postgres::Error) -> bool {
    let refused = |r: &rustls::Error| matches!(r, rustls::Error::InvalidCertificate(_));
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        // An I/O error hides the error it wraps from `source`.
        let wrapped = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if cause.downcast_ref::<rustls::Error>().is_some_and(refused)
            || wrapped.is_some_and(refused)
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// The class of a SQLSTATE, by its first two characters: connection failures (08), rolled-back
/// transactions (40: serialization failures, deadlocks), insufficient resources (53), locks
/// not available (55), operator intervention (57) and system errors (58) are transient; data
/// exceptions (22: a NUL in a text, a timestamp out of range) and integrity violations (23)
/// are definite, the row is at fault; authorization (28), unknown catalog or schema (3D, 3F),
/// syntax or access rules (42: a missing privilege, an unknown table) and unsupported features
/// (0A) are fatal. Other classes are taken as transient, which is retried.
pub fn sqlstate_class(code: &str) -> ErrorClass {
    match code.get(..2).unwrap_or_default() {
        "22" | "23" => ErrorClass::Definite,
        "28" | "3D" | "3F" | "42" | "0A" => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// `name` as a quoted SQL identifier: identifiers from topologies never reach SQL unquoted.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table`, both quoted.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// The connection URL of a topology's external tables: the one the tables name (they must
/// agree), else `fallback` (the CLI's `--database-url`, or `DATABASE_URL`).
pub fn database_url(
    topology: &miroir_engine::topology::Topology,
    fallback: Option<&str>,
) -> Result<String, PostgresError> {
    let mut named = topology
        .tables
        .iter()
        .filter_map(|t| t.postgres().and_then(|pg| pg.url.clone()));
    let first = named.next();
    if let Some(other) = named.find(|u| Some(u) != first.as_ref()) {
        return Err(PostgresError::Config(format!(
            "external tables name different databases ({} and {}): one topology writes one database",
            redacted(&first.unwrap_or_default()),
            redacted(&other)
        )));
    }
    first
        .or_else(|| fallback.map(str::to_string))
        .ok_or_else(|| {
            PostgresError::Config(
                "no database: set DATABASE_URL, pass --database-url, or give `url` in the table's sink"
                    .into(),
            )
        })
}

/// `url` with its password, if any, masked: how a connection URL may appear in a message.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Connects (over TLS as `url`'s `sslmode` asks), running the connection on the current
/// runtime.
pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, PostgresError> {
    let tls::Connection { config, tls } = tls::connection(url)?;
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redacted_url_keeps_everything_but_the_password() {
        assert_eq!(
            redacted("postgres://app:s3cr:et@db.internal:5432/app?sslmode=require"),
            "postgres://app:***@db.internal:5432/app?sslmode=require"
        );
        assert_eq!(redacted("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(redacted("postgres://db/app"), "postgres://db/app");
    }

    #[test]
    fn identifiers_are_quoted_and_escaped() {
        assert_eq!(ident("users"), "\"users\"");
        assert_eq!(
            ident("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
        assert_eq!(qualified("app", "t"), "\"app\".\"t\"");
    }

    #[test]
    fn sqlstates_are_classed_by_what_to_do_next() {
        for (code, class) in [
            ("08006", ErrorClass::Transient), // connection failure
            ("40001", ErrorClass::Transient), // serialization failure
            ("40P01", ErrorClass::Transient), // deadlock
            ("57P01", ErrorClass::Transient), // admin shutdown
            ("22021", ErrorClass::Definite),  // a NUL byte in a text
            ("22008", ErrorClass::Definite),  // datetime out of range
            ("23505", ErrorClass::Definite),  // unique violation
            ("42501", ErrorClass::Fatal),     // insufficient privilege
            ("42P01", ErrorClass::Fatal),     // undefined table
            ("28P01", ErrorClass::Fatal),     // bad password
        ] {
            assert_eq!(sqlstate_class(code), class, "{code}");
        }
    }
}
