//! The in-process engine: ranks are threads of one process and meet in a shared mailbox.
//!
//! A collective deposits one part per destination and takes one part per source, the
//! parts matched by the collective's sequence number on each rank (every rank of a group
//! calls the same collectives in the same order). Point-to-point messages are matched by
//! source, destination and tag. Payloads are moved, not copied: a host value or a tensor
//! deposited by one thread is taken by another.

use crate::CommError;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Any payload of the in-process engine.
pub(crate) type Boxed = Box<dyn Any + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// The collective with this sequence number.
    Collective(u64),
    /// A point-to-point message with this tag.
    Message(u64),
}

/// A deposited part: the operation's name and the payload.
struct Part {
    op: &'static str,
    payload: Boxed,
}

/// The mailbox shared by the ranks of a group.
pub(crate) struct Group {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// `(key, source, destination)` → part.
    parts: HashMap<(Key, usize, usize), Part>,
    /// Ranks that left, with the reason.
    left: HashMap<usize, String>,
}

impl Group {
    pub(crate) fn new(world: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Group { world, timeout, state: Mutex::default(), changed: Condvar::new() })
    }
}

/// One rank's place in a group; dropping it leaves the group (the others' waits for it
/// then fail with [`CommError::RankFailed`]).
pub(crate) struct Member {
    group: Arc<Group>,
    rank: usize,
}

impl Drop for Member {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() { "panicked" } else { "dropped its communicator" };
        let mut state = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        state.left.insert(self.rank, reason.to_string());
        self.group.changed.notify_all();
    }
}

impl Member {
    pub(crate) fn new(group: Arc<Group>, rank: usize) -> Self {
        Member { group, rank }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.group.timeout
    }

    /// Deposits `parts[r]` for rank `r` and takes the part of every source (by source
    /// rank), all under collective number `seq`.
    pub(crate) fn exchange(&self, seq: u64, op: &'static str, parts: Vec<Boxed>) -> Result<Vec<Boxed>, CommError> {
        let (group, me) = (&self.group, self.rank);
        let mut state = group.state.lock().unwrap_or_else(|e| e.into_inner());
        for (dst, payload) in parts.into_iter().enumerate() {
            state.parts.insert((Key::Collective(seq), me, dst), Part { op, payload });
        }
        group.changed.notify_all();
        let sources: Vec<usize> = (0..group.world).collect();
        let Some(mut state) = self.wait(state, Key::Collective(seq), &sources, op, Instant::now() + group.timeout)? else {
            return Err(self.timeout_error(Key::Collective(seq), &sources, op));
        };
        let mut out = Vec::with_capacity(group.world);
        for src in 0..group.world {
            let part = state.parts.remove(&(Key::Collective(seq), src, me)).expect("waited for");
            if part.op != op {
                return Err(CommError::Mismatch { rank: me, op, other: src, other_op: part.op.to_string() });
            }
            out.push(part.payload);
        }
        Ok(out)
    }

    /// Deposits a message for `dst` (does not wait for it to be taken).
    pub(crate) fn send(&self, tag: u64, dst: usize, op: &'static str, payload: Boxed) {
        let mut state = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        state.parts.insert((Key::Message(tag), self.rank, dst), Part { op, payload });
        self.group.changed.notify_all();
    }

    /// Takes the message `src` sent here with `tag`, waiting for it at most `wait`
    /// (`None` then).
    pub(crate) fn recv(&self, tag: u64, src: usize, op: &'static str, wait: Duration) -> Result<Option<Boxed>, CommError> {
        let state = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut state) = self.wait(state, Key::Message(tag), &[src], op, Instant::now() + wait)? else {
            return Ok(None);
        };
        let part = state.parts.remove(&(Key::Message(tag), src, self.rank)).expect("waited for");
        if part.op != op {
            return Err(CommError::Mismatch { rank: self.rank, op, other: src, other_op: part.op.to_string() });
        }
        Ok(Some(part.payload))
    }

    /// Waits until every source in `sources` deposited its part under `key` for this
    /// rank: fails as soon as a missing source has left; `None` at the deadline.
    fn wait<'a>(&self, mut state: MutexGuard<'a, State>, key: Key, sources: &[usize], op: &'static str, deadline: Instant) -> Result<Option<MutexGuard<'a, State>>, CommError> {
        loop {
            let missing: Vec<usize> = sources.iter().copied().filter(|&src| !state.parts.contains_key(&(key, src, self.rank))).collect();
            if missing.is_empty() {
                return Ok(Some(state));
            }
            if let Some((&rank, reason)) = missing.iter().find_map(|r| state.left.get_key_value(r)) {
                return Err(CommError::RankFailed { rank, op, reason: reason.clone() });
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            state = self.group.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The timeout error of `op` waiting for those of `sources` that did not send.
    fn timeout_error(&self, key: Key, sources: &[usize], op: &'static str) -> CommError {
        let state = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        let missing = sources.iter().copied().filter(|&src| !state.parts.contains_key(&(key, src, self.rank))).collect();
        CommError::Timeout { rank: self.rank, op, missing, after: self.group.timeout }
    }
}
