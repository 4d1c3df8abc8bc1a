//! The phase drivers this operator runs: one task per VolumeMigration, each
//! `volmig_master::Driver::run` over the CR-status store. Stopping one only
//! stops this master (between steps); the session goes on under the next
//! driver (a later reconcile, or the next leader).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use volmig_master::StopSignal;

struct Running {
    stop: Arc<StopSignal>,
    endpoint: String,
    handle: JoinHandle<()>,
}

#[derive(Default)]
pub struct Drivers {
    running: Mutex<HashMap<String, Running>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Entries are inserted and removed whole; a panic cannot tear one.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drivers {
    fn prune(map: &mut HashMap<String, Running>) {
        map.retain(|_, r| !r.handle.is_finished());
    }

    /// Drivers running now.
    pub fn active(&self) -> usize {
        let mut m = lock(&self.running);
        Self::prune(&mut m);
        m.len()
    }

    /// The agent endpoint of `key`'s running driver.
    pub fn endpoint(&self, key: &str) -> Option<String> {
        let mut m = lock(&self.running);
        Self::prune(&mut m);
        m.get(key).map(|r| r.endpoint.clone())
    }

    pub fn is_running(&self, key: &str) -> bool {
        self.endpoint(key).is_some()
    }

    /// Runs `fut` as `key`'s driver (one per key: a running one is kept).
    pub fn start<F>(&self, key: &str, endpoint: &str, stop: Arc<StopSignal>, fut: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut m = lock(&self.running);
        Self::prune(&mut m);
        if m.contains_key(key) {
            return false;
        }
        let handle = tokio::spawn(fut);
        m.insert(
            key.to_string(),
            Running {
                stop,
                endpoint: endpoint.to_string(),
                handle,
            },
        );
        true
    }

    /// Asks `key`'s driver to stop between steps.
    pub fn stop(&self, key: &str) {
        if let Some(r) = lock(&self.running).get(key) {
            r.stop.stop();
        }
    }

    /// Stops every driver and waits up to `timeout` for them.
    pub async fn stop_all(&self, timeout: Duration) {
        let all: Vec<Running> = lock(&self.running).drain().map(|(_, r)| r).collect();
        for r in &all {
            r.stop.stop();
        }
        let wait = futures::future::join_all(all.into_iter().map(|r| r.handle));
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::warn!(?timeout, "some drivers did not stop in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_driver_per_key_and_stop_all() {
        let d = Drivers::default();
        let stop = Arc::new(StopSignal::default());
        let s2 = stop.clone();
        assert!(d.start("ns/a", "https://e", stop.clone(), async move {
            while !s2.is_stopped() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
        assert!(!d.start("ns/a", "https://f", stop.clone(), async {}));
        assert_eq!(d.endpoint("ns/a").as_deref(), Some("https://e"));
        assert_eq!(d.active(), 1);
        d.stop_all(Duration::from_secs(5)).await;
        assert!(stop.is_stopped());
        assert_eq!(d.active(), 0);
    }
}
