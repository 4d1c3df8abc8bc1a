//! The driver's one hook for what lies beyond its own session: whether
//! its cutover waits for others. A single session cuts over on its own
//! ([`Solo`]); a member of a consistency group meets the other members at
//! barriers ([`InGroup`](crate::group::InGroup)), as [`MultiAttach`]
//! (crate::MultiAttach) wraps a [`Slave`](volmig_api::Slave) without the
//! driver knowing.
//!
//! The driver calls the hook at fixed points only: when it starts on a
//! record, before each phase's step, with its vote once quiesced, when a
//! recovery finds the agent quiesced mid-cutover, when it decides on a
//! rollback, and when it returns.

use std::future::Future;

use volmig_api::phase::Phase;

use crate::driver::StopSignal;
use crate::error::Result;
use crate::record::SessionRecord;

/// What the hook lets the driver do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Go on.
    Go,
    /// Quiesced, but not everyone can cut over: release and refresh again.
    Retry,
    /// Not now (stopped, or the others failed): the driver goes round its
    /// loop, where it stops or rolls back.
    Hold,
}

/// A recovery found the agent still quiesced in a cutover phase, not
/// redirected: what to do with the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MidCutover {
    /// Carry on from where the agent is.
    Continue,
    /// Release the quiesce and refresh: the cutover starts over, together
    /// with the others.
    Requiesce,
    /// The cutover cannot be trusted any more: fail (the others roll back
    /// with it).
    Fail(String),
}

/// How a session's cutover is coordinated with other sessions.
pub trait Cutover: Send + Sync {
    /// The driver starts on a record in `phase` (a restarted master may
    /// find it anywhere, ended included; `error` is the record's).
    fn begin(&self, phase: Phase, error: Option<&str>);

    /// Before `phase`'s step: may it be performed now? May wait for the
    /// others; `stop` ends the wait with [`Gate::Hold`].
    fn before(&self, phase: Phase, stop: &StopSignal) -> impl Future<Output = Gate> + Send;

    /// Quiesced: `ready` says this session's residue fits its sync goal.
    /// [`Gate::Go`] keeps the session's own decision, [`Gate::Retry`] sends
    /// it back to refresh.
    fn quiesced(&self, ready: bool, stop: &StopSignal) -> impl Future<Output = Gate> + Send;

    /// A recovery found the agent quiesced mid-cutover, not redirected.
    fn mid_cutover(&self) -> MidCutover;

    /// Why this session must roll back because of the others, if it must.
    fn failed(&self) -> Option<String>;

    /// This session is rolling back (aborted or failed) for `reason`.
    fn fail(&self, reason: &str);

    /// The driver returns with `result`.
    fn end(&self, result: &Result<SessionRecord>);
}

/// A session that cuts over on its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Cutover for Solo {
    fn begin(&self, _: Phase, _: Option<&str>) {}

    async fn before(&self, _: Phase, _: &StopSignal) -> Gate {
        Gate::Go
    }

    async fn quiesced(&self, _: bool, _: &StopSignal) -> Gate {
        Gate::Go
    }

    fn mid_cutover(&self) -> MidCutover {
        MidCutover::Continue
    }

    fn failed(&self) -> Option<String> {
        None
    }

    fn fail(&self, _: &str) {}

    fn end(&self, _: &Result<SessionRecord>) {}
}
