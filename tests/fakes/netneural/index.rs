//! The fake NetNeural's indexes: per unique constraint, each row's key → its position; per
//! text[] column, each element → the rows holding it. Built when first needed, kept up to
//! date by inserts, dropped when anything else changes a table.

use std::collections::HashMap;

use serde_json::Value;

use super::super::postgrest::{Filter, Kind, Op, Query, array_literal};
use super::Row;
use super::db::Db;
use super::schema::*;

impl Db {
    /// Builds the unique indexes of `table` that are missing.
    pub(super) fn ensure_index(&mut self, table: &'static str) {
        let t = self
            .tables
            .iter()
            .find(|t| t.name == table)
            .expect("a table");
        for (u, cols) in t.unique.iter().enumerate() {
            if self.index.contains_key(&(table, u)) {
                continue;
            }
            let map = self.rows[table]
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Db::key(r, cols).map(|k| (k, i)))
                .collect();
            self.index.insert((table, u), map);
        }
    }

    /// Replaces a table's rows (after an update, a delete, a merge): its indexes go.
    pub(super) fn replace_rows(&mut self, table: &'static str, rows: Vec<Row>) {
        self.rows.insert(table, rows);
        self.forget_indexes(table);
    }

    pub(super) fn forget_indexes(&mut self, table: &str) {
        self.index.retain(|(t, _), _| *t != table);
        self.elements.retain(|(t, _), _| *t != table);
    }

    /// Adds row `i` of `table` to the element indexes built for it.
    pub(super) fn index_elements(&mut self, table: &'static str, i: usize) {
        let row = &self.rows[table][i];
        for ((t, col), map) in self.elements.iter_mut() {
            if *t != table {
                continue;
            }
            for e in row
                .get(*col)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(e) = e.as_str() {
                    map.entry(e.to_owned()).or_default().push(i);
                }
            }
        }
    }

    /// The positions of the only rows that can match `q`, in order, when a filter allows an
    /// index to say (`id=eq.X`, `col=cs.{X,…}` on a text[] column); `None` to read them all.
    /// The caller still tests every filter on them.
    pub(super) fn candidates(&mut self, table: &'static str, q: &Query) -> Option<Vec<usize>> {
        for f in &q.filters {
            let Filter::Cond {
                col,
                negate: false,
                op,
                value,
            } = f
            else {
                continue;
            };
            let t = self.table(table).ok()?;
            match op {
                Op::Eq if col == "id" && super::super::postgrest::is_uuid(value) => {
                    self.ensure_index(table);
                    let key = Db::key(
                        &Row::from_iter([(
                            "id".to_owned(),
                            Value::from(value.to_ascii_lowercase()),
                        )]),
                        &["id"],
                    )?;
                    return Some(
                        self.index[&(table, 0)]
                            .get(&key)
                            .copied()
                            .into_iter()
                            .collect(),
                    );
                }
                Op::Cs if t.kind(col) == Kind::TextArray => {
                    let first = array_literal(value).ok()?.into_iter().next()?;
                    let col: &'static str = t.column(col)?.name;
                    if !self.elements.contains_key(&(table, col)) {
                        let mut map: HashMap<String, Vec<usize>> = HashMap::new();
                        for (i, r) in self.rows[table].iter().enumerate() {
                            for e in r.get(col).and_then(Value::as_array).into_iter().flatten() {
                                if let Some(e) = e.as_str() {
                                    map.entry(e.to_owned()).or_default().push(i);
                                }
                            }
                        }
                        self.elements.insert((table, col), map);
                    }
                    let mut at = self.elements[&(table, col)]
                        .get(&first)
                        .cloned()
                        .unwrap_or_default();
                    at.dedup();
                    return Some(at);
                }
                _ => {}
            }
        }
        None
    }
}
