//! Who sends a command or a query: a principal proven by a bearer token (a JWT), not
//! claimed.
//!
//! An [`Authenticator`] verifies a token's signature with the keys it was given (a JWKS file,
//! a PEM public key, or, for development, an HS256 shared secret), its expiry (60 s of
//! leeway), and its issuer and audience when they are configured; the principal's id and
//! roles come from configurable claims (`sub` and `roles` by default; dotted paths reach
//! nested claims, such as Keycloak's `realm_access.roles`). Without a token, a principal is
//! only taken from what the caller claims when the development setting
//! [`AuthConfig::trust_principal_headers`] is on.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value as Json;

use crate::command::Principal;

/// How tokens are verified.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// The keys tokens are signed with; `None`: no token can be verified.
    pub keys: Option<KeySource>,
    /// The issuer tokens must name (`iss`), if any.
    pub issuer: Option<String>,
    /// The audience tokens must name (`aud`), if any.
    pub audience: Option<String>,
    /// The claim holding the principal's id (default `sub`); a dotted path for a nested one.
    pub subject_claim: Option<String>,
    /// The claim holding the principal's roles, a list or a comma- or space-separated text
    /// (default `roles`); a dotted path for a nested one.
    pub roles_claim: Option<String>,
    /// Development only: take a principal claimed without a token as it is.
    pub trust_principal_headers: bool,
}

/// Where the verifying keys come from.
#[derive(Clone)]
pub enum KeySource {
    /// A JWKS document (`{"keys": [...]}`) or a PEM public key (RSA, EC or Ed25519).
    File(PathBuf),
    /// An HS256 shared secret (development: whoever verifies can also mint).
    Secret(Vec<u8>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "File({path:?})"),
            KeySource::Secret(_) => write!(f, "Secret(..)"),
        }
    }
}

/// The keys or settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file cannot be read.
    #[error("cannot read the token keys {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file holds no key miroir can use.
    #[error("the token keys {path} hold no usable key: {message}")]
    Keys {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A token cannot be minted with the key given.
    #[error("cannot sign a token: {0}")]
    Sign(String),
}

/// Why a caller is not authenticated: no token, or one that does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// One verifying key: what it verifies, and the family of algorithms it takes.
struct Key {
    id: Option<String>,
    key: DecodingKey,
    family: Family,
}

/// The algorithms one key verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl Family {
    fn of(alg: Algorithm) -> Family {
        use Algorithm::*;
        match alg {
            HS256 | HS384 | HS512 => Family::Hmac,
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
            ES256 | ES384 => Family::Ec,
            EdDSA => Family::Ed,
        }
    }
}

/// Verifies tokens and tells the principal they prove.
pub struct Authenticator {
    keys: Vec<Key>,
    config: AuthConfig,
}

impl Authenticator {
    /// Loads the keys of `config`.
    pub fn new(config: AuthConfig) -> Result<Authenticator, AuthError> {
        let keys = match &config.keys {
            None => Vec::new(),
            Some(KeySource::Secret(secret)) => vec![Key {
                id: None,
                key: DecodingKey::from_secret(secret),
                family: Family::Hmac,
            }],
            Some(KeySource::File(path)) => load_keys(path)?,
        };
        Ok(Authenticator { keys, config })
    }

    /// Whether a principal claimed without a token is taken as it is (development).
    pub fn trusts_principal_headers(&self) -> bool {
        self.config.trust_principal_headers
    }

    /// Whether any token can be verified.
    pub fn verifies_tokens(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The principal a caller is: the one `token` proves, or, without a token and with
    /// [`AuthConfig::trust_principal_headers`] on, the one it claims (`claimed`: id and
    /// comma-separated roles).
    pub fn principal(
        &self,
        token: Option<&str>,
        claimed: Option<(&str, &str)>,
    ) -> Result<Principal, Unauthenticated> {
        match (token.filter(|t| !t.is_empty()), claimed) {
            (Some(token), _) => self.verify(token),
            (None, Some((id, roles))) if self.config.trust_principal_headers && !id.is_empty() => {
                Ok(Principal::new(id, roles))
            }
            (None, _) => Err(Unauthenticated("no bearer token".into())),
        }
    }

    /// The principal `token` proves.
    pub fn verify(&self, token: &str) -> Result<Principal, Unauthenticated> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Unauthenticated(format!("the token is malformed: {e}")))?;
        let family = Family::of(header.alg);
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.family == family)
            .filter(|k| header.kid.is_none() || k.id.is_none() || k.id == header.kid)
            .collect();
        if candidates.is_empty() {
            return Err(Unauthenticated(format!(
                "no key verifies {:?} tokens{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|kid| format!(" with key id `{kid}`"))
                    .unwrap_or_default()
            )));
        }
        let validation = self.validation(header.alg);
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Json>(token, &key.key, &validation) {
                Ok(data) => return self.principal_of(&data.claims),
                Err(e) => last = Some(e),
            }
        }
        let reason = last.map(|e| e.to_string()).unwrap_or_default();
        Err(Unauthenticated(format!(
            "the token does not hold: {reason}"
        )))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation
    }

    fn principal_of(&self, claims: &Json) -> Result<Principal, Unauthenticated> {
        let subject = self.config.subject_claim.as_deref().unwrap_or("sub");
        let id = claim(claims, subject)
            .and_then(Json::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Unauthenticated(format!("the token has no `{subject}` claim")))?;
        let roles = self.config.roles_claim.as_deref().unwrap_or("roles");
        let roles: Vec<String> = match claim(claims, roles) {
            Some(Json::Array(items)) => items
                .iter()
                .filter_map(Json::as_str)
                .map(str::to_string)
                .collect(),
            Some(Json::String(text)) => text
                .split([',', ' '])
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Principal {
            id: id.to_string(),
            roles,
        })
    }
}

/// The claim at dotted `path` of `claims`.
fn claim<'a>(claims: &'a Json, path: &str) -> Option<&'a Json> {
    path.split('.').try_fold(claims, |at, part| at.get(part))
}

/// The keys of a JWKS document or a PEM public key.
fn load_keys(path: &Path) -> Result<Vec<Key>, AuthError> {
    let text = std::fs::read(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let unusable = |message: String| AuthError::Keys {
        path: path.to_path_buf(),
        message,
    };
    if text.trim_ascii_start().starts_with(b"-----BEGIN") {
        let key = pem_key(&text)
            .ok_or_else(|| unusable("not an RSA, EC or Ed25519 public key in PEM form".into()))?;
        return Ok(vec![key]);
    }
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| unusable(format!("neither PEM nor a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            AlgorithmParameters::OctetKey(_) => Family::Hmac,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| unusable(e.to_string()))?;
        keys.push(Key {
            id: jwk.common.key_id.clone(),
            key,
            family,
        });
    }
    if keys.is_empty() {
        return Err(unusable("the JWKS document has no key".into()));
    }
    Ok(keys)
}

/// A PEM public key, whichever of RSA, EC or Ed25519 it is.
fn pem_key(pem: &[u8]) -> Option<Key> {
    let key = |key: DecodingKey, family| Key {
        id: None,
        key,
        family,
    };
    DecodingKey::from_rsa_pem(pem)
        .map(|k| key(k, Family::Rsa))
        .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| key(k, Family::Ec)))
        .or_else(|_| DecodingKey::from_ed_pem(pem).map(|k| key(k, Family::Ed)))
        .ok()
}

/// What a minted token says.
#[derive(Clone, Debug)]
pub struct TokenClaims {
    /// The principal's id (`sub`).
    pub subject: String,
    /// Its roles (`roles`).
    pub roles: Vec<String>,
    /// Seconds it stays valid.
    pub valid_for: u64,
    /// `iss`, if any.
    pub issuer: Option<String>,
    /// `aud`, if any.
    pub audience: Option<String>,
}

impl TokenClaims {
    /// Claims naming `principal` and its roles, valid for `valid_for` seconds, with no issuer
    /// or audience.
    pub fn of(principal: &Principal, valid_for: u64) -> TokenClaims {
        TokenClaims {
            subject: principal.id.clone(),
            roles: principal.roles.clone(),
            valid_for,
            issuer: None,
            audience: None,
        }
    }
}

/// Mints a token for `claims` issued now (see [`issue`]).
pub fn issue_now(key: &SigningKey, claims: &TokenClaims) -> Result<String, AuthError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    issue(key, claims, now)
}

/// Mints a token for `claims`, issued at `now` (seconds since the epoch), signed with an
/// HS256 secret or a private key in PEM form (RS256, ES256 or EdDSA): development tokens for
/// `miroir token issue`.
pub fn issue(key: &SigningKey, claims: &TokenClaims, now: u64) -> Result<String, AuthError> {
    let (alg, encoding) = match key {
        SigningKey::Secret(secret) => (Algorithm::HS256, EncodingKey::from_secret(secret)),
        SigningKey::Pem(pem) => EncodingKey::from_rsa_pem(pem)
            .map(|k| (Algorithm::RS256, k))
            .or_else(|_| EncodingKey::from_ec_pem(pem).map(|k| (Algorithm::ES256, k)))
            .or_else(|_| EncodingKey::from_ed_pem(pem).map(|k| (Algorithm::EdDSA, k)))
            .map_err(|_| {
                AuthError::Sign("not an RSA, EC or Ed25519 private key in PEM form".into())
            })?,
    };
    let mut body = serde_json::json!({
        "sub": claims.subject,
        "roles": claims.roles,
        "iat": now,
        "exp": now + claims.valid_for,
    });
    if let Some(issuer) = &claims.issuer {
        body["iss"] = issuer.as_str().into();
    }
    if let Some(audience) = &claims.audience {
        body["aud"] = audience.as_str().into();
    }
    jsonwebtoken::encode(&Header::new(alg), &body, &encoding)
        .map_err(|e| AuthError::Sign(e.to_string()))
}

/// The key a token is minted with.
pub enum SigningKey {
    /// An HS256 shared secret.
    Secret(Vec<u8>),
    /// A private key in PEM form.
    Pem(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a development secret of enough length";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: TokenClaims, at: u64) -> String {
        issue(&SigningKey::Secret(SECRET.to_vec()), &claims, at).unwrap()
    }

    fn alice() -> TokenClaims {
        TokenClaims {
            subject: "alice".into(),
            roles: vec!["user-admin".into()],
            valid_for: 3600,
            issuer: Some("idp".into()),
            audience: Some("app".into()),
        }
    }

    fn authenticator(trust: bool) -> Authenticator {
        Authenticator::new(AuthConfig {
            keys: Some(KeySource::Secret(SECRET.to_vec())),
            issuer: Some("idp".into()),
            audience: Some("app".into()),
            trust_principal_headers: trust,
            ..AuthConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_valid_token_proves_its_subject_and_roles() {
        let auth = authenticator(false);
        let p = auth.principal(Some(&token(alice(), now())), None).unwrap();
        assert_eq!(p, Principal::new("alice", "user-admin"));
        // A claim beside a token changes nothing.
        let p = auth
            .principal(Some(&token(alice(), now())), Some(("mallory", "root")))
            .unwrap();
        assert_eq!(p.id, "alice");
    }

    #[test]
    fn claims_tokens_that_do_not_hold_and_no_token_are_refused() {
        let auth = authenticator(false);
        let refused = |token: Option<&str>| auth.principal(token, Some(("u-1", "user-admin")));
        assert_eq!(
            refused(None),
            Err(Unauthenticated("no bearer token".into()))
        );
        let expired = token(alice(), now() - 7200);
        assert!(refused(Some(&expired)).unwrap_err().0.contains("Expired"));
        let other = issue(
            &SigningKey::Secret(b"another secret of enough length".to_vec()),
            &alice(),
            now(),
        )
        .unwrap();
        assert!(refused(Some(&other))
            .unwrap_err()
            .0
            .contains("InvalidSignature"));
        let audience = token(
            TokenClaims {
                audience: Some("elsewhere".into()),
                ..alice()
            },
            now(),
        );
        assert!(refused(Some(&audience))
            .unwrap_err()
            .0
            .contains("InvalidAudience"));
        let issuer = token(
            TokenClaims {
                issuer: Some("someone".into()),
                ..alice()
            },
            now(),
        );
        assert!(refused(Some(&issuer))
            .unwrap_err()
            .0
            .contains("InvalidIssuer"));
        assert!(refused(Some("not.a.token"))
            .unwrap_err()
            .0
            .contains("malformed"));
    }

    #[test]
    fn a_claimed_principal_is_taken_only_when_trusted() {
        let auth = authenticator(true);
        assert_eq!(
            auth.principal(None, Some(("u-1", "a,b"))),
            Ok(Principal::new("u-1", "a,b"))
        );
        assert!(auth.principal(None, None).is_err());
    }

    #[test]
    fn roles_come_from_a_nested_claim() {
        let claims = serde_json::json!({
            "sub": "bob",
            "realm_access": { "roles": ["support", "user"] },
            "scope": "read write"
        });
        let auth = |roles: &str| {
            Authenticator::new(AuthConfig {
                roles_claim: Some(roles.into()),
                ..AuthConfig::default()
            })
            .unwrap()
        };
        let p = auth("realm_access.roles").principal_of(&claims).unwrap();
        assert_eq!(p.roles, ["support", "user"]);
        let p = auth("scope").principal_of(&claims).unwrap();
        assert_eq!(p.roles, ["read", "write"]);
        let p = auth("missing").principal_of(&claims).unwrap();
        assert!(p.roles.is_empty());
    }

    #[test]
    fn keys_load_from_a_jwks_document_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        // An octet key (base64url of the secret) verifies HS256 tokens.
        use base64::Engine;
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        std::fs::write(
            &jwks,
            format!(r#"{{"keys":[{{"kty":"oct","kid":"dev","k":"{k}","alg":"HS256"}}]}}"#),
        )
        .unwrap();
        let auth = Authenticator::new(AuthConfig {
            keys: Some(KeySource::File(jwks)),
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!(auth.verify(&token(alice(), now())).unwrap().id, "alice");
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "hello").unwrap();
        let error = Authenticator::new(AuthConfig {
            keys: Some(KeySource::File(garbage)),
            ..AuthConfig::default()
        })
        .err()
        .unwrap();
        assert!(
            error.to_string().contains("neither PEM nor a JWKS"),
            "{error}"
        );
    }
}
