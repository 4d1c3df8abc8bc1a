//! `migrate` arguments to a `VolumeMigration` (pure: no cluster).

use kube::api::ObjectMeta;
use volmig_api::crd::{
    CopyModeSpec, SourceRef, TargetRef, VerifySpec, VolumeMigration, VolumeMigrationSpec,
    VolumePair, check_spec,
};
use volmig_api::units::{parse_duration, parse_size};

use super::args::MigrateArgs;
use super::{Error, Result};

fn copy_mode(s: &str) -> Result<CopyModeSpec> {
    s.parse::<volmig_api::phase::CopyMode>()
        .map(CopyModeSpec::from)
        .map_err(|_| Error::Args(format!("--mode {s:?}: expected Auto, Background or Mirror")))
}

fn verify(s: &str) -> Result<VerifySpec> {
    match s.to_ascii_lowercase().as_str() {
        "none" => Ok(VerifySpec::None),
        "sample" => Ok(VerifySpec::Sample),
        "full" => Ok(VerifySpec::Full),
        _ => Err(Error::Args(format!(
            "--verify {s:?}: expected None, Sample or Full"
        ))),
    }
}

/// The default name: `<first pvc>-migration`, kept within 253 characters.
fn default_name(first: &str) -> String {
    const SUFFIX: &str = "-migration";
    let keep = first.len().min(253 - SUFFIX.len());
    let base: String = first.chars().take(keep).collect();
    format!("{}{SUFFIX}", base.trim_end_matches(['-', '.']))
}

/// Builds the resource `migrate` creates, refusing what the CRD's rules (or
/// the flags' own syntax) would refuse, with a message naming the flag.
pub fn build_migration(a: &MigrateArgs, namespace: Option<&str>) -> Result<VolumeMigration> {
    let Some(first) = a.pvcs.first() else {
        return Err(Error::Args(
            "name at least one persistent volume claim to migrate".into(),
        ));
    };
    let targets: Vec<TargetRef> = match (&a.to_storage_class, a.to_pvc.as_slice()) {
        (Some(_), [_, ..]) => {
            return Err(Error::Args(
                "give either --to-storage-class or --to-pvc, not both".into(),
            ));
        }
        (None, []) => {
            return Err(Error::Args(
                "say where the data goes: --to-storage-class SC (new claims) or --to-pvc NAME (an existing claim)".into(),
            ));
        }
        (Some(sc), []) => a
            .pvcs
            .iter()
            .map(|_| TargetRef {
                storage_class_name: Some(sc.clone()),
                persistent_volume_claim: None,
            })
            .collect(),
        (None, pvcs) => {
            if pvcs.len() != a.pvcs.len() {
                return Err(Error::Args(format!(
                    "--to-pvc given {} time(s) for {} claim(s): give one target claim per source claim, in order",
                    pvcs.len(),
                    a.pvcs.len()
                )));
            }
            pvcs.iter()
                .map(|p| TargetRef {
                    storage_class_name: None,
                    persistent_volume_claim: Some(p.clone()),
                })
                .collect()
        }
    };
    if let Err(e) = parse_duration(&a.sync_goal) {
        return Err(Error::Args(format!(
            "--sync-goal {:?} is not a duration (e.g. 100ms, 2s): {e}",
            a.sync_goal
        )));
    }
    if let Some(b) = &a.bandwidth
        && let Err(e) = parse_size(b)
    {
        return Err(Error::Args(format!(
            "--bandwidth {b:?} is not a quantity (e.g. 200Mi, 1G): {e}"
        )));
    }
    let spec = VolumeMigrationSpec {
        volumes: a
            .pvcs
            .iter()
            .zip(targets)
            .map(|(src, target)| VolumePair {
                source: SourceRef {
                    persistent_volume_claim: src.clone(),
                },
                target,
            })
            .collect(),
        copy_mode: copy_mode(&a.mode)?,
        sync_goal: a.sync_goal.clone(),
        bandwidth_limit: a.bandwidth.clone(),
        verify: verify(&a.verify)?,
        retain_source: a.retain_source,
        abort: false,
    };
    check_spec(&spec).map_err(Error::Invalid)?;
    let mut vm = VolumeMigration::new(&a.name.clone().unwrap_or_else(|| default_name(first)), spec);
    vm.metadata = ObjectMeta {
        name: vm.metadata.name.take(),
        namespace: namespace.map(str::to_string),
        ..ObjectMeta::default()
    };
    Ok(vm)
}

/// The resource as YAML (what `--dry-run` prints; `kubectl apply -f -` takes it).
pub fn to_yaml(vm: &VolumeMigration) -> Result<String> {
    serde_saphyr::to_string(vm).map_err(|e| Error::Yaml(e.to_string()))
}
