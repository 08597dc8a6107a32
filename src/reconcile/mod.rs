//! The three-way merge of a device's syncable document between the mirror and the clouds.
//!
//! Pure: values in, decisions out. The cloud tasks pull, call [`reconcile_device`], make the
//! write requests it asks for, and commit what [`DevicePlan::settle`] says.
//!
//! # Documents and fields
//!
//! A device's syncable document is `{"name", "tags", "enabled", "desired": {…}}`. It is
//! merged field by field, a field being a leaf named by JSON Pointer (`/name`,
//! `/desired/config/interval`): see [`flatten`]. Absent and `null` are the same; `/tags` is a
//! set (sorted, without duplicates, absent when empty).
//!
//! # The rule
//!
//! Per field, with `base` the last value the mirror and this cloud agreed on, `local` the
//! mirror and `remote` the cloud now ([`plan`]):
//! - held (a pending manual conflict for this cloud) → nothing;
//! - `local == remote` → in sync; [`Action::Agree`] refreshes the base if it differs;
//! - only the cloud changed → [`Action::Take`] (if the direction pulls);
//! - only the mirror changed → [`Action::Push`] (if the direction pushes);
//! - both changed, to different values: on a one-way spoke the side it copies from wins
//!   without a record (a one-way spoke is a replica); otherwise the field's [`FieldRule`]
//!   decides. [`FieldRule::MergeSet`] merges the sets three-way (an addition or a removal on
//!   either side survives; no conflict, as nobody lost); a [`Strategy`] records a
//!   [`Conflict`] and settles it: `local_wins` pushes, `remote_wins` takes, `newest_wins`
//!   compares the documents' change times (unknown is oldest, a tie goes to the mirror),
//!   `manual` holds the field until an operator resolves it.
//!
//! The [`Policy`] is one global strategy refined by field rules, the longest pointer that
//! covers a field on a segment boundary deciding.
//!
//! # The hub
//!
//! The mirror is the hub and each cloud a spoke with its own base ([`reconcile_device`]):
//! the spokes are planned in turn against the mirror as the previous ones left it, and again
//! until a pass takes nothing, so a change taken from Golioth is pushed to NetNeural in the
//! same run, and edits made in both clouds at once surface as a conflict with whichever is
//! planned second. Conflicts are recorded at most once per cloud and field per run.
//!
//! A write request may fail; [`DevicePlan::settle`] then keeps that cloud's base and
//! document as they were (so the next run pushes again) and drops the conflicts settled by
//! that push (the next run finds them again). A write that failed but was applied anyway
//! (a timeout after the cloud committed) is found in sync by the next run, so the data is
//! right, but the conflict it settled is then never recorded: the one way a conflict record
//! can go missing, accepted because recording it before the write is confirmed would record
//! it twice whenever the write really failed.
//!
//! # Where this departs from the first sketch
//!
//! - [`DevicePlan::actions`] and [`DevicePlan::local_at`] were added: the sync log counts
//!   actions per cloud, and the store needs the mirror's change time after a take.
//! - [`Direction`] has `PULL_ONLY`, `PUSH_ONLY` and `NONE` besides `BOTH`.
//! - Pushes that cancel out within one run (a value pushed, then the old one pushed back
//!   after a later take) need no write request: [`DevicePlan::pushes`] compares the cloud's
//!   document after our writes with the one pulled, not the list of actions.

mod fields;
mod hub;
mod plan;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use fields::{Fields, TAGS, flatten, pointer_escape, subtree, unflatten};
pub use hub::{DevicePlan, Settlement, Spoke, reconcile_device};
pub use plan::{
    Action, Conflict, Direction, FieldRule, PlanInput, Policy, Settled, Side, Strategy, plan,
};
