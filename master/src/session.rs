//! A session's record from outside its driver: creating it (phase
//! Activating) and the requests others make of a running session (abort,
//! a new bandwidth limit), which its driver takes in at its next step.

use crate::error::{MasterError, Result};
use crate::record::{SessionConfig, SessionRecord, now_ms};
use crate::store::SessionStore;

/// Creates a session's record (phase Activating) for a driver to run.
pub async fn create_session<St: SessionStore>(
    store: &St,
    volume: &str,
    target: &std::path::Path,
    config: SessionConfig,
    epoch: u64,
) -> Result<SessionRecord> {
    config.validate().map_err(MasterError::Invalid)?;
    let mut rec = SessionRecord::new(volume, std::path::Path::new(""), target, 0, config);
    rec.epoch = epoch;
    if let Some(old) = store.load(volume).await? {
        if !old.phase.is_terminal() {
            return Err(MasterError::SessionExists {
                volume: volume.to_string(),
                session: old.session,
            });
        }
        rec.revision = old.revision;
    }
    rec.phase_times[0].start_ms = now_ms();
    store.save(volume, &mut rec).await?;
    Ok(rec)
}

/// Records an abort request; the driver acts on it at its next step.
pub async fn request_abort<St: SessionStore>(store: &St, volume: &str) -> Result<SessionRecord> {
    crate::store::update(store, volume, |rec| {
        if rec.phase.is_terminal() {
            return Err(MasterError::Invalid(format!(
                "session {} already {}",
                rec.session, rec.phase
            )));
        }
        rec.abort_requested = true;
        Ok(true)
    })
    .await
}

/// Changes a running session's bandwidth limit; the driver pushes it.
pub async fn set_bandwidth<St: SessionStore>(
    store: &St,
    volume: &str,
    bytes_per_sec: u64,
) -> Result<SessionRecord> {
    crate::store::update(store, volume, |rec| {
        rec.config.bandwidth = bytes_per_sec;
        Ok(true)
    })
    .await
}
