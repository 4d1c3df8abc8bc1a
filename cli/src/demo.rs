//! `volmig demo`: a complete live migration on temporary files. An
//! in-process agent serves a source volume over NBD; writers keep writing
//! through NBD before, during and after the migration, which the cli's
//! master drives (`volmig_master::Driver` over a state file, the agent its
//! slave); at the end every block of the target is checked against what
//! the writers wrote.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use volmig_api::slave::{Frontend, ServeVolume};
use volmig_frontends::nbd::{NbdClient, NbdServer};
use volmig_master::{Driver, DriverConfig, FileStore, SessionRecord, StopSignal};
use volmig_node_agent::agent::Agent;
use volmig_node_agent::interposer::Interposer;
use volmig_node_agent::serving::Frontends;
use volmig_node_agent::session::{Phase, SessionConfig};
use volmig_node_agent::units::human_bytes;

use crate::pattern::{BLOCK, fill};

pub struct DemoArgs {
    pub size: u64,
    pub writers: u64,
    pub baseline: Duration,
    pub config: SessionConfig,
    pub keep: Option<std::path::PathBuf>,
    pub quiet: bool,
}

/// What the writers saw.
#[derive(Default)]
struct WriterStats {
    ops: AtomicU64,
    /// Worst single write latency, microseconds, since the last reset.
    max_lat_us: AtomicU64,
}

/// Per block: the generation last written (0 = initial contents).
struct Expected {
    gens: Vec<AtomicU32>,
}

fn initial_data_blocks(blocks: u64) -> u64 {
    blocks / 4
}

fn make_source(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    // A quarter of the volume holds data; the rest is sparse.
    let blocks = size / BLOCK as u64;
    let mut chunk = vec![0u8; 256 * BLOCK];
    let data = initial_data_blocks(blocks);
    let mut b = 0;
    while b < data {
        let n = 256.min(data - b);
        for i in 0..n {
            fill(
                &mut chunk[i as usize * BLOCK..(i as usize + 1) * BLOCK],
                b + i,
                0,
            );
        }
        f.write_all_at(&chunk[..n as usize * BLOCK], b * BLOCK as u64)?;
        b += n;
    }
    Ok(())
}

async fn writer(
    sock: std::path::PathBuf,
    id: u64,
    n: u64,
    blocks: u64,
    expected: Arc<Expected>,
    stats: Arc<WriterStats>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut c = NbdClient::connect_unix(&sock, "demo").await?;
    let mut rng = SmallRng::seed_from_u64(id);
    let mut buf = vec![0u8; BLOCK];
    while !stop.load(Ordering::Relaxed) {
        let b = rng.random_range(0..blocks / n) * n + id;
        let g = expected.gens[b as usize].load(Ordering::Relaxed) + 1;
        fill(&mut buf, b, g);
        let t = Instant::now();
        c.write(b * BLOCK as u64, &buf, false).await?;
        let us = t.elapsed().as_micros() as u64;
        // only this writer writes block b: the store orders after the ack
        expected.gens[b as usize].store(g, Ordering::Relaxed);
        stats.ops.fetch_add(1, Ordering::Relaxed);
        stats.max_lat_us.fetch_max(us, Ordering::Relaxed);
    }
    c.flush().await?;
    Ok(())
}

fn check(target: &Path, expected: &Expected, size: u64) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(target)?;
    let blocks = size / BLOCK as u64;
    let data = initial_data_blocks(blocks);
    let (mut got, mut want) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut rewritten = 0;
    for b in 0..blocks {
        f.read_exact_at(&mut got, b * BLOCK as u64)?;
        let g = expected.gens[b as usize].load(Ordering::Relaxed);
        if g == 0 && b >= data {
            want.fill(0);
        } else {
            fill(&mut want, b, g);
        }
        if g > 0 {
            rewritten += 1;
        }
        if got != want {
            bail!(
                "target block {b} (offset {}) does not hold what was written (generation {g})",
                b * BLOCK as u64
            );
        }
    }
    Ok((blocks, rewritten))
}

fn rate_line(label: &str, ops: u64, secs: f64) -> String {
    let iops = ops as f64 / secs.max(1e-9);
    format!(
        "{label:<28} {:>9.0} IOPS  {:>10}/s",
        iops,
        human_bytes(iops * BLOCK as f64)
    )
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("volmig-demo-").tempdir()?;
    let dir = args
        .keep
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let (source, target, sock) = (
        dir.join("source.img"),
        dir.join("target.img"),
        dir.join("nbd.sock"),
    );
    let size = args.size / BLOCK as u64 * BLOCK as u64;
    if size < 64 * BLOCK as u64 * args.writers.max(1) {
        bail!(
            "--size {} is too small for {} writers",
            args.size,
            args.writers
        );
    }
    println!(
        "volmig demo: live migration of a {} volume while {} writers write through NBD",
        human_bytes(size as f64),
        args.writers
    );
    println!("  workdir  {}", dir.display());
    make_source(&source, size).context("creating the source volume")?;
    std::fs::File::create(&target)?.set_len(size)?;

    let server: NbdServer<Interposer> = NbdServer::new();
    let agent = Agent::with_frontends(&dir.join("state"), Frontends::with_nbd(server.clone()))?;
    agent
        .serve(ServeVolume {
            volume: "demo".into(),
            backing: source.clone(),
            frontends: vec![Frontend::Nbd],
            direct: false,
        })
        .await?;
    let vol = agent.interposer("demo")?;
    let handle = server.serve_unix(&sock).await?;
    println!("  serving  nbd+unix:///demo?socket={}", sock.display());

    let blocks = size / BLOCK as u64;
    let expected = Arc::new(Expected {
        gens: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
    });
    let stats = Arc::new(WriterStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..args.writers)
        .map(|i| {
            tokio::spawn(writer(
                sock.clone(),
                i,
                args.writers,
                blocks,
                expected.clone(),
                stats.clone(),
                stop.clone(),
            ))
        })
        .collect();

    // Baseline: the writers alone.
    let t0 = Instant::now();
    tokio::time::sleep(args.baseline).await;
    let base_ops = stats.ops.swap(0, Ordering::Relaxed);
    let base_secs = t0.elapsed().as_secs_f64();
    let base_lat = stats.max_lat_us.swap(0, Ordering::Relaxed);

    // The migration, driven by the cli's master with the agent as its slave.
    let start = Instant::now();
    let store = FileStore::open(&dir.join("master"))?;
    volmig_master::create_session(&store, "demo", &target, args.config.clone(), 1).await?;
    let driver = Driver::new(
        agent.clone(),
        store.clone(),
        "demo",
        DriverConfig {
            epoch: 1,
            ..DriverConfig::default()
        },
        Arc::new(StopSignal::default()),
    );
    let master = tokio::spawn(async move { driver.run().await });
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "  {spinner} {msg:<15} [{bar:30}] {bytes}/{total_bytes} copied, {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut last_phase = None;
    let record: SessionRecord = loop {
        if master.is_finished() {
            break master.await.context("the master task")??;
        }
        if let Some(rec) = store.load_now("demo")? {
            let p = rec.phase;
            if last_phase != Some(p) {
                bar.set_message(p.to_string());
                last_phase = Some(p);
            }
            bar.set_position(rec.bytes_copied.min(size));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mig_secs = start.elapsed().as_secs_f64();
    let mig_ops = stats.ops.swap(0, Ordering::Relaxed);
    let mig_lat = stats.max_lat_us.swap(0, Ordering::Relaxed);
    bar.set_position(record.bytes_copied.min(size));
    bar.finish_with_message(record.phase.to_string());

    // Keep writing on the target for a moment, then stop.
    let t1 = Instant::now();
    tokio::time::sleep(args.baseline / 2).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.context("writer task")??;
    }
    let after_ops = stats.ops.swap(0, Ordering::Relaxed);
    let after_secs = t1.elapsed().as_secs_f64();
    handle.shutdown().await.ok();

    let r = &record;
    println!("\nphase timeline");
    let t_start = r.phase_times.first().map(|p| p.start_ms).unwrap_or(0);
    for p in &r.phase_times {
        let end = p.end_ms.unwrap_or(p.start_ms);
        println!(
            "  {:>7.3}s  {:<14} {:>8} ms",
            (p.start_ms - t_start) as f64 / 1e3,
            p.phase.to_string(),
            end - p.start_ms
        );
    }
    if r.phase != Phase::Completed {
        bail!(
            "migration ended {}: {}",
            r.phase,
            r.error.clone().unwrap_or_default()
        );
    }
    println!("\nresult");
    println!(
        "  migration time              {mig_secs:.2} s ({} copy passes after the first, mirror mode {})",
        r.progress.passes,
        if r.progress.mirror { "on" } else { "off" }
    );
    println!(
        "  copied                      {} in all passes (re-copies included), {}/s",
        human_bytes(r.bytes_copied as f64),
        human_bytes(r.bytes_copied as f64 / mig_secs)
    );
    println!(
        "  cutover stall (agent)       {:.1} ms (sync goal {} ms)",
        r.cutover_stall_ms.unwrap_or(0.0),
        r.config.sync_goal_ms
    );
    println!(
        "  worst write latency         {:.1} ms before, {:.1} ms during the migration",
        base_lat as f64 / 1e3,
        mig_lat as f64 / 1e3
    );
    println!(
        "  {}",
        rate_line("writers before migration", base_ops, base_secs)
    );
    println!(
        "  {}",
        rate_line("writers during migration", mig_ops, mig_secs)
    );
    println!(
        "  {}",
        rate_line("writers after (on target)", after_ops, after_secs)
    );
    let (checked, rewritten) = check(&target, &expected, size)?;
    println!(
        "  verified                    target holds exactly what was written: {checked} blocks checked, {rewritten} rewritten by the writers"
    );
    println!(
        "  active device now           {}",
        vol.active().path().display()
    );
    Ok(())
}
