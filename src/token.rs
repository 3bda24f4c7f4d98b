//! The command line's bearer tokens: how `miroir run` verifies them, and `miroir token issue`,
//! which mints development tokens.

use std::path::PathBuf;
use std::time::Duration;

use miroir::miroir_engine::auth::{issue_now, AuthConfig, KeySource, SigningKey, TokenClaims};
use miroir::miroir_engine::command::Principal;

/// The environment variable holding an HS256 shared secret (development): never a flag, so
/// that it shows in no process list.
pub const SECRET_ENV: &str = "MIROIR_AUTH_HS256_SECRET";

/// How `miroir run` verifies the bearer tokens of commands and queries.
#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    /// The keys tokens are signed with: a JWKS file (`{"keys": [...]}`) or a PEM public key
    /// (RSA, EC or Ed25519). Without it, the HS256 secret of MIROIR_AUTH_HS256_SECRET
    /// (development) verifies them, if set.
    #[arg(long, env = "MIROIR_AUTH_KEYS")]
    auth_keys: Option<PathBuf>,
    /// The issuer tokens must name (`iss`).
    #[arg(long, env = "MIROIR_AUTH_ISSUER")]
    auth_issuer: Option<String>,
    /// The audience tokens must name (`aud`).
    #[arg(long, env = "MIROIR_AUTH_AUDIENCE")]
    auth_audience: Option<String>,
    /// The claim holding the principal's id; a dotted path for a nested one.
    #[arg(long, env = "MIROIR_AUTH_SUBJECT_CLAIM", default_value = "sub")]
    auth_subject_claim: String,
    /// The claim holding the principal's roles (a list, or a comma- or space-separated
    /// text); a dotted path for a nested one, such as Keycloak's `realm_access.roles`.
    #[arg(long, env = "MIROIR_AUTH_ROLES_CLAIM", default_value = "roles")]
    auth_roles_claim: String,
    /// Development only: believe the principal and roles a command claims without a token
    /// (`miroir-principal`, `miroir-roles` headers). Anyone who can write the command topic
    /// is then anyone; a warning says so at start.
    #[arg(long, env = "MIROIR_TRUST_PRINCIPAL_HEADERS")]
    trust_principal_headers: bool,
}

impl AuthArgs {
    /// The engine's settings.
    pub fn config(self) -> AuthConfig {
        let keys = match (self.auth_keys, std::env::var(SECRET_ENV).ok()) {
            (Some(path), _) => Some(KeySource::File(path)),
            (None, Some(secret)) if !secret.is_empty() => {
                Some(KeySource::Secret(secret.into_bytes()))
            }
            (None, _) => None,
        };
        AuthConfig {
            keys,
            issuer: self.auth_issuer,
            audience: self.auth_audience,
            subject_claim: Some(self.auth_subject_claim),
            roles_claim: Some(self.auth_roles_claim),
            trust_principal_headers: self.trust_principal_headers,
        }
    }
}

/// `miroir token ...`.
#[derive(clap::Subcommand)]
pub enum TokenAction {
    /// Mints a bearer token (a JWT) for development and tests, signed with the HS256 secret
    /// of MIROIR_AUTH_HS256_SECRET or with a private key in PEM form, and prints it. Real
    /// deployments get tokens from their identity provider.
    ///
    /// EXAMPLES:
    ///     MIROIR_AUTH_HS256_SECRET=dev-secret miroir token issue --sub alice --roles user-admin
    ///     miroir token issue --key private.pem --sub alice --audience user-directory
    Issue {
        /// The principal's id (`sub`).
        #[arg(long)]
        sub: String,
        /// Its roles, comma-separated (`roles`).
        #[arg(long, default_value = "")]
        roles: String,
        /// How long it stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        valid_for: Duration,
        /// The issuer (`iss`).
        #[arg(long)]
        issuer: Option<String>,
        /// The audience (`aud`).
        #[arg(long)]
        audience: Option<String>,
        /// A private key in PEM form (RSA: RS256, EC: ES256, Ed25519: EdDSA) instead of the
        /// HS256 secret.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Prints the token `action` asks for.
pub fn run(action: TokenAction) -> anyhow::Result<()> {
    let TokenAction::Issue {
        sub,
        roles,
        valid_for,
        issuer,
        audience,
        key,
    } = action;
    let key = match key {
        Some(path) => SigningKey::Pem(
            std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
        ),
        None => match std::env::var(SECRET_ENV) {
            Ok(secret) if !secret.is_empty() => SigningKey::Secret(secret.into_bytes()),
            _ => anyhow::bail!("no key: pass --key PRIVATE.pem, or set {SECRET_ENV}"),
        },
    };
    let claims = TokenClaims {
        issuer,
        audience,
        ..TokenClaims::of(&Principal::new(sub, &roles), valid_for.as_secs())
    };
    println!("{}", issue_now(&key, &claims)?);
    Ok(())
}
