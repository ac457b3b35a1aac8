//! Per-tenant caps on settings (`limits = { statement_timeout = "30s", work_mem = "64MB" }`).
//!
//! PostgreSQL has no upper bound for a user-settable parameter, and a client can change one
//! in ways no proxy sees (`set_config()` inside a query, dynamic SQL). So the cap is enforced
//! where it cannot be bypassed for long: one statement, run by pgtenant before every
//! transaction in transaction mode and after every transaction in session mode, lowers each
//! capped setting that is above its cap (or unlimited) to the cap. A client may lower a
//! setting and keep it; a raise lasts at most to the end of its transaction.

/// How a capped setting's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Sizes with a unit (`64MB`); negative means unlimited.
    Memory,
    /// Durations with a unit (`30s`); zero means unlimited.
    Time,
    /// Plain numbers.
    Number,
}

/// The settings that may be capped. Others are refused, so a cap never silently fails to hold.
const CAPPABLE: &[(&str, Kind)] = &[
    ("statement_timeout", Kind::Time),
    ("lock_timeout", Kind::Time),
    ("idle_in_transaction_session_timeout", Kind::Time),
    ("idle_session_timeout", Kind::Time),
    ("work_mem", Kind::Memory),
    ("maintenance_work_mem", Kind::Memory),
    ("temp_buffers", Kind::Memory),
    ("temp_file_limit", Kind::Memory),
    ("max_parallel_workers_per_gather", Kind::Number),
    ("max_parallel_maintenance_workers", Kind::Number),
    ("hash_mem_multiplier", Kind::Number),
];

fn kind_of(name: &str) -> Option<Kind> {
    CAPPABLE
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, k)| k)
}

/// Checks one cap; the error says what is accepted.
pub fn validate(name: &str, value: &str) -> Result<(), String> {
    let Some(kind) = kind_of(name) else {
        let names: Vec<&str> = CAPPABLE.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "\"{name}\" cannot be capped; settings that can: {}",
            names.join(", ")
        ));
    };
    let value = value.trim();
    let digits = value.len() - value.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = value.split_at(digits);
    let ok = match kind {
        Kind::Memory => digits > 0 && ["B", "kB", "MB", "GB", "TB"].contains(&unit.trim()),
        Kind::Time => {
            digits > 0
                && number.bytes().any(|b| b != b'0')
                && ["us", "ms", "s", "min", "h", "d"].contains(&unit.trim())
        }
        Kind::Number => value
            .parse::<f64>()
            .is_ok_and(|v| v.is_finite() && v >= 0.0),
    };
    if ok {
        Ok(())
    } else {
        Err(match kind {
            Kind::Memory => format!("cap of {name} must be a size with a unit, e.g. \"64MB\""),
            Kind::Time => {
                format!("cap of {name} must be a non-zero duration with a unit, e.g. \"30s\"")
            }
            Kind::Number => format!("cap of {name} must be a non-negative number"),
        })
    }
}

/// `enforce_sql` of a tenant's `limits` map, as kept in its model.
pub fn enforce_statement(
    limits: &std::collections::BTreeMap<String, String>,
) -> Option<std::sync::Arc<str>> {
    let pairs: Vec<(String, String)> = limits.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    enforce_sql(&pairs).map(std::sync::Arc::from)
}

/// The statement that brings every capped setting down to its cap, or None without caps.
/// Values must have passed `validate`.
pub fn enforce_sql(limits: &[(String, String)]) -> Option<String> {
    let lit = crate::tenancy::tier::quote_literal;
    let columns: Vec<String> = limits
        .iter()
        .filter_map(|(name, cap)| {
            let name = name.to_ascii_lowercase();
            let (n, c) = (lit(&name), lit(cap.trim()));
            let current = format!("pg_catalog.current_setting({n})");
            let above = match kind_of(&name)? {
                Kind::Memory => format!(
                    "pg_catalog.pg_size_bytes({current}) > pg_catalog.pg_size_bytes({c}) \
                     OR pg_catalog.pg_size_bytes({current}) < 0"
                ),
                Kind::Time => format!(
                    "{current}::interval > {c}::interval OR {current}::interval = interval '0'"
                ),
                Kind::Number => format!("{current}::numeric > {c}::numeric"),
            };
            Some(format!(
                "CASE WHEN {above} THEN pg_catalog.set_config({n}, {c}, false) END"
            ))
        })
        .collect();
    (!columns.is_empty()).then(|| format!("SELECT {}", columns.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_need_a_known_setting_and_a_value_with_a_unit() {
        assert!(validate("statement_timeout", "30s").is_ok());
        assert!(validate("work_mem", "64MB").is_ok());
        assert!(validate("max_parallel_workers_per_gather", "2").is_ok());
        assert!(
            validate("statement_timeout", "0").is_err(),
            "zero is no cap"
        );
        assert!(
            validate("statement_timeout", "30").is_err(),
            "a unit is required"
        );
        assert!(validate("work_mem", "lots").is_err());
        assert!(validate("search_path", "x").is_err());
    }

    #[test]
    fn no_caps_no_statement() {
        assert_eq!(enforce_sql(&[]), None);
    }

    #[test]
    fn one_statement_lowers_every_capped_setting() {
        let sql = enforce_sql(&[
            ("statement_timeout".into(), "30s".into()),
            ("work_mem".into(), "64MB".into()),
        ])
        .unwrap();
        assert!(sql.starts_with("SELECT CASE WHEN"));
        assert_eq!(sql.matches("set_config").count(), 2);
        assert!(
            sql.contains("interval '0'"),
            "an unlimited timeout is above any cap"
        );
    }
}
