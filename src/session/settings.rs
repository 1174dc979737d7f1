//! Session settings under transaction pooling. A client's settings (its startup parameters, and
//! every session-level `SET`/`RESET` it ran) must follow it from one server connection to the next.
//! Each server connection records what the proxy applied on it (`ServerConn::applied`); before a
//! client uses a connection, the difference is applied with `set_config`/`RESET` in one round trip.
//! After a client ran `SET`/`RESET`, the values it now has are read back from the server before the
//! connection is given back (`capture`), so rolled-back `SET`s and list syntax need no guessing.

use crate::analysis::SessionEffect;
use crate::pool::upstream::{ServerConn, UpstreamError};
use crate::wire;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touch {
    Set,
    Reset,
}

/// A few settings by name, in a sorted `Vec`: a client usually has two or three, and a
/// `BTreeMap` node costs half a kilobyte per idle client.
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub struct SettingMap(Vec<(String, String)>);

impl SettingMap {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(name))
    }
    pub fn get(&self, name: &str) -> Option<&String> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }
    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }
    pub fn insert(&mut self, name: String, value: String) {
        match self.find(&name) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// SQL that turns a connection with `applied` into one with these settings, or `None` if
    /// they match. A value the server already reports (`ParameterStatus`) needs no statement.
    pub fn sync_sql(
        &self,
        applied: &BTreeMap<String, String>,
        reported: &BTreeMap<String, String>,
    ) -> Option<String> {
        let mut sql = String::new();
        for name in applied.keys().filter(|k| !self.contains_key(k)) {
            sql.push_str(&format!("RESET {};", quote_ident(name)));
        }
        // Checked on every check-out: nothing is allocated when nothing differs.
        let mut sets = String::new();
        let differing = self.iter().filter(|(k, v)| match applied.get(*k) {
            Some(a) => a != *v,
            None => reported.get(*k) != Some(v),
        });
        for (k, v) in differing {
            sets.push_str(if sets.is_empty() { "SELECT " } else { ", " });
            sets.push_str(&format!("set_config({}, {}, false)", quote(k), quote(v)));
        }
        if !sets.is_empty() {
            sql.push_str(&sets);
            sql.push(';');
        }
        (!sql.is_empty()).then_some(sql)
    }
}

impl FromIterator<(String, String)> for SettingMap {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(it: I) -> Self {
        let mut m = SettingMap::default();
        for (k, v) in it {
            m.insert(k, v);
        }
        m.0.shrink_to_fit();
        m
    }
}

#[derive(Debug, Default)]
pub struct Settings {
    /// From the startup packet; `RESET` returns to these, as in PostgreSQL. Shared by the clients
    /// of a pool that sent the same ones (see `Pools::shared_settings`).
    startup: Arc<SettingMap>,
    /// What the client's session has now: the startup settings until it changes one.
    pub wanted: Arc<SettingMap>,
    /// Changed by statements since the last capture.
    touched: BTreeMap<String, Touch>,
    reset_all: bool,
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

impl Settings {
    pub fn new(startup: Arc<SettingMap>) -> Self {
        Settings {
            wanted: startup.clone(),
            startup,
            ..Settings::default()
        }
    }

    /// The startup settings.
    pub fn startup(&self) -> &Arc<SettingMap> {
        &self.startup
    }

    /// Note what a statement about to run does to session settings.
    pub fn record(&mut self, effects: &[SessionEffect]) {
        for e in effects {
            match e {
                SessionEffect::Set(name) => {
                    self.touched.insert(name.to_ascii_lowercase(), Touch::Set);
                }
                SessionEffect::Reset(name) => {
                    self.touched.insert(name.to_ascii_lowercase(), Touch::Reset);
                }
                SessionEffect::ResetAll => {
                    self.touched.clear();
                    self.reset_all = true;
                }
                SessionEffect::DeallocateAll => {}
            }
        }
    }

    /// Settings may have changed since the last capture.
    pub fn dirty(&self) -> bool {
        self.reset_all || !self.touched.is_empty()
    }

    /// SQL that turns a connection with `applied` into one with `wanted`, or `None` if they match.
    /// A wanted value the server already reports (`ParameterStatus`) needs no statement.
    pub fn sync_sql(
        &self,
        applied: &BTreeMap<String, String>,
        reported: &BTreeMap<String, String>,
    ) -> Option<String> {
        self.wanted.sync_sql(applied, reported)
    }

    /// Apply the client's settings to `conn`.
    pub async fn apply(&self, conn: &mut ServerConn) -> Result<(), UpstreamError> {
        if let Some(sql) = self.sync_sql(&conn.applied, &conn.params) {
            conn.simple_query(&sql).await?;
            conn.applied = self
                .wanted
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        Ok(())
    }

    /// Read back the settings the client's statements changed on `conn`.
    pub async fn capture(&mut self, conn: &mut ServerConn) -> Result<(), UpstreamError> {
        if self.reset_all {
            // The connection is back at its own defaults; the client's startup values are its
            // defaults, to be applied again on the next connection it gets.
            conn.applied.clear();
            self.wanted = self.startup.clone();
            self.reset_all = false;
        }
        if self.touched.is_empty() {
            return Ok(());
        }
        let touched = std::mem::take(&mut self.touched);
        let names: Vec<&String> = touched.keys().collect();
        let sql = format!(
            "SELECT {}",
            names
                .iter()
                .map(|n| format!("current_setting({}, true)", quote(n)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let replies = conn.simple_query(&sql).await?;
        let values = replies
            .iter()
            .find(|(tag, _)| *tag == b'D')
            .and_then(|(_, body)| wire::data_row_texts(body))
            .unwrap_or_default();
        for (name, value) in names.iter().zip(values) {
            let (name, touch) = (name.to_string(), touched[*name]);
            // NULL: not a setting (the statement failed), nothing changed.
            if let Some(v) = value {
                conn.applied.insert(name.clone(), v.clone());
                let wanted = match (touch, self.startup.get(&name)) {
                    (Touch::Reset, Some(s)) => s.clone(),
                    _ => v,
                };
                Arc::make_mut(&mut self.wanted).insert(name, wanted);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Settings {
        fn of(pairs: Vec<(String, String)>) -> Self {
            Settings::new(Arc::new(pairs.into_iter().collect()))
        }
    }

    #[test]
    fn sync_sql_sets_differences_and_resets_extras() {
        let s = Settings::of(vec![("application_name".into(), "app".into())]);
        let mut applied = BTreeMap::new();
        applied.insert("work_mem".to_string(), "8MB".to_string());
        let sql = s.sync_sql(&applied, &BTreeMap::new()).unwrap();
        assert_eq!(
            sql,
            "RESET \"work_mem\";SELECT set_config('application_name', 'app', false);"
        );
        applied.clear();
        applied.insert("application_name".to_string(), "app".to_string());
        assert_eq!(s.sync_sql(&applied, &BTreeMap::new()), None);
        let mut reported = BTreeMap::new();
        reported.insert("application_name".to_string(), "app".to_string());
        assert_eq!(s.sync_sql(&BTreeMap::new(), &reported), None);
    }

    #[test]
    fn quotes_values() {
        let s = Settings::of(vec![("search_path".into(), "it's, \"x\"".into())]);
        let sql = s.sync_sql(&BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert!(sql.contains("'it''s, \"x\"'"), "{sql}");
    }

    #[test]
    fn records_effects() {
        let mut s = Settings::of(vec![]);
        assert!(!s.dirty());
        s.record(&[SessionEffect::Set("TimeZone".into())]);
        assert!(s.dirty());
        s.record(&[SessionEffect::ResetAll]);
        assert!(s.touched.is_empty() && s.reset_all);
    }
}
