//! What the reconciler reads about the cluster: pods, claims and volumes
//! from reflector caches (kube-runtime `reflector`/`Store`, one watch per
//! kind, kept current by the API server's events), not a live LIST on every
//! reconcile — and a running migration is reconciled on every save of its
//! status. Writes go to the API server; the cache catches up through the
//! watch. What must not act on a stale view reads live (one GET): the
//! finalizer's last look before it lets go, and an object a create found
//! to exist already.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::error::{Error, Result};

/// kubectl's copy of the applied object: large, and read by nobody here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How a read goes: from the cache, or to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Cached,
    Live,
}

/// The caches of every pod, claim and volume in the cluster.
pub struct Caches {
    pods: Store<Pod>,
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    client: Client,
    tasks: Vec<JoinHandle<()>>,
}

/// A reflector of every `K` in the cluster, trimmed of what nobody reads.
fn reflect<K>(client: &Client) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| {
            o.managed_fields_mut().clear();
            o.annotations_mut().remove(LAST_APPLIED);
        })
        .reflect(writer)
        .applied_objects();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(r) = stream.next().await {
            if let Err(e) = r {
                warn!(%kind, error = %e, "watch failed; retrying");
            }
        }
    });
    (store, task)
}

impl Caches {
    /// Starts the reflectors (in the current tokio runtime).
    pub fn start(client: &Client) -> Self {
        let (pods, a) = reflect(client);
        let (claims, b) = reflect(client);
        let (volumes, c) = reflect(client);
        Self {
            pods,
            claims,
            volumes,
            client: client.clone(),
            tasks: vec![a, b, c],
        }
    }

    /// Waits until every cache holds the cluster as listed once.
    pub async fn ready(&self) -> Result<()> {
        let gone = |what| move |_| Error::CacheGone(what);
        self.pods.wait_until_ready().await.map_err(gone("pods"))?;
        self.claims
            .wait_until_ready()
            .await
            .map_err(gone("persistentvolumeclaims"))?;
        self.volumes
            .wait_until_ready()
            .await
            .map_err(gone("persistentvolumes"))?;
        Ok(())
    }

    pub fn pods(&self) -> &Store<Pod> {
        &self.pods
    }

    pub fn claims(&self) -> &Store<PersistentVolumeClaim> {
        &self.claims
    }

    pub fn volumes(&self) -> &Store<PersistentVolume> {
        &self.volumes
    }

    /// Every pod in namespace `ns`.
    pub fn pods_in(&self, ns: &str) -> Vec<Arc<Pod>> {
        self.pods
            .state_filter(|p| p.metadata.namespace.as_deref() == Some(ns))
    }

    /// Pod `ns/name`.
    pub async fn pod(&self, ns: &str, name: &str, read: Read) -> Result<Option<Pod>> {
        match read {
            Read::Cached => Ok(self
                .pods
                .get(&ObjectRef::new(name).within(ns))
                .map(|p| (*p).clone())),
            Read::Live => Ok(Api::<Pod>::namespaced(self.client.clone(), ns)
                .get_opt(name)
                .await?),
        }
    }

    /// Claim `ns/name`.
    pub async fn claim(
        &self,
        ns: &str,
        name: &str,
        read: Read,
    ) -> Result<Option<PersistentVolumeClaim>> {
        match read {
            Read::Cached => Ok(self
                .claims
                .get(&ObjectRef::new(name).within(ns))
                .map(|c| (*c).clone())),
            Read::Live => Ok(
                Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
                    .get_opt(name)
                    .await?,
            ),
        }
    }

    /// PersistentVolume `name`.
    pub async fn volume(&self, name: &str, read: Read) -> Result<Option<PersistentVolume>> {
        match read {
            Read::Cached => Ok(self
                .volumes
                .get(&ObjectRef::new(name))
                .map(|v| (*v).clone())),
            Read::Live => Ok(Api::<PersistentVolume>::all(self.client.clone())
                .get_opt(name)
                .await?),
        }
    }
}

impl Drop for Caches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
