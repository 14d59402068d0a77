//! Petra's configuration: any command line (arguments separated by NUL bytes, not necessarily
//! UTF-8) parses or gives a clap error, never a panic.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once(OsString::from("petra")).chain(
        data.split(|&b| b == 0)
            .map(|arg| OsString::from_vec(arg.to_vec())),
    );
    match petra::Cli::try_parse_from(args) {
        Ok(_) => {}
        Err(err) => {
            let _ = err.render().to_string();
        }
    }
});
