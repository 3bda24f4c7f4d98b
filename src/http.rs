//! The HTTP API (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 while every component runs; 503 with the failure once one stopped for good (the runtime, the Kafka source, a command processor) |
//! | `GET /ready` | 200 once every assigned partition is applied the external database (if any) accepts writes and the command processors (if any) consume, 503 otherwise (JSON body says why) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/topology` | sources, tables, their columns and keys, and the operator graph |
//! | `GET /v1/tables/{table}/rows/{key}` | the row with its partition and freshness; 404 when absent, 400 when `key` is not a key of the table |
//! | `GET /v1/tables/{table}/rows?prefix=&limit=` | rows whose key starts with `prefix` (limit ≤ 10000, default 100) |
//!
//! A key is written in its URL form ([`miroir_engine::value::key_text`]): the parts of a
//! composite key joined with `|`, with `\` and `|` inside a part escaped by `\`, and NULL
//! written `\N`. A scan's prefix is that form cut short: whole parts, then the beginning of a
//! text part.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::{EngineError, Inner, QueryError};

/// Most rows one scan returns.
const MAX_SCAN: usize = 10_000;

/// A running HTTP server on its own small tokio runtime.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(inner: Arc<Inner>, addr: SocketAddr) -> Result<Server, EngineError> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| EngineError::Listen { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| EngineError::Listen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| EngineError::Listen { addr, source })?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("miroir-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return warn!(error = %e, "cannot serve HTTP"),
                    };
                    info!(addr = %bound, "serving HTTP");
                    let served = axum::serve(listener, router(inner))
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        warn!(error = %e, "HTTP server stopped");
                    }
                });
            })
            .map_err(|source| EngineError::Listen { addr, source })?;
        Ok(Server {
            addr: bound,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/topology", get(topology))
        .route("/v1/tables/{table}/rows", get(scan))
        .route("/v1/tables/{table}/rows/{key}", get(row))
        .with_state(inner)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn query_error(e: QueryError) -> Response {
    match e {
        QueryError::UnknownTable(_) | QueryError::External { .. } => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        QueryError::BadKey { .. } => error(StatusCode::BAD_REQUEST, e.to_string()),
        QueryError::Store(_) => {
            warn!(error = %e, "query failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn health(State(inner): State<Arc<Inner>>) -> Response {
    match inner.failure() {
        None => "ok".into_response(),
        Some(failure) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "healthy": false, "failure": failure })),
        )
            .into_response(),
    }
}

async fn ready(State(inner): State<Arc<Inner>>) -> Response {
    let status = inner.runtime.status();
    let body = json!({
        "ready": inner.ready(),
        "lag": status.lag,
        "failure": status.failure,
        "sink_failure": status.sink_failure,
        "commands": inner.processors.iter().map(|(name, p)| json!({
            "command": name,
            "ready": p.ready(),
            "failure": p.failure(),
        })).collect::<Vec<_>>(),
    });
    let code = if inner.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(inner): State<Arc<Inner>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        inner.metrics.render(),
    )
        .into_response()
}

async fn topology(State(inner): State<Arc<Inner>>) -> Response {
    let t = &inner.topology;
    let columns = |cols: &[miroir_engine::value::Column]| {
        cols.iter()
            .map(|c| json!({ "name": c.name, "type": c.ty.name() }))
            .collect::<Vec<_>>()
    };
    Json(json!({
        "name": t.name,
        "sources": t.sources.iter().map(|s| json!({
            "name": s.name, "topic": s.topic, "key": s.key_name(), "columns": columns(&s.columns),
        })).collect::<Vec<_>>(),
        "tables": t.tables.iter().map(|tb| json!({
            "name": tb.name,
            "query": tb.sql,
            "key": tb.key.iter().map(|k| tb.columns[*k].name.clone()).collect::<Vec<_>>(),
            "columns": columns(&tb.columns),
            "store": match tb.postgres() {
                Some(pg) => json!({ "postgres": pg.qualified() }),
                None => json!("internal"),
            },
        })).collect::<Vec<_>>(),
        "explain": t.explain(),
    }))
    .into_response()
}

async fn row(
    State(inner): State<Arc<Inner>>,
    Path((table, key)): Path<(String, String)>,
) -> Response {
    match inner.get(&table, &key) {
        Ok(Some(answer)) => Json(answer).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no row with key `{key}` in `{table}`"),
        ),
        Err(e) => query_error(e),
    }
}

#[derive(Deserialize)]
struct ScanParams {
    #[serde(default)]
    prefix: String,
    limit: Option<String>,
}

async fn scan(
    State(inner): State<Arc<Inner>>,
    Path(table): Path<String>,
    Query(p): Query<ScanParams>,
) -> Response {
    let limit = match p.limit.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=MAX_SCAN).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit must be a number from 1 to {MAX_SCAN}"),
            )
        }
    };
    match inner.scan(&table, &p.prefix, limit) {
        Ok(rows) => Json(json!({ "table": table, "rows": rows, "freshness": inner.freshness() }))
            .into_response(),
        Err(e) => query_error(e),
    }
}
