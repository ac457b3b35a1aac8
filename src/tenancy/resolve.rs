//! Naming the tenant from a startup packet.
//!
//! Carriers, in order of precedence:
//! 1. `options`: `-c pgtenant.tenant=ID` (also `-cpgtenant.tenant=ID`, `--pgtenant.tenant=ID`)
//!    or a bare `tenant=ID` word;
//! 2. the user name suffix: `role<sep>ID` (split at the last separator);
//! 3. the database name, unless it is just the user name (libpq's default);
//! 4. the TLS server name (SNI) `tenant<tls.sni_suffix>`, given by the caller.
//!
//! Every carrier present must name the same tenant.

use crate::protocol::startup::StartupMessage;

/// The `-c` setting that carries the tenant in `options`.
pub const TENANT_OPTION: &str = "pgtenant.tenant";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("no tenant given: connect as user \"role{sep}tenant\", with database \"tenant\", or with options \"-c {TENANT_OPTION}=tenant\"")]
    NoTenant { sep: String },
    #[error("tenant \"{first}\" from {first_carrier} conflicts with tenant \"{second}\" from {second_carrier}")]
    Conflict {
        first: String,
        first_carrier: &'static str,
        second: String,
        second_carrier: &'static str,
    },
    #[error(
        "unsupported startup option \"{0}\": only -c name=value and --name=value are accepted"
    )]
    BadOption(String),
    #[error("replication connections are not supported")]
    Replication,
    #[error("invalid value for target_session_attrs: \"{0}\" (use any, read-write, primary, read-only, standby or prefer-standby)")]
    BadTarget(String),
}

/// Where a client asks its reads to go: the `target_session_attrs` of libpq, which libpq
/// itself never sends, so clients pass it as a startup parameter or
/// `options=-c pgtenant.target_session_attrs=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadIntent {
    /// `read-write`, `primary`: the primary, whatever the role.
    Primary,
    /// `read-only`: replicas; the primary when none is usable if the tenant allows it.
    ReadOnly,
    /// `standby`: replicas only.
    Standby,
    /// `prefer-standby`: replicas, else the primary.
    PreferStandby,
}

impl ReadIntent {
    fn parse(v: &str) -> Result<Option<ReadIntent>, ResolveError> {
        match v.to_ascii_lowercase().as_str() {
            "any" => Ok(None),
            "read-write" | "primary" => Ok(Some(ReadIntent::Primary)),
            "read-only" => Ok(Some(ReadIntent::ReadOnly)),
            "standby" => Ok(Some(ReadIntent::Standby)),
            "prefer-standby" => Ok(Some(ReadIntent::PreferStandby)),
            _ => Err(ResolveError::BadTarget(v.to_string())),
        }
    }
}

/// Startup settings that carry a `ReadIntent`.
fn is_target_setting(name: &str) -> bool {
    name.eq_ignore_ascii_case("target_session_attrs")
        || name.eq_ignore_ascii_case("pgtenant.target_session_attrs")
}

/// Who a client says it is, before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    pub tenant: String,
    /// Client role: the user name without the tenant suffix.
    pub role: String,
    /// The user name exactly as sent, for messages.
    pub user: String,
    /// Settings to apply to the session: GUC-style startup parameters and `-c` options, in order.
    pub settings: Vec<(String, String)>,
    /// Where the client asked its reads to go, if it did.
    pub intent: Option<ReadIntent>,
}

pub fn resolve(
    msg: &StartupMessage,
    separator: &str,
    server_name_tenant: Option<&str>,
) -> Result<Addressed, ResolveError> {
    let user = msg
        .param("user")
        .filter(|u| !u.is_empty())
        .ok_or(ResolveError::NoUser)?;
    if msg
        .param("replication")
        .is_some_and(|r| r != "false" && r != "0" && r != "off")
    {
        return Err(ResolveError::Replication);
    }
    let mut found: Option<(String, &'static str)> = None;
    let mut claim = |tenant: &str, carrier: &'static str| -> Result<(), ResolveError> {
        match &found {
            Some((t, c)) if t != tenant => Err(ResolveError::Conflict {
                first: t.clone(),
                first_carrier: c,
                second: tenant.to_string(),
                second_carrier: carrier,
            }),
            Some(_) => Ok(()),
            None => {
                found = Some((tenant.to_string(), carrier));
                Ok(())
            }
        }
    };

    let mut settings = Vec::new();
    let mut intent = None;
    for (name, value) in &msg.params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for word in split_options(value) {
                    match parse_option(&word)? {
                        OptionWord::Tenant(t) => claim(&t, "options")?,
                        OptionWord::Setting(k, v) if k.eq_ignore_ascii_case(TENANT_OPTION) => {
                            claim(&v, "options")?
                        }
                        OptionWord::Setting(k, v) if is_target_setting(&k) => {
                            intent = ReadIntent::parse(&v)?
                        }
                        OptionWord::Setting(k, v) => settings.push((k, v)),
                    }
                }
            }
            n if is_target_setting(n) => intent = ReadIntent::parse(value)?,
            _ => settings.push((name.clone(), value.clone())),
        }
    }

    let role = match user.rsplit_once(separator) {
        Some((role, tenant)) if !role.is_empty() && !tenant.is_empty() => {
            claim(tenant, "user name")?;
            role
        }
        _ => user,
    };

    if let Some(db) = msg
        .param("database")
        .filter(|d| !d.is_empty() && *d != user)
    {
        claim(db, "database name")?;
    }
    if let Some(t) = server_name_tenant {
        claim(t, "TLS server name")?;
    }

    let (tenant, _) = found.ok_or_else(|| ResolveError::NoTenant {
        sep: separator.to_string(),
    })?;
    Ok(Addressed {
        tenant,
        role: role.to_string(),
        user: user.to_string(),
        settings,
        intent,
    })
}

enum OptionWord {
    Tenant(String),
    Setting(String, String),
}

fn parse_option(word: &str) -> Result<OptionWord, ResolveError> {
    if let Some(t) = word.strip_prefix("tenant=") {
        return Ok(OptionWord::Tenant(t.to_string()));
    }
    let setting = word
        .strip_prefix("--")
        .or_else(|| word.strip_prefix("-c"))
        .ok_or_else(|| ResolveError::BadOption(word.to_string()))?;
    let (k, v) = setting
        .split_once('=')
        .ok_or_else(|| ResolveError::BadOption(word.to_string()))?;
    // libpq and PostgreSQL accept '-' for '_' in option names.
    Ok(OptionWord::Setting(k.replace('-', "_"), v.to_string()))
}

/// Splits `options` the way PostgreSQL does (pg_split_opts): on unescaped whitespace, with
/// backslash escaping the next character. `-c x=y` becomes one word, `-cx=y`.
fn split_options(s: &str) -> Vec<String> {
    let mut raw = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    raw.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        raw.push(cur);
    }
    let mut words = Vec::new();
    let mut it = raw.into_iter();
    while let Some(w) = it.next() {
        if w == "-c" {
            match it.next() {
                Some(next) => words.push(format!("-c{next}")),
                None => words.push(w),
            }
        } else {
            words.push(w);
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            protocol_options: vec![],
        }
    }

    #[test]
    fn tenant_from_user_suffix() {
        let a = resolve(
            &msg(&[("user", "app.acme"), ("database", "app.acme")]),
            ".",
            None,
        )
        .unwrap();
        assert_eq!((a.tenant.as_str(), a.role.as_str()), ("acme", "app"));
    }

    #[test]
    fn tenant_from_database_name() {
        let a = resolve(&msg(&[("user", "app"), ("database", "acme")]), ".", None).unwrap();
        assert_eq!((a.tenant.as_str(), a.role.as_str()), ("acme", "app"));
    }

    #[test]
    fn tenant_from_options_in_both_spellings() {
        for opt in [
            "-c pgtenant.tenant=acme",
            "--pgtenant.tenant=acme",
            "tenant=acme",
        ] {
            let a = resolve(&msg(&[("user", "app"), ("options", opt)]), ".", None).unwrap();
            assert_eq!(a.tenant, "acme", "{opt}");
        }
    }

    #[test]
    fn agreeing_carriers_are_fine() {
        let m = msg(&[
            ("user", "app.acme"),
            ("database", "acme"),
            ("options", "tenant=acme"),
        ]);
        assert_eq!(resolve(&m, ".", None).unwrap().tenant, "acme");
    }

    #[test]
    fn conflicting_carriers_are_refused() {
        let m = msg(&[("user", "app.acme"), ("database", "globex")]);
        assert!(matches!(
            resolve(&m, ".", None),
            Err(ResolveError::Conflict { .. })
        ));
    }

    #[test]
    fn missing_tenant_is_refused() {
        assert!(matches!(
            resolve(&msg(&[("user", "app")]), ".", None),
            Err(ResolveError::NoTenant { .. })
        ));
    }

    #[test]
    fn other_options_and_parameters_become_session_settings() {
        let m = msg(&[
            ("user", "app.acme"),
            ("application_name", "psql"),
            ("options", "-c statement_timeout=5s --lock-timeout=1s"),
        ]);
        let a = resolve(&m, ".", None).unwrap();
        assert_eq!(
            a.settings,
            vec![
                ("application_name".into(), "psql".into()),
                ("statement_timeout".into(), "5s".into()),
                ("lock_timeout".into(), "1s".into()),
            ]
        );
    }

    #[test]
    fn tenant_from_the_tls_server_name_alone() {
        let a = resolve(
            &msg(&[("user", "app"), ("database", "app")]),
            ".",
            Some("acme"),
        )
        .unwrap();
        assert_eq!((a.tenant.as_str(), a.role.as_str()), ("acme", "app"));
    }

    #[test]
    fn a_tls_server_name_that_disagrees_with_the_user_name_is_refused() {
        let m = msg(&[("user", "app.globex")]);
        assert!(matches!(
            resolve(&m, ".", Some("acme")),
            Err(ResolveError::Conflict {
                second_carrier: "TLS server name",
                ..
            })
        ));
    }

    #[test]
    fn configurable_separator_splits_at_the_last_occurrence() {
        let a = resolve(&msg(&[("user", "a@b@acme")]), "@", None).unwrap();
        assert_eq!((a.tenant.as_str(), a.role.as_str()), ("acme", "a@b"));
    }

    #[test]
    fn read_intent_comes_from_a_startup_parameter_or_an_option_and_is_no_setting() {
        for (k, v) in [
            ("target_session_attrs", "read-only"),
            ("options", "-c pgtenant.target_session_attrs=read-only"),
        ] {
            let a = resolve(&msg(&[("user", "app.acme"), (k, v)]), ".", None).unwrap();
            assert_eq!(a.intent, Some(ReadIntent::ReadOnly), "{k}");
            assert!(a.settings.is_empty(), "{k}");
        }
    }

    #[test]
    fn an_unknown_read_intent_is_refused() {
        let m = msg(&[("user", "app.acme"), ("target_session_attrs", "fastest")]);
        assert!(matches!(
            resolve(&m, ".", None),
            Err(ResolveError::BadTarget(_))
        ));
    }

    #[test]
    fn unknown_option_switches_are_refused() {
        let m = msg(&[("user", "app.acme"), ("options", "-B 100")]);
        assert!(matches!(
            resolve(&m, ".", None),
            Err(ResolveError::BadOption(_))
        ));
    }
}
