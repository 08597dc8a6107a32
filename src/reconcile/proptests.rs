//! The hub through a simulated world: the mirror, two clouds, and the gateway's per-cloud
//! bases, held fields and conflict log, driven by random sequences of edits (by the operator
//! on the mirror, by users in either cloud), sync runs (whose pulls and pushes may fail) and
//! resolutions of manual conflicts, under every global strategy, with and without field
//! rules.
//!
//! Every edit writes a value never seen before ("e17"; for the tags, a new element), so
//! that the end state tells the edits apart; a few shared values ("v0", "v1") make the two
//! sides agree by chance now and then. Checked:
//! - after a final fault-free run, the mirror and each cloud agree on every field that has
//!   no pending manual conflict for that cloud (so on every field with none in either);
//! - one-way clouds: no take from a cloud that is not pulled, no write to one that is not
//!   pushed, no conflict on either; after a fault-free run the base equals the cloud on
//!   what is pulled and the mirror on what is pushed;
//! - no conflict is recorded twice: the same cloud, field, local and remote values are
//!   never recorded again unless someone edited or resolved that field in between;
//! - no edit vanished: each edit's value is still somewhere, or a later edit or resolution
//!   overwrote it where it was, or a recorded conflict names it;
//! - a run with nothing edited since a fault-free run is quiet.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{Just, ProptestConfig, any, prop, prop_oneof, proptest};
use proptest::strategy::Strategy as _;
use serde_json::{Value, json};

use super::*;
use crate::model::{Target, UnixMillis};

const FIELDS: [&str; 5] = ["/name", "/tags", "/enabled", "/desired/a", "/desired/b/c"];
const CLOUDS: [Target; 2] = [Target::Golioth, Target::NetNeural];

#[derive(Clone, Copy, Debug)]
enum Edit {
    /// A value never seen before (for the tags: a new element added).
    Fresh,
    /// One of two shared values (for the tags: a shared element added).
    Shared(u8),
    /// The field removed (for the tags: one element removed).
    Remove(u8),
    /// A value never seen before (for the tags: the set replaced by a new element alone).
    Replace,
}

#[derive(Clone, Copy, Debug)]
enum Choice {
    Local,
    Remote,
    Fresh,
}

#[derive(Clone, Debug)]
enum Step {
    Mirror {
        field: usize,
        edit: Edit,
    },
    Cloud {
        cloud: usize,
        field: usize,
        edit: Edit,
    },
    Sync {
        pulled: [bool; 2],
        written: [bool; 2],
    },
    Resolve {
        pick: usize,
        choice: Choice,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    Mirror,
    Cloud(usize),
}

/// A document and when it last changed.
#[derive(Clone, Debug, Default)]
struct Doc {
    fields: Fields,
    at: Option<UnixMillis>,
}

#[derive(Clone, Debug)]
struct Record {
    cloud: usize,
    conflict: Conflict,
    /// The field's edit count when it was recorded.
    epoch: u64,
    pending: bool,
}

struct World {
    policy: Policy,
    directions: [Direction; 2],
    clock: i64,
    mirror: Doc,
    clouds: [Doc; 2],
    bases: [Fields; 2],
    log: Vec<Record>,
    /// Every fresh value written: (field, value or tag).
    written: Vec<(String, String)>,
    /// Values an edit or a resolution overwrote where they were.
    overwritten: BTreeSet<(String, String)>,
    /// Per field, how many edits and resolutions touched it.
    epochs: BTreeMap<String, u64>,
    /// The last run was fault-free (or quiet after one) and nothing changed since.
    quiet_expected: bool,
}

/// The values a field holds: its string, or its tags.
fn atoms(value: Option<&Value>) -> Vec<String> {
    match value {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().flat_map(|v| atoms(Some(v))).collect(),
        Some(other) => vec![other.to_string()],
    }
}

fn index(target: Target) -> usize {
    CLOUDS
        .iter()
        .position(|t| *t == target)
        .expect("one of the two clouds")
}

impl World {
    fn new(policy: Policy, directions: [Direction; 2]) -> World {
        World {
            policy,
            directions,
            clock: 0,
            mirror: Doc::default(),
            clouds: [Doc::default(), Doc::default()],
            bases: [Fields::new(), Fields::new()],
            log: Vec::new(),
            written: Vec::new(),
            overwritten: BTreeSet::new(),
            epochs: BTreeMap::new(),
            quiet_expected: true,
        }
    }

    fn now(&mut self) -> UnixMillis {
        self.clock += 1;
        UnixMillis(self.clock)
    }

    fn fresh(&mut self, field: &str) -> String {
        let value = format!("e{}", self.written.len());
        self.written.push((field.to_owned(), value.clone()));
        value
    }

    fn doc(&mut self, place: Place) -> &mut Doc {
        match place {
            Place::Mirror => &mut self.mirror,
            Place::Cloud(i) => &mut self.clouds[i],
        }
    }

    fn step(&mut self, step: &Step) {
        match *step {
            Step::Mirror { field, edit } => self.edit(Place::Mirror, FIELDS[field], edit),
            Step::Cloud { cloud, field, edit } => {
                self.edit(Place::Cloud(cloud), FIELDS[field], edit)
            }
            Step::Sync { pulled, written } => self.sync(pulled, written),
            Step::Resolve { pick, choice } => self.resolve(pick, choice),
        }
    }

    fn edit(&mut self, place: Place, field: &str, edit: Edit) {
        let old = self.doc(place).fields.get(field).cloned();
        let new = if field == TAGS {
            let mut tags = atoms(old.as_ref());
            match edit {
                Edit::Fresh => tags.push(self.fresh(field)),
                Edit::Shared(k) => tags.push(format!("v{}", k % 2)),
                Edit::Remove(i) if !tags.is_empty() => {
                    tags.remove(usize::from(i) % tags.len());
                }
                Edit::Remove(_) => {}
                Edit::Replace => tags = vec![self.fresh(field)],
            }
            Some(json!(tags))
        } else {
            match edit {
                Edit::Fresh | Edit::Replace => Some(json!(self.fresh(field))),
                Edit::Shared(k) => Some(json!(format!("v{}", k % 2))),
                Edit::Remove(_) => None,
            }
        };
        self.overwrite(place, field, new);
    }

    /// A person writes `new` at `place`: what it replaces there was overwritten knowingly.
    fn overwrite(&mut self, place: Place, field: &str, new: Option<Value>) {
        let now = self.now();
        let doc = self.doc(place);
        let old = doc.fields.get(field).cloned();
        match new {
            Some(value) => doc.fields.insert(field.to_owned(), value),
            None => doc.fields.remove(field),
        };
        doc.fields = flatten(&unflatten(&doc.fields));
        let new = doc.fields.get(field).cloned();
        if new == old {
            return;
        }
        doc.at = Some(now);
        let kept = atoms(new.as_ref());
        for atom in atoms(old.as_ref()) {
            if !kept.contains(&atom) {
                self.overwritten.insert((field.to_owned(), atom));
            }
        }
        *self.epochs.entry(field.to_owned()).or_default() += 1;
        self.quiet_expected = false;
    }

    fn epoch(&self, field: &str) -> u64 {
        self.epochs.get(field).copied().unwrap_or_default()
    }

    fn held(&self, cloud: usize) -> BTreeSet<String> {
        self.log
            .iter()
            .filter(|r| r.pending && r.cloud == cloud)
            .map(|r| r.conflict.field.clone())
            .collect()
    }

    fn sync(&mut self, pulled: [bool; 2], written: [bool; 2]) {
        let spokes: Vec<Spoke> = (0..2)
            .filter(|&i| pulled[i])
            .map(|i| Spoke {
                target: CLOUDS[i],
                base: self.bases[i].clone(),
                remote: self.clouds[i].fields.clone(),
                remote_at: self.clouds[i].at,
                direction: self.directions[i],
                held: self.held(i),
            })
            .collect();
        let plan = reconcile_device(&self.mirror.fields, self.mirror.at, &spokes, &self.policy);
        assert!(
            !self.quiet_expected || plan.is_quiet(),
            "nothing changed since a fault-free run, yet {plan:#?}"
        );
        for spoke in &spokes {
            self.check_direction(&plan, spoke.target, spoke.direction);
        }

        let settled = plan.settle(|target| written[index(target)]);
        let now = self.now();
        for (i, cloud) in self.clouds.iter_mut().enumerate() {
            if let Some(fields) = plan.pushes(CLOUDS[i]).filter(|_| written[i]) {
                cloud.fields = flatten(&unflatten(fields));
                cloud.at = Some(now);
            }
        }
        for (target, remote) in &settled.remotes {
            assert_eq!(
                remote,
                &self.clouds[index(*target)].fields,
                "settled remote"
            );
        }
        self.mirror.fields = settled.local;
        self.mirror.at = plan.local_at();
        for (target, base) in settled.bases {
            self.bases[index(target)] = base;
        }
        for (target, conflict) in settled.conflicts {
            self.record(index(target), conflict);
        }
        let fault_free = pulled == [true; 2] && written == [true; 2];
        self.quiet_expected = fault_free || (self.quiet_expected && plan.is_quiet());
    }

    fn check_direction(&self, plan: &DevicePlan, target: Target, direction: Direction) {
        for action in plan.actions(target) {
            let allowed = match action {
                Action::Take { .. } => direction.pull,
                Action::Push { .. } => direction.push,
                Action::Agree { .. } => true,
                Action::Conflict(_) => direction == Direction::BOTH,
            };
            assert!(allowed, "{action:?} on {target:?}, {direction:?}");
        }
        assert!(direction.push || plan.pushes(target).is_none());
    }

    fn record(&mut self, cloud: usize, conflict: Conflict) {
        let epoch = self.epoch(&conflict.field);
        let twice = self.log.iter().any(|r| {
            r.cloud == cloud
                && r.epoch == epoch
                && r.conflict.field == conflict.field
                && r.conflict.local == conflict.local
                && r.conflict.remote == conflict.remote
        });
        assert!(!twice, "recorded twice: {conflict:?} on cloud {cloud}");
        self.log.push(Record {
            cloud,
            pending: conflict.settled == Settled::Held,
            conflict,
            epoch,
        });
    }

    /// The operator resolves a pending conflict: the mirror takes the chosen value and the
    /// cloud's base becomes the remote value recorded, so the next run pushes the choice.
    fn resolve(&mut self, pick: usize, choice: Choice) {
        let pending: Vec<usize> = (0..self.log.len())
            .filter(|&i| self.log[i].pending)
            .collect();
        let Some(&at) = pending.get(pick % pending.len().max(1)) else {
            return;
        };
        let Record {
            cloud, conflict, ..
        } = self.log[at].clone();
        let field = conflict.field.as_str();
        let chosen = match choice {
            Choice::Local => conflict.local.clone(),
            Choice::Remote => conflict.remote.clone(),
            Choice::Fresh if field == TAGS => Some(json!([self.fresh(field)])),
            Choice::Fresh => Some(json!(self.fresh(field))),
        };
        self.overwrite(Place::Mirror, field, chosen);
        match &conflict.remote {
            Some(value) => self.bases[cloud].insert(field.to_owned(), value.clone()),
            None => self.bases[cloud].remove(field),
        };
        self.log[at].pending = false;
        *self.epochs.entry(field.to_owned()).or_default() += 1;
        self.quiet_expected = false;
    }

    /// A fault-free run, then the checks of the end state, then a run that must be quiet.
    fn finish(mut self) {
        self.sync([true; 2], [true; 2]);
        for (i, direction) in self.directions.into_iter().enumerate() {
            let held = self.held(i);
            for field in FIELDS.iter().filter(|f| !held.contains(**f)) {
                let base = self.bases[i].get(*field);
                let state = || {
                    format!(
                        "{field} on cloud {i}: mirror {:?}, cloud {:?}, base {base:?}\n{:#?}",
                        self.mirror.fields.get(*field),
                        self.clouds[i].fields.get(*field),
                        self.log
                    )
                };
                if direction.pull {
                    assert!(base == self.clouds[i].fields.get(*field), "{}", state());
                }
                if direction.push {
                    assert!(base == self.mirror.fields.get(*field), "{}", state());
                }
            }
        }
        if self.directions == [Direction::BOTH; 2] {
            self.check_nothing_vanished();
        }
        self.sync([true; 2], [true; 2]);
    }

    fn check_nothing_vanished(&self) {
        let mut known: BTreeSet<(String, String)> = self.overwritten.clone();
        let values = |fields: &Fields| -> Vec<(String, String)> {
            fields
                .iter()
                .flat_map(|(f, v)| atoms(Some(v)).into_iter().map(|a| (f.clone(), a)))
                .collect()
        };
        for doc in [&self.mirror, &self.clouds[0], &self.clouds[1]] {
            known.extend(values(&doc.fields));
        }
        for record in &self.log {
            let c = &record.conflict;
            for atom in atoms(c.local.as_ref())
                .into_iter()
                .chain(atoms(c.remote.as_ref()))
            {
                known.insert((c.field.clone(), atom));
            }
        }
        for edit in &self.written {
            assert!(
                known.contains(edit),
                "{edit:?} vanished\nmirror {:?}\nclouds {:?}\n{:#?}",
                self.mirror,
                self.clouds,
                self.log
            );
        }
    }
}

fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
    prop_oneof![
        2 => Just(Edit::Fresh),
        1 => (0u8..2).prop_map(Edit::Shared),
        1 => any::<u8>().prop_map(Edit::Remove),
        1 => Just(Edit::Replace),
    ]
}

fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    let field = 0..FIELDS.len();
    let works = || prop::array::uniform2(prop::bool::weighted(0.8));
    let choice = prop_oneof![
        Just(Choice::Local),
        Just(Choice::Remote),
        Just(Choice::Fresh)
    ];
    let step = prop_oneof![
        3 => (field.clone(), edit()).prop_map(|(field, edit)| Step::Mirror { field, edit }),
        4 => (0..2usize, field, edit())
            .prop_map(|(cloud, field, edit)| Step::Cloud { cloud, field, edit }),
        4 => (works(), works()).prop_map(|(pulled, written)| Step::Sync { pulled, written }),
        2 => (any::<usize>(), choice).prop_map(|(pick, choice)| Step::Resolve { pick, choice }),
    ];
    prop::collection::vec(step, 1..30)
}

/// Every global strategy, alone and refined by field rules that merge the tags and give
/// `/desired` (and `/desired/b` within it) and `/name` their own strategies.
fn policies() -> Vec<Policy> {
    Strategy::ALL
        .into_iter()
        .flat_map(|strategy| {
            let rules = vec![
                (TAGS.to_owned(), FieldRule::MergeSet),
                (
                    "/desired".to_owned(),
                    FieldRule::Strategy(Strategy::RemoteWins),
                ),
                (
                    "/desired/b".to_owned(),
                    FieldRule::Strategy(Strategy::Manual),
                ),
                (
                    "/name".to_owned(),
                    FieldRule::Strategy(Strategy::NewestWins),
                ),
            ];
            [
                Policy::new(strategy),
                Policy {
                    strategy,
                    fields: rules,
                },
            ]
        })
        .collect()
}

fn direction() -> impl proptest::strategy::Strategy<Value = Direction> {
    prop::sample::select(vec![
        Direction::BOTH,
        Direction::PULL_ONLY,
        Direction::PUSH_ONLY,
        Direction::NONE,
    ])
}

fn run(policy: Policy, directions: [Direction; 2], steps: &[Step]) {
    let mut world = World::new(policy, directions);
    for step in steps {
        world.step(step);
    }
    world.finish();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn two_way_clouds_converge_without_losing_an_edit_or_recording_a_conflict_twice(
        steps in steps(),
    ) {
        for policy in policies() {
            run(policy, [Direction::BOTH; 2], &steps);
        }
    }

    #[test]
    fn one_way_clouds_keep_to_their_direction(
        steps in steps(),
        directions in prop::array::uniform2(direction()),
    ) {
        for policy in policies() {
            run(policy, directions, &steps);
        }
    }
}
