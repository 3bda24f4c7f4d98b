//! Who may read over HTTP. Once the instance verifies bearer tokens (see
//! [`miroir_engine::auth`]), a query of a table or of the topology needs a valid one in
//! `Authorization: Bearer ...` (401 otherwise), and a table with `readers` needs one of those
//! roles (403 otherwise); a table's `row_filter` then decides which rows the caller is
//! served. A table with `readers` or a row filter is never served without a token. Health,
//! readiness and metrics stay open.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use miroir_engine::auth::Authenticator;
use miroir_engine::command::Principal;
use serde_json::json;
use tracing::info;

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Whether the caller of a request with `headers` may read what `readers` may (empty: any
/// authenticated caller), and who it is (`None` when nothing needs a token: no key verifies
/// them, no reader role is named and no row is `filtered`); `Err` is the answer when it may
/// not. `what` names it in the log.
pub(crate) fn may_read(
    auth: &Authenticator,
    (what, readers, filtered): (&str, &[String], bool),
    headers: &HeaderMap,
) -> Result<Option<Principal>, Refused> {
    if !auth.verifies_tokens() && readers.is_empty() && !filtered {
        return Ok(None);
    }
    let principal = match auth.principal(bearer(headers), None) {
        Ok(p) => p,
        Err(why) => {
            info!(what, reason = %why, "query refused: not authenticated");
            return Err(Refused {
                status: StatusCode::UNAUTHORIZED,
                message: why.0,
            });
        }
    };
    if readers.is_empty() || principal.roles.iter().any(|r| readers.contains(r)) {
        return Ok(Some(principal));
    }
    info!(
        what,
        principal = principal.id,
        "query refused: no reader role"
    );
    Err(Refused {
        status: StatusCode::FORBIDDEN,
        message: format!(
            "`{}` may not read {what}: it takes one of the roles {}",
            principal.id,
            readers.join(", ")
        ),
    })
}

/// A query refused: 401 (with `WWW-Authenticate: Bearer`) or 403, and why.
#[derive(Debug)]
pub(crate) struct Refused {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = axum::Json(json!({ "error": self.message }));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use miroir_engine::auth::{issue_now, AuthConfig, KeySource, SigningKey, TokenClaims};

    const SECRET: &[u8] = b"access tests secret";

    fn auth(keys: bool) -> Authenticator {
        Authenticator::new(AuthConfig {
            keys: keys.then(|| KeySource::Secret(SECRET.to_vec())),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn with_token(roles: &[&str]) -> HeaderMap {
        let ada = Principal::new("ada", &roles.join(","));
        let claims = TokenClaims::of(&ada, 60);
        let token = issue_now(&SigningKey::Secret(SECRET.to_vec()), &claims).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    fn status(r: Result<Option<Principal>, Refused>) -> u16 {
        r.map_or_else(|r| r.into_response().status().as_u16(), |_| 200)
    }

    #[test]
    fn reads_need_a_token_once_tokens_are_verified_and_a_role_where_readers_are_named() {
        let none = HeaderMap::new();
        let support = vec!["support".to_string()];
        // No keys: open, except a table with readers.
        assert_eq!(
            status(may_read(&auth(false), ("t", &[], false), &none)),
            200
        );
        assert_eq!(status(may_read(&auth(false), ("t", &[], true), &none)), 401);
        assert_eq!(
            status(may_read(&auth(false), ("t", &support, false), &none)),
            401
        );
        // Keys: a valid token, and one of the roles where readers are named.
        let auth = auth(true);
        assert_eq!(status(may_read(&auth, ("t", &[], false), &none)), 401);
        assert_eq!(
            status(may_read(&auth, ("t", &[], false), &with_token(&[]))),
            200
        );
        assert_eq!(
            status(may_read(
                &auth,
                ("t", &support, false),
                &with_token(&["user"])
            )),
            403
        );
        assert_eq!(
            status(may_read(
                &auth,
                ("t", &support, false),
                &with_token(&["support"])
            )),
            200
        );
        let mut garbage = HeaderMap::new();
        garbage.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer x.y.z"),
        );
        assert_eq!(status(may_read(&auth, ("t", &[], false), &garbage)), 401);
    }
}
