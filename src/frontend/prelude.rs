//! What a server connection needs before it serves a client, decided in one place for both
//! pool modes from what the connection last served and what the client believes about its
//! session. Transaction mode pipelines the statements ahead of the client's first message;
//! session mode runs them in round trips at login. Pure: the tests below are the rules.

use std::sync::Arc;

use super::client_state::ClientState;

/// The statements a backend runs before a client's transaction or session, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prelude {
    /// Row tier, another tenant (or none) bound: clear everything of the previous session
    /// (`row_context::SWITCH_RESET_SQL`). Prepared statements go with it.
    pub reset: bool,
    /// The client's settings: its script after a reset, else a replay (which starts with RESET
    /// ALL) when the backend's differ from the client's.
    pub settings: Option<String>,
    /// Row tier: bind the context to the client's tenant, after anything that cleared it.
    pub bind: bool,
    /// The tenant's caps on settings, whatever the last transaction raised.
    pub caps: bool,
}

/// Decides the prelude. `row`: the client's row-tier tenant; `bound`: the tenant the backend is
/// bound to; `applied`: the settings script last applied there; `caps`: the tenant has caps.
pub fn prelude(
    row: Option<&str>,
    bound: Option<&str>,
    state: &ClientState,
    applied: &Arc<str>,
    caps: bool,
) -> Prelude {
    let reset = row.is_some_and(|t| bound != Some(t));
    let settings = if reset {
        let script = state.script();
        (!script.is_empty()).then(|| script.to_string())
    } else {
        state.replay_for(applied)
    };
    Prelude {
        reset,
        bind: row.is_some() && (reset || settings.is_some()),
        settings,
        caps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(settings: &[(&str, &str)]) -> ClientState {
        let owned: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ClientState::from_startup(&owned)
    }

    /// A backend that needs nothing before the client's messages.
    const NOTHING: Prelude = Prelude {
        reset: false,
        settings: None,
        bind: false,
        caps: false,
    };

    #[test]
    fn a_backend_already_serving_the_same_settings_needs_nothing() {
        let c = client(&[("application_name", "a")]);
        let p = prelude(None, None, &c, &c.script().clone(), false);
        assert_eq!(p, NOTHING);
    }

    #[test]
    fn other_settings_are_replayed_from_a_reset() {
        let c = client(&[("application_name", "a")]);
        let p = prelude(None, None, &c, &Arc::from("SET work_mem = '1MB'"), false);
        let replay = p.settings.expect("replay");
        assert!(replay.starts_with("RESET ALL; RESET ROLE; "), "{replay}");
        assert!(replay.contains("application_name"));
        assert!(!p.reset && !p.bind);
    }

    #[test]
    fn a_client_without_settings_after_one_with_them_gets_a_bare_reset() {
        let c = client(&[]);
        let p = prelude(None, None, &c, &Arc::from("SET work_mem = '1MB'"), false);
        assert_eq!(p.settings.as_deref(), Some("RESET ALL; RESET ROLE"));
    }

    #[test]
    fn a_row_backend_of_another_tenant_is_reset_then_given_the_script_then_bound() {
        let c = client(&[("application_name", "a")]);
        let p = prelude(
            Some("hooli"),
            Some("piedpiper"),
            &c,
            &c.script().clone(),
            false,
        );
        assert!(p.reset && p.bind);
        // After the reset the script alone, no RESET ALL of its own.
        assert_eq!(p.settings.as_deref(), Some(&**c.script()));
    }

    #[test]
    fn a_row_backend_bound_to_no_one_is_reset_and_bound_even_without_settings() {
        let c = client(&[]);
        let p = prelude(Some("hooli"), None, &c, &Arc::from(""), false);
        assert_eq!(
            p,
            Prelude {
                reset: true,
                settings: None,
                bind: true,
                caps: false
            }
        );
    }

    #[test]
    fn a_replay_on_a_row_backend_binds_again_because_reset_all_clears_the_context() {
        let c = client(&[("application_name", "a")]);
        let p = prelude(Some("hooli"), Some("hooli"), &c, &Arc::from(""), false);
        assert!(!p.reset && p.bind && p.settings.is_some());
    }

    #[test]
    fn a_row_backend_of_the_same_tenant_and_settings_needs_nothing() {
        let c = client(&[]);
        let p = prelude(Some("hooli"), Some("hooli"), &c, &Arc::from(""), false);
        assert_eq!(p, NOTHING);
    }

    #[test]
    fn caps_come_whatever_else_is_needed() {
        let c = client(&[]);
        assert!(prelude(None, None, &c, &Arc::from(""), true).caps);
    }
}
