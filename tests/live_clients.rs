//! System tests: real NBD clients (fio, qemu-io/qemu-img, nbdinfo, nbdcopy)
//! keep using a volume served by the `volmig-agent` binary while it migrates
//! live to a target file, and afterwards find their data on the target.
//!
//! The external tools are required: a missing binary fails the test with the
//! name of the Debian package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use volmig_testkit::agent::AgentProcess;
use volmig_testkit::fio::{
    assert_clean as assert_fio_clean, issued as fio_issued, require_fio_nbd, run_fio,
};
use volmig_testkit::master::TERMINAL;
use volmig_testkit::pattern::{pattern, pattern_file, sparse_file};
use volmig_testkit::tools::qemu_img_compare;
use volmig_testkit::{ChildGuard, Expected, MIB, Out, require_bin, run, run_ok, wait_until};

const IODEPTH: u64 = 8;

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// (a) fio's nbd engine with verification through a live migration
// ---------------------------------------------------------------------------

/// Runs fio in `dir` (where it keeps its verify state file).
fn fio(dir: &Path, args: &[String]) -> Out {
    run_fio(dir, args, Duration::from_secs(900))
}

#[test]
fn fio_nbd_verify_through_live_migration() {
    require_fio_nbd();

    let size = 256 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let tgt = dir.path().join("target.img");
    pattern_file(&src, size, 1);
    sparse_file(&tgt, size);
    let mut agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &src)
        .start();
    let uri = agent.unix_uri("vol");

    // fio's random map writes each 4 KiB block once per pass over the 256
    // MiB; at 4 MiB/s a pass takes 64 s, longer than the migration (the
    // verify-state replay below relies on fio not starting a second pass).
    let job = |engine: &[String]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--name=live".into()];
        v.extend_from_slice(engine);
        v.extend(
            [
                "--rw=randwrite",
                "--bs=4k",
                &format!("--iodepth={IODEPTH}"),
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--size=256M",
                "--randseed=4242",
                "--rate=4m",
            ]
            .map(String::from),
        );
        v
    };
    let nbd_engine = ["--ioengine=nbd".to_string(), format!("--uri={uri}")];

    // Phase 1: fio writes (and verifies a backlog of its writes as it goes)
    // until the trigger file appears; the migration runs meanwhile.
    let stop = dir.path().join("fio.stop");
    let mut writer_args = job(&nbd_engine);
    writer_args.extend([
        "--time_based".to_string(),
        "--runtime=900".to_string(),
        "--verify_backlog=256".to_string(),
        format!("--trigger-file={}", stop.display()),
    ]);
    let fio_dir = dir.path().to_path_buf();
    let writer = std::thread::spawn(move || fio(&fio_dir, &writer_args));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !writer.is_finished(),
        "fio ended before the migration started:\n{}",
        writer.join().unwrap().text()
    );

    let m = agent.migrate_wait(
        "vol",
        &tgt,
        &["--bandwidth", "64Mi", "--sync-goal", "100ms"],
    );
    assert!(
        m.ok(),
        "migrate --wait failed:\n{}\nagent log:\n{}",
        m.text(),
        agent.log_text()
    );
    for want in ["phase       Completed", "verified    yes", "stall       "] {
        assert!(m.stdout.contains(want), "{want:?} missing:\n{}", m.text());
    }
    let st = agent.master().record("vol");
    agent.assert_completed(&st);
    assert!(
        st["bytes_copied"].as_u64().unwrap() >= size,
        "copied less than the volume: {st:#}"
    );
    assert_eq!(agent.active_path("vol"), tgt);
    // fio's connection survived the cutover: it is still writing.
    assert!(
        !writer.is_finished(),
        "fio ended during the migration:\n{}",
        writer.join().unwrap().text()
    );

    // Let fio write to the target for a while, then stop it cleanly.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, b"").unwrap();
    let out = writer.join().unwrap();
    assert_fio_clean(&out);
    let (verified_live, written) = fio_issued(&out);
    assert!(
        written > 1000,
        "fio wrote too little ({written} blocks):\n{}",
        out.text()
    );
    assert!(
        written < size / 4096,
        "fio went over the volume more than once ({written} blocks): the migration took \
         too long for this test's workload rate"
    );
    assert!(
        verified_live > 0,
        "fio verified nothing while writing:\n{}",
        out.text()
    );
    assert!(
        dir.path().join("local-live-0-verify.state").exists(),
        "fio saved no verify state"
    );

    // Phase 2 (and 3): the saved state lists the writes still in flight when
    // fio stopped (at most IODEPTH, issued but maybe never done); the replay
    // skips them, and the last IODEPTH issued may not be in the state at all.
    //
    // Phase 2: replay the same write pattern up to where fio stopped and
    // verify every block, reading through the agent (served from the target).
    let mut verify_args = job(&nbd_engine);
    verify_args.extend(
        [
            "--verify_only",
            "--verify_state_load=1",
            "--verify_state_save=0",
        ]
        .map(String::from),
    );
    let out = fio(dir.path(), &verify_args);
    assert_fio_clean(&out);
    let (verified, _) = fio_issued(&out);
    assert!(
        verified <= written && verified + 2 * IODEPTH >= written,
        "verify_only checked {verified} blocks of {written} written:\n{}",
        out.text()
    );

    eprintln!(
        "fio: {written} blocks written, {verified_live} verified while writing, \
         {verified} verified through the export afterwards"
    );

    // Phase 3: the same check straight on the target file, agent stopped.
    agent.stop();
    let file_engine = [
        "--ioengine=psync".to_string(),
        format!("--filename={}", tgt.display()),
    ];
    let mut direct_args = job(&file_engine);
    direct_args.extend(
        [
            "--verify_only",
            "--verify_state_load=1",
            "--verify_state_save=0",
        ]
        .map(String::from),
    );
    let out = fio(dir.path(), &direct_args);
    assert_fio_clean(&out);
    let (verified_direct, _) = fio_issued(&out);
    assert!(
        verified_direct <= written && verified_direct + 2 * IODEPTH >= written,
        "direct verify of the target checked {verified_direct} blocks of {written}:\n{}",
        out.text()
    );
}

// ---------------------------------------------------------------------------
// (b) qemu-io writes during a migration; qemu-img compare and info
// ---------------------------------------------------------------------------

#[test]
fn qemu_io_writes_during_migration_land_on_target() {
    let qemu_io = require_bin("qemu-io", "qemu-utils");
    let qemu_img = require_bin("qemu-img", "qemu-utils");
    let size = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let tgt = dir.path().join("target.img");
    pattern_file(&src, size, 2);
    sparse_file(&tgt, size);
    let expected = Expected::of_file(&src);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &src)
        .start();
    let uri = agent.unix_uri("vol");

    let info = run_ok(&qemu_img, &["info", "--output=json", "-f", "raw", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "{info}");
    assert_eq!(v["format"], "raw", "{info}");

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "16Mi"]);
    let writer = {
        let (stop, rounds, expected, uri) =
            (stop.clone(), rounds.clone(), expected.clone(), uri.clone());
        std::thread::spawn(move || {
            let sectors = size / 512;
            let mut i: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                // three writes per connection, 512-byte aligned, up to 512 KiB,
                // overlapping each other now and then
                let writes: Vec<(u64, u64, u8)> = (0..3u64)
                    .map(|k| {
                        let len = 512 * (1 + (i * 7 + k * 131) % 1024);
                        let off = 512 * ((i * 2_654_435_761 + k * 7919) % (sectors - len / 512));
                        (off, len, ((i * 3 + k) % 255 + 1) as u8)
                    })
                    .collect();
                let mut args = vec!["-f".to_string(), "raw".into(), uri.clone()];
                for (off, len, p) in &writes {
                    args.push("-c".into());
                    args.push(format!("write -P {p} {off} {len}"));
                }
                let (off, len, p) = writes[2];
                args.push("-c".into());
                args.push(format!("read -P {p} {off} {len}"));
                args.push("-c".into());
                args.push("flush".into());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = run(&qemu_io, &args);
                assert!(
                    out.ok()
                        && out.stdout.matches("wrote ").count() == 3
                        && out.stdout.contains("read ")
                        && !out.stdout.contains("failed"),
                    "qemu-io round {i}:\n{}",
                    out.text()
                );
                for (off, len, p) in writes {
                    expected.fill(off, len, p);
                }
                rounds.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };

    let st = m.wait_terminal(MIGRATION_TIMEOUT);
    let during = rounds.load(Ordering::SeqCst);
    // a few more rounds on the target
    wait_until("qemu-io rounds after cutover", MIGRATION_TIMEOUT, || {
        rounds.load(Ordering::SeqCst) >= during + 3 || writer.is_finished()
    });
    stop.store(true, Ordering::SeqCst);
    if let Err(e) = writer.join() {
        std::panic::resume_unwind(e);
    }
    agent.assert_completed(&st);
    assert!(
        during >= 1,
        "no qemu-io round completed during the migration (test not meaningful)"
    );
    assert_eq!(agent.active_path("vol"), tgt);
    eprintln!(
        "qemu-io: {during} rounds during the migration, {} in all",
        rounds.load(Ordering::SeqCst)
    );

    let want = dir.path().join("expected.img");
    expected.save(&want);
    let want_s = want.to_str().unwrap();
    for image in [tgt.to_str().unwrap(), uri.as_str()] {
        let out = run(&qemu_img, &qemu_img_compare(image, want_s));
        assert!(
            out.status.code() == Some(0) && out.stdout.contains("Images are identical"),
            "{image} differs from the expected image:\n{}",
            out.text()
        );
    }
    // the comparison is able to fail
    let src_cmp = run(&qemu_img, &qemu_img_compare(src.to_str().unwrap(), want_s));
    assert_eq!(
        src_cmp.status.code(),
        Some(1),
        "the source cannot hold the writes made after cutover:\n{}",
        src_cmp.text()
    );
    let info = run_ok(&qemu_img, &["info", "-f", "raw", &uri]);
    assert!(
        info.contains(&format!("virtual size: 64 MiB ({size} bytes)")),
        "{info}"
    );
}

// ---------------------------------------------------------------------------
// (c) nbdinfo (size, allocation map) and nbdcopy in and out
// ---------------------------------------------------------------------------

/// `nbdinfo --map` rows: (offset, length, type).
fn map_rows(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            let mut num = || -> u64 {
                it.next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bad map line {l:?} in:\n{out}"))
            };
            (num(), num(), num() as u32)
        })
        .collect()
}

#[test]
fn nbdinfo_map_and_nbdcopy_across_migration() {
    let nbdinfo = require_bin("nbdinfo", "libnbd-bin");
    let nbdcopy = require_bin("nbdcopy", "libnbd-bin");
    let size = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let tgt = dir.path().join("target.img");
    sparse_file(&src, size);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&pattern(8 * MIB, MIB as usize, 3), 8 * MIB)
            .unwrap();
    }
    sparse_file(&tgt, size);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &src)
        .start();
    let uri = agent.unix_uri("vol");

    let out = run_ok(&nbdinfo, &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol", "{out}");
    assert_eq!(e["export-size"].as_u64(), Some(size), "{out}");
    assert_eq!(e["is_read_only"], false, "{out}");

    // one data region in a sparse volume: hole, data, hole
    let out = run_ok(&nbdinfo, &["--map", &uri]);
    assert_eq!(
        map_rows(&out),
        vec![
            (0, 8 * MIB, 3),
            (8 * MIB, MIB, 0),
            (9 * MIB, size - 9 * MIB, 3)
        ],
        "{out}"
    );

    // A payload with data regions and holes, copied in during the migration.
    let payload = dir.path().join("payload.img");
    sparse_file(&payload, size);
    let regions = [(0, 4 * MIB), (20 * MIB, 8 * MIB), (size - 4 * MIB, 4 * MIB)];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&payload)
            .unwrap();
        for (off, len) in regions {
            f.write_all_at(&pattern(off, len as usize, 33), off)
                .unwrap();
        }
    }
    let payload_bytes = std::fs::read(&payload).unwrap();
    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "16Mi"]);
    run_ok(&nbdcopy, &[payload.to_str().unwrap(), &uri]);
    let phase_after_copy_in = m.phase();
    let st = m.wait_terminal(MIGRATION_TIMEOUT);
    agent.assert_completed(&st);
    eprintln!("nbdcopy into the export finished in phase {phase_after_copy_in}");
    assert_eq!(agent.active_path("vol"), tgt);

    // nbdcopy out, through the agent (now on the target)
    let back = dir.path().join("back.img");
    run_ok(&nbdcopy, &[&uri, back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), payload_bytes.len());
    assert!(
        got == payload_bytes,
        "nbdcopy out differs from what went in"
    );
    assert!(
        std::fs::read(&tgt).unwrap() == payload_bytes,
        "the target file differs from the payload"
    );

    // The map of the migrated volume covers it, never calls data zero, and
    // has the payload's layout.
    let out = run_ok(&nbdinfo, &["--map", &uri]);
    let rows = map_rows(&out);
    let mut pos = 0;
    for &(off, len, ty) in &rows {
        assert_eq!(off, pos, "map not contiguous:\n{out}");
        if ty & 2 != 0 {
            assert!(
                payload_bytes[off as usize..(off + len) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "extent {off}+{len} is reported zero but holds data:\n{out}"
            );
        }
        pos = off + len;
    }
    assert_eq!(pos, size, "map does not cover the export:\n{out}");
    // and the migration kept the volume sparse (the copier punches holes)
    assert_eq!(
        rows,
        vec![
            (0, 4 * MIB, 0),
            (4 * MIB, 16 * MIB, 3),
            (20 * MIB, 8 * MIB, 0),
            (28 * MIB, 32 * MIB, 3),
            (60 * MIB, 4 * MIB, 0)
        ],
        "{out}"
    );
    let info = run_ok(&nbdinfo, &["--size", &uri]);
    assert_eq!(info.trim(), size.to_string());
}

// ---------------------------------------------------------------------------
// (d) the TCP frontend: one qemu-io connection over TCP spans the cutover
// ---------------------------------------------------------------------------

/// An interactive qemu-io: commands on stdin, output into a file.
struct QemuIo {
    child: ChildGuard,
    out: std::path::PathBuf,
    sent_writes: usize,
}

impl QemuIo {
    fn start(uri: &str, out: &Path) -> QemuIo {
        let bin = require_bin("qemu-io", "qemu-utils");
        let log = std::fs::File::create(out).unwrap();
        let child = Command::new(bin)
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn qemu-io");
        QemuIo {
            child: ChildGuard::new(child),
            out: out.to_path_buf(),
            sent_writes: 0,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.child().stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a write and waits until qemu-io reports it done.
    fn write(&mut self, pattern: u8, off: u64, len: u64) {
        self.send(&format!("write -P {pattern} {off} {len}"));
        self.sent_writes += 1;
        let n = self.sent_writes;
        wait_until("qemu-io write", Duration::from_secs(120), || {
            let o = self.output();
            assert!(
                !o.contains("failed") && !o.contains("rror"),
                "qemu-io over TCP failed:\n{o}"
            );
            o.matches("wrote ").count() >= n
        });
    }
}

#[test]
fn tcp_frontend_qemu_io_session_spans_migration() {
    let qemu_io = require_bin("qemu-io", "qemu-utils");
    let size = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let tgt = dir.path().join("target.img");
    pattern_file(&src, size, 4);
    sparse_file(&tgt, size);
    let expected = Expected::of_file(&src);
    let agent = AgentProcess::builder(dir.path(), "agent")
        .export("vol", &src)
        .nbd_tcp()
        .start();
    let tcp = agent.tcp_uri("vol");
    let unix = agent.unix_uri("vol");

    let mut q = QemuIo::start(&tcp, &dir.path().join("qemu-io.out"));
    let mut writes: Vec<(u8, u64, u64)> = Vec::new();
    let mut do_write = |q: &mut QemuIo, p: u8, off: u64, len: u64| {
        q.write(p, off, len);
        expected.fill(off, len, p);
        writes.push((p, off, len));
    };
    do_write(&mut q, 0x11, MIB, MIB);
    // what went in over TCP is what a unix client reads
    let out = run_ok(
        &qemu_io,
        &[
            "-f",
            "raw",
            &unix,
            "-c",
            &format!("read -P 0x11 {MIB} {MIB}"),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let mut m = agent.migrate("vol", &tgt, &["--bandwidth", "8Mi"]);
    let mut k = 0u64;
    let mut during = 0;
    let st = loop {
        if TERMINAL.contains(&m.phase().as_str()) {
            break m.wait_terminal(MIGRATION_TIMEOUT);
        }
        do_write(
            &mut q,
            (0x20 + k % 0x50) as u8,
            4 * MIB + (k * 192 * 1024) % (24 * MIB),
            256 * 1024,
        );
        during += 1;
        k += 1;
        std::thread::sleep(Duration::from_millis(50));
    };
    agent.assert_completed(&st);
    assert!(during >= 1, "no write during the migration");
    assert_eq!(agent.active_path("vol"), tgt);

    // same TCP connection, now on the target
    do_write(&mut q, 0x77, 20 * MIB, MIB);
    do_write(&mut q, 0x78, size - 4096, 4096);
    let image = expected.image();
    for (p, off, len) in writes.clone() {
        // earlier writes may have been overwritten by later ones: read what
        // the last write of each byte range left
        if image[off as usize..(off + len) as usize]
            .iter()
            .all(|&b| b == p)
        {
            q.send(&format!("read -P {p} {off} {len}"));
        }
    }
    q.send("flush");
    q.send("quit");
    let st = q.child.child().wait().unwrap();
    let log = q.output();
    assert!(st.success(), "qemu-io over TCP exited {st}:\n{log}");
    assert!(
        !log.contains("Pattern verification failed") && !log.contains("rror"),
        "{log}"
    );
    assert_eq!(log.matches("wrote ").count(), writes.len(), "{log}");
    assert!(log.contains("read "), "{log}");

    // a new TCP connection reads the post-cutover write
    let out = run_ok(
        &qemu_io,
        &[
            "-f",
            "raw",
            &tcp,
            "-c",
            &format!("read -P 0x77 {} {MIB}", 20 * MIB),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // and the target file holds exactly everything written over TCP
    expected.check_device(&tgt);
    eprintln!("qemu-io over TCP: {during} writes during the migration");
}
