//! Just enough SQL lexing for a transaction pooler: split a query string into statements and
//! recognise the few that change session state or cannot work when backends are shared.
//! Nothing here rewrites SQL; unknown input is simply `Other`.

/// What a statement means to the pooler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement<'a> {
    /// `SET [SESSION] name ...`; `text` is the whole statement, replayed verbatim.
    Set {
        name: String,
        text: &'a str,
    },
    /// `RESET name`, or `RESET ALL` (None).
    Reset(Option<String>),
    DiscardAll,
    DeallocateAll,
    /// Cannot work when consecutive transactions may run on different backends.
    Unsupported(&'static str),
    Other,
}

/// Splits on semicolons outside quotes, comments and dollar quotes. Empty statements are dropped.
pub fn statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut start) = (0, 0);
    while i < b.len() {
        match b[i] {
            b';' => {
                push_stmt(&mut out, &sql[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i = skip_token(b, i),
        }
    }
    push_stmt(&mut out, &sql[start..]);
    out
}

fn push_stmt<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    if !words(s).is_empty() {
        out.push(s.trim());
    }
}

/// Index after the quoted string, comment or single byte at `i`.
fn skip_token(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'\'' => {
            let escapes = i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
            let mut j = i + 1;
            while j < b.len() {
                if escapes && b[j] == b'\\' {
                    j += 2;
                    continue;
                }
                if b[j] == b'\'' {
                    if j + 1 < b.len() && b[j + 1] == b'\'' {
                        j += 2;
                        continue;
                    }
                    return j + 1;
                }
                j += 1;
            }
            b.len()
        }
        b'"' => match b[i + 1..].iter().position(|&c| c == b'"') {
            Some(p) => i + p + 2,
            None => b.len(),
        },
        b'-' if b.get(i + 1) == Some(&b'-') => match b[i..].iter().position(|&c| c == b'\n') {
            Some(p) => i + p + 1,
            None => b.len(),
        },
        b'/' if b.get(i + 1) == Some(&b'*') => {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            j
        }
        b'$' => {
            // $tag$ ... $tag$, where tag is empty or an identifier.
            let tag_end = b[i + 1..]
                .iter()
                .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
                .map(|p| i + 1 + p);
            match tag_end {
                Some(e) if b[e] == b'$' && !(e > i + 1 && b[i + 1].is_ascii_digit()) => {
                    let tag = &b[i..=e];
                    let body = e + 1;
                    match b[body..].windows(tag.len()).position(|w| w == tag) {
                        Some(p) => body + p + tag.len(),
                        None => b.len(),
                    }
                }
                _ => i + 1,
            }
        }
        _ => i + 1,
    }
}

/// Upper-cased words and punctuation of a statement, outside strings and comments; strings
/// become a single `'` token. Enough to recognise statement shapes.
fn words(s: &str) -> Vec<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] == b'.')
            {
                i += 1;
            }
            // E'...' strings: the E belongs to the literal.
            if i - start == 1 && (c == b'E' || c == b'e') && b.get(i) == Some(&b'\'') {
                i = skip_token(b, i);
                out.push("'".to_string());
                continue;
            }
            out.push(s[start..i].to_ascii_uppercase());
        } else if c == b'"' {
            let end = skip_token(b, i);
            out.push(s[i..end].to_string());
            i = end;
        } else if c == b'\'' || c == b'$' {
            let end = skip_token(b, i);
            if end > i + 1 || c == b'\'' {
                out.push("'".to_string());
            }
            i = end;
        } else if (c == b'-' && b.get(i + 1) == Some(&b'-'))
            || (c == b'/' && b.get(i + 1) == Some(&b'*'))
        {
            i = skip_token(b, i);
        } else {
            out.push((c as char).to_string());
            i += 1;
        }
    }
    out
}

const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "PG_ADVISORY_LOCK",
    "PG_ADVISORY_LOCK_SHARED",
    "PG_TRY_ADVISORY_LOCK",
    "PG_TRY_ADVISORY_LOCK_SHARED",
];

/// Whether `word` (ASCII letters) is a first word that makes a statement interesting to the
/// pooler: SET, RESET, DISCARD, DEALLOCATE, PREPARE, LISTEN, LOAD, DECLARE, CREATE. By length
/// first, so that the usual SELECT is one comparison away from "no".
fn interesting_first_word(word: &[u8]) -> bool {
    let is = |k: &[u8]| word.eq_ignore_ascii_case(k);
    match word.len() {
        3 => is(b"SET"),
        4 => is(b"LOAD"),
        5 => is(b"RESET"),
        6 => is(b"LISTEN") || is(b"CREATE"),
        7 => is(b"DISCARD") || is(b"PREPARE") || is(b"DECLARE"),
        10 => is(b"DEALLOCATE"),
        _ => false,
    }
}

/// True when `sql` may hold something `classify` would not call `Other`. A cheap test without
/// allocation, so the common single query (SELECT/INSERT/UPDATE/...) skips the lexer. It runs
/// on every query of every transaction: one memchr pass finds both a `;` and the last letter
/// of "advisory".
pub fn may_matter(sql: impl AsRef<[u8]>) -> bool {
    let b = sql.as_ref();
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let b = &b[start..];
    if b.starts_with(b"--") || b.starts_with(b"/*") {
        return true;
    }
    let word_len = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
    if interesting_first_word(&b[..word_len]) {
        return true;
    }
    // More than one statement (a `;` before the trailing ones), or a session advisory lock.
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace() && *c != b';')
        .map_or(0, |i| i + 1);
    const NEEDLE: &[u8] = b"advisory";
    memchr::memchr3_iter(b';', b'y', b'Y', &b[..end]).any(|i| {
        b[i] == b';'
            || i + 1 >= NEEDLE.len() && b[i + 1 - NEEDLE.len()..=i].eq_ignore_ascii_case(NEEDLE)
    })
}

/// Names through which a statement can change settings that no statement parser sees:
/// `set_config()`, and the ways core PostgreSQL runs SQL held in a string (plpgsql's EXECUTE,
/// SQL EXECUTE of a prepared statement, the `query_to_xml` family, `ts_stat`), plus `U&`
/// escapes, which can spell any of them.
const UNSEEN_SETTING_CHANGES: &[&[u8]] = &[
    b"set_config",
    b"execute",
    b"query_to_xml",
    b"ts_stat",
    b"u&",
];

/// True when `sql` may change a setting in a way `classify` cannot see (see
/// `UNSEEN_SETTING_CHANGES`; also any DO block). Errs on the side of true.
pub fn may_change_settings_unseen(sql: impl AsRef<[u8]>) -> bool {
    let b = sql.as_ref();
    let contains = |needle: &[u8]| {
        b.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if UNSEEN_SETTING_CHANGES.iter().any(|n| contains(n)) {
        return true;
    }
    // A DO block: "do" as a word of its own followed by its body or LANGUAGE.
    b.windows(2).enumerate().any(|(i, w)| {
        w.eq_ignore_ascii_case(b"do")
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'_')
            && b.get(i + 2)
                .is_none_or(|c| !c.is_ascii_alphanumeric() && *c != b'_')
    })
}

/// Whether `sql` starts a transaction that is read-only from its first statement on (`BEGIN
/// READ ONLY`, `START TRANSACTION ... READ ONLY`, or `BEGIN; SET TRANSACTION READ ONLY`), and
/// nothing in the same string runs after that transaction ends. Such a transaction can be served
/// by a replica: even a write slipped in later is refused there, never applied.
pub fn opens_read_only_transaction(sql: &[u8]) -> bool {
    let lead = sql.trim_ascii_start();
    let starts = |w: &[u8]| lead.len() >= w.len() && lead[..w.len()].eq_ignore_ascii_case(w);
    if !(starts(b"begin") || starts(b"start")) {
        return false;
    }
    let Ok(text) = std::str::from_utf8(sql) else {
        return false;
    };
    let stmts: Vec<Vec<String>> = statements(text).into_iter().map(words).collect();
    let Some(first) = stmts.first() else {
        return false;
    };
    fn at(w: &[String], i: usize) -> &str {
        w.get(i).map(String::as_str).unwrap_or("")
    }
    let begins =
        at(first, 0) == "BEGIN" || (at(first, 0) == "START" && at(first, 1) == "TRANSACTION");
    if !begins {
        return false;
    }
    let read_only = |w: &[String]| w.windows(2).any(|p| p[0] == "READ" && p[1] == "ONLY");
    let second_sets_it = stmts
        .get(1)
        .is_some_and(|w| at(w, 0) == "SET" && at(w, 1) == "TRANSACTION" && read_only(w));
    if !(read_only(first) || second_sets_it) {
        return false;
    }
    // Nothing may follow the end of this transaction in the same string.
    let ends = |w: &[String]| {
        matches!(at(w, 0), "COMMIT" | "END" | "ROLLBACK" | "ABORT")
            || (at(w, 0) == "PREPARE" && at(w, 1) == "TRANSACTION")
    };
    match stmts.iter().position(|w| ends(w)) {
        Some(i) => i + 1 == stmts.len(),
        None => true,
    }
}

/// The statement name of `DEALLOCATE [PREPARE] name` when that is all `sql` holds, as
/// PostgreSQL folds it: an unquoted name lower-cased, a quoted one as written (`""` is `"`).
/// `DEALLOCATE ALL` and anything else give None.
pub fn deallocated_name(sql: &str) -> Option<String> {
    let stmt = only_statement(sql)?;
    let mut rest = stmt[keyword(stmt, "DEALLOCATE")?..].trim_start();
    if let Some(n) = keyword(rest, "PREPARE") {
        let after = rest[n..].trim_start();
        if !after.is_empty() {
            rest = after;
        }
    }
    let all = keyword(rest, "ALL").is_some();
    let (name, tail) = identifier(rest)?;
    (!all && tail.trim().is_empty()).then_some(name)
}

/// What a query that is one `LISTEN channel` or `UNLISTEN channel | *` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenRequest {
    Listen(String),
    /// None: `UNLISTEN *`.
    Unlisten(Option<String>),
}

/// `sql` as a `ListenRequest`, when it is exactly one LISTEN or UNLISTEN statement; the
/// channel folded as PostgreSQL folds identifiers.
pub fn listen_request(sql: &str) -> Option<ListenRequest> {
    let stmt = only_statement(sql)?;
    if let Some(n) = keyword(stmt, "LISTEN") {
        let (name, tail) = identifier(stmt[n..].trim_start())?;
        return tail
            .trim()
            .is_empty()
            .then_some(ListenRequest::Listen(name));
    }
    let rest = stmt[keyword(stmt, "UNLISTEN")?..].trim_start();
    if let Some(tail) = rest.strip_prefix('*') {
        return tail
            .trim()
            .is_empty()
            .then_some(ListenRequest::Unlisten(None));
    }
    let (name, tail) = identifier(rest)?;
    tail.trim()
        .is_empty()
        .then_some(ListenRequest::Unlisten(Some(name)))
}

/// The one statement `sql` holds, if it holds exactly one.
fn only_statement(sql: &str) -> Option<&str> {
    match statements(sql).as_slice() {
        [stmt] => Some(stmt),
        _ => None,
    }
}

/// The length of keyword `k` when `s` starts with it (any case) followed by a space, a quote
/// or nothing.
fn keyword(s: &str, k: &str) -> Option<usize> {
    let head = s.get(..k.len())?;
    let boundary = s[k.len()..]
        .chars()
        .next()
        .is_none_or(|c| c.is_whitespace() || c == '"');
    (head.eq_ignore_ascii_case(k) && boundary).then_some(k.len())
}

/// The identifier `s` starts with, folded as PostgreSQL folds it (unquoted: lower case; quoted:
/// as written, `""` for `"`), and what follows it.
fn identifier(s: &str) -> Option<(String, &str)> {
    if let Some(quoted) = s.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices();
        loop {
            match chars.next() {
                Some((i, '"')) if quoted[i + 1..].starts_with('"') => {
                    name.push('"');
                    chars.next();
                }
                Some((i, '"')) => {
                    return (!name.is_empty()).then_some((name, &quoted[i + 1..]));
                }
                Some((_, c)) => name.push(c),
                None => return None,
            }
        }
    }
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(s.len());
    (end > 0).then(|| (s[..end].to_ascii_lowercase(), &s[end..]))
}

pub fn classify(stmt: &str) -> Statement<'_> {
    let w = words(stmt);
    let at = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    if w.iter().any(|t| {
        let name = t.rsplit('.').next().unwrap_or(t);
        SESSION_ADVISORY_LOCKS.contains(&name)
    }) {
        return Statement::Unsupported("session-level advisory locks");
    }
    match at(0) {
        "SET" => {
            let mut i = 1;
            match at(1) {
                "LOCAL" | "TRANSACTION" | "CONSTRAINTS" => return Statement::Other,
                "SESSION" if at(2) == "CHARACTERISTICS" || at(2) == "AUTHORIZATION" => {
                    return Statement::Set {
                        name: "session_authorization".into(),
                        text: stmt,
                    }
                }
                "SESSION" => i = 2,
                _ => {}
            }
            let name = match (at(i), at(i + 1)) {
                ("TIME", "ZONE") => "timezone".to_string(),
                ("NAMES", _) => "client_encoding".to_string(),
                ("SCHEMA", _) => "search_path".to_string(),
                ("XML", "OPTION") => "xmloption".to_string(),
                ("", _) => return Statement::Other,
                (n, _) => n.trim_matches('"').to_ascii_lowercase(),
            };
            Statement::Set { name, text: stmt }
        }
        "RESET" => match at(1) {
            "ALL" => Statement::Reset(None),
            "" => Statement::Other,
            "TIME" if at(2) == "ZONE" => Statement::Reset(Some("timezone".into())),
            "SESSION" if at(2) == "AUTHORIZATION" => {
                Statement::Reset(Some("session_authorization".into()))
            }
            n => Statement::Reset(Some(n.trim_matches('"').to_ascii_lowercase())),
        },
        "DISCARD" if at(1) == "ALL" => Statement::DiscardAll,
        "DEALLOCATE" if at(1) == "ALL" || (at(1) == "PREPARE" && at(2) == "ALL") => {
            Statement::DeallocateAll
        }
        "PREPARE" if at(1) != "TRANSACTION" => Statement::Unsupported("SQL PREPARE"),
        "LISTEN" => Statement::Unsupported("LISTEN"),
        "LOAD" => Statement::Unsupported("LOAD"),
        "DECLARE" => {
            let with_hold = w.windows(2).any(|p| p[0] == "WITH" && p[1] == "HOLD");
            if with_hold {
                Statement::Unsupported("WITH HOLD cursors")
            } else {
                Statement::Other
            }
        }
        "CREATE" => {
            let mut i = 1;
            if at(i) == "OR" && at(i + 1) == "REPLACE" {
                i += 2;
            }
            if at(i) == "GLOBAL" || at(i) == "LOCAL" {
                i += 1;
            }
            let temp = at(i) == "TEMP" || at(i) == "TEMPORARY";
            let drops_at_commit = w
                .windows(3)
                .any(|p| p[0] == "ON" && p[1] == "COMMIT" && p[2] == "DROP");
            if temp && !drops_at_commit {
                Statement::Unsupported("temporary objects that outlive a transaction")
            } else {
                Statement::Other
            }
        }
        _ => Statement::Other,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_listen_or_unlisten_is_a_listen_request() {
        use super::{listen_request, ListenRequest::*};
        assert_eq!(listen_request("LISTEN Jobs"), Some(Listen("jobs".into())));
        assert_eq!(
            listen_request(" listen \"Jobs\" ; "),
            Some(Listen("Jobs".into()))
        );
        assert_eq!(
            listen_request("UNLISTEN jobs"),
            Some(Unlisten(Some("jobs".into())))
        );
        assert_eq!(listen_request("unlisten *"), Some(Unlisten(None)));
        assert_eq!(
            listen_request("LISTEN \"a\"\"b\""),
            Some(Listen("a\"b".into()))
        );
    }

    #[test]
    fn anything_more_than_one_listen_is_not_a_listen_request() {
        use super::listen_request;
        for sql in [
            "LISTEN a; SELECT 1",
            "BEGIN; LISTEN a",
            "LISTEN",
            "LISTEN a b",
            "LISTENER a",
            "UNLISTEN",
            "UNLISTEN * x",
            "SELECT 'LISTEN a'",
            "LISTEN \"\"",
            "LISTEN \"open",
        ] {
            assert_eq!(listen_request(sql), None, "{sql}");
        }
    }

    #[test]
    fn settings_changed_where_no_parser_looks_are_suspected() {
        for sql in [
            "SELECT set_config('search_path', 'x', false)",
            "do $$ begin execute 'set search_path = x'; end $$",
            "DO LANGUAGE plpgsql $$ BEGIN NULL; END $$",
            "EXECUTE stmt(1)",
            "SELECT query_to_xml('select 1', true, false, '')",
            "SELECT * FROM ts_stat('select 1')",
            "SELECT U&\"set\\005fconfig\"('a', 'b', false)",
        ] {
            assert!(may_change_settings_unseen(sql), "{sql}");
        }
        for sql in [
            "SELECT balance FROM accounts WHERE id = $1",
            "UPDATE done SET document = 'todo' WHERE id = 1",
            "INSERT INTO t (redo) VALUES (1)",
        ] {
            assert!(!may_change_settings_unseen(sql), "{sql}");
        }
    }

    use super::*;

    #[test]
    fn splits_outside_quotes_comments_and_dollar_quotes() {
        let s = statements(
            "SELECT 'a;b'; SELECT \"x;\" -- c;\n; DO $$ BEGIN; END $$; /* ; */ SELECT 1;;",
        );
        assert_eq!(s.len(), 4, "{s:?}");
        assert!(s[2].starts_with("DO $$ BEGIN; END $$"));
    }

    #[test]
    fn plain_queries_skip_the_lexer() {
        assert!(!may_matter(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;"
        ));
        assert!(!may_matter("  update t set x = 1"));
        assert!(may_matter("set x = 1"));
        assert!(may_matter("SELECT 1; SELECT 2"));
        assert!(may_matter("SELECT pg_advisory_lock(1)"));
        assert!(may_matter("/* c */ LISTEN x"));
    }

    /// `may_matter` as first written, plainly: the fast one must agree with it.
    fn may_matter_spec(sql: &str) -> bool {
        let t = sql.trim_start();
        let word: String = t.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
        let body = t.trim_end_matches(|c: char| c.is_ascii_whitespace() || c == ';');
        t.starts_with("--")
            || t.starts_with("/*")
            || [
                "SET",
                "RESET",
                "DISCARD",
                "DEALLOCATE",
                "PREPARE",
                "LISTEN",
                "LOAD",
                "DECLARE",
                "CREATE",
            ]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(&word))
            || body.contains(';')
            || body.to_ascii_lowercase().contains("advisory")
    }

    proptest::proptest! {
        #[test]
        fn may_matter_agrees_with_its_plain_spec(
            sql in "[ \t\n]{0,2}(select|SeT|reset|discard|deallocate|prepare|listen|load|declare|create|update|--|/\\*|x)?[ a-zA-Z;/*_()-]{0,30}(advisory|AdvisorY|advisor|;|y)?[ ;\n]{0,3}"
        ) {
            proptest::prop_assert_eq!(may_matter(&sql), may_matter_spec(&sql), "{:?}", sql);
        }
    }

    #[test]
    fn recognises_set_forms() {
        assert_eq!(
            classify("SET statement_timeout = '5s'"),
            Statement::Set {
                name: "statement_timeout".into(),
                text: "SET statement_timeout = '5s'"
            }
        );
        assert!(
            matches!(classify("set session TimeZone to 'UTC'"), Statement::Set { name, .. } if name == "timezone")
        );
        assert!(
            matches!(classify("SET TIME ZONE 'UTC'"), Statement::Set { name, .. } if name == "timezone")
        );
        assert!(
            matches!(classify("SET search_path TO a, b"), Statement::Set { name, .. } if name == "search_path")
        );
        assert!(
            matches!(classify("SET pgtenant.tenant_id = 'x'"), Statement::Set { name, .. } if name == "pgtenant.tenant_id")
        );
        assert_eq!(
            classify("SET LOCAL statement_timeout = 1"),
            Statement::Other
        );
        assert_eq!(
            classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Statement::Other
        );
    }

    #[test]
    fn recognises_resets_and_discards() {
        assert_eq!(classify("RESET ALL"), Statement::Reset(None));
        assert_eq!(
            classify("reset DateStyle"),
            Statement::Reset(Some("datestyle".into()))
        );
        assert_eq!(classify("DISCARD ALL"), Statement::DiscardAll);
        assert_eq!(classify("DEALLOCATE ALL"), Statement::DeallocateAll);
        assert_eq!(classify("DISCARD PLANS"), Statement::Other);
    }

    #[test]
    fn recognises_what_transaction_pooling_cannot_serve() {
        for sql in [
            "LISTEN jobs",
            "PREPARE q AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (x int)",
            "create temporary table t as select 1",
            "SELECT pg_advisory_lock(1)",
            "select pg_catalog.pg_try_advisory_lock(1, 2)",
        ] {
            assert!(matches!(classify(sql), Statement::Unsupported(_)), "{sql}");
        }
        for sql in [
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "SELECT pg_advisory_xact_lock(1)",
            "DECLARE c CURSOR FOR SELECT 1",
            "SELECT 'LISTEN x'",
            "PREPARE TRANSACTION 'x'",
            "SELECT 'pg_advisory_lock(1)'",
        ] {
            assert!(!matches!(classify(sql), Statement::Unsupported(_)), "{sql}");
        }
    }

    #[test]
    fn read_only_transaction_starts_are_recognised() {
        for sql in [
            "BEGIN READ ONLY",
            "begin transaction isolation level repeatable read, read only",
            "START TRANSACTION READ ONLY; SELECT 1",
            "BEGIN; SET TRANSACTION READ ONLY; SELECT 1; COMMIT",
        ] {
            assert!(opens_read_only_transaction(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn transactions_that_may_write_are_not_read_only() {
        for sql in [
            "BEGIN",
            "BEGIN READ WRITE",
            "BEGIN; INSERT INTO t VALUES (1); SET TRANSACTION READ ONLY",
            "BEGIN READ ONLY; COMMIT; INSERT INTO t VALUES (1)",
            "SELECT 1",
            "/* BEGIN READ ONLY */ INSERT INTO t VALUES (1)",
        ] {
            assert!(!opens_read_only_transaction(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn deallocate_of_one_name_gives_the_name_as_postgresql_folds_it() {
        assert_eq!(
            deallocated_name("DEALLOCATE _pg3_0").as_deref(),
            Some("_pg3_0")
        );
        assert_eq!(
            deallocated_name("deallocate prepare Stmt1;").as_deref(),
            Some("stmt1")
        );
        assert_eq!(
            deallocated_name("DEALLOCATE \"A\"\"b\"").as_deref(),
            Some("A\"b")
        );
        assert_eq!(
            deallocated_name("DEALLOCATE prepare").as_deref(),
            Some("prepare")
        );
    }

    #[test]
    fn deallocate_all_and_anything_more_is_not_one_name() {
        assert_eq!(deallocated_name("DEALLOCATE ALL"), None);
        assert_eq!(deallocated_name("DEALLOCATE PREPARE ALL"), None);
        assert_eq!(deallocated_name("DEALLOCATE a; SELECT 1"), None);
        assert_eq!(deallocated_name("DEALLOCATE a b"), None);
        assert_eq!(deallocated_name("DEALLOCATEX a"), None);
        assert_eq!(deallocated_name("SELECT 1"), None);
        assert_eq!(deallocated_name("DEALLOCATE \"open"), None);
    }
}
