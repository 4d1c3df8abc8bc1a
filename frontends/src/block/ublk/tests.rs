//! What of the ublk driver runs without `ublk_drv`: parameters, records,
//! the recovery decision, request decoding and execution against a volume,
//! error mapping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;

use volmig_testkit::MemVolume;

use super::*;

const MIB: u64 = 1 << 20;

fn detail() -> UblkDetail {
    UblkDetail {
        dev_id: 4,
        tag: volume_tag("pv-1", 7),
        nr_queues: 2,
        queue_depth: 128,
        max_io_bytes: 1 << 20,
        logical_block_shift: 9,
    }
}

fn info(state: u32, tag: u64) -> DevInfo {
    DevInfo {
        state: state as u16,
        flags: u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE),
        ublksrv_flags: tag,
        nr_hw_queues: 2,
        queue_depth: 128,
    }
}

fn refused(p: RecoveryPlan) -> BlockErrorKind {
    match p {
        RecoveryPlan::Refuse(k, _) => k,
        RecoveryPlan::Recover => panic!("recovered"),
    }
}

#[test]
fn only_a_started_recoverable_device_with_our_tag_is_recovered() {
    let d = detail();
    for state in [
        sys::UBLK_S_DEV_QUIESCED,
        sys::UBLK_S_DEV_LIVE,
        sys::UBLK_S_DEV_FAIL_IO,
    ] {
        assert_eq!(
            plan_recovery(&d, Some(info(state, d.tag))),
            RecoveryPlan::Recover,
            "state {state}"
        );
    }
    assert_eq!(refused(plan_recovery(&d, None)), BlockErrorKind::Gone);
    assert_eq!(
        refused(plan_recovery(&d, Some(info(sys::UBLK_S_DEV_DEAD, d.tag)))),
        BlockErrorKind::Gone
    );
    assert_eq!(
        refused(plan_recovery(
            &d,
            Some(info(sys::UBLK_S_DEV_QUIESCED, d.tag ^ 1))
        )),
        BlockErrorKind::Foreign
    );
    // Another server's device usually carries no tag at all.
    assert_eq!(
        refused(plan_recovery(&d, Some(info(sys::UBLK_S_DEV_QUIESCED, 0)))),
        BlockErrorKind::Foreign
    );
    let mut no_recovery = info(sys::UBLK_S_DEV_QUIESCED, d.tag);
    no_recovery.flags = 0;
    assert_eq!(
        refused(plan_recovery(&d, Some(no_recovery))),
        BlockErrorKind::Unsupported
    );
    assert_eq!(
        refused(plan_recovery(&d, Some(info(99, d.tag)))),
        BlockErrorKind::Io
    );
}

#[test]
fn tags_are_stable_per_volume_and_nonce_and_never_zero() {
    assert_eq!(volume_tag("pv-1", 7), volume_tag("pv-1", 7));
    assert_ne!(volume_tag("pv-1", 7), volume_tag("pv-1", 8));
    assert_ne!(volume_tag("pv-1", 7), volume_tag("pv-2", 7));
    for n in 0..1000 {
        assert_ne!(volume_tag("", n), 0);
    }
}

#[test]
fn control_flags_ask_for_recovery_with_reissue_and_quiesce_when_offered() {
    let rec = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
    let quiesce = u64::from(sys::UBLK_F_QUIESCE);
    assert_eq!(ctrl_flags(None).unwrap(), rec);
    assert_eq!(ctrl_flags(Some(rec)).unwrap(), rec);
    assert_eq!(ctrl_flags(Some(rec | quiesce | 1)).unwrap(), rec | quiesce);
    assert!(ctrl_flags(Some(u64::from(sys::UBLK_F_USER_RECOVERY))).is_err());
    assert!(ctrl_flags(Some(0)).is_err());
}

#[test]
fn device_parameters() {
    let p = device_params(8 * MIB, 1 << 20, 12);
    assert_eq!(
        p.types,
        sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
    );
    assert_eq!(p.basic.dev_sectors, (8 * MIB) >> 9);
    assert_eq!(p.basic.max_sectors, 2048);
    assert_eq!(p.basic.logical_bs_shift, 12);
    assert_ne!(
        p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE,
        0,
        "flushes reach us"
    );
    assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
    assert_eq!(p.discard.discard_granularity, 4096);
    assert!(p.discard.max_write_zeroes_sectors > 0);
    assert_eq!(p.discard.max_discard_segments, 1);
}

#[test]
fn parameters_are_validated() {
    assert!(UblkParams::default().validate().is_ok());
    for bad in [
        UblkParams {
            nr_queues: 0,
            ..UblkParams::default()
        },
        UblkParams {
            queue_depth: 0,
            ..UblkParams::default()
        },
        UblkParams {
            queue_depth: u16::MAX,
            ..UblkParams::default()
        },
        UblkParams {
            max_io_bytes: 1000,
            ..UblkParams::default()
        },
        UblkParams {
            max_io_bytes: 64 << 20,
            ..UblkParams::default()
        },
        UblkParams {
            logical_block_shift: 10,
            ..UblkParams::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
        assert!(UblkDriver::new(bad).is_err());
    }
}

#[test]
fn requests_are_decoded_from_io_descriptors() {
    assert_eq!(
        decode(sys::UBLK_IO_OP_READ, 8, 16),
        Request::Read {
            offset: 4096,
            len: 8192
        }
    );
    assert_eq!(
        decode(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 0, 1),
        Request::Write {
            offset: 0,
            len: 512,
            fua: true
        }
    );
    assert_eq!(
        decode(sys::UBLK_IO_OP_WRITE, 0, 1),
        Request::Write {
            offset: 0,
            len: 512,
            fua: false
        }
    );
    assert_eq!(decode(sys::UBLK_IO_OP_FLUSH, 0, 0), Request::Flush);
    assert_eq!(
        decode(sys::UBLK_IO_OP_DISCARD, 2, 2),
        Request::Discard {
            offset: 1024,
            len: 1024
        }
    );
    assert_eq!(
        decode(sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP, 0, 8),
        Request::WriteZeroes {
            offset: 0,
            len: 4096,
            may_trim: false
        }
    );
    assert_eq!(
        decode(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 8),
        Request::WriteZeroes {
            offset: 0,
            len: 4096,
            may_trim: true
        }
    );
    assert_eq!(
        decode(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8),
        Request::Unsupported(sys::UBLK_IO_OP_ZONE_APPEND)
    );
}

#[tokio::test]
async fn requests_run_against_the_volume_and_complete_with_the_right_result() {
    let vol = MemVolume::new(MIB);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let (r, back) = execute(
        &vol,
        Request::Write {
            offset: 4096,
            len: 8192,
            fua: true,
        },
        data.clone(),
    )
    .await;
    assert_eq!(r, 8192, "a write completes with its byte count");
    assert_eq!(back.len(), 8192, "the buffer comes back for reuse");
    assert_eq!(vol.counters.fua_writes.load(Ordering::SeqCst), 1);
    let (r, got) = execute(
        &vol,
        Request::Read {
            offset: 4096,
            len: 8192,
        },
        vec![0; 8192],
    )
    .await;
    assert_eq!(r, 8192);
    assert_eq!(got, data);
    let (r, _) = execute(&vol, Request::Flush, Vec::new()).await;
    assert_eq!(r, 0);
    assert_eq!(vol.counters.flushes.load(Ordering::SeqCst), 1);
    let (r, _) = execute(
        &vol,
        Request::WriteZeroes {
            offset: 4096,
            len: 4096,
            may_trim: false,
        },
        Vec::new(),
    )
    .await;
    assert_eq!(r, 0);
    let (r, _) = execute(
        &vol,
        Request::Discard {
            offset: 8192,
            len: 4096,
        },
        Vec::new(),
    )
    .await;
    assert_eq!(r, 0);
    assert_eq!(vol.bytes(4096, 8192), vec![0; 8192]);

    // Out of range or inconsistent: EINVAL, nothing touched.
    let (r, _) = execute(
        &vol,
        Request::Write {
            offset: MIB - 512,
            len: 1024,
            fua: false,
        },
        vec![9; 1024],
    )
    .await;
    assert_eq!(r, -libc::EINVAL);
    assert_eq!(vol.bytes(MIB - 512, 512), vec![0; 512]);
    let (r, _) = execute(
        &vol,
        Request::Read {
            offset: 0,
            len: 4096,
        },
        vec![0; 512],
    )
    .await;
    assert_eq!(r, -libc::EINVAL);
    let (r, _) = execute(
        &vol,
        Request::Discard {
            offset: u64::MAX - 1,
            len: 2,
        },
        Vec::new(),
    )
    .await;
    assert_eq!(r, -libc::EINVAL);
    let (r, _) = execute(&vol, Request::Unsupported(13), Vec::new()).await;
    assert_eq!(r, -libc::EOPNOTSUPP);
}

#[test]
fn libublk_errors_keep_their_errno() {
    assert_eq!(
        io_error(UblkError::OtherError(-libc::EBUSY)).raw_os_error(),
        Some(libc::EBUSY)
    );
    assert_eq!(
        io_error(UblkError::UringIOError(-libc::ENODEV)).raw_os_error(),
        Some(libc::ENODEV)
    );
    assert_eq!(
        io_error(UblkError::QueueIsDown).raw_os_error(),
        Some(libc::ENODEV)
    );
    assert_eq!(
        io_error(UblkError::InvalidVal).raw_os_error(),
        Some(libc::EINVAL)
    );
    assert_eq!(io_error(UblkError::UringTimeout).raw_os_error(), None);
    // And become the block error kinds callers act on.
    let ctx = BlockContext {
        kind: BlockKind::Ublk,
        op: "detach",
        volume: "v".into(),
        device: Some(device_path(3)),
    };
    let e = BlockError::io(ctx, "x", io_error(UblkError::OtherError(-libc::EBUSY)));
    assert_eq!(e.kind(), BlockErrorKind::Busy);
}

#[test]
fn records_carry_everything_a_recovery_needs() {
    let d = detail();
    let a = attached("pv-1", &d);
    assert_eq!(a.path, PathBuf::from("/dev/ublkb4"));
    assert_eq!(a.record.kind, BlockKind::Ublk);
    let back: UblkDetail = serde_json::from_value(a.record.detail).unwrap();
    assert_eq!(back, d);
}

#[tokio::test]
async fn calls_on_unknown_volumes_and_bad_records_change_nothing() {
    let drv = UblkDriver::new(UblkParams::default()).unwrap();
    let e = BlockDriver::<MemVolume>::detach(&drv, "nope")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::NotAttached);
    let e = BlockDriver::<MemVolume>::resize(&drv, "nope", MIB)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::NotAttached);
    let e = drv
        .quiesce("nope", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::NotAttached);
    let vol = Arc::new(MemVolume::new(MIB));
    let mut rec = attached("pv-1", &detail()).record;
    rec.kind = BlockKind::Nbd;
    let e = drv.reattach(&rec, vol.clone()).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidRecord);
    rec.kind = BlockKind::Ublk;
    rec.detail = serde_json::json!({"dev_id": -1});
    let e = drv.reattach(&rec, vol.clone()).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidRecord);
    // A volume that is not a whole number of blocks never reaches the kernel.
    let e = drv
        .attach("odd", Arc::new(MemVolume::new(MIB + 100)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidArgument);
    // Without ublk_drv (as on the machines this is developed on), attach
    // says so instead of failing somewhere in libublk.
    if !std::path::Path::new(crate::block::ublk_paths::CONTROL).exists() {
        let e = drv.attach("v", vol).await.unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::Unsupported, "{e}");
    }
}
