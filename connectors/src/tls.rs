//! The cryptography behind every TLS connection miroir makes or serves (PostgreSQL, the HTTP
//! endpoint, forwarded queries).

use std::sync::Arc;

/// rustls's provider backed by `ring`. `ring` builds with a C compiler alone (`aws-lc-rs`, the
/// other provider, needs a much longer C build), at the price of no post-quantum key exchange,
/// for which rustls marks the function deprecated.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
