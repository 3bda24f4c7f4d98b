//! The HTTP API (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 while every component runs; 503 with the failure once one stopped for good (the runtime, the Kafka source, a command processor) |
//! | `GET /ready` | 200 once every assigned partition is applied the external database (if any) accepts writes and the command processors (if any) consume, 503 otherwise (JSON body says why) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/topology` | sources, tables, their columns and keys, and the operator graph |
//! | `GET /v1/cluster` | this instance, and every live instance of the topology with its address, the partitions it owns, restores and stands by for, and its lags |
//! | `GET /v1/tables/{table}/rows/{key}` | the row with its partition, the instance that served it and its freshness; 404 when absent, 400 when `key` is not a key of the table. Asked of an instance that does not own the key's partition, forwarded to the one that does; 503 with `Retry-After` while the partition has no owner. While the owner cannot answer (dead, restoring, moving), a standby replica of the partition answers with the row it holds, `freshness.stale` true and `freshness.lag` its changelog records not read yet (503 when it has no row). `?local=true` answers from this instance's state alone; `?standby=true` from its standby replica alone; `?min_offset=P:O&wait=5s` waits until that record of the source topic is applied, `?min_version=V&wait=5s` until an event of the key's entity with at least that version (the source's `late.order_by`) is |
//! | `GET /v1/tables/{table}/rows?prefix=&limit=&after=` | rows whose key starts with `prefix`, in key order, from every instance (limit ≤ 10000, default 100), and the cursor `next` to pass as `after` for the next page (`null` after the last); `?local=true` scans this instance alone |
//!
//! A key is written in its URL form ([`miroir_engine::value::key_text`]): the parts of a
//! composite key joined with `|`, with `\` and `|` inside a part escaped by `\`, and NULL
//! written `\N`. A scan's prefix is that form cut short: whole parts, then the beginning of a
//! text part.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::access::{bearer, may_read};
use crate::{EngineError, Inner, QueryError, Route, ScanOrder, VersionTarget};
use miroir_connectors::kafka::membership::Member;
use miroir_engine::command::Principal;

/// Most rows one scan returns.
const MAX_SCAN: usize = 10_000;

/// Header of a query forwarded by another instance (its id): it is answered here or refused,
/// never forwarded again.
const FORWARDED_BY: &str = "x-miroir-forwarded-by";

/// How long a forwarded query may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the HTTP API's address (port 0 picks a free one); returns the listener and the
/// address bound.
pub(crate) fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), EngineError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| EngineError::Listen { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| EngineError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| EngineError::Listen { addr, source })?;
    Ok((listener, bound))
}

/// The address other instances reach a server bound to `bound` at, unless told otherwise:
/// `bound` itself, with `127.0.0.1` for an unspecified IP (set `--advertise` when the
/// instances run on several hosts).
pub(crate) fn advertised(bound: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() {
        warn!(addr = %bound, "listening on every interface: other instances are told 127.0.0.1; set --advertise when they run on other hosts");
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
    } else {
        bound
    }
}

/// A running HTTP server on its own small tokio runtime.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `routes` on `listener` (bound to `bound`) on a thread of its own, over TLS
    /// with `tls`.
    pub(crate) fn start(
        routes: Router,
        (listener, bound): (std::net::TcpListener, SocketAddr),
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Server, EngineError> {
        let addr = bound;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("miroir-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let served = rt.block_on(async move {
                    let stopped = async move {
                        let _ = stop_rx.await;
                    };
                    match tls {
                        None => serve_plain(listener, bound, routes, stopped).await,
                        Some(tls) => serve_tls(listener, bound, routes, tls, stopped).await,
                    }
                });
                if let Err(e) = served {
                    warn!(addr = %bound, error = %e, "HTTP server stopped");
                }
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

/// Serves `routes` over plain HTTP until `stopped`.
async fn serve_plain(
    listener: std::net::TcpListener,
    bound: SocketAddr,
    routes: Router,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    info!(addr = %bound, "serving HTTP");
    axum::serve(listener, routes)
        .with_graceful_shutdown(stopped)
        .await
}

/// Serves `routes` over TLS until `stopped`.
async fn serve_tls(
    listener: std::net::TcpListener,
    bound: SocketAddr,
    routes: Router,
    tls: Arc<rustls::ServerConfig>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        stopped.await;
        shutdown.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    info!(addr = %bound, "serving HTTPS");
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
    axum_server::from_tcp_rustls(listener, config)?
        .handle(handle)
        .serve(routes.into_make_service())
        .await
}

/// Most queries served at once; more wait their turn (health, readiness and metrics do not).
const MAX_CONCURRENT_QUERIES: usize = 64;

/// Longest time a query is served: the longest wait a query may ask for, and a margin.
const QUERY_TIMEOUT: Duration = Duration::from_secs(MAX_WAIT.as_secs() + 10);

/// Largest request body taken (queries have none).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Routes {
    /// Every route.
    All,
    /// The queries alone (the probes are on an address of their own).
    Queries,
    /// `/health`, `/ready` and `/metrics` alone.
    Probes,
}

/// The routes `which` of the API, over `inner`.
pub(crate) fn router(inner: Arc<Inner>, which: Routes) -> Router {
    // Queries are limited together, so that a few large scans cannot starve the probes.
    let queries = Router::new()
        .route("/v1/topology", get(topology))
        .route("/v1/cluster", get(cluster))
        .route("/v1/tables/{table}/rows", get(scan))
        .route("/v1/tables/{table}/rows/{key}", get(row))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            MAX_CONCURRENT_QUERIES,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            QUERY_TIMEOUT,
        ));
    let probes = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    let routes = match which {
        Routes::All => probes.merge(queries),
        Routes::Queries => queries,
        Routes::Probes => probes,
    };
    routes
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            MAX_BODY_BYTES,
        ))
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
        QueryError::BadKey { .. } | QueryError::BadCursor(_) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        QueryError::Unavailable(message) => unavailable(message),
        QueryError::Refused(_) => error(StatusCode::FORBIDDEN, e.to_string()),
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
        "restore_remaining": status.restore_remaining,
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

async fn topology(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Err(refused) = may_read(&inner.auth, ("the topology", &[], false), &headers) {
        return refused.into_response();
    }
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
            "kind": if s.stream.is_some() { "stream" } else { "upsert" },
            "row_key": s.identity.iter().map(|k| s.columns[*k].name.clone()).collect::<Vec<_>>(),
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

/// Options of a row query.
#[derive(Deserialize)]
struct RowParams {
    /// Answer from this instance's state alone.
    #[serde(default)]
    local: bool,
    /// `P:O`: answer once the record at offset `O` of partition `P` of the table's source
    /// topic is applied (read your writes: a command's reply gives both).
    min_offset: Option<String>,
    /// `V`: answer once an event of the key's entity with at least version `V` (the source's
    /// `late.order_by`) is applied (a command's reply gives it).
    min_version: Option<String>,
    /// How long to wait for `min_offset` or `min_version` (a duration; default 5 s, at most
    /// 30 s).
    wait: Option<String>,
    /// Answer from this instance's standby replica of the key's partition (stale).
    #[serde(default)]
    standby: bool,
}

/// What a row query waits for before it answers.
enum Awaited {
    /// The record at this offset of this partition of the table's source topic.
    Offset(u32, i64),
    /// An event of the key's entity with at least this version (as the query gave it).
    Version(String),
}

/// The longest `wait` of a row query.
const MAX_WAIT: Duration = Duration::from_secs(30);

impl RowParams {
    /// What to wait for, and how long; an error message when malformed.
    fn awaited(&self) -> Result<Option<(Awaited, Duration)>, String> {
        let awaited = match (&self.min_offset, &self.min_version) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err("min_offset and min_version exclude each other".into())
            }
            (Some(spec), None) => spec
                .split_once(':')
                .and_then(|(p, o)| Some(Awaited::Offset(p.parse().ok()?, o.parse().ok()?)))
                .ok_or_else(|| format!("min_offset `{spec}` is not PARTITION:OFFSET"))?,
            (None, Some(version)) => Awaited::Version(version.clone()),
        };
        let wait = match &self.wait {
            None => Duration::from_secs(5),
            Some(w) => humantime::parse_duration(w)
                .ok()
                .filter(|d| *d <= MAX_WAIT)
                .ok_or_else(|| format!("wait `{w}` is not a duration up to 30s"))?,
        };
        Ok(Some((awaited, wait)))
    }
}

/// What a waiting row query reads again until it is applied.
enum Probe {
    /// The last offset applied of this partition of this source topic, against this one.
    Offset(String, u32, i64),
    /// The version of this entity.
    Version(VersionTarget),
}

/// Waits until what the query awaits for `key` of `table` is applied here, for at most
/// `wait`; the answer to give instead when it is not.
async fn wait_until_applied(
    inner: &Inner,
    (table, key): (&str, &str),
    (awaited, wait): (Awaited, Duration),
) -> Result<(), Response> {
    let bad = |e: String| error(StatusCode::BAD_REQUEST, e);
    // What the query awaits is resolved once; only how far the instance got is read again.
    let (probe, what) = match awaited {
        Awaited::Offset(partition, offset) => {
            let (_, source) = inner.source_of(table, "min_offset").map_err(bad)?;
            let what = format!(
                "offset {offset} of partition {partition} of {}",
                source.topic
            );
            let topic = source.topic.clone();
            (Probe::Offset(topic, partition, offset), what)
        }
        Awaited::Version(version) => {
            let target = inner.version_target(table, key, &version).map_err(bad)?;
            (
                Probe::Version(target),
                format!("version {version} of key `{key}`"),
            )
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (done, applied) = match &probe {
            Probe::Offset(topic, partition, offset) => {
                let applied = inner.runtime.committed_offset(topic, *partition);
                (applied.is_some_and(|a| a >= *offset), json!(applied))
            }
            Probe::Version(target) => {
                let applied = inner.applied_version(target).map_err(bad)?;
                let done = applied.as_ref().is_some_and(|a| *a >= target.wanted);
                (done, json!(applied.map(|v| v.to_key_text())))
            }
        };
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": format!("{what} is not applied after {wait:?}; ask again"),
                    "applied_up_to": applied,
                })),
            )
                .into_response();
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return Err(response);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn row(
    State(inner): State<Arc<Inner>>,
    Path((table, key)): Path<(String, String)>,
    Query(p): Query<RowParams>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let caller = match inner.may_read(&table, &headers) {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    let absent = || {
        error(
            StatusCode::NOT_FOUND,
            format!("no row with key `{key}` in `{table}`"),
        )
    };
    let awaited = match p.awaited() {
        Ok(a) => a,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if p.standby {
        return match inner.get_standby(&table, &key) {
            Ok(answer) if !inner.admits(&table, caller.as_ref())(&answer.row) => absent(),
            Ok(answer) => Json(answer).into_response(),
            Err(e) => query_error(e),
        };
    }
    if !p.local {
        let forwarded = headers.contains_key(FORWARDED_BY);
        // A standby answers for a partition whose owner cannot, unless the query awaits a
        // write (only the owner knows it).
        let standby = |owner: Option<String>| {
            let inner = inner.clone();
            let (table, key) = (table.clone(), key.clone());
            let token = bearer(&headers).map(str::to_string);
            let caller = caller.clone();
            let waits = awaited.is_some();
            async move {
                let asked = (forwarded, token.as_deref(), caller.as_ref());
                match waits {
                    true => None,
                    false => from_standby(&inner, (&table, &key), owner.as_deref(), asked).await,
                }
            }
        };
        match inner.route(&table, &key) {
            Ok(Route::Here) => {}
            Ok(Route::At(owner)) if !forwarded => {
                let ask = Ask {
                    table: &table,
                    key: &key,
                    query: query.as_deref(),
                    wait: awaited.as_ref().map_or(Duration::ZERO, |(_, w)| *w),
                    token: bearer(&headers),
                };
                let answered = inner
                    .forwarder
                    .row(inner.membership.me(), &owner, &ask)
                    .await;
                return match answered {
                    Ok(answer) if answer.status() != StatusCode::SERVICE_UNAVAILABLE => answer,
                    failed => match standby(Some(owner.instance.clone())).await {
                        Some(answer) => answer,
                        None => failed.unwrap_or_else(|()| moving(&table, &key)),
                    },
                };
            }
            Ok(Route::At(owner)) => {
                return match standby(Some(owner.instance)).await {
                    Some(answer) => answer,
                    None => moving(&table, &key),
                };
            }
            Ok(Route::Moving) => {
                return match standby(None).await {
                    Some(answer) => answer,
                    None => moving(&table, &key),
                };
            }
            Ok(Route::Restoring) => {
                return unavailable(format!(
                    "this instance is reading the partition of key `{key}` of `{table}`; ask again"
                ))
            }
            Ok(Route::Incomplete(why)) => return unavailable(why),
            Err(e) => return query_error(e),
        }
    }
    if let Some(awaited) = awaited {
        if let Err(response) = wait_until_applied(&inner, (&table, &key), awaited).await {
            return response;
        }
    }
    match inner.get(&table, &key) {
        Ok(Some(answer)) if inner.admits(&table, caller.as_ref())(&answer.row) => {
            Json(answer).into_response()
        }
        Ok(_) => absent(),
        Err(e) => query_error(e),
    }
}

/// The answer of a standby replica of the partition of `key` in `table` (this instance's, or,
/// unless the query was `forwarded` already, another's), other than owner `owner`'s; `None`
/// when none answers with a row.
async fn from_standby(
    inner: &Inner,
    (table, key): (&str, &str),
    owner: Option<&str>,
    (forwarded, token, caller): (bool, Option<&str>, Option<&Principal>),
) -> Option<Response> {
    let standby = inner.standby_of(table, key, owner)?;
    if standby.instance == inner.membership.me() {
        return inner
            .get_standby(table, key)
            .ok()
            .filter(|answer| inner.admits(table, caller)(&answer.row))
            .map(|answer| Json(answer).into_response());
    }
    if forwarded {
        return None;
    }
    let ask = Ask {
        table,
        key,
        query: Some("standby=true"),
        wait: Duration::ZERO,
        token,
    };
    match inner
        .forwarder
        .row(inner.membership.me(), &standby, &ask)
        .await
    {
        Ok(answer) if answer.status() == StatusCode::OK => Some(answer),
        _ => None,
    }
}

/// The answer while the partition of `key` has no owner that can answer (a rebalance is
/// moving it): 503, to be asked again.
fn moving(table: &str, key: &str) -> Response {
    unavailable(format!(
        "the partition of key `{key}` of `{table}` is moving to another instance; ask again"
    ))
}

/// 503 with `message`, to be asked again in a second.
fn unavailable(message: String) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    response
}

/// A one-thread tokio runtime, stopped when dropped.
struct RuntimeOwner {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeOwner {
    fn start() -> Result<RuntimeOwner, EngineError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(EngineError::Forwarder)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("miroir-forward".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .map_err(EngineError::Forwarder)?;
        Ok(RuntimeOwner {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for RuntimeOwner {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A row query, as forwarded to the owner of its key.
struct Ask<'a> {
    table: &'a str,
    key: &'a str,
    /// The query's options, passed on as they came.
    query: Option<&'a str>,
    /// How long the owner may wait before it answers (`min_offset`).
    wait: Duration,
    /// The caller's bearer token, passed on: the owner checks it too.
    token: Option<&'a str>,
}

/// One page of a scan, as asked of each instance.
struct Scan<'a> {
    table: &'a str,
    prefix: &'a str,
    after: Option<&'a str>,
    order: ScanOrder,
    limit: usize,
    /// The caller's bearer token, passed on: each instance checks it too.
    token: Option<&'a str>,
}

async fn cluster(State(inner): State<Arc<Inner>>) -> Response {
    Json(json!({
        "instance": inner.membership.me(),
        "instances": inner.membership.live(),
    }))
    .into_response()
}

/// Sends queries on to the instance that owns their key, over pooled connections.
#[derive(Clone)]
pub(crate) struct Forwarder {
    client: reqwest::Client,
    /// `https` when the instances serve TLS, else `http`.
    scheme: &'static str,
    /// Where the embedding API's forwards run (its callers may be in no runtime, or in one
    /// of their own).
    runtime: tokio::runtime::Handle,
    /// Keeps that runtime's thread.
    _owner: Arc<RuntimeOwner>,
    /// Queries forwarded, by outcome (`answered`: the owner answered, whatever its answer;
    /// `unreachable`: it did not, and the caller got a 503).
    forwards: prometheus::IntCounterVec,
    /// Seconds from forwarding a query to its owner's answer.
    seconds: prometheus::Histogram,
}

impl Forwarder {
    /// A forwarder whose metrics are in `registry`; over TLS with `tls` (the other instances
    /// serve it too).
    pub(crate) fn new(
        registry: &prometheus::Registry,
        tls: Option<&crate::HttpTls>,
    ) -> Result<Forwarder, EngineError> {
        let forwards = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "miroir_query_forwards_total",
                "Row queries forwarded to the instance owning their key, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "miroir_query_forward_seconds",
                "Seconds from forwarding a row query to its owner's answer",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        for metric in [
            Box::new(forwards.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(seconds.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        let owner = RuntimeOwner::start()?;
        let mut client = reqwest::Client::builder().timeout(FORWARD_TIMEOUT);
        for root in tls
            .map(crate::HttpTls::peer_roots)
            .transpose()?
            .unwrap_or_default()
        {
            client = client.add_root_certificate(root);
        }
        let client = client.build().map_err(|e| {
            EngineError::Forwarder(std::io::Error::other(format!("HTTP client: {e}")))
        })?;
        Ok(Forwarder {
            client,
            scheme: if tls.is_some() { "https" } else { "http" },
            runtime: owner.handle.clone(),
            _owner: Arc::new(owner),
            forwards,
            seconds,
        })
    }

    /// Asks `owner` for the row of `key` in `table`, on behalf of instance `me`: its answer,
    /// whatever its status; `Err` when it gave none.
    async fn row(&self, me: &str, owner: &Member, ask: &Ask<'_>) -> Result<Response, ()> {
        let timer = self.seconds.start_timer();
        let asked = self.ask(me, owner, ask).await;
        timer.observe_duration();
        let outcome = if asked.is_ok() {
            "answered"
        } else {
            "unreachable"
        };
        self.forwards.with_label_values(&[outcome]).inc();
        asked
    }

    /// `owner`'s rows of `scan`, with their cursors; `Err` when it did not give them (logged).
    async fn scan(
        &self,
        me: &str,
        owner: &Member,
        scan: &Scan<'_>,
    ) -> Result<Vec<(String, serde_json::Value)>, ()> {
        let addr = owner.advertise.as_deref().ok_or(())?;
        let failed = |e: &dyn std::fmt::Display| {
            warn!(instance = %owner.instance, addr, table = scan.table, error = %e, "an instance did not answer a scan");
        };
        let mut url =
            reqwest::Url::parse(&format!("{}://{addr}/", self.scheme)).map_err(|e| failed(&e))?;
        url.path_segments_mut()
            .expect("an http URL has a path")
            .extend(["v1", "tables", scan.table, "rows"]);
        let mut query = vec![
            ("prefix", scan.prefix.to_string()),
            ("limit", scan.limit.to_string()),
            ("local", "true".to_string()),
        ];
        if scan.order == ScanOrder::Descending {
            query.push(("order", "desc".to_string()));
        }
        if let Some(after) = scan.after {
            query.push(("after", after.to_string()));
        }
        let mut request = self.client.get(url).query(&query).header(FORWARDED_BY, me);
        if let Some(token) = scan.token {
            request = request.bearer_auth(token);
        }
        let answer = request
            .send()
            .await
            .and_then(|a| a.error_for_status())
            .map_err(|e| failed(&e))?;
        let page: serde_json::Value = answer.json().await.map_err(|e| failed(&e))?;
        let (Some(rows), Some(cursors)) = (page["rows"].as_array(), page["cursors"].as_array())
        else {
            failed(&"no rows or cursors in the answer");
            return Err(());
        };
        Ok(cursors
            .iter()
            .filter_map(|c| c.as_str().map(String::from))
            .zip(rows.iter().cloned())
            .collect())
    }

    /// The owner's answer, whatever its status; `Err` when it gave none (logged).
    async fn ask(&self, me: &str, owner: &Member, ask: &Ask<'_>) -> Result<Response, ()> {
        let (status, body) = self.fetch(me, owner, ask).await?;
        Ok((status, [("content-type", "application/json")], body).into_response())
    }

    /// For a caller outside any async runtime (the embedding API): the owner's status and
    /// body, fetched on the forwarder's own runtime with the caller's `token`, if any; `Err`
    /// when it gave none (logged).
    pub(crate) fn fetch_blocking(
        &self,
        me: &str,
        owner: &Member,
        (table, key): (&str, &str),
        (query, token): (Option<&str>, Option<&str>),
    ) -> Result<(StatusCode, bytes::Bytes), ()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (me, owner, table, key) = (
            me.to_string(),
            owner.clone(),
            table.to_string(),
            key.to_string(),
        );
        let query = query.map(str::to_string);
        let token = token.map(str::to_string);
        let this = self.clone();
        self.runtime.spawn(async move {
            let ask = Ask {
                table: &table,
                key: &key,
                query: query.as_deref(),
                wait: Duration::ZERO,
                token: token.as_deref(),
            };
            let _ = tx.send(this.fetch(&me, &owner, &ask).await);
        });
        rx.recv().unwrap_or(Err(()))
    }

    /// The owner's status and body for the row of `key`; `Err` when it gave none (logged).
    async fn fetch(
        &self,
        me: &str,
        owner: &Member,
        ask: &Ask<'_>,
    ) -> Result<(StatusCode, bytes::Bytes), ()> {
        let (table, key) = (ask.table, ask.key);
        let addr = owner.advertise.as_deref().ok_or(())?;
        let mut url = reqwest::Url::parse(&format!("{}://{addr}/", self.scheme)).map_err(|e| {
            warn!(instance = %owner.instance, addr, error = %e, "the owner's address is not a host:port");
        })?;
        url.path_segments_mut()
            .expect("an http URL has a path")
            .extend(["v1", "tables", table, "rows", key]);
        url.set_query(ask.query);
        let mut request = self
            .client
            .get(url)
            .timeout(FORWARD_TIMEOUT + ask.wait)
            .header(FORWARDED_BY, me);
        if let Some(token) = ask.token {
            request = request.bearer_auth(token);
        }
        let answer = request
            .send()
            .await
            .map_err(|e| {
                warn!(instance = %owner.instance, addr, table, key, error = %e, "the owner of the key did not answer");
            })?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(|e| {
            warn!(instance = %owner.instance, addr, table, key, error = %e, "the owner's answer was cut short");
        })?;
        Ok((status, body))
    }
}

#[derive(Deserialize)]
struct ScanParams {
    #[serde(default)]
    prefix: String,
    limit: Option<String>,
    /// Go on after this cursor (the `next` of the page before).
    after: Option<String>,
    /// `asc` (key order, the default) or `desc`.
    order: Option<String>,
    /// Scan this instance's state alone.
    #[serde(default)]
    local: bool,
}

async fn scan(
    State(inner): State<Arc<Inner>>,
    Path(table): Path<String>,
    Query(p): Query<ScanParams>,
    headers: HeaderMap,
) -> Response {
    let caller = match inner.may_read(&table, &headers) {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
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
    let order = match p.order.as_deref() {
        None | Some("asc") => ScanOrder::Ascending,
        Some("desc") => ScanOrder::Descending,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("order must be `asc` or `desc`, not `{other}`"),
            )
        }
    };
    let forwarded = headers.contains_key(FORWARDED_BY);
    let admit = inner.admits(&table, caller.as_ref());
    let from = (p.after.as_deref(), order);
    let mut rows = match inner.scan(&table, (&p.prefix, from, limit), &admit) {
        Ok(rows) => rows,
        Err(e) => return query_error(e),
    };
    let mut full = rows.len() >= limit;
    if !p.local && !forwarded && inner.scatters(&table) {
        let me = inner.membership.me();
        let scan = Scan {
            table: &table,
            prefix: &p.prefix,
            after: p.after.as_deref(),
            order,
            limit,
            token: bearer(&headers),
        };
        for owner in inner.membership.live().iter().filter(|m| m.instance != me) {
            match inner.forwarder.scan(me, owner, &scan).await {
                Ok(page) => {
                    full |= page.len() >= limit;
                    rows.extend(page);
                }
                Err(()) => {
                    return unavailable(format!(
                        "instance {} did not answer the scan of `{table}`; ask again",
                        owner.instance
                    ))
                }
            }
        }
        match order {
            ScanOrder::Ascending => rows.sort_by(|a, b| a.0.cmp(&b.0)),
            ScanOrder::Descending => rows.sort_by(|a, b| b.0.cmp(&a.0)),
        }
        rows.dedup_by(|a, b| a.0 == b.0);
    }
    let more = full || rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|(c, _)| c.clone())
    } else {
        None
    };
    let (cursors, rows): (Vec<String>, Vec<serde_json::Value>) = rows.into_iter().unzip();
    let mut body =
        json!({ "table": table, "rows": rows, "next": next, "freshness": inner.freshness() });
    if forwarded {
        body["cursors"] = json!(cursors);
    }
    Json(body).into_response()
}
