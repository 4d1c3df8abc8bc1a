//! The quiesce gate: every workload request holds it shared for its whole
//! life; quiesce takes it exclusively, which stops new requests at the door
//! and waits for the ones in flight to drain. tokio's RwLock is fair (FIFO),
//! so a pending quiesce is not starved by a stream of new requests, and a
//! quiesce that misses its deadline is dropped from the queue and lets the
//! held requests through at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

#[derive(Debug, Default)]
pub struct QuiesceGate {
    lock: Arc<RwLock<()>>,
    held: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
}

/// Proof that a request is inside the gate.
pub type GatePass = OwnedRwLockReadGuard<()>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiesceTimeout;

impl QuiesceGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters the gate (waits while the volume is quiesced).
    pub async fn enter(&self) -> GatePass {
        self.lock.clone().read_owned().await
    }

    /// Holds new I/O and waits for in-flight I/O to drain, at most
    /// `deadline`. Idempotent: holding an already held gate succeeds at once.
    pub async fn hold(&self, deadline: Duration) -> Result<(), QuiesceTimeout> {
        let mut held = self.held.lock().await;
        if held.is_some() {
            return Ok(());
        }
        match tokio::time::timeout(deadline, self.lock.clone().write_owned()).await {
            Ok(guard) => {
                *held = Some(guard);
                Ok(())
            }
            Err(_) => Err(QuiesceTimeout),
        }
    }

    /// Lets held I/O through. Idempotent.
    pub async fn release(&self) -> bool {
        self.held.lock().await.take().is_some()
    }

    pub async fn is_held(&self) -> bool {
        self.held.lock().await.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hold_waits_for_in_flight_and_blocks_new() {
        let gate = Arc::new(QuiesceGate::new());
        let pass = gate.enter().await;
        // in-flight request: hold times out
        assert_eq!(
            gate.hold(Duration::from_millis(20)).await,
            Err(QuiesceTimeout)
        );
        // the timed-out hold did not block requests
        let p2 = tokio::time::timeout(Duration::from_secs(1), gate.enter()).await;
        assert!(p2.is_ok(), "a failed quiesce must release waiting I/O");
        drop(p2);
        drop(pass);
        gate.hold(Duration::from_secs(1)).await.unwrap();
        gate.hold(Duration::from_secs(1)).await.unwrap(); // idempotent
        assert!(gate.is_held().await);
        let g2 = gate.clone();
        let waiter = tokio::spawn(async move {
            let _p = g2.enter().await;
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "new I/O must wait while quiesced");
        assert!(gate.release().await);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(!gate.release().await);
    }
}
