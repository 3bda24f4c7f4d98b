//! Declared checks (`check = { url, timeout }` of a command section): the HTTP services a
//! master asks before it applies a command, as the command processors' [`Dependency`].
//!
//! The service gets a POST with `{"command": "<operation>", "key": "<entity key>", "payload":
//! {...}}`. A 2xx lets the command through. A 4xx (but 408 and 429) rejects it: the reply
//! carries the answer's `code`, `field` and `message` (or `detail`, as in RFC 9457) when the
//! body is such a JSON object, else the code `rejected` and the body. Anything else (a 5xx,
//! a 408 or 429, no answer within the timeout, no connection) is a technical failure: retried
//! with the command's backoff, then parked in the dead-letter topic.

use std::collections::HashMap;
use std::sync::OnceLock;

use miroir_connectors::commands::processor::dependency::{Dependency, DependencyError};
use miroir_engine::topology::command::{CommandSpec, HttpCheck};
use miroir_engine::topology::Topology;

/// The checks of a topology's commands, by command name.
pub(crate) struct HttpChecks {
    checks: HashMap<String, HttpCheck>,
    /// Made on the first check, on a processor's thread (a blocking client cannot be made
    /// inside an async runtime, where an embedding app may start the engine).
    client: OnceLock<Result<reqwest::blocking::Client, String>>,
}

/// The longest part of a service's answer a rejection or a failure quotes.
const QUOTED: usize = 500;

impl HttpChecks {
    /// The checks `topology`'s commands declare; `None` when none does.
    pub(crate) fn of(topology: &Topology) -> Option<HttpChecks> {
        let checks: HashMap<String, HttpCheck> = topology
            .commands
            .iter()
            .filter_map(|c| Some((c.name.clone(), c.check.clone()?)))
            .collect();
        (!checks.is_empty()).then(|| HttpChecks {
            checks,
            client: OnceLock::new(),
        })
    }

    fn client(&self) -> Result<&reqwest::blocking::Client, DependencyError> {
        self.client
            .get_or_init(|| {
                reqwest::blocking::Client::builder()
                    .build()
                    .map_err(|e| format!("cannot make the checks' HTTP client: {e}"))
            })
            .as_ref()
            .map_err(DependencyError::new)
    }
}

impl Dependency for HttpChecks {
    fn check(
        &self,
        command: &CommandSpec,
        key: &str,
        payload: &serde_json::Value,
    ) -> Result<(), DependencyError> {
        let Some(check) = self.checks.get(&command.name) else {
            return Ok(());
        };
        let body =
            serde_json::json!({ "command": command.operation, "key": key, "payload": payload });
        let response = self
            .client()?
            .post(&check.url)
            .timeout(check.timeout)
            .json(&body)
            .send()
            .map_err(|e| DependencyError::Failed {
                message: format!("{}: {}", check.url, describe(&e)),
                source: Some(Box::new(e)),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().unwrap_or_default();
        let retried = [
            reqwest::StatusCode::REQUEST_TIMEOUT,
            reqwest::StatusCode::TOO_MANY_REQUESTS,
        ];
        if status.is_client_error() && !retried.contains(&status) {
            return Err(rejection(status, &text));
        }
        Err(DependencyError::new(format!(
            "{} answered {status}: {}",
            check.url,
            quote(&text)
        )))
    }
}

/// What a service's 4xx answer says, as a rejection.
fn rejection(status: reqwest::StatusCode, text: &str) -> DependencyError {
    let body: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let said = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let message = said("message")
        .or_else(|| said("detail"))
        .unwrap_or_else(|| match text.trim() {
            "" => status.to_string(),
            text => quote(text),
        });
    DependencyError::rejected(
        said("code").unwrap_or_else(|| "rejected".into()),
        said("field"),
        message,
    )
}

/// Why a request got no answer, in words.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        e.to_string()
    }
}

fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTED) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4xx_answer_becomes_the_rejection_it_describes() {
        let status = reqwest::StatusCode::CONFLICT;
        let e = rejection(
            status,
            r#"{"code": "email_taken", "field": "email", "message": "used by another system"}"#,
        );
        let DependencyError::Rejected {
            code,
            field,
            message,
        } = e
        else {
            panic!("a rejection");
        };
        assert_eq!(
            (code.as_str(), field.as_deref(), message.as_str()),
            ("email_taken", Some("email"), "used by another system")
        );
        let problem = rejection(status, r#"{"title": "Conflict", "detail": "taken"}"#);
        assert!(
            matches!(problem, DependencyError::Rejected { ref message, .. } if message == "taken")
        );
        let plain = rejection(status, "no");
        assert!(
            matches!(plain, DependencyError::Rejected { ref code, ref message, .. } if code == "rejected" && message == "no")
        );
        let empty = rejection(status, "");
        assert!(
            matches!(empty, DependencyError::Rejected { ref message, .. } if message == "409 Conflict")
        );
    }

    #[test]
    fn quotes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(QUOTED + 3);
        assert_eq!(quote(&long).chars().count(), QUOTED + 1);
        assert_eq!(quote("short"), "short");
    }
}
