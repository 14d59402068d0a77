//! Petra's response body as Klaus reads it: Ok exactly when the body is at most
//! `MAX_BODY_BYTES` (64 KiB) of UTF-8, and then the text is the body unchanged.
//!
//! Input: a flag byte, then the body. With the flag's low bit set, the body is padded in front
//! with ASCII up to `MAX_BODY_BYTES - 128 + flag`, so that inputs land on both sides of the limit
//! without libFuzzer having to grow 64 KiB inputs.
#![no_main]

use klaus::upstream::{MAX_BODY_BYTES, PetraError, body_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flag, rest)) = data.split_first() else {
        return;
    };
    let body = if flag & 1 == 1 {
        let len = MAX_BODY_BYTES - 128 + usize::from(flag);
        let mut body = vec![b'a'; len.saturating_sub(rest.len())];
        body.extend_from_slice(rest);
        body
    } else {
        rest.to_vec()
    };
    let len = body.len();
    let utf8 = std::str::from_utf8(&body).is_ok();
    match body_text(body.clone()) {
        Ok(text) => {
            assert!(len <= MAX_BODY_BYTES, "Ok for {len} bytes");
            assert_eq!(text.as_bytes(), &body[..]);
        }
        Err(PetraError::TooLarge) => assert!(len > MAX_BODY_BYTES, "TooLarge for {len} bytes"),
        Err(PetraError::NotText) => {
            assert!(len <= MAX_BODY_BYTES, "NotText checked before the size");
            assert!(!utf8, "NotText for valid UTF-8");
        }
        Err(other) => panic!("unexpected error for a body: {other}"),
    }
});
