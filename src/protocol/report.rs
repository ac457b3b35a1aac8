//! The one shape every refusal takes on its way to the client: an ErrorResponse.

use bytes::BytesMut;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error as the client will read it. Layers keep their own typed errors and convert to this
/// at the edge, so the SQLSTATE is chosen in one place per error kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorReport {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        ErrorReport {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        ErrorReport {
            severity: Severity::Error,
            ..ErrorReport::fatal(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let sev = self.severity.as_str().to_string();
        let mut fields = vec![
            (b'S', sev.clone()),
            (b'V', sev),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        // Encoding a message built from owned strings cannot fail.
        let _ = ErrorResponse::new(fields).encode(buf);
    }
}

/// The (type, value) fields of an ErrorResponse or NoticeResponse body, up to its terminator
/// or the first malformed field.
pub fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&field, tail) = rest.split_first()?;
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        rest = &tail[end + 1..];
        Some((field, &tail[..end]))
    })
}

/// The SQLSTATE field of an ErrorResponse body.
pub fn sqlstate_of(body: &[u8]) -> Option<&[u8]> {
    error_fields(body).find(|(f, _)| *f == b'C').map(|(_, v)| v)
}
