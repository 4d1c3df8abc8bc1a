//! `SessionStore` over a VolumeMigration's status: in a cluster the CR
//! status is the communication data set.
//!
//! Optimistic concurrency: a record's revision is the object's
//! `metadata.generation` plus its volume's `session.revision` (the number
//! of saves of that record). Both only grow, so equal sums mean nothing
//! changed; a spec edit (abort, a new bandwidth limit) changes the revision,
//! so the driver's next save fails with `Conflict`, it reloads and merges
//! those requests. A save reads the object, checks the revision, writes the
//! record into the status it read and replaces the status with that
//! object's `resourceVersion`. When the API server answers 409 (someone
//! wrote in between: another volume of a group, the reconciler), the save
//! reads again and retries as long as this record's revision still holds.
//!
//! What users ask for lives in the spec and wins on load: `spec.abort` (or
//! the object being deleted) is an abort request, `spec.bandwidthLimit` the
//! bandwidth.

use kube::Api;
use kube::api::PostParams;
use tokio::sync::mpsc;
use volmig_api::crd::{VolumeMigration, VolumeMigrationStatus, check_spec};
use volmig_api::phase::Phase;
use volmig_master::{MasterError, Result, SessionRecord, SessionStore, now_ms};

use crate::status_map::{
    has_record, read_record, session_conditions, volume_revision, write_record,
};

/// A record saved, for Events and metrics.
#[derive(Debug, Clone)]
pub struct Saved {
    pub namespace: String,
    pub name: String,
    /// The VolumeMigration's uid: its Events name it, so `kubectl
    /// describe` finds them.
    pub uid: Option<String>,
    /// The phase before this save (`None`: the session was just created).
    pub before: Option<Phase>,
    pub record: SessionRecord,
}

#[derive(Clone)]
pub struct CrStatusStore {
    api: Api<VolumeMigration>,
    namespace: String,
    name: String,
    saved: Option<mpsc::UnboundedSender<Saved>>,
}

fn store_err(what: &str, name: &str, e: kube::Error) -> MasterError {
    MasterError::Store {
        path: format!("VolumeMigration {name}").into(),
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}

/// The revision of `key`'s record in `vm` (see the module docs).
pub fn revision_of(vm: &VolumeMigration, key: &str) -> u64 {
    let g = vm.metadata.generation.unwrap_or(0).max(0) as u64;
    g + vm
        .status
        .as_ref()
        .map(|s| volume_revision(s, key))
        .unwrap_or(0)
}

/// Saves that lose a race to an unrelated write are retried this often.
const RETRIES: usize = 16;

impl CrStatusStore {
    pub fn new(api: Api<VolumeMigration>, namespace: &str, name: &str) -> Self {
        Self {
            api,
            namespace: namespace.to_string(),
            name: name.to_string(),
            saved: None,
        }
    }

    /// Reports every save on `tx`.
    pub fn with_observer(mut self, tx: mpsc::UnboundedSender<Saved>) -> Self {
        self.saved = Some(tx);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn get(&self) -> Result<VolumeMigration> {
        match self.api.get(&self.name).await {
            Ok(vm) => Ok(vm),
            Err(kube::Error::Api(ae)) if ae.code == 404 => Err(MasterError::NoSession(format!(
                "VolumeMigration {} is gone",
                self.name
            ))),
            Err(e) => Err(store_err("reading", &self.name, e)),
        }
    }

    /// The record of `key` in `vm`, with the user's requests from the spec.
    pub fn record_of(vm: &VolumeMigration, key: &str) -> Result<Option<SessionRecord>> {
        let empty = VolumeMigrationStatus::default();
        let status = vm.status.as_ref().unwrap_or(&empty);
        let name = vm.metadata.name.clone().unwrap_or_default();
        let mut rec =
            read_record(status, key, revision_of(vm, key)).map_err(|e| MasterError::Corrupt {
                path: format!("VolumeMigration {name}").into(),
                reason: e.0,
            })?;
        if let Some(r) = &mut rec {
            r.abort_requested |= vm.spec.abort || vm.metadata.deletion_timestamp.is_some();
            if let Ok(p) = check_spec(&vm.spec) {
                r.config.bandwidth = p.bandwidth;
            }
        }
        Ok(rec)
    }
}

impl SessionStore for CrStatusStore {
    async fn load(&self, key: &str) -> Result<Option<SessionRecord>> {
        Self::record_of(&self.get().await?, key)
    }

    async fn save(&self, key: &str, rec: &mut SessionRecord) -> Result<()> {
        for _ in 0..RETRIES {
            let mut vm = self.get().await?;
            let mut status = vm.status.clone().unwrap_or_default();
            let exists = has_record(&status, key);
            let found = if exists { revision_of(&vm, key) } else { 0 };
            if found != rec.revision {
                return Err(MasterError::Conflict {
                    key: key.to_string(),
                    expected: rec.revision,
                    found,
                });
            }
            let before = if exists {
                status
                    .volumes
                    .iter()
                    .find(|v| v.volume == key)
                    .and_then(|v| v.session.as_ref())
                    .and_then(|s| s.phase.session_phase())
            } else {
                None
            };
            write_record(&mut status, rec);
            if let Some(s) = status
                .volumes
                .iter_mut()
                .find(|v| v.volume == key)
                .and_then(|v| v.session.as_mut())
            {
                s.revision += 1;
            }
            status.revision += 1;
            // The record was loaded with this generation's spec (the
            // revision check above says so).
            status.observed_generation = vm.metadata.generation;
            session_conditions(&mut status, vm.metadata.generation, now_ms());
            vm.status = Some(status);
            match self
                .api
                .replace_status(&self.name, &PostParams::default(), &vm)
                .await
            {
                Ok(stored) => {
                    rec.revision = revision_of(&stored, key);
                    if let Some(tx) = &self.saved {
                        let _ = tx.send(Saved {
                            namespace: self.namespace.clone(),
                            name: self.name.clone(),
                            uid: stored.metadata.uid.clone(),
                            before,
                            record: rec.clone(),
                        });
                    }
                    return Ok(());
                }
                // someone wrote in between: read again, check again
                Err(kube::Error::Api(ae)) if ae.code == 409 => continue,
                Err(kube::Error::Api(ae)) if ae.code == 404 => {
                    return Err(MasterError::NoSession(format!(
                        "VolumeMigration {} is gone",
                        self.name
                    )));
                }
                Err(e) => return Err(store_err("writing the status", &self.name, e)),
            }
        }
        Err(MasterError::Conflict {
            key: key.to_string(),
            expected: rec.revision,
            found: rec.revision,
        })
    }

    async fn keys(&self) -> Result<Vec<String>> {
        let vm = self.get().await?;
        Ok(vm
            .status
            .map(|s| {
                s.volumes
                    .into_iter()
                    .filter(|v| v.session.is_some())
                    .map(|v| v.volume)
                    .collect()
            })
            .unwrap_or_default())
    }
}
