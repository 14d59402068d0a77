//! What a request may carry on to the next service: a request id of safe characters, and W3C
//! trace context (`traceparent`, `tracestate`) only when it is well formed and bounded.
//!
//! Both services log the request id and return it on the response, and Klaus passes all three
//! headers on to Petra; so whatever a client puts in them ends up in logs, in the next
//! service's request and back in the client's answer. Only values that can do no harm there
//! are kept: anything else is replaced (the request id) or dropped (trace context).

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

/// The request id header: taken from the request when it passes [`is_valid_request_id`], made
/// up otherwise, and always returned on the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The W3C trace state header, which belongs to the `traceparent` beside it.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest request id taken from a client; a longer one is replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The longest `tracestate` passed on, in bytes: the size W3C asks vendors to propagate at
/// least, and the bound the spec lets them cut at.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The longest `traceparent` of a later version (with fields after the flags) passed on.
pub const MAX_TRACEPARENT_BYTES: usize = 512;

/// The most `tracestate` list members passed on (W3C: at most 32).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Whether `id` may be kept as the request id: 1 to [`MAX_REQUEST_ID_LEN`] bytes of
/// `[A-Za-z0-9._:-]`, enough for UUIDs, ULIDs and the ids proxies make, and nothing a log
/// viewer, a shell or an HTML page would read as markup or quoting.
pub fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new random request id (a UUID v4, lowercase).
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Whether `value` is a `traceparent` W3C Trace Context (level 1, section 3.2) lets a
/// participant pass on: `VERSION-TRACEID-PARENTID-FLAGS` in lowercase hex, the version not
/// `ff`, neither id all zeros. Version `00` is exactly 55 bytes; a later version may add
/// fields after a `-`, which are kept as long as they are lowercase hex and dashes (the spec
/// leaves their format open; this keeps them harmless).
pub fn is_valid_traceparent(value: &[u8]) -> bool {
    const LEN: usize = 55;
    if value.len() < LEN {
        return false;
    }
    let (head, rest) = value.split_at(LEN);
    let version = &head[0..2];
    let fields_ok = is_lower_hex(version)
        && version != b"ff"
        && head[2] == b'-'
        && is_lower_hex(&head[3..35])
        && !is_zeros(&head[3..35])
        && head[35] == b'-'
        && is_lower_hex(&head[36..52])
        && !is_zeros(&head[36..52])
        && head[52] == b'-'
        && is_lower_hex(&head[53..55]);
    if !fields_ok {
        return false;
    }
    if version == b"00" {
        return rest.is_empty();
    }
    rest.is_empty()
        || (rest[0] == b'-'
            && value.len() <= MAX_TRACEPARENT_BYTES
            && rest
                .iter()
                .all(|&b| b == b'-' || b.is_ascii_digit() || b.is_ascii_lowercase()))
}

/// Whether `value` is a `tracestate` that may be passed on: at most
/// [`MAX_TRACESTATE_BYTES`] bytes and [`MAX_TRACESTATE_MEMBERS`] list members, each member
/// `key=value` as W3C Trace Context (section 3.3) defines them (empty members are allowed).
pub fn is_valid_tracestate(value: &[u8]) -> bool {
    if value.len() > MAX_TRACESTATE_BYTES {
        return false;
    }
    let mut members = 0;
    for member in value.split(|&b| b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS || !is_tracestate_member(member) {
            return false;
        }
    }
    true
}

/// `key=value`: a key of lowercase letters, digits and `_-*/`, optionally `tenant@system`,
/// starting with a letter or digit, at most 256 bytes; a value of 1 to 256 printable ASCII
/// bytes other than `,` and `=`, not ending in a space.
fn is_tracestate_member(member: &[u8]) -> bool {
    let Some(eq) = member.iter().position(|&b| b == b'=') else {
        return false;
    };
    let (key, value) = (&member[..eq], &member[eq + 1..]);
    let key_char = |b: &u8| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
    };
    let key_ok = (1..=256).contains(&key.len())
        && (key[0].is_ascii_lowercase() || key[0].is_ascii_digit())
        && key.iter().filter(|&&b| b == b'@').count() <= 1
        && key.iter().all(|b| *b == b'@' || key_char(b))
        && key.last() != Some(&b'@');
    let value_ok = (1..=256).contains(&value.len())
        && value
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
        && value.last() != Some(&b' ');
    key_ok && value_ok
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_zeros(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == b'0')
}

/// Makes `headers` safe to log and pass on: a request id that is not valid is replaced by a
/// new one, and trace context that is not valid is removed. An invalid or repeated
/// `traceparent` takes `tracestate` with it (the state belongs to the parent it came with), so
/// that the next service starts a new trace; an invalid `tracestate` goes alone. Several
/// `tracestate` lines are joined into one, as W3C allows, before they are checked. Returns the
/// request id.
pub fn sanitize(headers: &mut HeaderMap) -> HeaderValue {
    let request_id = match headers.get(&REQUEST_ID) {
        Some(id)
            if is_valid_request_id(id.as_bytes())
                && headers.get_all(&REQUEST_ID).iter().count() == 1 =>
        {
            id.clone()
        }
        _ => {
            let id = new_request_id();
            headers.insert(REQUEST_ID, id.clone());
            id
        }
    };
    let mut parents = headers.get_all(&TRACEPARENT).iter();
    let parent_ok = match (parents.next(), parents.next()) {
        (Some(parent), None) => is_valid_traceparent(parent.as_bytes()),
        _ => false,
    };
    if !parent_ok {
        headers.remove(&TRACEPARENT);
        headers.remove(&TRACESTATE);
        return request_id;
    }
    let mut states = headers.get_all(&TRACESTATE).iter();
    let joined = match (states.next(), states.next()) {
        (None, _) => return request_id,
        (Some(_), None) => None,
        (Some(first), Some(second)) => {
            let mut joined = first.as_bytes().to_vec();
            for more in std::iter::once(second).chain(states) {
                joined.push(b',');
                joined.extend_from_slice(more.as_bytes());
                if joined.len() > MAX_TRACESTATE_BYTES {
                    break;
                }
            }
            Some(joined)
        }
    };
    match joined {
        Some(joined) => {
            headers.remove(&TRACESTATE);
            if is_valid_tracestate(&joined)
                && let Ok(value) = HeaderValue::from_bytes(&joined)
            {
                headers.insert(TRACESTATE, value);
            }
        }
        None => {
            let valid = headers
                .get(&TRACESTATE)
                .is_some_and(|state| is_valid_tracestate(state.as_bytes()));
            if !valid {
                headers.remove(&TRACESTATE);
            }
        }
    }
    request_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_of_safe_characters_are_kept() {
        for id in [
            "abc-123",
            "0af7651916cd43dd8448eb211c80319c",
            "01HZY3M6Q2V9J0K7T5R8W4X1B2",
            "trace:42.span_7-x",
            "550e8400-e29b-41d4-a716-446655440000",
        ] {
            assert!(is_valid_request_id(id.as_bytes()), "{id}");
        }
        assert!(is_valid_request_id(&[b'a'; MAX_REQUEST_ID_LEN]));
    }

    #[test]
    fn hostile_request_ids_are_refused() {
        for id in [
            "",
            "has space",
            "<script>alert(1)</script>",
            "\"quoted\"",
            "it's",
            "a;b",
            "a/b",
            "a\\b",
            "{json}",
            "%0d%0a",
            "ünïcode",
            "tab\there",
        ] {
            assert!(!is_valid_request_id(id.as_bytes()), "{id:?}");
        }
        assert!(!is_valid_request_id(&[b'a'; MAX_REQUEST_ID_LEN + 1]));
        assert!(!is_valid_request_id(&[0xff, 0xfe]));
        assert_eq!(new_request_id().len(), 36);
        assert!(is_valid_request_id(new_request_id().as_bytes()));
    }

    #[test]
    fn traceparents_of_the_w3c_spec_are_valid() {
        // The examples of W3C Trace Context level 1, section 3.2.4, and a later version with
        // an added field (section 4.3: parse the first four fields, keep the rest).
        for value in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-will-be-like",
        ] {
            assert!(is_valid_traceparent(value.as_bytes()), "{value}");
        }
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for value in [
            "",
            "00",
            // Version ff is forbidden; ids of all zeros are invalid.
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            // Uppercase hex, wrong lengths, wrong separators, non-hex.
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            "0A-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
            // Version 00 has nothing after the flags; a later version only after a dash.
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01extra",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-<script>",
            "<script>alert(1)</script>-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(!is_valid_traceparent(value.as_bytes()), "{value:?}");
        }
        let mut long = b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-".to_vec();
        long.resize(MAX_TRACEPARENT_BYTES, b'a');
        assert!(is_valid_traceparent(&long));
        long.push(b'a');
        assert!(!is_valid_traceparent(&long));
    }

    #[test]
    fn tracestates_are_bounded_and_well_formed() {
        // The examples of W3C Trace Context level 1, section 3.3.
        for value in [
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7",
            "fw529a3039@dt=ZmFsc2U",
            "congo=ucfJifl5GOE,rojo=00f067aa0ba902b7",
            // Optional whitespace and empty members are allowed.
            "rojo=1 , , congo=2",
            "",
        ] {
            assert!(is_valid_tracestate(value.as_bytes()), "{value:?}");
        }
        let members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(is_valid_tracestate(
            members(MAX_TRACESTATE_MEMBERS).as_bytes()
        ));
        assert!(!is_valid_tracestate(
            members(MAX_TRACESTATE_MEMBERS + 1).as_bytes()
        ));
        let big = format!("a={}", "x".repeat(250));
        let near = [big.as_str(), big.as_str()].join(",");
        assert!(near.len() <= MAX_TRACESTATE_BYTES && is_valid_tracestate(near.as_bytes()));
        let over = format!("{near},b=0123456789");
        assert!(over.len() > MAX_TRACESTATE_BYTES && !is_valid_tracestate(over.as_bytes()));
        for value in [
            "novalue",
            "=v",
            "Upper=v",
            "k=",
            "k=a,b",
            "k=v=w",
            "k=<script>\u{7f}",
            "a@b@c=v",
            "k@=v",
        ] {
            assert!(!is_valid_tracestate(value.as_bytes()), "{value:?}");
        }
    }

    fn headers(pairs: &[(HeaderName, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                name.clone(),
                HeaderValue::from_bytes(value).expect("header value"),
            );
        }
        map
    }

    const PARENT: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn sanitize_keeps_what_is_valid() {
        let mut map = headers(&[
            (REQUEST_ID, b"req-42"),
            (TRACEPARENT, PARENT),
            (TRACESTATE, b"rojo=1"),
        ]);
        assert_eq!(sanitize(&mut map), "req-42");
        assert_eq!(map[&REQUEST_ID], "req-42");
        assert_eq!(map[&TRACEPARENT], PARENT);
        assert_eq!(map[&TRACESTATE], "rojo=1");
    }

    #[test]
    fn sanitize_replaces_a_hostile_id_and_drops_bad_trace_context() {
        let mut map = headers(&[
            (REQUEST_ID, b"<script>"),
            (
                TRACEPARENT,
                b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
            ),
            (TRACESTATE, b"rojo=1"),
        ]);
        let id = sanitize(&mut map);
        assert!(is_valid_request_id(id.as_bytes()) && id != "<script>");
        assert_eq!(map[&REQUEST_ID], id);
        // An invalid parent takes its state with it: the next service starts a new trace.
        assert!(!map.contains_key(&TRACEPARENT) && !map.contains_key(&TRACESTATE));

        // A state without a parent means nothing.
        let mut map = headers(&[(TRACESTATE, b"rojo=1")]);
        sanitize(&mut map);
        assert!(!map.contains_key(&TRACESTATE));

        // Two parents: which one is meant is unknown.
        let mut map = headers(&[(TRACEPARENT, PARENT), (TRACEPARENT, PARENT)]);
        sanitize(&mut map);
        assert!(!map.contains_key(&TRACEPARENT));

        // Two ids: replaced.
        let mut map = headers(&[(REQUEST_ID, b"a"), (REQUEST_ID, b"b")]);
        let id = sanitize(&mut map);
        assert_eq!(map.get_all(&REQUEST_ID).iter().count(), 1);
        assert!(id != "a" && id != "b");
    }

    #[test]
    fn sanitize_drops_an_oversized_state_and_keeps_the_parent() {
        let many = (0..=MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let mut map = headers(&[(TRACEPARENT, PARENT), (TRACESTATE, many.as_bytes())]);
        sanitize(&mut map);
        assert_eq!(map[&TRACEPARENT], PARENT);
        assert!(!map.contains_key(&TRACESTATE));
    }

    #[test]
    fn sanitize_joins_state_lines_and_bounds_the_whole() {
        let mut map = headers(&[
            (TRACEPARENT, PARENT),
            (TRACESTATE, b"rojo=1"),
            (TRACESTATE, b"congo=2"),
        ]);
        sanitize(&mut map);
        assert_eq!(map[&TRACESTATE], "rojo=1,congo=2");
        assert_eq!(map.get_all(&TRACESTATE).iter().count(), 1);

        // 20 lines of 2 members each: 40 members in all, over the bound.
        let mut pairs = vec![(TRACEPARENT, PARENT)];
        pairs.extend(std::iter::repeat_n((TRACESTATE, b"a=1,b=2".as_slice()), 20));
        let mut map = headers(&pairs);
        sanitize(&mut map);
        assert!(!map.contains_key(&TRACESTATE));
        assert_eq!(map[&TRACEPARENT], PARENT);
    }
}
