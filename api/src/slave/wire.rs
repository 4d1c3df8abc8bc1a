//! The gRPC boundary: the one place domain types become protobuf and back.
//! A message from the wire is checked here (`FromWire`): a missing fence,
//! an unspecified enum or an invalid session config is refused as
//! `Invalid`, never replaced by a default. Errors travel as a gRPC code
//! plus their kind and context in metadata, so nothing is parsed from a
//! message's text.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};

use super::error::{ErrorContext, ErrorKind, SlaveError, SlaveResult};
use super::types::*;
use crate::config::{SessionConfig, Verify};
use crate::io::{BlockChoice, BlockKind};
use crate::phase::CopyMode;
use crate::wire as pb;

/// A domain value as its protobuf message.
pub trait IntoWire {
    type Wire;
    fn into_wire(self) -> Self::Wire;
}

/// A domain value from its protobuf message, checked.
pub trait FromWire: Sized {
    type Wire;
    fn from_wire(w: Self::Wire) -> SlaveResult<Self>;
}

fn path(s: String) -> PathBuf {
    PathBuf::from(s)
}

fn text(p: PathBuf) -> String {
    p.display().to_string()
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

// --- fence

fn fence_from(f: Option<pb::Fence>) -> SlaveResult<Fence> {
    match f {
        Some(f) if !f.session_id.is_empty() && !f.volume.is_empty() => Ok(Fence {
            session: f.session_id,
            volume: f.volume,
            epoch: f.epoch,
        }),
        _ => Err(SlaveError::invalid(
            "the call carries no fence (session, volume, epoch)",
        )),
    }
}

fn fence_to(f: Fence) -> Option<pb::Fence> {
    Some(pb::Fence {
        session_id: f.session,
        volume: f.volume,
        epoch: f.epoch,
    })
}

/// A step that only names its session: `Fence` on this side, `Step` on the
/// wire.
impl IntoWire for Fence {
    type Wire = pb::Step;
    fn into_wire(self) -> pb::Step {
        pb::Step {
            fence: fence_to(self),
        }
    }
}

impl FromWire for Fence {
    type Wire = pb::Step;
    fn from_wire(w: pb::Step) -> SlaveResult<Self> {
        fence_from(w.fence)
    }
}

// --- enums

fn mode_to(m: CopyMode) -> pb::CopyMode {
    match m {
        CopyMode::Background => pb::CopyMode::Background,
        CopyMode::Mirror => pb::CopyMode::Mirror,
        CopyMode::Auto => pb::CopyMode::Auto,
    }
}

fn mode_from(v: i32) -> SlaveResult<CopyMode> {
    match pb::CopyMode::try_from(v) {
        Ok(pb::CopyMode::Background) => Ok(CopyMode::Background),
        Ok(pb::CopyMode::Mirror) => Ok(CopyMode::Mirror),
        Ok(pb::CopyMode::Auto) => Ok(CopyMode::Auto),
        _ => Err(SlaveError::invalid(format!(
            "copy mode {v} is not one of Background, Mirror, Auto"
        ))),
    }
}

fn verify_to(v: Verify) -> pb::Verify {
    match v {
        Verify::None => pb::Verify::None,
        Verify::Sample => pb::Verify::Sample,
        Verify::Full => pb::Verify::Full,
    }
}

fn verify_from(v: i32) -> SlaveResult<Verify> {
    match pb::Verify::try_from(v) {
        Ok(pb::Verify::None) => Ok(Verify::None),
        Ok(pb::Verify::Sample) => Ok(Verify::Sample),
        Ok(pb::Verify::Full) => Ok(Verify::Full),
        _ => Err(SlaveError::invalid(format!(
            "verify mode {v} is not one of None, Sample, Full"
        ))),
    }
}

fn frontend_to(f: Frontend) -> i32 {
    match f {
        Frontend::Nbd => pb::Frontend::Nbd as i32,
        Frontend::Block(_) => pb::Frontend::Block as i32,
    }
}

/// The wire carries the block frontend's choice beside the list (one
/// `block_kind` field): a list with a block frontend names its choice there.
fn frontends_to(f: Vec<Frontend>) -> (Vec<i32>, i32) {
    let choice = f.iter().find_map(|f| match f {
        Frontend::Block(c) => Some(*c),
        Frontend::Nbd => None,
    });
    (
        f.into_iter().map(frontend_to).collect(),
        choice.map(block_choice_to).unwrap_or_default(),
    )
}

fn frontends_from(v: Vec<i32>, block_kind: i32) -> SlaveResult<Vec<Frontend>> {
    let choice = block_choice_from(block_kind)?;
    v.into_iter()
        .map(|f| match pb::Frontend::try_from(f) {
            Ok(pb::Frontend::Nbd) => Ok(Frontend::Nbd),
            Ok(pb::Frontend::Block) => Ok(Frontend::Block(choice)),
            _ => Err(SlaveError::invalid(format!(
                "frontend {f} is not known to this agent"
            ))),
        })
        .collect()
}

fn block_kind_to(k: BlockKind) -> i32 {
    match k {
        BlockKind::FuseLoop => pb::BlockKind::Fuse as i32,
        BlockKind::Nbd => pb::BlockKind::Nbd as i32,
        BlockKind::Ublk => pb::BlockKind::Ublk as i32,
    }
}

fn block_choice_to(c: BlockChoice) -> i32 {
    match c {
        BlockChoice::Auto => pb::BlockKind::Auto as i32,
        BlockChoice::Only(k) => block_kind_to(k),
    }
}

fn block_choice_from(v: i32) -> SlaveResult<BlockChoice> {
    match pb::BlockKind::try_from(v) {
        Ok(pb::BlockKind::Auto) => Ok(BlockChoice::Auto),
        Ok(pb::BlockKind::Fuse) => Ok(BlockChoice::Only(BlockKind::FuseLoop)),
        Ok(pb::BlockKind::Nbd) => Ok(BlockChoice::Only(BlockKind::Nbd)),
        Ok(pb::BlockKind::Ublk) => Ok(BlockChoice::Only(BlockKind::Ublk)),
        Err(_) => Err(SlaveError::invalid(format!(
            "block device kind {v} is not known to this agent"
        ))),
    }
}

// --- session config

impl IntoWire for SessionConfig {
    type Wire = pb::SessionConfig;
    fn into_wire(self) -> pb::SessionConfig {
        pb::SessionConfig {
            mode: mode_to(self.mode) as i32,
            sync_goal_ms: self.sync_goal_ms,
            bandwidth: self.bandwidth,
            grain: self.grain,
            chunk_size: self.chunk_size,
            in_flight: self.in_flight.min(u32::MAX as usize) as u32,
            sparse: self.sparse,
            verify: verify_to(self.verify) as i32,
            failback_window_ms: self.failback_window_ms,
            max_passes: self.max_passes,
        }
    }
}

impl FromWire for SessionConfig {
    type Wire = pb::SessionConfig;
    fn from_wire(w: pb::SessionConfig) -> SlaveResult<Self> {
        let c = SessionConfig {
            mode: mode_from(w.mode)?,
            sync_goal_ms: w.sync_goal_ms,
            bandwidth: w.bandwidth,
            grain: w.grain,
            chunk_size: w.chunk_size,
            in_flight: w.in_flight as usize,
            sparse: w.sparse,
            verify: verify_from(w.verify)?,
            failback_window_ms: w.failback_window_ms,
            max_passes: w.max_passes,
        };
        c.validate().map_err(SlaveError::invalid)?;
        Ok(c)
    }
}

// --- requests

impl IntoWire for Prepare {
    type Wire = pb::PrepareRequest;
    fn into_wire(self) -> pb::PrepareRequest {
        pb::PrepareRequest {
            fence: fence_to(self.fence),
            target: text(self.target),
            config: Some(self.config.into_wire()),
            monitor_only: self.monitor_only,
        }
    }
}

impl FromWire for Prepare {
    type Wire = pb::PrepareRequest;
    fn from_wire(w: pb::PrepareRequest) -> SlaveResult<Self> {
        let fence = fence_from(w.fence)?;
        if w.target.is_empty() {
            return Err(SlaveError::invalid("prepare names no target"));
        }
        let config = w
            .config
            .ok_or_else(|| SlaveError::invalid("prepare carries no session config"))
            .and_then(SessionConfig::from_wire)?;
        Ok(Prepare {
            fence,
            target: path(w.target),
            config,
            monitor_only: w.monitor_only,
        })
    }
}

/// Requests of a fence and plain fields.
macro_rules! plain_request {
    ($dom:ident => $pb:ident { $($f:ident),* } ; to { $($tf:ident: $te:expr),* } ; from { $($ff:ident: $fe:expr),* }) => {
        impl IntoWire for $dom {
            type Wire = pb::$pb;
            #[allow(clippy::redundant_closure_call)]
            fn into_wire(self) -> pb::$pb {
                let $dom { fence, $($f),* } = self;
                pb::$pb { fence: fence_to(fence), $($tf: ($te)($tf)),* }
            }
        }
        impl FromWire for $dom {
            type Wire = pb::$pb;
            #[allow(clippy::redundant_closure_call)]
            fn from_wire(w: pb::$pb) -> SlaveResult<Self> {
                let pb::$pb { fence, $($ff),* } = w;
                Ok($dom { fence: fence_from(fence)?, $($ff: ($fe)($ff)?),* })
            }
        }
    };
}

fn same<T>(t: T) -> T {
    t
}

fn ok<T>(t: T) -> SlaveResult<T> {
    Ok(t)
}

impl IntoWire for CopyPass {
    type Wire = pb::CopyPassRequest;
    fn into_wire(self) -> pb::CopyPassRequest {
        pb::CopyPassRequest {
            fence: fence_to(self.fence),
            slice_ms: self.slice.map(|d| ms(d).max(1)).unwrap_or(0),
        }
    }
}

impl FromWire for CopyPass {
    type Wire = pb::CopyPassRequest;
    fn from_wire(w: pb::CopyPassRequest) -> SlaveResult<Self> {
        Ok(CopyPass {
            fence: fence_from(w.fence)?,
            slice: (w.slice_ms > 0).then(|| Duration::from_millis(w.slice_ms)),
        })
    }
}

plain_request!(SetMirror => SetMirrorRequest { on } ; to { on: same } ; from { on: ok });
plain_request!(Redirect => RedirectRequest { to_source } ; to { to_source: same } ; from { to_source: ok });
plain_request!(SetBandwidth => SetBandwidthRequest { bytes_per_sec } ; to { bytes_per_sec: same } ; from { bytes_per_sec: ok });
plain_request!(TakeDirty => TakeDirtyRequest { ack } ; to { ack: same } ; from { ack: ok });

impl IntoWire for Quiesce {
    type Wire = pb::QuiesceRequest;
    fn into_wire(self) -> pb::QuiesceRequest {
        pb::QuiesceRequest {
            fence: fence_to(self.fence),
            budget_ms: ms(self.budget).max(1),
        }
    }
}

impl FromWire for Quiesce {
    type Wire = pb::QuiesceRequest;
    fn from_wire(w: pb::QuiesceRequest) -> SlaveResult<Self> {
        Ok(Quiesce {
            fence: fence_from(w.fence)?,
            budget: Duration::from_millis(w.budget_ms),
        })
    }
}

impl IntoWire for Terminate {
    type Wire = pb::TerminateRequest;
    fn into_wire(self) -> pb::TerminateRequest {
        pb::TerminateRequest {
            fence: fence_to(self.fence),
            verify: verify_to(self.verify) as i32,
            failback_window_ms: ms(self.failback_window),
        }
    }
}

impl FromWire for Terminate {
    type Wire = pb::TerminateRequest;
    fn from_wire(w: pb::TerminateRequest) -> SlaveResult<Self> {
        Ok(Terminate {
            fence: fence_from(w.fence)?,
            verify: verify_from(w.verify)?,
            failback_window: Duration::from_millis(w.failback_window_ms),
        })
    }
}

fn runs_to(runs: Vec<DirtyRun>) -> Vec<pb::DirtyWords> {
    runs.into_iter()
        .map(|r| pb::DirtyWords {
            first_word: r.first_word,
            words: r.words,
        })
        .collect()
}

fn runs_from(runs: Vec<pb::DirtyWords>) -> Vec<DirtyRun> {
    runs.into_iter()
        .map(|r| DirtyRun {
            first_word: r.first_word,
            words: r.words,
        })
        .collect()
}

impl IntoWire for MergeDirty {
    type Wire = pb::MergeDirtyRequest;
    fn into_wire(self) -> pb::MergeDirtyRequest {
        pb::MergeDirtyRequest {
            fence: fence_to(self.fence),
            grain: self.grain,
            size: self.size,
            runs: runs_to(self.runs),
        }
    }
}

impl FromWire for MergeDirty {
    type Wire = pb::MergeDirtyRequest;
    fn from_wire(w: pb::MergeDirtyRequest) -> SlaveResult<Self> {
        Ok(MergeDirty {
            fence: fence_from(w.fence)?,
            grain: w.grain,
            size: w.size,
            runs: runs_from(w.runs),
        })
    }
}

// --- responses

impl IntoWire for SessionState {
    type Wire = pb::SessionState;
    fn into_wire(self) -> pb::SessionState {
        pb::SessionState {
            session_id: self.session,
            volume: self.volume,
            epoch: self.epoch,
            size: self.size,
            source: text(self.source),
            target: text(self.target),
            attached: self.attached,
            mirror: self.mirror,
            quiesced: self.quiesced,
            redirected: self.redirected,
            dirty_bytes: self.dirty_bytes,
            bytes_copied: self.bytes_copied,
            finished: self.finished,
            copy_rate: self.copy_rate,
            write_rate: self.write_rate,
            resumes: self.resumes as u64,
        }
    }
}

impl FromWire for SessionState {
    type Wire = pb::SessionState;
    fn from_wire(w: pb::SessionState) -> SlaveResult<Self> {
        Ok(SessionState {
            session: w.session_id,
            volume: w.volume,
            epoch: w.epoch,
            size: w.size,
            source: path(w.source),
            target: path(w.target),
            attached: w.attached,
            mirror: w.mirror,
            quiesced: w.quiesced,
            redirected: w.redirected,
            dirty_bytes: w.dirty_bytes,
            bytes_copied: w.bytes_copied,
            finished: w.finished,
            copy_rate: w.copy_rate,
            write_rate: w.write_rate,
            resumes: w.resumes.min(u32::MAX as u64) as u32,
        })
    }
}

impl IntoWire for PassResult {
    type Wire = pb::PassResult;
    fn into_wire(self) -> pb::PassResult {
        pb::PassResult {
            complete: self.complete,
            bytes: self.bytes,
            data_bytes: self.data_bytes,
            elapsed_us: us(self.elapsed),
            dirty_bytes: self.dirty_bytes,
            stopped: self.stopped,
            walked: self.walked,
            redirtied_bytes: self.redirtied_bytes,
        }
    }
}

impl FromWire for PassResult {
    type Wire = pb::PassResult;
    fn from_wire(w: pb::PassResult) -> SlaveResult<Self> {
        Ok(PassResult {
            complete: w.complete,
            bytes: w.bytes,
            data_bytes: w.data_bytes,
            elapsed: Duration::from_micros(w.elapsed_us),
            dirty_bytes: w.dirty_bytes,
            stopped: w.stopped,
            walked: w.walked,
            redirtied_bytes: w.redirtied_bytes,
        })
    }
}

impl IntoWire for QuiesceResult {
    type Wire = pb::QuiesceResult;
    fn into_wire(self) -> pb::QuiesceResult {
        pb::QuiesceResult {
            quiesced: self.quiesced,
            spent_us: us(self.spent),
            dirty_bytes: self.dirty_bytes,
        }
    }
}

impl FromWire for QuiesceResult {
    type Wire = pb::QuiesceResult;
    fn from_wire(w: pb::QuiesceResult) -> SlaveResult<Self> {
        Ok(QuiesceResult {
            quiesced: w.quiesced,
            spent: Duration::from_micros(w.spent_us),
            dirty_bytes: w.dirty_bytes,
        })
    }
}

impl IntoWire for ResumeResult {
    type Wire = pb::ResumeResult;
    fn into_wire(self) -> pb::ResumeResult {
        pb::ResumeResult {
            stall_us: self.stall.map(us).unwrap_or(0),
        }
    }
}

impl FromWire for ResumeResult {
    type Wire = pb::ResumeResult;
    fn from_wire(w: pb::ResumeResult) -> SlaveResult<Self> {
        Ok(ResumeResult {
            stall: (w.stall_us > 0).then(|| Duration::from_micros(w.stall_us)),
        })
    }
}

impl IntoWire for TerminateResult {
    type Wire = pb::TerminateResult;
    fn into_wire(self) -> pb::TerminateResult {
        pb::TerminateResult {
            verified: self.verified,
            mismatch_offset: self.mismatch_offset,
        }
    }
}

impl FromWire for TerminateResult {
    type Wire = pb::TerminateResult;
    fn from_wire(w: pb::TerminateResult) -> SlaveResult<Self> {
        Ok(TerminateResult {
            verified: w.verified,
            mismatch_offset: w.mismatch_offset,
        })
    }
}

impl IntoWire for DirtyBatch {
    type Wire = pb::DirtyBatch;
    fn into_wire(self) -> pb::DirtyBatch {
        pb::DirtyBatch {
            batch: self.batch,
            grain: self.grain,
            size: self.size,
            runs: runs_to(self.runs),
            dirty_bytes: self.dirty_bytes,
        }
    }
}

impl FromWire for DirtyBatch {
    type Wire = pb::DirtyBatch;
    fn from_wire(w: pb::DirtyBatch) -> SlaveResult<Self> {
        Ok(DirtyBatch {
            batch: w.batch,
            grain: w.grain,
            size: w.size,
            runs: runs_from(w.runs),
            dirty_bytes: w.dirty_bytes,
        })
    }
}

// --- serving

impl IntoWire for ServeVolume {
    type Wire = pb::ServeVolumeRequest;
    fn into_wire(self) -> pb::ServeVolumeRequest {
        let (frontends, block_kind) = frontends_to(self.frontends);
        pb::ServeVolumeRequest {
            volume: self.volume,
            backing: text(self.backing),
            frontends,
            direct: self.direct,
            block_kind,
        }
    }
}

impl FromWire for ServeVolume {
    type Wire = pb::ServeVolumeRequest;
    fn from_wire(w: pb::ServeVolumeRequest) -> SlaveResult<Self> {
        if w.volume.is_empty() || w.backing.is_empty() {
            return Err(SlaveError::invalid(
                "serving a volume needs its name and backing device",
            ));
        }
        Ok(ServeVolume {
            volume: w.volume,
            backing: path(w.backing),
            frontends: frontends_from(w.frontends, w.block_kind)?,
            direct: w.direct,
        })
    }
}

impl IntoWire for UnserveVolume {
    type Wire = pb::UnserveVolumeRequest;
    fn into_wire(self) -> pb::UnserveVolumeRequest {
        pb::UnserveVolumeRequest {
            volume: self.volume,
        }
    }
}

impl FromWire for UnserveVolume {
    type Wire = pb::UnserveVolumeRequest;
    fn from_wire(w: pb::UnserveVolumeRequest) -> SlaveResult<Self> {
        if w.volume.is_empty() {
            return Err(SlaveError::invalid("unserve names no volume"));
        }
        Ok(UnserveVolume { volume: w.volume })
    }
}

impl IntoWire for Unserved {
    type Wire = pb::UnserveVolumeResponse;
    fn into_wire(self) -> pb::UnserveVolumeResponse {
        pb::UnserveVolumeResponse {
            was_served: self.was_served,
        }
    }
}

impl FromWire for Unserved {
    type Wire = pb::UnserveVolumeResponse;
    fn from_wire(w: pb::UnserveVolumeResponse) -> SlaveResult<Self> {
        Ok(Unserved {
            was_served: w.was_served,
        })
    }
}

impl IntoWire for ListVolumes {
    type Wire = pb::ListVolumesRequest;
    fn into_wire(self) -> pb::ListVolumesRequest {
        pb::ListVolumesRequest {}
    }
}

impl FromWire for ListVolumes {
    type Wire = pb::ListVolumesRequest;
    fn from_wire(_: pb::ListVolumesRequest) -> SlaveResult<Self> {
        Ok(ListVolumes)
    }
}

impl IntoWire for VolumeInfo {
    type Wire = pb::VolumeInfo;
    fn into_wire(self) -> pb::VolumeInfo {
        let (frontends, block_kind) = frontends_to(self.frontends);
        pb::VolumeInfo {
            name: self.name,
            size: self.size,
            active: text(self.active),
            session_id: self.session.unwrap_or_default(),
            backing: text(self.backing),
            frontends,
            error: self.error.unwrap_or_default(),
            device: self.device.map(text).unwrap_or_default(),
            device_kind: self.device_kind.map(block_kind_to).unwrap_or_default(),
            block_kind,
        }
    }
}

impl FromWire for VolumeInfo {
    type Wire = pb::VolumeInfo;
    fn from_wire(w: pb::VolumeInfo) -> SlaveResult<Self> {
        Ok(VolumeInfo {
            name: w.name,
            size: w.size,
            active: path(w.active),
            session: (!w.session_id.is_empty()).then_some(w.session_id),
            backing: path(w.backing),
            frontends: frontends_from(w.frontends, w.block_kind)?,
            device: (!w.device.is_empty()).then(|| path(w.device)),
            device_kind: match block_choice_from(w.device_kind)? {
                BlockChoice::Only(k) => Some(k),
                BlockChoice::Auto => None,
            },
            error: (!w.error.is_empty()).then_some(w.error),
        })
    }
}

impl IntoWire for VolumeList {
    type Wire = pb::ListVolumesResponse;
    fn into_wire(self) -> pb::ListVolumesResponse {
        pb::ListVolumesResponse {
            volumes: self.volumes.into_iter().map(IntoWire::into_wire).collect(),
        }
    }
}

impl FromWire for VolumeList {
    type Wire = pb::ListVolumesResponse;
    fn from_wire(w: pb::ListVolumesResponse) -> SlaveResult<Self> {
        Ok(VolumeList {
            volumes: w
                .volumes
                .into_iter()
                .map(VolumeInfo::from_wire)
                .collect::<SlaveResult<_>>()?,
        })
    }
}

// --- errors

const KIND: &str = "volmig-error-kind";
const OP: &str = "volmig-op";
const VOLUME: &str = "volmig-volume";
const SESSION: &str = "volmig-session";
const AGENT: &str = "volmig-agent";

fn code_of(kind: ErrorKind) -> tonic::Code {
    use tonic::Code;
    match kind {
        ErrorKind::Fenced | ErrorKind::InUse => Code::FailedPrecondition,
        ErrorKind::Busy => Code::Aborted,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::WrongState => Code::OutOfRange,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Failed => Code::Internal,
    }
}

/// The kind a status without our metadata means (a transport error, a
/// proxy, an older agent).
fn kind_of(code: tonic::Code) -> ErrorKind {
    use tonic::Code;
    match code {
        Code::FailedPrecondition => ErrorKind::Fenced,
        Code::Aborted => ErrorKind::Busy,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::InvalidArgument => ErrorKind::Invalid,
        Code::OutOfRange => ErrorKind::WrongState,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Failed,
    }
}

fn put(md: &mut MetadataMap, key: &'static str, value: &Option<String>) {
    if let Some(v) = value
        && let Ok(v) = MetadataValue::try_from(v.as_str())
    {
        md.insert(key, v);
    }
}

fn get(md: &MetadataMap, key: &str) -> Option<String> {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl From<SlaveError> for tonic::Status {
    fn from(e: SlaveError) -> Self {
        let mut s = tonic::Status::new(code_of(e.kind), e.message);
        let md = s.metadata_mut();
        put(md, KIND, &Some(e.kind.name().to_string()));
        put(md, OP, &e.context.op);
        put(md, VOLUME, &e.context.volume);
        put(md, SESSION, &e.context.session);
        put(md, AGENT, &e.context.agent);
        s
    }
}

impl From<tonic::Status> for SlaveError {
    fn from(s: tonic::Status) -> Self {
        let md = s.metadata();
        let kind = get(md, KIND)
            .and_then(|k| ErrorKind::from_name(&k))
            .unwrap_or_else(|| kind_of(s.code()));
        let message = match (get(md, KIND), kind) {
            // Not ours: a transport or deadline error says what it was.
            (None, ErrorKind::Unavailable) => format!("{}: {}", s.code(), s.message()),
            _ => s.message().to_string(),
        };
        SlaveError {
            kind,
            message,
            context: Box::new(ErrorContext {
                op: get(md, OP),
                volume: get(md, VOLUME),
                session: get(md, SESSION),
                agent: get(md, AGENT),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_roundtrip_with_their_kind_and_context() {
        for kind in ErrorKind::ALL {
            let e = SlaveError::new(kind, "what happened")
                .op("prepare")
                .volume("db")
                .session("db-1")
                .agent("https://n1:7443");
            let s: tonic::Status = e.clone().into();
            assert_eq!(SlaveError::from(s), e);
        }
        // Fenced and InUse share a code; the kind tells them apart.
        let s: tonic::Status = SlaveError::new(ErrorKind::InUse, "x").into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(SlaveError::from(s).kind, ErrorKind::InUse);
        // A status that is not ours still maps by code.
        let e = SlaveError::from(tonic::Status::unavailable("connection refused"));
        assert!(e.is_transient());
        assert!(e.message.contains("connection refused"));
    }

    #[test]
    fn requests_roundtrip_and_bad_ones_are_refused() {
        let fence = Fence {
            session: "s".into(),
            volume: "v".into(),
            epoch: 3,
        };
        let p = Prepare {
            fence: fence.clone(),
            target: "/dev/sdc".into(),
            config: SessionConfig {
                verify: Verify::Sample,
                mode: CopyMode::Mirror,
                failback_window_ms: 1500,
                ..SessionConfig::default()
            },
            monitor_only: true,
        };
        assert_eq!(Prepare::from_wire(p.clone().into_wire()).unwrap(), p);
        let mut w = p.clone().into_wire();
        w.fence = None;
        assert_eq!(Prepare::from_wire(w).unwrap_err().kind, ErrorKind::Invalid);
        let mut w = p.clone().into_wire();
        if let Some(c) = w.config.as_mut() {
            c.mode = pb::CopyMode::Unspecified as i32;
        }
        let e = Prepare::from_wire(w).unwrap_err();
        assert!(e.message.contains("copy mode"), "{e}");
        let mut w = p.clone().into_wire();
        if let Some(c) = w.config.as_mut() {
            c.grain = 1000;
        }
        assert!(
            Prepare::from_wire(w)
                .unwrap_err()
                .message
                .contains("granularity")
        );
        let t = Terminate {
            fence: fence.clone(),
            verify: Verify::None,
            failback_window: Duration::from_millis(20),
        };
        assert_eq!(Terminate::from_wire(t.clone().into_wire()).unwrap(), t);
        let mut w = t.into_wire();
        w.verify = 0;
        assert!(Terminate::from_wire(w).is_err());
        let c = CopyPass {
            fence: fence.clone(),
            slice: None,
        };
        assert_eq!(CopyPass::from_wire(c.clone().into_wire()).unwrap(), c);
        let m = MergeDirty {
            fence,
            grain: 65536,
            size: 1 << 30,
            runs: vec![DirtyRun {
                first_word: 7,
                words: vec![1, 2],
            }],
        };
        assert_eq!(MergeDirty::from_wire(m.clone().into_wire()).unwrap(), m);
        let s = ServeVolume {
            volume: "v".into(),
            backing: "/dev/sdb".into(),
            frontends: vec![Frontend::Nbd],
            direct: true,
        };
        assert_eq!(ServeVolume::from_wire(s.clone().into_wire()).unwrap(), s);
        let mut w = s.into_wire();
        w.frontends = vec![0];
        assert!(ServeVolume::from_wire(w).is_err());
        for choice in [
            BlockChoice::Auto,
            BlockChoice::Only(BlockKind::FuseLoop),
            BlockChoice::Only(BlockKind::Nbd),
            BlockChoice::Only(BlockKind::Ublk),
        ] {
            let s = ServeVolume {
                volume: "v".into(),
                backing: "/dev/sdb".into(),
                frontends: vec![Frontend::Nbd, Frontend::Block(choice)],
                direct: false,
            };
            assert_eq!(ServeVolume::from_wire(s.clone().into_wire()).unwrap(), s);
            let mut w = s.into_wire();
            w.block_kind = 99;
            assert!(ServeVolume::from_wire(w).is_err(), "an unknown block kind");
        }
        let mut w = ServeVolume {
            volume: "v".into(),
            backing: "/dev/sdb".into(),
            frontends: vec![Frontend::Nbd],
            direct: false,
        }
        .into_wire();
        w.block_kind = 99;
        assert!(ServeVolume::from_wire(w).is_err(), "an unknown block kind");
        let v = VolumeInfo {
            name: "v".into(),
            size: 4096,
            backing: "/a".into(),
            active: "/a".into(),
            session: None,
            frontends: vec![Frontend::Block(BlockChoice::Auto)],
            device: Some("/dev/loop7".into()),
            device_kind: Some(BlockKind::FuseLoop),
            error: None,
        };
        assert_eq!(VolumeInfo::from_wire(v.clone().into_wire()).unwrap(), v);
        for was_served in [true, false] {
            let u = Unserved { was_served };
            assert_eq!(Unserved::from_wire(u.into_wire()).unwrap(), u);
        }
    }
}
