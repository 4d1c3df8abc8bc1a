//! Consistency groups: several sessions (volumes, possibly on several
//! agents) cut over together. Each member runs its own [`Driver`]
//! (crate::Driver) through Copy and Refresh, with an [`InGroup`] as its
//! [`Cutover`] hook; at cutover they meet at five barriers of one
//! [`GroupCoord`], in order:
//!
//! | barrier | a member arrives | all arrived |
//! |---|---|---|
//! | `Quiesce` | ready to quiesce (its residue converged) | all quiesce |
//! | `Quiesced` | quiesced; votes yes if its residue fits the sync goal | all yes: synchronize; any no: all release and refresh again |
//! | `Synchronized` | synchronized | all redirect |
//! | `Redirected` | redirected (still quiesced) | all resume: one consistent cut |
//! | `Resumed` | resumed on the target | each terminates on its own |
//!
//! A member that fails or is aborted before the last barrier fails the
//! group: every other member aborts too (before redirect that drops the
//! target; after it, it redirects back to the source, which mirror-back
//! kept current), so every workload ends on its source or all on their
//! targets.
//!
//! A member past `Resumed` has left the group: its own failure no longer
//! fails the others, nor theirs it (every member passed `Resumed` at once).
//!
//! The barriers live in the master's memory. After a master restart the
//! members recover from their agents' state: members that were quiesced but
//! not redirected go back to Refreshing (their agents' quiesce leases
//! release I/O anyway), members already redirected wait at `Resumed` for
//! the rest, which pass the earlier barriers on their own.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use volmig_api::phase::Phase;

use crate::cutover::{Cutover, Gate, MidCutover};
use crate::driver::StopSignal;
use crate::error::Result;
use crate::record::SessionRecord;

/// The barriers, in the order members meet them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Barrier {
    Quiesce = 0,
    Quiesced = 1,
    Synchronized = 2,
    Redirected = 3,
    Resumed = 4,
}

/// Past every barrier: terminating on its own, or ended.
const DONE: u8 = 5;

impl Barrier {
    pub const ALL: [Barrier; 5] = [
        Barrier::Quiesce,
        Barrier::Quiesced,
        Barrier::Synchronized,
        Barrier::Redirected,
        Barrier::Resumed,
    ];
}

/// What the group decided at a barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everyone is here and agreed: go on.
    Go,
    /// Someone voted no at `Quiesced`: release and refresh again.
    Retry,
    /// A member failed or was aborted: roll back.
    Abort(String),
}

/// One member's place at the barriers.
#[derive(Debug, Default)]
struct Seat {
    name: String,
    /// The next barrier this member will arrive at (`DONE` past all).
    next: u8,
    /// Arrived at `next` with this vote and waits.
    waiting: Option<bool>,
    /// The decision for the barrier it waited at, not yet taken.
    verdict: Option<Verdict>,
}

#[derive(Debug, Default)]
struct State {
    members: Vec<Seat>,
    failed: Option<String>,
}

/// The meeting point of a group's member drivers (one per group, shared).
#[derive(Debug)]
pub struct GroupCoord {
    name: String,
    state: Mutex<State>,
    changed: Notify,
}

impl GroupCoord {
    /// A group of `members` (volume names), all before the first barrier.
    pub fn new(name: &str, members: &[String]) -> Self {
        Self {
            name: name.to_string(),
            state: Mutex::new(State {
                members: members
                    .iter()
                    .map(|m| Seat {
                        name: m.clone(),
                        ..Seat::default()
                    })
                    .collect(),
                failed: None,
            }),
            changed: Notify::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; the
        // state stays meaningful, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index(st: &State, member: &str) -> Option<usize> {
        st.members.iter().position(|m| m.name == member)
    }

    /// Places `member` before `next` (used when a restarted master finds a
    /// member further along, or sends one back to Refreshing).
    pub fn place(&self, member: &str, next: Option<Barrier>) {
        let mut st = self.lock();
        if let Some(i) = Self::index(&st, member) {
            st.members[i].next = next.map(|b| b as u8).unwrap_or(DONE);
            st.members[i].waiting = None;
            st.members[i].verdict = None;
            Self::resolve(&mut st);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// `member` is past every barrier (terminating, or ended well).
    pub fn leave(&self, member: &str) {
        self.place(member, None);
    }

    /// Fails the group: every waiting and later arrival gets `Abort`.
    pub fn fail(&self, member: &str, reason: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(format!("group member {member}: {reason}"));
        }
        if let Some(i) = Self::index(&st, member) {
            st.members[i].next = DONE;
            st.members[i].waiting = None;
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Why the group failed, if it did.
    pub fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Members that have not arrived at `barrier` yet (for status lines).
    pub fn missing(&self, barrier: Barrier) -> Vec<String> {
        let st = self.lock();
        st.members
            .iter()
            .filter(|m| m.next < barrier as u8 || (m.next == barrier as u8 && m.waiting.is_none()))
            .map(|m| m.name.clone())
            .collect()
    }

    /// Decides every barrier whose members are all there.
    fn resolve(st: &mut State) {
        loop {
            let mut progressed = false;
            for b in Barrier::ALL {
                let k = b as u8;
                let here: Vec<usize> = (0..st.members.len())
                    .filter(|&i| st.members[i].next == k && st.members[i].verdict.is_none())
                    .collect();
                if here.is_empty() {
                    continue;
                }
                let complete = st
                    .members
                    .iter()
                    .all(|m| m.next > k || (m.next == k && m.waiting.is_some()));
                let verdict = if let Some(f) = &st.failed {
                    Verdict::Abort(f.clone())
                } else if !complete {
                    continue;
                } else if here.iter().any(|&i| st.members[i].waiting == Some(false)) {
                    Verdict::Retry
                } else {
                    Verdict::Go
                };
                for i in here {
                    if st.members[i].waiting.is_none() && !matches!(verdict, Verdict::Abort(_)) {
                        continue;
                    }
                    let m = &mut st.members[i];
                    m.waiting = None;
                    m.next = match verdict {
                        Verdict::Go => k + 1,
                        Verdict::Retry => Barrier::Quiesce as u8,
                        Verdict::Abort(_) => DONE,
                    };
                    m.verdict = Some(verdict.clone());
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Arrives at `barrier` with `vote` and waits for the group's verdict.
    /// `stop` ends the wait early with `None` (the driver is shutting
    /// down; the session goes on under the next master).
    pub async fn arrive(
        &self,
        member: &str,
        barrier: Barrier,
        vote: bool,
        stop: &StopSignal,
    ) -> Option<Verdict> {
        {
            let mut st = self.lock();
            if let Some(f) = &st.failed {
                return Some(Verdict::Abort(f.clone()));
            }
            let i = Self::index(&st, member)?;
            let m = &mut st.members[i];
            m.next = barrier as u8;
            m.waiting = Some(vote);
            m.verdict = None;
            Self::resolve(&mut st);
        }
        self.changed.notify_waiters();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(i) = Self::index(&st, member)
                    && let Some(v) = st.members[i].verdict.take()
                {
                    return Some(v);
                }
                if let Some(f) = &st.failed {
                    return Some(Verdict::Abort(f.clone()));
                }
            }
            if stop.is_stopped() {
                let mut st = self.lock();
                if let Some(i) = Self::index(&st, member) {
                    st.members[i].waiting = None;
                }
                return None;
            }
            tokio::select! {
                _ = notified => {}
                _ = stop.sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
    }
}

/// One member's [`Cutover`] hook: where its driver meets the others.
#[derive(Debug)]
pub struct InGroup {
    coord: Arc<GroupCoord>,
    member: String,
    /// What this driver knows of its way through the barriers.
    way: Mutex<Way>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Way {
    /// The last barrier passed in this round of the cutover.
    passed: Option<Barrier>,
    /// Past `Resumed`: the group no longer binds this member.
    left: bool,
}

impl InGroup {
    pub fn new(coord: Arc<GroupCoord>, member: &str) -> Self {
        Self {
            coord,
            member: member.to_string(),
            way: Mutex::default(),
        }
    }

    fn way(&self) -> std::sync::MutexGuard<'_, Way> {
        // Two plain fields: a panic cannot leave them torn.
        self.way.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The barrier a member meets before `phase`'s step, if any.
    fn due(phase: Phase) -> Option<Barrier> {
        match phase {
            Phase::Quiescing => Some(Barrier::Quiesce),
            Phase::Redirecting => Some(Barrier::Synchronized),
            Phase::Resuming => Some(Barrier::Redirected),
            Phase::Terminating => Some(Barrier::Resumed),
            _ => None,
        }
    }

    fn passed(&self, b: Barrier) {
        let mut w = self.way();
        w.passed = Some(b);
        if b == Barrier::Resumed {
            w.left = true;
            drop(w);
            self.coord.leave(&self.member);
        }
    }
}

impl Cutover for InGroup {
    fn begin(&self, phase: Phase, error: Option<&str>) {
        match phase {
            Phase::Terminating | Phase::Completed => self.coord.leave(&self.member),
            Phase::Aborted | Phase::Failed => self.coord.fail(
                &self.member,
                error.unwrap_or("ended before the group cut over"),
            ),
            _ => {}
        }
    }

    async fn before(&self, phase: Phase, stop: &StopSignal) -> Gate {
        let Some(b) = Self::due(phase) else {
            return Gate::Go;
        };
        if self.way().passed.is_some_and(|p| p >= b) {
            return Gate::Go;
        }
        match self.coord.arrive(&self.member, b, true, stop).await {
            Some(Verdict::Go) => {
                self.passed(b);
                Gate::Go
            }
            _ => Gate::Hold,
        }
    }

    async fn quiesced(&self, ready: bool, stop: &StopSignal) -> Gate {
        match self
            .coord
            .arrive(&self.member, Barrier::Quiesced, ready, stop)
            .await
        {
            Some(Verdict::Go) => {
                self.passed(Barrier::Quiesced);
                Gate::Go
            }
            Some(Verdict::Retry) => {
                self.way().passed = None;
                Gate::Retry
            }
            _ => Gate::Hold,
        }
    }

    fn mid_cutover(&self) -> MidCutover {
        if self.way().passed.is_some() {
            // Mid-cutover in this very process: the others may be quiesced
            // and waiting; all roll back together.
            MidCutover::Fail("the agent lost its quiesce during the cutover".into())
        } else {
            // A restarted master: the group quiesces again, together.
            MidCutover::Requiesce
        }
    }

    fn failed(&self) -> Option<String> {
        if self.way().left {
            return None;
        }
        self.coord.failed()
    }

    fn fail(&self, reason: &str) {
        if !self.way().left {
            self.coord.fail(&self.member, reason);
        }
    }

    fn end(&self, result: &Result<SessionRecord>) {
        // A driver that errs out (deposed, store failure) must not leave
        // the others waiting at a barrier forever.
        match result {
            Err(e) => self.fail(&e.to_string()),
            Ok(rec) if rec.phase.is_terminal() && rec.phase != Phase::Completed => {
                self.fail(&format!("ended {}", rec.phase));
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coord(n: usize) -> Arc<GroupCoord> {
        let names: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
        Arc::new(GroupCoord::new("g", &names))
    }

    async fn arrive(c: &Arc<GroupCoord>, m: &str, b: Barrier, vote: bool) -> Option<Verdict> {
        c.arrive(m, b, vote, &StopSignal::default()).await
    }

    #[tokio::test]
    async fn waits_for_everyone_then_goes() {
        let c = coord(3);
        let a = tokio::spawn({
            let c = c.clone();
            async move { arrive(&c, "v0", Barrier::Quiesce, true).await }
        });
        let b = tokio::spawn({
            let c = c.clone();
            async move { arrive(&c, "v1", Barrier::Quiesce, true).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !a.is_finished() && !b.is_finished(),
            "went before v2 arrived"
        );
        assert_eq!(c.missing(Barrier::Quiesce), vec!["v2".to_string()]);
        assert_eq!(
            arrive(&c, "v2", Barrier::Quiesce, true).await,
            Some(Verdict::Go)
        );
        assert_eq!(a.await.unwrap(), Some(Verdict::Go));
        assert_eq!(b.await.unwrap(), Some(Verdict::Go));
    }

    #[tokio::test]
    async fn one_no_vote_sends_everyone_back() {
        let c = coord(2);
        let a = tokio::spawn({
            let c = c.clone();
            async move { arrive(&c, "v0", Barrier::Quiesced, true).await }
        });
        assert_eq!(
            arrive(&c, "v1", Barrier::Quiesced, false).await,
            Some(Verdict::Retry)
        );
        assert_eq!(a.await.unwrap(), Some(Verdict::Retry));
        // The next round is a fresh one.
        let a = tokio::spawn({
            let c = c.clone();
            async move { arrive(&c, "v0", Barrier::Quiesced, true).await }
        });
        assert_eq!(
            arrive(&c, "v1", Barrier::Quiesced, true).await,
            Some(Verdict::Go)
        );
        assert_eq!(a.await.unwrap(), Some(Verdict::Go));
    }

    #[tokio::test]
    async fn a_failure_aborts_waiting_and_later_members() {
        let c = coord(3);
        let a = tokio::spawn({
            let c = c.clone();
            async move { arrive(&c, "v0", Barrier::Synchronized, true).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        c.fail("v1", "target write failed");
        let v = a.await.unwrap();
        assert!(
            matches!(v, Some(Verdict::Abort(ref r)) if r.contains("v1") && r.contains("target write failed"))
        );
        assert!(matches!(
            arrive(&c, "v2", Barrier::Quiesce, true).await,
            Some(Verdict::Abort(_))
        ));
    }

    #[tokio::test]
    async fn members_further_along_do_not_block_earlier_barriers() {
        // After a master restart: v0 was already redirected and waits at
        // Resumed; v1 goes through every barrier alone, then both go.
        let c = coord(2);
        let a = tokio::spawn({
            let c = c.clone();
            async move { arrive(&c, "v0", Barrier::Resumed, true).await }
        });
        for b in [
            Barrier::Quiesce,
            Barrier::Quiesced,
            Barrier::Synchronized,
            Barrier::Redirected,
        ] {
            assert_eq!(arrive(&c, "v1", b, true).await, Some(Verdict::Go), "{b:?}");
        }
        assert!(!a.is_finished());
        assert_eq!(
            arrive(&c, "v1", Barrier::Resumed, true).await,
            Some(Verdict::Go)
        );
        assert_eq!(a.await.unwrap(), Some(Verdict::Go));
    }

    #[tokio::test]
    async fn a_member_that_left_counts_as_past() {
        let c = coord(2);
        c.leave("v1");
        assert_eq!(
            arrive(&c, "v0", Barrier::Quiesce, true).await,
            Some(Verdict::Go)
        );
    }

    #[tokio::test]
    async fn stop_ends_the_wait_without_a_verdict() {
        let c = coord(2);
        let stop = Arc::new(StopSignal::default());
        let a = tokio::spawn({
            let c = c.clone();
            let stop = stop.clone();
            async move { c.arrive("v0", Barrier::Quiesce, true, &stop).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        stop.stop();
        assert_eq!(a.await.unwrap(), None);
    }
}
