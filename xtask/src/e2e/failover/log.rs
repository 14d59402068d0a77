//! Klaus's own account of a failover: its log lines about its endpoints (ejections, returns,
//! failover, failback, DNS changes), printed with their time and checked for the failover and
//! the failback in that order.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use xshell::{Shell, cmd};

use crate::e2e::containers::Klaus;

/// What Klaus logs about its endpoints (ejections, returns, failover, failback, DNS changes):
/// the messages that contain one of these.
const UPSTREAM_MESSAGES: [&str; 5] = [
    "eject",
    "failing",
    "endpoints changed",
    "has no endpoint",
    "back after",
];

/// What Klaus must log while cloud A goes and comes back, in this order (each a message's
/// beginning): the failover, then the failback. (Whether A's endpoints are ejected before the
/// DNS drops them depends on timing, so an ejection line is printed but not required.)
pub(super) const LOGGED_SEQUENCE: [&str; 2] = [
    "failing over to the next Petra priority",
    "failing back to a higher Petra priority",
];

/// Whether `messages` hold a message beginning with each of `sequence`, in that order.
pub(super) fn in_order(messages: &[String], sequence: &[&str]) -> bool {
    let mut rest = messages.iter();
    sequence
        .iter()
        .all(|wanted| rest.any(|message| message.starts_with(wanted)))
}

/// Prints Klaus's log lines about its endpoints, each with its time relative to `origin`
/// (`since` names it), so that the sequence (and any flapping) shows; returns their messages.
pub(super) fn print_klaus_upstream_log(
    sh: &Shell,
    klaus: &Klaus,
    origin: SystemTime,
    since: &str,
) -> Vec<String> {
    let id = &klaus.id;
    let Ok(log) = cmd!(sh, "docker logs {id}").quiet().ignore_stderr().read() else {
        eprintln!("warning: cannot read Klaus's log");
        return Vec::new();
    };
    let mut messages = Vec::new();
    let origin_of_day = origin
        .duration_since(UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64() % DAY);
    println!("  Klaus's log about its endpoints (seconds {since}):");
    for line in log.lines() {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let text = |key: &str| fields.get(key).and_then(Value::as_str).unwrap_or("");
        let message = text("message");
        if !UPSTREAM_MESSAGES.iter().any(|m| message.contains(m)) {
            continue;
        }
        let at = seconds_of_day(text("timestamp")).map_or("?".to_owned(), |t| {
            // Wrapped into ±12 h, in case the run crosses midnight.
            let offset = (t - origin_of_day + DAY * 1.5) % DAY - DAY / 2.0;
            format!("{offset:+.2}")
        });
        let details: Vec<String> = fields
            .iter()
            .filter(|(key, _)| {
                !["timestamp", "level", "message", "target", "url"].contains(&key.as_str())
            })
            .map(|(key, value)| match value {
                Value::String(text) => format!("{key}={text}"),
                other => format!("{key}={other}"),
            })
            .collect();
        println!("    {at:>7}s {message} ({})", details.join(", "));
        messages.push(message.to_owned());
    }
    messages
}

/// Seconds in a day.
const DAY: f64 = 86_400.0;

/// The time of day, in seconds, of an RFC 3339 UTC timestamp such as `2026-11-30T22:19:29.438198Z`.
fn seconds_of_day(timestamp: &str) -> Option<f64> {
    let (_, time) = timestamp.split_once('T')?;
    let mut parts = time.trim_end_matches('Z').splitn(3, ':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logged_sequence_must_come_in_order() {
        let log = |lines: &[&str]| lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
        let full = log(&[
            "Petra endpoints changed",
            "ejected a Petra endpoint after consecutive failures",
            "failing over to the next Petra priority: no endpoint of a higher one is available",
            "ejected a Petra endpoint after consecutive failures",
            "failing back to a higher Petra priority",
        ]);
        assert!(in_order(&full, &LOGGED_SEQUENCE));
        let back_first = log(&[
            "failing back to a higher Petra priority",
            "failing over to the next Petra priority",
        ]);
        assert!(!in_order(&back_first, &LOGGED_SEQUENCE));
        assert!(!in_order(&[], &LOGGED_SEQUENCE));
    }
}
