//! The JSON log line: each field written straight into the line, numbers with itoa and ryu,
//! strings escaped byte by byte.

use std::fmt::{self, Write as _};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::timestamp::write_timestamp;

/// One JSON object per event: `{"timestamp":"…Z","level":"INFO",<fields>,"target":"…"}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_str("\"")?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'a, W: fmt::Write> {
    out: &'a mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                write_field_name(self.out, field.name())?;
                value(self.out)
            })();
        }
    }
}

impl<W: fmt::Write> Visit for JsonFields<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| {
            if value.is_finite() {
                out.write_str(ryu::Buffer::new().format_finite(value))
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |out| {
            out.write_str("\"")?;
            write!(Escaped(out), "{value}")?;
            out.write_str("\"")
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_str("\"")?;
            write!(Escaped(out), "{value:?}")?;
            out.write_str("\"")
        });
    }
}

/// `,"name":`, which starts a field after the one before it. A field name is almost always an
/// identifier: one check, then one write.
pub(super) fn write_field_name(out: &mut impl fmt::Write, name: &str) -> fmt::Result {
    if needs_escaping(name) {
        out.write_str(",")?;
        write_json_str(out, name)?;
        out.write_str(":")
    } else {
        out.write_str(",\"")?;
        out.write_str(name)?;
        out.write_str("\":")
    }
}

/// `value` as a JSON string, quotes included.
pub(super) fn write_json_str(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    out.write_str("\"")?;
    Escaped(out).write_str(value)?;
    out.write_str("\"")
}

/// Whether `s` holds a byte that a JSON string must escape. The check looks at every byte
/// without stopping early, which the compiler vectorises: most strings here (request ids,
/// routes, field names) need nothing and are then written whole, without the byte-by-byte
/// search for the first byte to escape.
fn needs_escaping(s: &str) -> bool {
    s.bytes().fold(false, |any, b| {
        any | (b == b'"') | (b == b'\\') | (b < b' ')
    })
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !needs_escaping(s) {
            return self.0.write_str(s);
        }
        // Byte by byte: every character that needs escaping is ASCII, and no byte of a
        // multi-byte UTF-8 sequence is, so the runs in between are whole characters.
        let mut rest = s;
        while let Some(at) = rest
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < b' ')
        {
            self.0.write_str(&rest[..at])?;
            match rest.as_bytes()[at] {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                other => write!(self.0, "\\u{:04x}", u32::from(other))?,
            }
            rest = &rest[at + 1..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::sink::Counting;
    use super::*;

    #[test]
    fn strings_are_escaped_for_json() {
        let mut out = String::new();
        write_json_str(&mut out, "a \"b\" \\ c\nd\te\u{1}é").expect("write");
        assert_eq!(out, r#""a \"b\" \\ c\nd\te\u0001é""#);
        let parsed: String = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed, "a \"b\" \\ c\nd\te\u{1}é");
    }

    #[test]
    fn numbers_are_json_numbers_at_any_size() {
        for value in [0.0, 1.5, 2.5e-7, 12_345.678_9, 1e21] {
            let line = one_line(|| tracing::info!(latency_ms = value, count = 7_u64, "x"));
            let line: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
            assert_eq!(line["latency_ms"].as_f64(), Some(value), "{line}");
            assert_eq!(line["count"].as_u64(), Some(7), "{line}");
        }
    }

    /// What `emit` logs, as JSON lines.
    pub(in crate::telemetry) fn one_line(emit: impl FnOnce()) -> String {
        let sink = Counting::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().expect("lock").0.clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    #[test]
    fn an_event_is_one_json_object_with_its_fields() {
        let text = one_line(|| {
            let error = std::io::Error::other("broken \"pipe\"");
            tracing::info!(
                target: "http",
                method = "GET",
                status = 200_u16,
                latency_ms = 1.5,
                slow = false,
                delta = -3_i64,
                error = &error as &dyn std::error::Error,
                shown = %"a\nb",
                "request"
            );
        });
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text:?}"
        );
        let line: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "http");
        assert_eq!(line["message"], "request");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["status"], 200);
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["slow"], false);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["error"], "broken \"pipe\"");
        assert_eq!(line["shown"], "a\nb");
        let timestamp = line["timestamp"].as_str().expect("timestamp");
        assert_eq!(
            timestamp.len(),
            "2026-11-27T08:15:02.123456Z".len(),
            "{timestamp}"
        );
        assert!(timestamp.ends_with('Z'), "{timestamp}");
    }
}
