//! TLS of PostgreSQL connections, with libpq's `sslmode` and `sslrootcert` (which
//! tokio-postgres does not parse beyond `disable`, `prefer` and `require`).
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `prefer` (the default) | when the server offers it | against `sslrootcert` when given |
//! | `require` | yes | against `sslrootcert` when given |
//! | `verify-ca` | yes | chain against `sslrootcert` |
//! | `verify-full` | yes | chain against `sslrootcert`, and the host name |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the system's roots.

use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PostgresError;

/// What a connection asks of TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed connection string and the TLS connector it calls for.
pub(crate) struct Connection {
    /// The options tokio-postgres understands (`sslmode` as the wire needs it).
    pub(crate) config: tokio_postgres::Config,
    /// The TLS connector.
    pub(crate) tls: MakeRustlsConnect,
}

/// Parses `url` (a `postgres://` URL or `key=value` words), taking `sslmode` and `sslrootcert`
/// out before tokio-postgres reads the rest.
pub(crate) fn connection(url: &str) -> Result<Connection, PostgresError> {
    let (rest, options) = take_tls_options(url);
    let mode = match options.mode.as_deref() {
        None | Some("prefer") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(other) => {
            return Err(PostgresError::Config(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            )))
        }
    };
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| PostgresError::Config(format!("connection string: {e}")))?;
    config.ssl_mode(match mode {
        SslMode::Disable => WireMode::Disable,
        SslMode::Prefer => WireMode::Prefer,
        _ => WireMode::Require,
    });
    let roots = match options.root_cert.as_deref() {
        Some(path) => Some(roots(path)?),
        None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(PostgresError::Config(format!(
                "sslmode={} needs sslrootcert: a PEM file of the CA certificates, or `system`",
                options.mode.unwrap_or_default()
            )))
        }
        None => None,
    };
    let verifier = verifier(roots, mode == SslMode::VerifyFull)?;
    let provider = crate::tls::crypto_provider();
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PostgresError::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Connection {
        config,
        tls: MakeRustlsConnect::new(tls),
    })
}

/// The `sslmode` and `sslrootcert` of a connection string.
#[derive(Debug, Default, PartialEq)]
struct TlsOptions {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// `url` without its `sslmode` and `sslrootcert`, and their values.
fn take_tls_options(url: &str) -> (String, TlsOptions) {
    let mut options = TlsOptions::default();
    // Whether `key` is a TLS option (then kept in `options`).
    let mut take = |key: &str, value: &str| -> bool {
        match key {
            "sslmode" => options.mode = Some(value.to_string()),
            "sslrootcert" => options.root_cert = Some(value.to_string()),
            _ => return false,
        }
        true
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(k, &percent_decoded(v))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter(|word| {
                let (k, v) = word.split_once('=').unwrap_or((word, ""));
                !take(k.trim(), v.trim())
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, options)
}

/// `value` with its `%XX` escapes decoded (a path in a URL's query).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The CA certificates of `path` (PEM), or the system's for `system`.
fn roots(path: &str) -> Result<RootCertStore, PostgresError> {
    let mut store = RootCertStore::empty();
    if path == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(PostgresError::Config(
                "sslrootcert=system: no CA certificate found on this system".into(),
            ));
        }
        return Ok(store);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| PostgresError::Config(format!("sslrootcert {path}: {e}")))?;
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(PostgresError::Config(format!(
            "sslrootcert {path}: no CA certificate in it"
        )));
    }
    Ok(store)
}

/// How the server's certificate is checked: against `roots` when given (with its host name
/// when `full`), else not at all (the connection is encrypted, its peer unproven: libpq's
/// `require`).
fn verifier(
    roots: Option<RootCertStore>,
    full: bool,
) -> Result<Arc<dyn ServerCertVerifier>, PostgresError> {
    let provider = crate::tls::crypto_provider();
    let Some(roots) = roots else {
        return Ok(Arc::new(Unchecked(provider)));
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| PostgresError::Config(format!("sslrootcert: {e}")))?;
    Ok(Arc::new(Checked { webpki, full }))
}

/// A chain checked against the roots; the host name too when `full`.
#[derive(Debug)]
struct Checked {
    webpki: Arc<WebPkiServerVerifier>,
    full: bool,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.full => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Any certificate is taken (`require` without `sslrootcert`); the handshake's signatures are
/// still checked, so the connection's keys belong to whoever holds the certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_out_of_a_url() {
        let (rest, options) = take_tls_options(
            "postgres://app:pw@db:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://app:pw@db:5432/app?application_name=x");
        assert_eq!(options.mode.as_deref(), Some("verify-full"));
        assert_eq!(options.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (rest, options) = take_tls_options("postgres://db/app?sslmode=require");
        assert_eq!(rest, "postgres://db/app");
        assert_eq!(options.mode.as_deref(), Some("require"));
    }

    #[test]
    fn tls_options_are_taken_out_of_key_value_words() {
        let (rest, options) =
            take_tls_options("host=db user=app sslmode=verify-ca sslrootcert=/ca.pem dbname=app");
        assert_eq!(rest, "host=db user=app dbname=app");
        assert_eq!(options.mode.as_deref(), Some("verify-ca"));
        assert_eq!(options.root_cert.as_deref(), Some("/ca.pem"));
    }

    #[test]
    fn verifying_without_roots_or_an_unknown_mode_is_a_configuration_error() {
        for url in [
            "postgres://db/app?sslmode=verify-full",
            "postgres://db/app?sslmode=allow-all",
            "postgres://db/app?sslmode=require&sslrootcert=/no/such/ca.pem",
        ] {
            let Err(e) = connection(url) else {
                panic!("{url} was taken")
            };
            assert!(matches!(e, PostgresError::Config(_)), "{url}: {e}");
        }
        assert!(connection("postgres://db/app?sslmode=require").is_ok());
        assert!(connection("postgres://db/app").is_ok());
    }
}
