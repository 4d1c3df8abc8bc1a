//! `/healthz`, `/readyz` and `/metrics` over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Debug, Default)]
pub struct Health {
    /// The process can reach the API server (set after the first success).
    pub ready: AtomicBool,
    /// The main loop ended (shutting down): not alive any more.
    pub stopping: AtomicBool,
}

async fn healthz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.stopping.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::SeqCst) && !h.stopping.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

pub fn health_router(h: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(h)
}

pub fn metrics_router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .with_state(m)
}

/// Serves `router` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn probes_follow_the_flags() {
        let h = Arc::new(Health::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = health_router(h.clone()).merge(metrics_router(Arc::new(Metrics::default())));
        tokio::spawn(async move { axum::serve(listener, app).await });
        assert!(
            get_status(addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            get_status(addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 503")
        );
        h.ready.store(true, Ordering::SeqCst);
        assert!(
            get_status(addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let m = get_status(addr, "/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200") && m.contains("volmig_sessions"),
            "{m}"
        );
        h.stopping.store(true, Ordering::SeqCst);
        assert!(
            get_status(addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 503")
        );
    }
}
