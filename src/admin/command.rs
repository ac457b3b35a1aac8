//! The admin console's commands, parsed from a simple query.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(String),
    Pause(Option<String>),
    Resume(Option<String>),
    Reload,
    Kill(String),
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown admin command: \"{0}\" (try SHOW HELP)")]
    Unknown(String),
    #[error("{0} needs a tenant: {0} tenant")]
    NeedsTenant(&'static str),
}

/// One command per query; a trailing `;` and letter case do not matter. A tenant id may be
/// quoted ("acme").
pub fn parse(sql: &str) -> Result<Command, CommandError> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let unquote = |w: &str| w.trim_matches('"').to_string();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let arg = words.get(1).map(|w| unquote(w));
    match (upper.first().map(String::as_str), words.len()) {
        (Some("SHOW"), 2) => Ok(Command::Show(upper[1].clone())),
        (Some("PAUSE"), 1 | 2) => Ok(Command::Pause(arg)),
        (Some("RESUME"), 1 | 2) => Ok(Command::Resume(arg)),
        (Some("RELOAD"), 1) => Ok(Command::Reload),
        (Some("KILL"), 2) => Ok(Command::Kill(arg.unwrap_or_default())),
        (Some("KILL"), 1) => Err(CommandError::NeedsTenant("KILL")),
        (Some("SHUTDOWN"), 1) => Ok(Command::Shutdown),
        _ => Err(CommandError::Unknown(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_ignore_case_and_a_trailing_semicolon() {
        assert_eq!(parse("show pools;"), Ok(Command::Show("POOLS".into())));
        assert_eq!(
            parse("PAUSE \"acme\""),
            Ok(Command::Pause(Some("acme".into())))
        );
        assert_eq!(parse("resume"), Ok(Command::Resume(None)));
        assert_eq!(parse("kill acme"), Ok(Command::Kill("acme".into())));
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        assert!(matches!(
            parse("DROP TABLE x"),
            Err(CommandError::Unknown(_))
        ));
        assert_eq!(parse("KILL"), Err(CommandError::NeedsTenant("KILL")));
    }
}
