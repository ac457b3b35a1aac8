//! Result sets of the admin console, as RowDescription, DataRows and CommandComplete.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::CommandComplete;
use pgwire::messages::Message;

/// Column types the console uses (PostgreSQL type oids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

impl Kind {
    fn oid(self) -> u32 {
        match self {
            Kind::Text => 25,
            Kind::Int => 20,
        }
    }
}

pub struct ResultSet {
    pub columns: Vec<(&'static str, Kind)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, Kind)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Option<String>>) {
        self.rows.push(row);
    }

    /// The whole result, ending with CommandComplete `SHOW`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let fields = self
            .columns
            .iter()
            .map(|(name, kind)| {
                FieldDescription::new(name.to_string(), 0, 0, kind.oid(), -1, -1, 0)
            })
            .collect();
        // Encoding owned, well-formed messages cannot fail.
        let _ = RowDescription::new(fields).encode(buf);
        for row in &self.rows {
            let mut data = BytesMut::new();
            for v in row {
                match v {
                    Some(s) => {
                        data.put_i32(s.len() as i32);
                        data.put_slice(s.as_bytes());
                    }
                    None => data.put_i32(-1),
                }
            }
            let _ = DataRow::new(data, row.len() as i16).encode(buf);
        }
        let _ = CommandComplete::new("SHOW".into()).encode(buf);
    }
}

/// A CommandComplete with `tag`, for commands that return no rows.
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    let _ = CommandComplete::new(tag.into()).encode(buf);
}

/// A text value.
pub fn t(s: impl ToString) -> Option<String> {
    Some(s.to_string())
}
