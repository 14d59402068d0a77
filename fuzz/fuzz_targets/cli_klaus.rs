//! Klaus's configuration: any command line (arguments separated by NUL bytes, not necessarily
//! UTF-8) parses or gives a clap error, never a panic; a parsed PETRA_URL then goes through
//! `parse_urls` as at startup.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once(OsString::from("klaus")).chain(
        data.split(|&b| b == 0)
            .map(|arg| OsString::from_vec(arg.to_vec())),
    );
    match klaus::Cli::try_parse_from(args) {
        Ok(cli) => {
            if let Some(raw) = cli.petra.petra_url.as_deref() {
                let _ = klaus::upstream::parse_urls(raw);
            }
        }
        Err(err) => {
            let _ = err.render().to_string();
        }
    }
});
