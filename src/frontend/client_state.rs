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
    /// Shared by clients whose settings are equal (most clients of an application send the
    /// same startup parameters), copied when one of them changes its own.
    settings: Arc<Settings>,
    /// foldhash, not SipHash: looked up at every Bind and Describe, and seeded per process.
    pub statements: foldhash::HashMap<Bytes, Arc<ClientStatement>>,
}

/// Compact, since every idle client holds one: each statement is kept once, in the script.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Settings {
    /// Setting name and where the statement that sets it lies in `script`, in the order first
    /// set.
    list: Box<[(Box<str>, u32, u32)]>,
    /// The statements as one script.
    script: Arc<str>,
}

impl Settings {
    fn from_statements(named: Vec<(Box<str>, String)>) -> Settings {
        let mut script = String::new();
        let mut list = Vec::with_capacity(named.len());
        for (name, statement) in named {
            if !script.is_empty() {
                script.push_str("; ");
            }
            let start = script.len() as u32;
            script.push_str(&statement);
            list.push((name, start, script.len() as u32));
        }
        Settings {
            list: list.into_boxed_slice(),
            script: Arc::from(script),
        }
    }

    /// Name and statement of each setting.
    fn statements(&self) -> Vec<(Box<str>, String)> {
        self.list
            .iter()
            .map(|(name, start, end)| {
                let statement = self.script.get(*start as usize..*end as usize);
                (name.clone(), statement.unwrap_or_default().to_string())
            })
            .collect()
    }
}

/// Sets `name` by `statement`, in place if it was set before.
fn set(list: &mut Vec<(Box<str>, String)>, name: Box<str>, statement: String) {
    match list.iter_mut().find(|(k, _)| *k == name) {
        Some(slot) => slot.1 = statement,
        None => list.push((name, statement)),
    }
}

/// Distinct startup settings kept for sharing, per thread (logins need no lock). Bounded: when
/// full, sets no client holds any more are dropped, and if none is, nothing new is kept.
const SHARED_SETTINGS_MAX: usize = 256;

thread_local! {
    static SHARED_SETTINGS: std::cell::RefCell<Vec<Arc<Settings>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `fresh`, or an equal set another client already holds.
fn shared(fresh: Settings) -> Arc<Settings> {
    if fresh.list.is_empty() {
        return Arc::default();
    }
    SHARED_SETTINGS.with(|cell| {
        let Ok(mut kept) = cell.try_borrow_mut() else {
            return Arc::new(fresh);
        };
        if let Some(found) = kept.iter().find(|k| ***k == fresh) {
            return found.clone();
        }
        if kept.len() >= SHARED_SETTINGS_MAX {
            kept.retain(|k| Arc::strong_count(k) > 1);
        }
        let fresh = Arc::new(fresh);
        if kept.len() < SHARED_SETTINGS_MAX {
            kept.push(fresh.clone());
        }
        fresh
    })
}

impl ClientState {
    /// Settings sent in the startup packet, as statements.
    pub fn from_startup(settings: &[(String, String)]) -> ClientState {
        let mut named = Vec::with_capacity(settings.len());
        for (k, v) in settings {
            set(
                &mut named,
                k.to_ascii_lowercase().into(),
                format!(
                    "SELECT pg_catalog.set_config({}, {}, false)",
                    quote_literal(k),
                    quote_literal(v)
                ),
            );
        }
        ClientState {
            settings: shared(Settings::from_statements(named)),
            statements: Default::default(),
        }
    }

    pub fn apply(&mut self, ops: impl IntoIterator<Item = SettingOp>) {
        let mut named = self.settings.statements();
        for op in ops {
            match op {
                SettingOp::Set { name, statement } => set(&mut named, name.into(), statement),
                SettingOp::Reset(name) => named.retain(|(k, _)| **k != *name),
                SettingOp::ResetAll => named.clear(),
            }
        }
        // A copy of its own: another client may share the settings it had.
        self.settings = Arc::new(Settings::from_statements(named));
    }

    /// The client's settings as one script ("" when it changed none).
    pub fn script(&self) -> &Arc<str> {
        &self.settings.script
    }

    /// What to run on a backend whose applied settings are `applied` so it matches this client;
    /// None when it already does. RESET restores the session defaults, which carry the tier's
    /// pins (they travel in the backend's startup packet).
    pub fn replay_for(&self, applied: &Arc<str>) -> Option<String> {
        let script = &self.settings.script;
        if Arc::ptr_eq(applied, script) || **applied == **script {
            return None;
        }
        Some(if script.is_empty() {
            "RESET ALL; RESET ROLE".to_string()
        } else {
            format!("RESET ALL; RESET ROLE; {script}")
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
    fn clients_with_the_same_startup_settings_share_them() {
        let startup = [("application_name".to_string(), "app".to_string())];
        let a = ClientState::from_startup(&startup);
        let b = ClientState::from_startup(&startup);
        assert!(Arc::ptr_eq(&a.settings, &b.settings));
        let other = ClientState::from_startup(&[("application_name".into(), "other".into())]);
        assert!(!Arc::ptr_eq(&a.settings, &other.settings));
    }

    #[test]
    fn a_change_by_one_client_leaves_a_client_sharing_its_settings_unchanged() {
        let startup = [("TimeZone".to_string(), "UTC".to_string())];
        let mut a = ClientState::from_startup(&startup);
        let b = ClientState::from_startup(&startup);
        let before = b.script().to_string();
        a.apply([
            SettingOp::Set {
                name: "search_path".into(),
                statement: "SET search_path = evil".into(),
            },
            SettingOp::Reset("timezone".into()),
        ]);
        assert_eq!(a.script().as_ref(), "SET search_path = evil");
        assert_eq!(b.script().as_ref(), before);
        assert_eq!(
            ClientState::from_startup(&startup).script().as_ref(),
            before,
            "a later client gets the startup settings, not the changed ones"
        );
    }

    #[test]
    fn the_shared_settings_stay_bounded() {
        let held: Vec<ClientState> = (0..SHARED_SETTINGS_MAX + 10)
            .map(|i| ClientState::from_startup(&[("application_name".into(), format!("a{i}"))]))
            .collect();
        let kept = SHARED_SETTINGS.with(|c| c.borrow().len());
        assert!(kept <= SHARED_SETTINGS_MAX);
        // Each client still has its own settings, kept or not.
        let last = SHARED_SETTINGS_MAX + 5;
        assert!(held[last].script().contains(&format!("'a{last}'")));
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
