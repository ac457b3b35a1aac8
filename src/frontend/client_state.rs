//! What a client believes about "its" session when it has no backend of its own: the settings
//! it made and the statements it prepared. Transaction mode replays the one and re-prepares the
//! other on whichever backend serves its next transaction.

use std::sync::Arc;

use bytes::Bytes;

use crate::tenancy::tier::quote_literal;

/// A named statement as the client knows it.
#[derive(Debug)]
pub struct ClientStatement {
    /// The pool-wide name it is prepared under on backends.
    pub global: Arc<str>,
    /// A complete Parse message for `global`, to prepare it on a backend that lacks it.
    pub parse: Bytes,
    /// Schema tier: running it may change a setting unseen (`sql_policy::may_change_settings_unseen`).
    pub unseen_changes: bool,
}

/// A change to session settings, effective once the transaction that made it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingOp {
    Set { name: String, statement: String },
    Reset(String),
    ResetAll,
}

#[derive(Debug, Default)]
pub struct ClientState {
    /// Setting name → the statement that sets it, in the order first set.
    settings: Vec<(String, String)>,
    script: Arc<str>,
    /// foldhash, not SipHash: looked up at every Bind and Describe, and seeded per process.
    pub statements: foldhash::HashMap<Bytes, Arc<ClientStatement>>,
}

impl ClientState {
    /// Settings sent in the startup packet, as statements.
    pub fn from_startup(settings: &[(String, String)]) -> ClientState {
        let mut s = ClientState::default();
        for (k, v) in settings {
            s.set(
                k.to_ascii_lowercase(),
                format!(
                    "SELECT pg_catalog.set_config({}, {}, false)",
                    quote_literal(k),
                    quote_literal(v)
                ),
            );
        }
        s.rebuild();
        s
    }

    fn set(&mut self, name: String, statement: String) {
        match self.settings.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = statement,
            None => self.settings.push((name, statement)),
        }
    }

    pub fn apply(&mut self, ops: impl IntoIterator<Item = SettingOp>) {
        for op in ops {
            match op {
                SettingOp::Set { name, statement } => self.set(name, statement),
                SettingOp::Reset(name) => self.settings.retain(|(k, _)| *k != name),
                SettingOp::ResetAll => self.settings.clear(),
            }
        }
        self.rebuild();
    }

    fn rebuild(&mut self) {
        let joined: Vec<&str> = self.settings.iter().map(|(_, s)| s.as_str()).collect();
        self.script = Arc::from(joined.join("; "));
    }

    /// The client's settings as one script ("" when it changed none).
    pub fn script(&self) -> &Arc<str> {
        &self.script
    }

    /// What to run on a backend whose applied settings are `applied` so it matches this client;
    /// None when it already does. RESET restores the session defaults, which carry the tier's
    /// pins (they travel in the backend's startup packet).
    pub fn replay_for(&self, applied: &Arc<str>) -> Option<String> {
        if Arc::ptr_eq(applied, &self.script) || **applied == *self.script {
            return None;
        }
        Some(if self.script.is_empty() {
            "RESET ALL; RESET ROLE".to_string()
        } else {
            format!("RESET ALL; RESET ROLE; {}", self.script)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_settings_become_set_config_calls() {
        let s = ClientState::from_startup(&[("application_name".into(), "it's".into())]);
        assert_eq!(
            s.script().as_ref(),
            "SELECT pg_catalog.set_config('application_name', 'it''s', false)"
        );
    }

    #[test]
    fn a_later_set_replaces_an_earlier_one_and_reset_removes_it() {
        let mut s = ClientState::default();
        s.apply([
            SettingOp::Set {
                name: "a".into(),
                statement: "SET a = 1".into(),
            },
            SettingOp::Set {
                name: "b".into(),
                statement: "SET b = 1".into(),
            },
            SettingOp::Set {
                name: "a".into(),
                statement: "SET a = 2".into(),
            },
        ]);
        assert_eq!(s.script().as_ref(), "SET a = 2; SET b = 1");
        s.apply([SettingOp::Reset("a".into())]);
        assert_eq!(s.script().as_ref(), "SET b = 1");
    }

    #[test]
    fn replay_is_skipped_when_the_backend_already_matches() {
        let mut s = ClientState::default();
        assert_eq!(s.replay_for(&Arc::from("")), None);
        s.apply([SettingOp::Set {
            name: "a".into(),
            statement: "SET a = 1".into(),
        }]);
        assert_eq!(s.replay_for(&Arc::from("SET a = 1")), None);
        assert_eq!(
            s.replay_for(&Arc::from("")).as_deref(),
            Some("RESET ALL; RESET ROLE; SET a = 1")
        );
        assert_eq!(
            ClientState::default()
                .replay_for(&Arc::from("SET a = 1"))
                .as_deref(),
            Some("RESET ALL; RESET ROLE")
        );
    }
}
