//! One device across both clouds: the mirror is the hub, each cloud a spoke with its own
//! base, so a change taken from one cloud reaches the other in the same run; and what to
//! commit once the write requests to the clouds have succeeded or failed.

use std::collections::BTreeSet;

use serde_json::Value;

use super::fields::Fields;
use super::plan::{Action, Conflict, Direction, PlanInput, Policy, Settled, Side, plan};
use crate::model::{Target, UnixMillis};

/// Passes over the spokes at most. Two always suffice: after a spoke's plan is applied its
/// base equals its remote on every field it may pull (and is not held), and only our own
/// pushes change the remote, so the second pass has nothing to take and only pushes what
/// the first pass took from a later spoke. The cap is a guard, not a tuning knob.
const MAX_PASSES: usize = 4;

/// One cloud as this run sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Spoke {
    pub target: Target,
    /// The last values the mirror and this cloud agreed on.
    pub base: Fields,
    /// The cloud's document now, as pulled.
    pub remote: Fields,
    /// When the cloud's document last changed, if it says.
    pub remote_at: Option<UnixMillis>,
    pub direction: Direction,
    /// Fields with a pending manual conflict for this device and cloud.
    pub held: BTreeSet<String>,
}

/// The reconciliation of one device: the mirror after every `Take`, each cloud's document
/// after our writes, and the conflicts found. Built by [`reconcile_device`]; nothing in it
/// has been written anywhere yet.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePlan {
    local: Fields,
    local_at: Option<UnixMillis>,
    local_changed: bool,
    /// In the order the spokes were given; at most one per target is expected.
    spokes: Vec<SpokeRun>,
}

/// One spoke's state through the passes.
#[derive(Clone, Debug, PartialEq)]
struct SpokeRun {
    target: Target,
    direction: Direction,
    remote_at: Option<UnixMillis>,
    held: BTreeSet<String>,
    /// The cloud's document as pulled: what it still is if our write fails.
    pulled: Fields,
    /// The cloud's document after every `Push`.
    remote: Fields,
    /// The base after every action.
    base: Fields,
    /// The base after the `Take` and `Agree` actions of values the cloud holds as pulled:
    /// what the base is if our write fails. (A field once pushed is never taken or agreed
    /// later in the same run: the push made the remote equal the base, and only a push
    /// changes the remote.)
    base_unpushed: Fields,
    /// Every action applied, in order.
    actions: Vec<Action>,
    /// The conflicts recorded, at most one per field.
    conflicts: Vec<Conflict>,
}

/// What to commit for one device once the write requests to the clouds have been made.
#[derive(Clone, Debug, PartialEq)]
pub struct Settlement {
    /// The mirror: every `Take` stands, whatever became of the writes (a take is a read).
    pub local: Fields,
    /// Each cloud's new base.
    pub bases: Vec<(Target, Fields)>,
    /// Each cloud's document as it now is, as far as we know.
    pub remotes: Vec<(Target, Fields)>,
    /// The conflicts to record.
    pub conflicts: Vec<(Target, Conflict)>,
}

/// Reconciles one device's mirror with the clouds in `spokes` (a cloud that could not be
/// pulled is left out). The fields are expected as [`flatten`](super::flatten) gives them.
///
/// Passes over the spokes in the order given, planning each against the current in-memory
/// state and applying its actions, until a pass takes nothing.
pub fn reconcile_device(
    local: &Fields,
    local_at: Option<UnixMillis>,
    spokes: &[Spoke],
    policy: &Policy,
) -> DevicePlan {
    let mut mirror = local.clone();
    let mut mirror_at = local_at;
    let mut runs: Vec<SpokeRun> = spokes.iter().map(SpokeRun::start).collect();
    for _ in 0..MAX_PASSES {
        let mut took = false;
        for run in &mut runs {
            let actions = plan(
                &PlanInput {
                    base: &run.base,
                    local: Side {
                        fields: &mirror,
                        changed_at: mirror_at,
                    },
                    remote: Side {
                        fields: &run.remote,
                        changed_at: run.remote_at,
                    },
                    direction: run.direction,
                    held: &run.held,
                },
                policy,
            );
            for action in actions {
                took |= run.apply(action, &mut mirror, &mut mirror_at);
            }
        }
        if !took {
            break;
        }
    }
    DevicePlan {
        local_changed: mirror != *local,
        local: mirror,
        local_at: mirror_at,
        spokes: runs,
    }
}

impl SpokeRun {
    fn start(spoke: &Spoke) -> SpokeRun {
        SpokeRun {
            target: spoke.target,
            direction: spoke.direction,
            remote_at: spoke.remote_at,
            held: spoke.held.clone(),
            pulled: spoke.remote.clone(),
            remote: spoke.remote.clone(),
            base: spoke.base.clone(),
            base_unpushed: spoke.base.clone(),
            actions: Vec::new(),
            conflicts: Vec::new(),
        }
    }

    /// Applies one action to the in-memory state; true if it was a `Take`.
    fn apply(
        &mut self,
        action: Action,
        mirror: &mut Fields,
        mirror_at: &mut Option<UnixMillis>,
    ) -> bool {
        let took = matches!(action, Action::Take { .. });
        match &action {
            Action::Take { field, value } => {
                // A merged set is taken into the mirror and pushed, but the cloud holds it
                // only once the push succeeded: until then the base stays old, and the next
                // run merges again (to the same set) instead of taking the cloud's set
                // back as if the cloud had removed what the merge added.
                if self.remote.get(field) == value.as_ref() {
                    set(&mut self.base_unpushed, field, value);
                }
                set(mirror, field, value);
                set(&mut self.base, field, value);
                *mirror_at = (*mirror_at).max(self.remote_at);
            }
            Action::Push { field, value } => {
                set(&mut self.remote, field, value);
                set(&mut self.base, field, value);
            }
            Action::Agree { field, value } => {
                set(&mut self.base, field, value);
                set(&mut self.base_unpushed, field, value);
            }
            Action::Conflict(conflict) => {
                // Not expected: a held field stays held for the rest of the run, and a
                // conflict settled either way leaves this cloud agreeing with the mirror on
                // the field, after which only our own pushes change the cloud's side.
                // Asserted in tests; should it happen, the first record stands.
                let again = self.conflicts.iter().any(|c| c.field == conflict.field);
                debug_assert!(!again, "a second conflict on {} in one run", conflict.field);
                if again {
                    return false;
                }
                if conflict.settled == Settled::Held {
                    self.held.insert(conflict.field.clone());
                }
                self.conflicts.push(conflict.clone());
            }
        }
        self.actions.push(action);
        took
    }

    fn pushed_fields(&self) -> Vec<(String, Option<Value>)> {
        let fields: BTreeSet<&String> = self.pulled.keys().chain(self.remote.keys()).collect();
        fields
            .into_iter()
            .filter(|field| self.pulled.get(*field) != self.remote.get(*field))
            .map(|field| (field.clone(), self.remote.get(field).cloned()))
            .collect()
    }

    /// Whether a write request is needed: pushes that cancel out (a value pushed, then the
    /// old one pushed back in a later pass) need none.
    fn has_pushes(&self) -> bool {
        self.remote != self.pulled
    }
}

fn set(fields: &mut Fields, field: &str, value: &Option<Value>) {
    match value {
        Some(value) => {
            fields.insert(field.to_owned(), value.clone());
        }
        None => {
            fields.remove(field);
        }
    }
}

impl DevicePlan {
    /// The mirror after every `Take`: what to store locally whatever becomes of the pushes.
    pub fn local(&self) -> &Fields {
        &self.local
    }

    /// When the mirror last changed, counting the times of the documents taken from.
    pub fn local_at(&self) -> Option<UnixMillis> {
        self.local_at
    }

    /// Whether [`local`](Self::local) differs from the mirror given.
    pub fn local_changed(&self) -> bool {
        self.local_changed
    }

    fn spoke(&self, target: Target) -> Option<&SpokeRun> {
        self.spokes.iter().find(|run| run.target == target)
    }

    /// The cloud's whole document after our writes, if any field must be pushed to it;
    /// `None`: no write request is needed (or the cloud was not in this run).
    pub fn pushes(&self, target: Target) -> Option<&Fields> {
        self.spoke(target)
            .filter(|run| run.has_pushes())
            .map(|run| &run.remote)
    }

    /// The fields pushed to the cloud and their new values (`None`: remove the field).
    pub fn pushed_fields(&self, target: Target) -> Vec<(String, Option<Value>)> {
        self.spoke(target)
            .map(SpokeRun::pushed_fields)
            .unwrap_or_default()
    }

    /// Every action applied for the cloud, in order (for the sync log and for tests).
    pub fn actions(&self, target: Target) -> &[Action] {
        self.spoke(target).map_or(&[], |run| &run.actions)
    }

    /// The conflicts found, cloud by cloud in the order the spokes were given.
    pub fn conflicts(&self) -> Vec<(Target, Conflict)> {
        self.spokes
            .iter()
            .flat_map(|run| run.conflicts.iter().map(|c| (run.target, c.clone())))
            .collect()
    }

    /// What to commit, given which clouds' write requests succeeded (`push_ok` is asked only
    /// about clouds with [`pushes`](Self::pushes); the others count as succeeded).
    ///
    /// For a cloud whose write failed, its base and document are as if its `Push` actions
    /// had not been planned, and the conflicts settled `Local` (whose outcome was that push)
    /// are not recorded: the next run finds them again, and recording them now would record
    /// them twice. Everything taken into the mirror stands: a value taken from one cloud for
    /// another whose write failed stays in the mirror while the other's base stays old, so
    /// the next run pushes it again.
    pub fn settle(&self, push_ok: impl Fn(Target) -> bool) -> Settlement {
        let mut settlement = Settlement {
            local: self.local.clone(),
            bases: Vec::new(),
            remotes: Vec::new(),
            conflicts: Vec::new(),
        };
        for run in &self.spokes {
            let written = !run.has_pushes() || push_ok(run.target);
            let (base, remote) = if written {
                (&run.base, &run.remote)
            } else {
                (&run.base_unpushed, &run.pulled)
            };
            settlement.bases.push((run.target, base.clone()));
            settlement.remotes.push((run.target, remote.clone()));
            settlement.conflicts.extend(
                run.conflicts
                    .iter()
                    .filter(|c| written || c.settled != Settled::Local)
                    .map(|c| (run.target, c.clone())),
            );
        }
        settlement
    }

    /// No `Take`, `Push`, `Agree` or conflict: nothing to write anywhere.
    pub fn is_quiet(&self) -> bool {
        self.spokes.iter().all(|run| run.actions.is_empty())
    }
}
