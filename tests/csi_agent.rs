#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The node plugin of a real `volmig-agent serve --csi-socket` process, on
//! the product path: a staged volume is served through the interposer as
//! the agent's kernel block device (FUSE + loop here). kubelet's calls
//! stage and publish a real ext4; a writer writes files through the
//! published path while the volume migrates live to another backing file
//! (`volmig migrate` over the agent's control socket); the mount and the
//! kernel device stay the same objects, every file reads back, and the
//! target alone holds a clean filesystem. Unstage is refused while the
//! migration runs; NodeStage repeated after it (with the old backing
//! device, or with the target the controller would name) is a no-op; a
//! mounted xfs grows online through the kernel device. kubelet's view of a
//! database: SQLite (WAL, synchronous=FULL) and fdatasync writers through
//! two agent SIGKILLs (idle, mid-copy) and a live migration, every
//! committed transaction on the target alone.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::Code;
use volmig_api::csi::volume_capability::access_mode::Mode;
use volmig_api::csi::volume_usage::Unit;
use volmig_testkit::agent::AgentProcess;
use volmig_testkit::csi::{
    CsiClient, KubeletMounts, assert_code, expand_req, mount_cap, publish_req, stage_req,
    stats_req, unpublish_req, unstage_req,
};
use volmig_testkit::devices::{is_mountpoint, mount_id};
use volmig_testkit::pattern::sparse_file;
use volmig_testkit::{MIB, require_bin, require_staging, run_ok};

const SNW: Mode = Mode::SingleNodeWriter;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// kubelet's staging path and publish target of `pv` under `dir`.
fn kubelet_paths(dir: &Path, pv: &str) -> (PathBuf, PathBuf) {
    let staging = dir.join(format!("kubelet/plugins/csi.volmig.io/{pv}/globalmount"));
    let parent = dir.join(format!("kubelet/pods/pod1/volumes/kubernetes.io~csi/{pv}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&parent).unwrap();
    (staging, parent.join("mount"))
}

/// The kernel device the plugin staged `volume` on (its record).
fn staged_device(agent: &AgentProcess, volume: &str) -> PathBuf {
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir.join(format!("csi/{volume}.json"))).unwrap(),
    )
    .unwrap();
    PathBuf::from(rec["device"].as_str().expect("a staged device"))
}

#[test]
fn a_staged_ext4_migrates_live_under_its_pods_mount() {
    require_staging();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    sparse_file(&source, 128 * MIB);
    sparse_file(&target, 128 * MIB);
    let agent = AgentProcess::builder(dir.path(), "n1")
        .csi(Some("n1"))
        .block()
        .start();
    let _undo = KubeletMounts::new(&agent.state_dir);
    let rt = rt();
    let _in_rt = rt.enter(); // the client's channel lives on it
    let c: CsiClient = agent.csi();
    let (staging, pod) = kubelet_paths(dir.path(), "pv-v");
    let cap = mount_cap("", &[], SNW);
    rt.block_on(async {
        let mut n = c.node.clone();
        let r = n
            .node_stage_volume(stage_req("v", &staging, &source, cap.clone()))
            .await;
        assert_code(r, Code::Ok, "stage");
        let r = n
            .node_publish_volume(publish_req("v", &staging, &pod, cap.clone(), false))
            .await;
        assert_code(r, Code::Ok, "publish");
    });
    let device = staged_device(&agent, "v");
    assert!(
        device.starts_with("/dev/"),
        "a kernel block device: {device:?}"
    );
    let volumes = agent.volumes();
    assert_eq!(volumes[0].device.as_deref(), Some(device.as_path()));
    let (pod_mount, staging_mount) = (mount_id(&pod).unwrap(), mount_id(&staging).unwrap());
    let rdev = std::fs::metadata(&device).unwrap().rdev();

    // A writer in the pod: files written and fsynced, again and again,
    // through the whole migration.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, pod) = (stop.clone(), pod.clone());
        std::thread::spawn(move || {
            let mut written = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("f{}", i % 64);
                let data = format!("{i}:")
                    .repeat(1 + (i as usize * 37) % 4000)
                    .into_bytes();
                let p = pod.join(&name);
                std::fs::write(&p, &data).unwrap();
                std::fs::File::open(&p).unwrap().sync_all().unwrap();
                written.insert(name, data);
                i += 1;
            }
            (written, i)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut mig = agent.migrate("v", &target, &["--sync-goal", "500ms"]);
    // Meanwhile the volume is held: unstage is refused, nothing changes.
    rt.block_on(async {
        let r = c
            .node
            .clone()
            .node_unstage_volume(unstage_req("v", &staging))
            .await;
        if mig.phase() != "Completed" {
            let msg = assert_code(r, Code::FailedPrecondition, "unstage during the migration");
            assert!(msg.contains("migration session"), "{msg}");
        }
    });
    assert!(is_mountpoint(&pod) && is_mountpoint(&staging));
    let record = mig.wait_terminal(Duration::from_secs(300));
    agent.assert_completed(&record);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (written, writes) = writer.join().unwrap();
    assert!(
        writes > 10,
        "the writer wrote through the migration ({writes} files)"
    );
    assert_eq!(
        agent.active_path("v"),
        target,
        "the volume is on the target"
    );

    // The pod's mount and the kernel device are the same objects.
    assert_eq!(
        (mount_id(&pod), mount_id(&staging)),
        (Some(pod_mount), Some(staging_mount))
    );
    assert_eq!(staged_device(&agent, "v"), device);
    assert_eq!(std::fs::metadata(&device).unwrap().rdev(), rdev);
    for (name, data) in &written {
        assert_eq!(&std::fs::read(pod.join(name)).unwrap(), data, "{name}");
    }
    rt.block_on(async {
        let mut n = c.node.clone();
        // kubelet stages again after its restart (the publish context it
        // kept names the old device), or the controller names the target:
        // both are the volume as staged.
        for backing in [&source, &target] {
            let r = n
                .node_stage_volume(stage_req("v", &staging, backing, cap.clone()))
                .await;
            assert_code(r, Code::Ok, "stage again after the migration");
        }
        let s = n
            .node_get_volume_stats(stats_req("v", pod.to_str().unwrap()))
            .await
            .unwrap()
            .into_inner();
        assert!(
            s.usage
                .iter()
                .any(|u| u.unit == Unit::Inodes as i32 && u.used > 0)
        );
        let cond = s.volume_condition.unwrap();
        assert!(
            !cond.abnormal && cond.message.contains("target.img"),
            "{cond:?}"
        );
        let r = n.node_unpublish_volume(unpublish_req("v", &pod)).await;
        assert_code(r, Code::Ok, "unpublish");
        let r = n.node_unstage_volume(unstage_req("v", &staging)).await;
        assert_code(r, Code::Ok, "unstage");
    });
    assert!(!is_mountpoint(&staging) && !pod.exists());
    assert!(agent.volumes().is_empty(), "the agent serves it no more");
    // The target alone holds the filesystem, clean.
    run_ok(
        &require_bin("e2fsck", "e2fsprogs"),
        &["-fn", target.to_str().unwrap()],
    );
}

#[test]
fn a_mounted_xfs_grows_through_the_kernel_device() {
    require_staging();
    require_bin("xfs_growfs", "xfsprogs");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b.img");
    let size = 320 * MIB;
    sparse_file(&backing, size);
    let agent = AgentProcess::builder(dir.path(), "n1")
        .csi(Some("n1"))
        .block()
        .start();
    let _undo = KubeletMounts::new(&agent.state_dir);
    let rt = rt();
    let _in_rt = rt.enter(); // the client's channel lives on it
    let c = agent.csi();
    let (staging, pod) = kubelet_paths(dir.path(), "pv-b");
    let cap = mount_cap("xfs", &[], SNW);
    rt.block_on(async {
        let mut n = c.node.clone();
        let r = n
            .node_stage_volume(stage_req("b", &staging, &backing, cap.clone()))
            .await;
        assert_code(r, Code::Ok, "stage");
        let r = n
            .node_publish_volume(publish_req("b", &staging, &pod, cap.clone(), false))
            .await;
        assert_code(r, Code::Ok, "publish");
        std::fs::write(pod.join("kept"), b"kept").unwrap();
        let total = |s: volmig_api::csi::NodeGetVolumeStatsResponse| {
            s.usage
                .iter()
                .find(|u| u.unit == Unit::Bytes as i32)
                .unwrap()
                .total
        };
        let before = total(
            n.node_get_volume_stats(stats_req("b", pod.to_str().unwrap()))
                .await
                .unwrap()
                .into_inner(),
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&backing)
            .unwrap()
            .set_len(2 * size)
            .unwrap();
        let grown = n
            .node_expand_volume(expand_req("b", &pod, 2 * size as i64))
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes;
        assert_eq!(grown, 2 * size as i64);
        let after = total(
            n.node_get_volume_stats(stats_req("b", pod.to_str().unwrap()))
                .await
                .unwrap()
                .into_inner(),
        );
        assert!(
            after > before + (size as i64) * 9 / 10,
            "grew: {before} -> {after}"
        );
        assert_eq!(
            volmig_node_agent::csi::system::device_size(&staged_device(&agent, "b")).unwrap(),
            2 * size
        );
        assert_eq!(std::fs::read(pod.join("kept")).unwrap(), b"kept");
        let r = n.node_unpublish_volume(unpublish_req("b", &pod)).await;
        assert_code(r, Code::Ok, "unpublish");
        let r = n.node_unstage_volume(unstage_req("b", &staging)).await;
        assert_code(r, Code::Ok, "unstage");
    });
    run_ok(
        &require_bin("xfs_repair", "xfsprogs"),
        &["-n", backing.to_str().unwrap()],
    );
}

/// SIGKILL, a moment down, start again (the keeper holds the FUSE
/// connection meanwhile); then a new client, as kubelet's is.
fn restart(agent: &mut AgentProcess) -> CsiClient {
    agent.kill();
    std::thread::sleep(Duration::from_millis(300));
    agent.start_again(&[(
        "VOLMIG_FAULT_DELAY",
        volmig_testkit::agent::WORKERS_READ_FIRST,
    )]);
    agent.csi()
}

/// NodeGetVolumeStats of the published volume: bytes and inodes in use,
/// a normal condition naming the backing device in use.
async fn stats_are_sound(c: &CsiClient, pod: &Path, backing: &Path) {
    let s = c
        .node
        .clone()
        .node_get_volume_stats(stats_req("db", pod.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    for unit in [Unit::Bytes, Unit::Inodes] {
        let u = s.usage.iter().find(|u| u.unit == unit as i32).unwrap();
        assert!(u.used > 0 && u.total > u.used, "{unit:?}: {u:?}");
    }
    let cond = s.volume_condition.unwrap();
    let name = backing.file_name().unwrap().to_str().unwrap();
    assert!(
        !cond.abnormal && cond.message.contains(name),
        "{cond:?} (backing {name})"
    );
}

#[test]
/// kubelet's view of a database on a volmig volume: staged and published
/// ext4 on the agent's FUSE + loop device, a SQLite writer (WAL,
/// synchronous=FULL, one insert per transaction) and a file writer
/// (fdatasync) in the pod's path; NodeGetVolumeStats all along; the agent
/// SIGKILLed and started again while idle, then the volume migrated live
/// to another file with another SIGKILL in the middle of the copy. The
/// writers see stalls and no error, the mount is never remounted, every
/// committed transaction and file is there, and the target alone holds a
/// clean filesystem with the whole database.
fn a_database_on_a_staged_volume_survives_migration_and_agent_restarts() {
    use volmig_testkit::devices::{FuseWatchdog, Mount, assert_fsck_clean, mount_identity};
    use volmig_testkit::fswriter::{FileWriter, FileWriterOpts, check_tree};
    use volmig_testkit::keeper::KeeperProcess;
    use volmig_testkit::sqlite::{SqliteWriter, check_rows};

    require_staging();
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("source.img"), dir.path().join("target.img"));
    sparse_file(&source, 256 * MIB);
    sparse_file(&target, 256 * MIB);
    let keeper = KeeperProcess::start(dir.path());
    let mut agent = AgentProcess::builder(dir.path(), "n1")
        .csi(Some("n1"))
        .block()
        .keeper(&keeper)
        .start();
    let _undo = KubeletMounts::new(&agent.state_dir);
    let _watchdog = FuseWatchdog::new(&agent.fuse_mount(), Duration::from_secs(240));
    let rt = rt();
    let _in_rt = rt.enter();
    let mut c = agent.csi();
    let (staging, pod) = kubelet_paths(dir.path(), "pv-db");
    let cap = mount_cap("ext4", &[], SNW);
    rt.block_on(async {
        let mut n = c.node.clone();
        let r = n
            .node_stage_volume(stage_req("db", &staging, &source, cap.clone()))
            .await;
        assert_code(r, Code::Ok, "stage");
        let r = n
            .node_publish_volume(publish_req("db", &staging, &pod, cap.clone(), false))
            .await;
        assert_code(r, Code::Ok, "publish");
    });
    let device = staged_device(&agent, "db");
    let rdev = std::fs::metadata(&device).unwrap().rdev();
    let mount_before = mount_identity(&pod).unwrap();

    let mut db = SqliteWriter::start(&pod.join("db.sqlite"));
    let opts = FileWriterOpts {
        datasync: true,
        ..FileWriterOpts::default()
    };
    let mut files = FileWriter::start(&pod.join("files"), opts);
    db.wait_commits(50, Duration::from_secs(120));
    files.wait_ops(20, Duration::from_secs(120));
    rt.block_on(stats_are_sound(&c, &pod, &source));

    // Idle: the agent dies and comes back under the running database.
    c = restart(&mut agent);
    db.wait_commits(50, Duration::from_secs(120));
    files.wait_ops(20, Duration::from_secs(120));
    rt.block_on(stats_are_sound(&c, &pod, &source));

    // A live migration, with the agent killed in the middle of the copy.
    let mut mig = agent.migrate("db", &target, &["--bandwidth", "16Mi"]);
    let at = agent.master().wait_record("db", "copying", |r| {
        r["bytes_copied"].as_u64().unwrap_or(0) > 0 || r["phase"] == "Refreshing"
    });
    rt.block_on(stats_are_sound(&c, &pod, &source));
    assert!(
        matches!(at["phase"].as_str(), Some("Copying" | "Refreshing")),
        "the session went past copying before the kill: {at}"
    );
    c = restart(&mut agent);
    db.wait_commits(50, Duration::from_secs(120));
    let record = mig.wait_terminal(Duration::from_secs(240));
    agent.assert_completed(&record);
    assert!(
        agent.session_state(&record).resumes >= 1,
        "the session resumed after the restart"
    );
    assert_eq!(agent.active_path("db"), target);
    db.wait_commits(50, Duration::from_secs(120));
    rt.block_on(stats_are_sound(&c, &pod, &target));

    let (db_stall, files_stall) = (db.max_latency(), files.max_latency());
    let committed = db.stop();
    let model = files.stop();
    eprintln!(
        "{committed} transactions (slowest commit {db_stall:?}), {} files (slowest write \
         {files_stall:?}) through two agent restarts and a migration",
        model.len()
    );
    agent.assert_each_request_served_once();
    assert_eq!(mount_identity(&pod).unwrap(), mount_before, "remounted");
    assert_eq!(staged_device(&agent, "db"), device);
    assert_eq!(std::fs::metadata(&device).unwrap().rdev(), rdev);
    assert_eq!(
        check_rows(&pod.join("db.sqlite"), committed, false),
        committed + 1
    );
    check_tree(&pod.join("files"), &model, "through the pod's mount");

    rt.block_on(async {
        let mut n = c.node.clone();
        let r = n.node_unpublish_volume(unpublish_req("db", &pod)).await;
        assert_code(r, Code::Ok, "unpublish");
        let r = n.node_unstage_volume(unstage_req("db", &staging)).await;
        assert_code(r, Code::Ok, "unstage");
    });
    agent.stop();
    // The target alone: a clean filesystem holding every committed row.
    assert_fsck_clean(&target);
    let ro = dir.path().join("ro");
    let mut m = Mount::new(&target, &ro, &["-o", "ro,loop"]);
    assert_eq!(
        check_rows(&ro.join("db.sqlite"), committed, true),
        committed + 1
    );
    let on_target = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_tree(&ro.join("files"), &model, "straight from the target")
    }));
    m.unmount();
    if let Err(e) = on_target {
        // Say whether the source (kept) has the files: whether a write
        // reached the agent and missed the copy, or was lost before it
        // (as once, when partial O_DIRECT writes to one span undid each
        // other: see `volume::span_locks`).
        let src = dir.path().join("src-ro");
        let mut s = Mount::new(&source, &src, &["-o", "ro,loop,noload"]);
        let on_source = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_tree(&src.join("files"), &model, "straight from the source")
        }));
        s.unmount();
        let why = |e: &Box<dyn std::any::Any + Send>| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        };
        panic!(
            "the target misses what the pod wrote: {}\nthe source: {}\nagent log:\n{}",
            why(&e),
            on_source
                .as_ref()
                .map_or_else(why, |_| "holds every file".into()),
            agent.log_text()
        );
    }
    drop(keeper);
}
