//! TLS of the HTTP endpoint (rustls): the server's certificate and key, and the CA the other
//! instances' certificates are checked against when a query is forwarded to them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the HTTP endpoint's TLS material is (PEM files).
#[derive(Clone, Debug)]
pub struct HttpTls {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that signed the other instances' certificates, trusted besides the
    /// system's when forwarding a query; `None`: the system's alone.
    pub ca: Option<PathBuf>,
}

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {path}: {message}")]
pub struct TlsError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl TlsError {
    fn at(path: &Path, message: impl std::fmt::Display) -> TlsError {
        TlsError {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

impl HttpTls {
    /// The server side: the certificate chain and key, read and checked now.
    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| TlsError::at(&self.cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::at(&self.cert, "no certificate in it"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| TlsError::at(&self.key, e))?;
        let provider = miroir_connectors::tls::crypto_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::at(&self.cert, e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::at(&self.key, e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The CA certificates other instances are checked against, besides the system's.
    pub(crate) fn peer_roots(&self) -> Result<Vec<reqwest::Certificate>, TlsError> {
        let Some(path) = &self.ca else {
            return Ok(Vec::new());
        };
        let pem = std::fs::read(path).map_err(|e| TlsError::at(path, e))?;
        let roots =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TlsError::at(path, e))?;
        if roots.is_empty() {
            return Err(TlsError::at(path, "no certificate in it"));
        }
        Ok(roots)
    }
}
