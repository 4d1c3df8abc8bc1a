//! The agent's Prometheus metrics and liveness probe (`--metrics ADDR`:
//! `GET /metrics`, OpenMetrics text; `GET /healthz`).
//!
//! Per volume: what the workload did through its frontends (bytes read and
//! written, and a latency histogram per operation, whose `_count` is the
//! number of requests), the cutover stalls the workload saw, and, while a
//! migration session holds the volume, how far the copy is (bytes copied,
//! dirty bytes, rates, quiesced, redirected, mirroring).
//!
//! The hot path takes no lock: a request's latency goes into fixed buckets
//! of atomic counters ([`Histogram`]), read at scrape time. The session
//! numbers are read from the sessions at scrape time too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use volmig_api::slave::SessionState;

use crate::agent::{Agent, lock};
use crate::interposer::IoCounters;

/// Upper bounds of the latency buckets, in nanoseconds (50 µs to 10 s;
/// a quiesced request waits up to the sync goal, a slow device longer).
const BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram of atomic counters: observing is two relaxed
/// additions, no lock, no allocation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds
    /// in seconds), as the encoder takes them.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let bounds = BOUNDS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(counts.iter().copied()).collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, counts.iter().sum(), buckets)
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// A frontend request's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
        }
    }
}

/// A volume's latencies and stalls (beside the byte counters of
/// [`IoCounters`], which it is part of).
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    ops: [Histogram; Op::ALL.len()],
    stalls: Histogram,
    last_stall_ns: AtomicU64,
}

/// Observes a request's latency when dropped (also when it fails or its
/// future is dropped).
pub struct Timer<'a> {
    h: &'a Histogram,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.h.observe(self.start.elapsed());
    }
}

impl VolumeMetrics {
    /// Times one request of kind `op` (until the guard is dropped).
    pub fn time(&self, op: Op) -> Timer<'_> {
        Timer {
            h: self.op(op),
            start: Instant::now(),
        }
    }

    pub fn op(&self, op: Op) -> &Histogram {
        &self.ops[op as usize]
    }

    /// A cutover held the volume's I/O for `d`.
    pub fn stalled(&self, d: Duration) {
        self.stalls.observe(d);
        self.last_stall_ns.store(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// One served volume at scrape time.
#[derive(Debug)]
struct VolumeSnapshot {
    name: String,
    size: u64,
    counters: Arc<IoCounters>,
    session: Option<SessionState>,
}

/// The FUSE block driver's counters (all its volumes), if it runs.
#[derive(Debug)]
struct FuseSnapshot {
    requests: u64,
    resent: u64,
    errors: u64,
    orphaned: u64,
    spliced: u64,
}

/// Everything one scrape reports.
#[derive(Debug)]
struct Snapshot {
    volumes: Vec<VolumeSnapshot>,
    failed: usize,
    fuse: Option<FuseSnapshot>,
}

async fn snapshot(agent: &Agent) -> Snapshot {
    let held: Vec<_> = {
        let vols = lock(&agent.volumes);
        vols.values()
            .map(|v| {
                (
                    v.served.volume.clone(),
                    v.interposer.clone(),
                    v.slave.clone(),
                )
            })
            .collect()
    };
    let mut volumes = Vec::with_capacity(held.len());
    for (name, interposer, slave) in held {
        let session = match slave {
            Some(s) if !s.is_finished() => Some(s.state().await),
            _ => None,
        };
        volumes.push(VolumeSnapshot {
            name,
            size: interposer.size(),
            counters: interposer.counters.clone(),
            session,
        });
    }
    let failed = agent.list().iter().filter(|v| v.error.is_some()).count();
    let fuse = agent
        .frontends()
        .block()
        .and_then(|b| b.started())
        .and_then(|d| d.fuse())
        .map(|f| {
            let st = f.stats();
            FuseSnapshot {
                requests: st.requests.load(Ordering::Relaxed),
                resent: st.resent.load(Ordering::Relaxed),
                errors: st.errors.load(Ordering::Relaxed),
                orphaned: st.orphaned.load(Ordering::Relaxed),
                spliced: st.spliced.load(Ordering::Relaxed),
            }
        });
    Snapshot {
        volumes,
        failed,
        fuse,
    }
}

/// A gauge or counter family, one sample per volume.
fn family<T: EncodeGauge>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl Iterator<Item = (Vec<(&'static str, String)>, T)>,
) -> Result<(), std::fmt::Error> {
    let mut e = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let m = e.encode_family(&labels)?;
        v.encode(m, kind)?;
    }
    Ok(())
}

/// A gauge without labels.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    v.encode(e, MetricType::Gauge)
}

/// The values a family holds.
trait EncodeGauge {
    fn encode(
        self,
        m: prometheus_client::encoding::MetricEncoder<'_>,
        kind: MetricType,
    ) -> Result<(), std::fmt::Error>;
}

impl EncodeGauge for u64 {
    fn encode(
        self,
        mut m: prometheus_client::encoding::MetricEncoder<'_>,
        kind: MetricType,
    ) -> Result<(), std::fmt::Error> {
        match kind {
            MetricType::Counter => {
                m.encode_counter::<prometheus_client::encoding::NoLabelSet, u64, u64>(&self, None)
            }
            _ => m.encode_gauge(&(i64::try_from(self).unwrap_or(i64::MAX))),
        }
    }
}

impl EncodeGauge for f64 {
    fn encode(
        self,
        mut m: prometheus_client::encoding::MetricEncoder<'_>,
        _kind: MetricType,
    ) -> Result<(), std::fmt::Error> {
        m.encode_gauge(&self)
    }
}

fn vol(name: &str) -> Vec<(&'static str, String)> {
    vec![("volume", name.to_string())]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vs = &self.volumes;
        single(
            &mut enc,
            "volmig_agent_volumes",
            "Volumes this agent serves",
            vs.len() as u64,
        )?;
        single(
            &mut enc,
            "volmig_agent_volumes_failed",
            "Volumes this agent was asked to serve and could not",
            self.failed as u64,
        )?;
        family(
            &mut enc,
            "volmig_agent_volume_size_bytes",
            "Size of the volume",
            MetricType::Gauge,
            vs.iter().map(|v| (vol(&v.name), v.size)),
        )?;
        family(
            &mut enc,
            "volmig_agent_volume_read_bytes",
            "Bytes the workload read through the volume's frontends",
            MetricType::Counter,
            vs.iter()
                .map(|v| (vol(&v.name), v.counters.bytes_read.load(Ordering::Relaxed))),
        )?;
        family(
            &mut enc,
            "volmig_agent_volume_written_bytes",
            "Bytes the workload wrote through the volume's frontends",
            MetricType::Counter,
            vs.iter().map(|v| {
                (
                    vol(&v.name),
                    v.counters.bytes_written.load(Ordering::Relaxed),
                )
            }),
        )?;
        family(
            &mut enc,
            "volmig_agent_volume_mirror_errors",
            "Mirrored writes whose target half failed (the grain was left dirty)",
            MetricType::Counter,
            vs.iter().map(|v| {
                (
                    vol(&v.name),
                    v.counters.mirror_errors.load(Ordering::Relaxed),
                )
            }),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "volmig_agent_volume_io_seconds",
                "Latency of the workload's requests through the volume's frontends, by operation (its _count is the number of requests)",
                None,
                MetricType::Histogram,
            )?;
            for v in vs {
                for op in Op::ALL {
                    let labels = [("volume", v.name.clone()), ("op", op.name().to_string())];
                    let (sum, count, buckets) = v.counters.metrics.op(op).snapshot();
                    e.encode_family(&labels)?
                        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            sum, count, &buckets, None,
                        )?;
                }
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "volmig_agent_volume_stall_seconds",
                "How long each cutover held the workload's I/O on the volume",
                None,
                MetricType::Histogram,
            )?;
            for v in vs {
                let (sum, count, buckets) = v.counters.metrics.stalls.snapshot();
                e.encode_family(&vol(&v.name))?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        family(
            &mut enc,
            "volmig_agent_volume_last_stall_seconds",
            "The last cutover's stall on the volume",
            MetricType::Gauge,
            vs.iter().map(|v| {
                (
                    vol(&v.name),
                    v.counters.metrics.last_stall_ns.load(Ordering::Relaxed) as f64 / 1e9,
                )
            }),
        )?;
        if let Some(f) = &self.fuse {
            for (name, help, v) in [
                (
                    "volmig_agent_fuse_requests",
                    "Requests the FUSE block driver served",
                    f.requests,
                ),
                (
                    "volmig_agent_fuse_resent_requests",
                    "Requests the kernel sent again after an agent restart (FUSE_NOTIFY_RESEND)",
                    f.resent,
                ),
                (
                    "volmig_agent_fuse_errors",
                    "FUSE requests answered with an error",
                    f.errors,
                ),
                (
                    "volmig_agent_fuse_orphaned_answers",
                    "FUSE answers the kernel no longer waited for: a request served twice (never expected; alert on any)",
                    f.orphaned,
                ),
                (
                    "volmig_agent_fuse_spliced_reads",
                    "FUSE reads answered by splicing from the backing file",
                    f.spliced,
                ),
            ] {
                let e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                v.encode(e, MetricType::Counter)?;
            }
        }
        // While a migration session holds the volume.
        let sessions = || {
            vs.iter()
                .filter_map(|v| Some((vol(&v.name), v.session.as_ref()?)))
        };
        family(
            &mut enc,
            "volmig_agent_session_copied_bytes",
            "Bytes this agent copied for the volume's session (all passes)",
            MetricType::Gauge,
            sessions().map(|(l, s)| (l, s.bytes_copied)),
        )?;
        family(
            &mut enc,
            "volmig_agent_session_dirty_bytes",
            "Bytes of the volume written since they were last copied",
            MetricType::Gauge,
            sessions().map(|(l, s)| (l, s.dirty_bytes)),
        )?;
        family(
            &mut enc,
            "volmig_agent_session_copy_rate_bytes_per_second",
            "The session's copy rate",
            MetricType::Gauge,
            sessions().map(|(l, s)| (l, s.copy_rate)),
        )?;
        family(
            &mut enc,
            "volmig_agent_session_write_rate_bytes_per_second",
            "The workload's write rate the session measured",
            MetricType::Gauge,
            sessions().map(|(l, s)| (l, s.write_rate)),
        )?;
        for (name, help, get) in [
            (
                "volmig_agent_session_quiesced",
                "1 while the session holds the workload's I/O (a cutover stall in progress)",
                (|s: &SessionState| s.quiesced) as fn(&SessionState) -> bool,
            ),
            (
                "volmig_agent_session_redirected",
                "1 once the workload's I/O goes to the target",
                |s: &SessionState| s.redirected,
            ),
            (
                "volmig_agent_session_mirror",
                "1 while the workload's writes are mirrored",
                |s: &SessionState| s.mirror,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                MetricType::Gauge,
                sessions().map(|(l, s)| (l, u64::from(get(s)))),
            )?;
        }
        Ok(())
    }
}

/// The OpenMetrics text of one scrape of `agent`.
pub async fn encode(agent: &Agent) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(agent).await));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    out
}

/// `/metrics` and `/healthz` for `agent`.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(a): State<Arc<Agent>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    encode(&a).await,
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(agent)
}

/// Binds `addr` (an error now, not in a task) and serves the router on it
/// until the process ends.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Agent>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics and /healthz listening");
    let app = router(agent);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use volmig_api::io::VolumeIo;
    use volmig_api::slave::{CopyPass, Prepare, Quiesce};
    use volmig_api::{Fence, SessionConfig, Slave};

    /// The value of the sample `line` starts with (`name{labels}`).
    fn sample(text: &str, line: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {line}\n{text}"))
    }

    #[test]
    fn histograms_count_into_their_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!(sum > 60.0);
        assert_eq!(buckets[0], (50e-6, 1), "10 µs is at most 50 µs");
        assert_eq!(buckets[6], (5e-3, 1), "3 ms is in (2.5 ms, 5 ms]");
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_counters_move_with_the_workload_and_the_session() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["src", "tgt"] {
            std::fs::File::create(dir.path().join(f))
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
        }
        let agent = Agent::new(&dir.path().join("state")).unwrap();
        let ip = agent
            .add_volume("v", &dir.path().join("src"), false)
            .await
            .unwrap();
        let before = encode(&agent).await;
        assert_eq!(
            sample(
                &before,
                r#"volmig_agent_volume_io_seconds_count{volume="v",op="write"}"#
            ),
            0.0
        );
        assert!(
            !before.contains("volmig_agent_session_dirty_bytes{"),
            "{before}"
        );

        // The workload: 3 writes, 2 reads, a flush.
        for i in 0..3 {
            ip.write(i * 4096, vec![7u8; 4096], false).await.unwrap();
        }
        for _ in 0..2 {
            ip.read(0, vec![0u8; 4096]).await.unwrap();
        }
        ip.flush().await.unwrap();
        // A session: prepare, one copy pass, a quiesce and a resume (a stall).
        let fence = Fence {
            session: "s1".into(),
            volume: "v".into(),
            epoch: 1,
        };
        agent
            .prepare(Prepare {
                fence: fence.clone(),
                target: dir.path().join("tgt"),
                config: SessionConfig {
                    grain: 65536,
                    chunk_size: 1 << 20,
                    in_flight: 2,
                    sparse: false,
                    ..SessionConfig::default()
                },
                monitor_only: false,
            })
            .await
            .unwrap();
        agent
            .copy_pass(CopyPass {
                fence: fence.clone(),
                slice: None,
            })
            .await
            .unwrap();
        ip.write(0, vec![9u8; 4096], false).await.unwrap();
        agent
            .quiesce(Quiesce {
                fence: fence.clone(),
                budget: Duration::from_secs(2),
            })
            .await
            .unwrap();
        agent.resume(fence.clone()).await.unwrap();

        let text = encode(&agent).await;
        let v = |name: &str| sample(&text, &format!("{name}{{volume=\"v\"}}"));
        let op = |op: &str| {
            sample(
                &text,
                &format!("volmig_agent_volume_io_seconds_count{{volume=\"v\",op=\"{op}\"}}"),
            )
        };
        assert_eq!(op("write"), 4.0, "{text}");
        assert_eq!(op("read"), 2.0);
        assert_eq!(op("flush"), 1.0);
        assert_eq!(op("trim"), 0.0);
        assert_eq!(v("volmig_agent_volume_written_bytes_total"), 4.0 * 4096.0);
        assert_eq!(v("volmig_agent_volume_read_bytes_total"), 2.0 * 4096.0);
        assert_eq!(v("volmig_agent_volume_size_bytes"), (4 << 20) as f64);
        assert!(
            v("volmig_agent_session_copied_bytes") >= (4 << 20) as f64,
            "{text}"
        );
        assert!(
            v("volmig_agent_session_dirty_bytes") > 0.0,
            "the last write is dirty"
        );
        assert_eq!(v("volmig_agent_volume_stall_seconds_count"), 1.0);
        assert!(v("volmig_agent_volume_last_stall_seconds") > 0.0);
        assert_eq!(v("volmig_agent_session_quiesced"), 0.0);
        assert_eq!(sample(&text, "volmig_agent_volumes"), 1.0);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn metrics_and_healthz_are_served_over_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::new(dir.path()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(agent)).await });
        for (path, want) in [("/healthz", "ok"), ("/metrics", "volmig_agent_volumes 0")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
            assert!(out.contains(want), "{path}: {out}");
        }
    }
}
