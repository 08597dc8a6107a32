//! The policy, and the three-way plan for one device against one cloud.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

use super::fields::{Fields, normalise_set};
use crate::model::UnixMillis;

/// How a conflict (both sides changed a field to different values) is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The mirror's value is kept and pushed to the cloud.
    LocalWins,
    /// The cloud's value is taken into the mirror.
    RemoteWins,
    /// The side whose document changed last wins; a tie, or no time on either side, goes to
    /// the mirror.
    NewestWins,
    /// Recorded for an operator; until resolved the field is neither pushed nor overwritten.
    Manual,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::LocalWins,
        Strategy::RemoteWins,
        Strategy::NewestWins,
        Strategy::Manual,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::LocalWins => "local_wins",
            Strategy::RemoteWins => "remote_wins",
            Strategy::NewestWins => "newest_wins",
            Strategy::Manual => "manual",
        }
    }

    /// # Errors
    /// Returns a sentence naming the value and the allowed ones.
    pub fn parse(raw: &str) -> Result<Strategy, String> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                format!(
                    "unknown conflict strategy {raw:?}; allowed are local_wins, remote_wins, \
                     newest_wins, manual"
                )
            })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a field policy says about the fields it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldRule {
    Strategy(Strategy),
    /// Three-way merge of a set (an array of strings such as the tags): additions and
    /// removals on both sides are kept, and nobody loses. For a value that is not an array,
    /// the global strategy applies instead.
    MergeSet,
}

impl FieldRule {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldRule::Strategy(strategy) => strategy.as_str(),
            FieldRule::MergeSet => "merge",
        }
    }

    /// # Errors
    /// Returns a sentence naming the value and the allowed ones.
    pub fn parse(raw: &str) -> Result<FieldRule, String> {
        if raw == "merge" {
            return Ok(FieldRule::MergeSet);
        }
        Strategy::parse(raw).map(FieldRule::Strategy).map_err(|_| {
            format!(
                "unknown field rule {raw:?}; allowed are local_wins, remote_wins, newest_wins, \
                 manual, merge"
            )
        })
    }
}

impl fmt::Display for FieldRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The conflict policy: one global strategy, refined per field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Settles every conflict that no field rule covers.
    pub strategy: Strategy,
    /// JSON Pointer → rule. A pointer covers itself and everything below it; the longest
    /// pointer covering a field decides (of two equal pointers, the later one).
    pub fields: Vec<(String, FieldRule)>,
}

impl Policy {
    /// A policy with no field rules: `strategy` governs every field.
    pub fn new(strategy: Strategy) -> Policy {
        Policy {
            strategy,
            fields: Vec::new(),
        }
    }

    /// The rule for one field: that of the longest configured pointer equal to `field` or a
    /// prefix of it on a segment boundary (`/desired/config` covers
    /// `/desired/config/interval`, not `/desired/configx`), else the global strategy.
    pub fn rule_for(&self, field: &str) -> FieldRule {
        self.fields
            .iter()
            .filter(|(pointer, _)| covers(pointer, field))
            .max_by_key(|(pointer, _)| pointer.len())
            .map_or(FieldRule::Strategy(self.strategy), |(_, rule)| *rule)
    }
}

fn covers(pointer: &str, field: &str) -> bool {
    field
        .strip_prefix(pointer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Which way changes may flow between the mirror and one cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Direction {
    /// The cloud's changes are taken into the mirror.
    pub pull: bool,
    /// The mirror's changes are sent to the cloud.
    pub push: bool,
}

impl Direction {
    pub const BOTH: Direction = Direction {
        pull: true,
        push: true,
    };
    pub const PULL_ONLY: Direction = Direction {
        pull: true,
        push: false,
    };
    pub const PUSH_ONLY: Direction = Direction {
        pull: false,
        push: true,
    };
    pub const NONE: Direction = Direction {
        pull: false,
        push: false,
    };
}

/// One side of the merge: its fields and when its document last changed (`None`: unknown,
/// older than any time).
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    pub fields: &'a Fields,
    pub changed_at: Option<UnixMillis>,
}

/// Everything [`plan`] looks at for one device and one cloud.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// The last value the mirror and this cloud agreed on, per field (absent: never agreed,
    /// or agreed on absent).
    pub base: &'a Fields,
    /// The mirror.
    pub local: Side<'a>,
    /// The cloud now.
    pub remote: Side<'a>,
    pub direction: Direction,
    /// Fields with a pending manual conflict for this device and cloud: no action at all.
    pub held: &'a BTreeSet<String>,
}

/// One decision about one field. A value of `None` means the field is absent (removed).
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write the cloud's value into the mirror; base := value.
    Take { field: String, value: Option<Value> },
    /// Send the mirror's value to the cloud; base := value once the write succeeded.
    Push { field: String, value: Option<Value> },
    /// Mirror and cloud already hold the same value but the base differs: base := value.
    Agree { field: String, value: Option<Value> },
    /// Both sides changed the field to different values; what follows it (a `Push`, a `Take`
    /// or nothing) carries out how it was settled.
    Conflict(Conflict),
}

impl Action {
    pub fn field(&self) -> &str {
        match self {
            Action::Take { field, .. }
            | Action::Push { field, .. }
            | Action::Agree { field, .. } => field,
            Action::Conflict(conflict) => &conflict.field,
        }
    }
}

/// A conflict, as it is recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    pub field: String,
    pub local: Option<Value>,
    pub remote: Option<Value>,
    pub base: Option<Value>,
    pub settled: Settled,
}

/// How a conflict was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settled {
    /// Manual: neither pushed nor overwritten until an operator resolves it.
    Held,
    /// The mirror's value won and is pushed.
    Local,
    /// The cloud's value won and is taken.
    Remote,
}

/// The actions that bring one device's mirror and one cloud together, sorted by field
/// (within a field: a conflict first, then a `Take`, then a `Push`).
pub fn plan(input: &PlanInput<'_>, policy: &Policy) -> Vec<Action> {
    let fields: BTreeSet<&str> = input
        .base
        .keys()
        .chain(input.local.fields.keys())
        .chain(input.remote.fields.keys())
        .map(String::as_str)
        .filter(|field| !input.held.contains(*field))
        .collect();
    let mut actions = Vec::new();
    for field in fields {
        plan_field(input, policy, field, &mut actions);
    }
    actions
}

fn plan_field(input: &PlanInput<'_>, policy: &Policy, field: &str, out: &mut Vec<Action>) {
    let base = input.base.get(field);
    let local = input.local.fields.get(field);
    let remote = input.remote.fields.get(field);
    let take = |value: Option<&Value>| Action::Take {
        field: field.to_owned(),
        value: value.cloned(),
    };
    let push = |value: Option<&Value>| Action::Push {
        field: field.to_owned(),
        value: value.cloned(),
    };
    let Direction { pull, push: send } = input.direction;

    if local == remote {
        if base != local {
            out.push(Action::Agree {
                field: field.to_owned(),
                value: local.cloned(),
            });
        }
    } else if local == base {
        if pull {
            out.push(take(remote));
        }
    } else if remote == base {
        if send {
            out.push(push(local));
        }
    } else {
        match (pull, send) {
            (false, false) => {}
            // A one-way spoke is a replica: the side it copies from wins without a record.
            (true, false) => out.push(take(remote)),
            (false, true) => out.push(push(local)),
            (true, true) => {
                let strategy = match policy.rule_for(field) {
                    FieldRule::Strategy(strategy) => strategy,
                    FieldRule::MergeSet => match merge_sets(base, local, remote) {
                        Some(merged) => {
                            let merged = merged.as_ref();
                            if merged != local {
                                out.push(take(merged));
                            }
                            if merged != remote {
                                out.push(push(merged));
                            }
                            return;
                        }
                        None => policy.strategy,
                    },
                };
                let settled = match strategy {
                    Strategy::LocalWins => Settled::Local,
                    Strategy::RemoteWins => Settled::Remote,
                    // `Option`'s order puts `None` before any time: an unknown time is older.
                    Strategy::NewestWins if input.local.changed_at >= input.remote.changed_at => {
                        Settled::Local
                    }
                    Strategy::NewestWins => Settled::Remote,
                    Strategy::Manual => Settled::Held,
                };
                out.push(Action::Conflict(Conflict {
                    field: field.to_owned(),
                    local: local.cloned(),
                    remote: remote.cloned(),
                    base: base.cloned(),
                    settled,
                }));
                match settled {
                    Settled::Local => out.push(push(local)),
                    Settled::Remote => out.push(take(remote)),
                    Settled::Held => {}
                }
            }
        }
    }
}

/// The three-way merge of sets: an element is kept when both sides hold it, or when one side
/// added it (holds it and the base did not). So an addition on either side survives and so
/// does a removal on either side. `None` when a value is not a set (absent counts as the
/// empty set); `Some(None)` when the merged set is empty, which is absent like an empty
/// `/tags`.
fn merge_sets(
    base: Option<&Value>,
    local: Option<&Value>,
    remote: Option<&Value>,
) -> Option<Option<Value>> {
    let base = as_set(base)?;
    let local = as_set(local)?;
    let remote = as_set(remote)?;
    let merged: Vec<Value> = local
        .iter()
        .filter(|x| remote.contains(x) || !base.contains(x))
        .chain(remote.iter().filter(|x| !base.contains(x)))
        .cloned()
        .collect();
    let merged = normalise_set(merged);
    Some((!merged.is_empty()).then_some(Value::Array(merged)))
}

fn as_set(value: Option<&Value>) -> Option<&[Value]> {
    match value {
        None => Some(&[]),
        Some(Value::Array(items)) => Some(items),
        Some(_) => None,
    }
}
