//! Faults injected into a save, to test that a crash at any point leaves the previous
//! checkpoint loadable and the unfinished one never taken for complete.

use std::str::FromStr;

/// Where in a save the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// After planning, before the rank writes anything.
    BeforeShard,
    /// Half of the rank's shard file on disk (a crash or a full disk mid-write).
    DuringShard,
    /// The rank's shard complete, the metadata not yet written.
    AfterShard,
    /// Half of `metadata.json`'s temporary file on disk (rank 0).
    DuringMetadata,
}

/// What the fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// The write fails as on a full disk: the save returns an error on every rank.
    Fail,
    /// The process ends at once (`abort`), as if killed.
    Abort,
}

/// A fault at `point` on rank `rank` of the checkpointer's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Where.
    pub point: FaultPoint,
    /// What.
    pub action: FaultAction,
    /// Which rank (of the group the checkpointer was built over).
    pub rank: usize,
    /// The save of which step (every save when `None`).
    pub step: Option<u64>,
}

impl Fault {
    /// `Err` with the fault's description, or the end of the process.
    pub(crate) fn trigger(&self) -> Result<(), String> {
        match self.action {
            FaultAction::Fail => Err(format!("injected fault at {:?}: no space left on device", self.point)),
            FaultAction::Abort => {
                eprintln!("burn-dcp: injected fault at {:?} on rank {}: aborting", self.point, self.rank);
                std::process::abort()
            }
        }
    }

    /// The fault the `BURN_DCP_FAULT` variable names (`point:action:rank[:step]`, e.g.
    /// `during-shard:abort:1:40`: rank 1 killed half-way through its shard of step 40's
    /// save), for a test that kills a real job mid-save.
    ///
    /// # Errors
    /// A value that does not parse, quoted.
    pub fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var("BURN_DCP_FAULT") {
            Ok(v) => v.parse().map(Some),
            Err(_) => Ok(None),
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("BURN_DCP_FAULT={s:?}: expected point:action:rank[:step] with point before-shard|during-shard|after-shard|during-metadata, action fail|abort");
        let parts: Vec<&str> = s.split(':').collect();
        let (point, action, rank, step) = match parts.as_slice() {
            [p, a, r] => (*p, *a, *r, None),
            [p, a, r, s] => (*p, *a, *r, Some(s.parse().map_err(|_| bad())?)),
            _ => return Err(bad()),
        };
        let point = match point {
            "before-shard" => FaultPoint::BeforeShard,
            "during-shard" => FaultPoint::DuringShard,
            "after-shard" => FaultPoint::AfterShard,
            "during-metadata" => FaultPoint::DuringMetadata,
            _ => return Err(bad()),
        };
        let action = match action {
            "fail" => FaultAction::Fail,
            "abort" => FaultAction::Abort,
            _ => return Err(bad()),
        };
        Ok(Fault { point, action, rank: rank.parse().map_err(|_| bad())?, step })
    }
}
